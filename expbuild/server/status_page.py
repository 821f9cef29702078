"""The status pages: queue, workers, recent tasks, and one task's whole history.

Plain server-rendered HTML (Jinja2 with autoescaping on: every value from the database is
escaped), read-only, no scripts. Routes: `/` (overview; `?state=` filters the recent
tasks) and `/tasks/{task}` (a task id such as `task-42`, or an operation name).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import jinja2
from aiohttp import web

from expbuild.db import tasks, workers
from expbuild.errors import ExpBuildError, InvalidArgument, NotFound
from expbuild.reapi.platforms import platform_text

POOL = web.AppKey("pool", asyncpg.Pool)
FINISHED_WINDOW = timedelta(hours=1)
RECENT_TASKS = 50

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def platform_cell(platform: dict[str, list[str]]) -> str:
    """A platform in a table cell; "(any)" where the action asks for nothing."""
    return platform_text(platform) or "(any)"


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return ""
    return seconds_text((now - moment).total_seconds()) + " ago"


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def between(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


_templates.globals.update(
    platform_cell=platform_cell,
    ago=ago,
    seconds_text=seconds_text,
    between=between,
    when=when,
)


def _page(name: str, status: int = 200, **values) -> web.Response:
    html = _templates.get_template(name).render(now=datetime.now(UTC), **values)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def login_required(request: web.Request, presented: bool) -> web.Response:
    return _page("login.html", status=401 if not presented else 403, presented=presented)


async def overview(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    state = request.query.get("state") or None
    try:
        recent = await tasks.list_tasks(pool, state=state, limit=RECENT_TASKS)
    except InvalidArgument as exc:
        return _page("error.html", status=400, message=str(exc))
    counts = await tasks.state_counts(pool, FINISHED_WINDOW)
    fleet = await workers.list_workers(pool, include_offline=True)
    totals = {s: sum(c.tasks for c in counts if c.state == s) for s in tasks.TASK_STATES}
    return _page(
        "overview.html",
        counts=counts,
        totals=totals,
        states=tasks.TASK_STATES,
        workers=fleet,
        recent=recent,
        state_filter=state,
        finished_window=seconds_text(FINISHED_WINDOW.total_seconds()),
    )


async def task_page(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    try:
        task_id = await tasks.resolve_task(pool, request.match_info["task"])
        history = await tasks.task_history(pool, task_id)
    except NotFound as exc:
        return _page("error.html", status=404, message=str(exc))
    except ExpBuildError as exc:
        return _page("error.html", status=400, message=str(exc))
    return _page("task.html", history=history, task=history.summary)


async def find_task(request: web.Request) -> web.Response:
    """The overview's lookup form: go to the task page of what was typed."""
    wanted = request.query.get("task", "").strip()
    if not wanted:
        raise web.HTTPSeeOther("/")
    raise web.HTTPSeeOther(str(request.app.router["task"].url_for(task=wanted)))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", overview)
    router.add_get("/find", find_task)
    router.add_get("/tasks/{task}", task_page, name="task")
