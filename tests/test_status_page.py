"""The status pages in headless Chromium after real work: the DOM shows what SQL says.

A real worker agent runs actions; a Worker API client driven by the test leases one task
and lets its lease expire, so one task has a history with a retry. Chromium loads each
page (`--dump-dom`), the test reads the rendered tables back, and a screenshot of each
page is kept under the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
import urllib.request
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import grpc
import pytest

from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.server.app import ServerApp
from tests.serving import running_worker, server_settings
from tests.test_metrics import start_execute
from tests.test_server_execution import put_action
from tests.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
EVIL = '<img src=x onerror="document.title=1">'
TOKEN = "s3cret-admin-token"


class Tables(HTMLParser):
    """Rows of every table with an id: {table id: [(row attributes, [cell texts])]}; and
    every element's tag, to check that no markup slipped through unescaped."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[tuple[dict, list[str]]]] = {}
        self.tags: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._row: tuple[dict, list[str]] | None = None
        self._cell: list[str] | None = None
        self._in_title = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "table" and "id" in attributes:
            self._table = attributes["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = (attributes, [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row[1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row[1]:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data

    def rows(self, table: str, attribute: str) -> dict[str, list[str]]:
        return {a[attribute]: cells for a, cells in self.tables[table] if attribute in a}


def chromium(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """Load `url` in headless Chromium; the DOM as rendered (or take a screenshot)."""
    assert Path(CHROMIUM).exists(), "the status page tests need Debian's chromium"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ]
    action = (
        [f"--screenshot={screenshot}", "--window-size=1400,1100", "--hide-scrollbars"]
        if screenshot
        else ["--dump-dom"]
    )
    done = subprocess.run(
        [CHROMIUM, *flags, *action, url], capture_output=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


async def load(url: str, profile: Path, shots: Path | None = None, name: str = "") -> Tables:
    page = Tables(await asyncio.to_thread(chromium, url, profile))
    if shots is not None:
        path = shots / f"{name}.png"
        await asyncio.to_thread(chromium, url, profile, screenshot=path)
        assert path.stat().st_size > 10_000
        print(f"status page screenshot: {path}")
    # Nothing a worker or client named became markup, and no script ran.
    assert "img" not in page.tags and "script" not in page.tags
    assert page.title.strip() != "1"
    return page


@pytest.fixture
async def server(database_url, tmp_path):
    settings = server_settings(
        tmp_path / "cas",
        metrics_address="127.0.0.1:0",
        lease_duration=timedelta(seconds=2),
        heartbeat_interval=timedelta(milliseconds=300),
    )

    async def only_our_token(token: str | None) -> bool:
        return token == TOKEN

    app = ServerApp(settings, database_url, status_access=only_our_token)
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


async def test_status_pages_show_what_sql_says(server, pool, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    profile = tmp_path / "chromium"
    base = f"http://127.0.0.1:{server.metrics_port}"

    async with running_worker(server, tmp_path / "work", name="builder-1", slots=3) as agent:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for word in ("one", "two"):
                digest = await put_action(server.store, ("echo", word))
                reader, _ = await start_execute(channel, digest)
                await asyncio.wait_for(reader, 60)
            # A client names a platform only a hostile-looking worker offers; that worker
            # leases the task once and vanishes, so the task is requeued and waits.
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.RegisterWorkerRequest(name=EVIL, max_concurrent_tasks=1)
            request.platform.properties.add(name="OSFamily", value=EVIL)
            flaky = (await stub.RegisterWorker(request)).worker_id
            parked = await put_action(server.store, ("sleep", "1"), platform=[("OSFamily", EVIL)])
            parked_reader, operation = await start_execute(channel, parked)
            leased = await stub.PollTasks(worker_pb2.PollTasksRequest(worker_id=flaky))
            assert len(leased.tasks) == 1
            parked_task = int(leased.tasks[0].task_id.removeprefix("task-"))

            async def requeued():
                return await pool.fetchval(
                    "SELECT state = 'queued' FROM tasks WHERE id = $1", parked_task
                )

            await wait_until(requeued, what="the flaky worker's lease to expire")

            # Without a token: the sign-in page, and nothing else.
            denied = await load(f"{base}/", profile)
            assert "queue" not in denied.tables and "workers" not in denied.tables

            # Sign in once with ?token=: the cookie carries it to the next pages.
            overview = await load(f"{base}/?token={TOKEN}", profile)
            assert "queue" in overview.tables
            overview = await load(f"{base}/", profile, shots, "overview")

            sql_counts = {
                (r["state"], r["n"])
                for r in await pool.fetch(
                    "SELECT state, count(*) AS n FROM tasks GROUP BY state ORDER BY state"
                )
            }
            assert sql_counts == {("completed", 2), ("queued", 1)}
            queue_rows = {
                (cells[2], int(cells[3])) for _attrs, cells in overview.tables["queue"][1:]
            }
            assert queue_rows == sql_counts
            assert any(EVIL in cells[1] for _a, cells in overview.tables["queue"][1:])

            workers = overview.rows("workers", "data-worker")
            sql_workers = await pool.fetch("SELECT id, name, max_concurrent FROM workers")
            assert set(workers) == {w["id"] for w in sql_workers}
            builder = workers[agent.worker_id]
            assert builder[0] == "builder-1" and builder[3] == "online"
            assert builder[4] == "0/3"
            assert builder[5].endswith("ago")
            assert workers[flaky][0] == EVIL  # shown as text

            tasks = overview.rows("tasks", "data-task")
            sql_tasks = await pool.fetch("SELECT id, state, attempts, max_attempts FROM tasks")
            assert {int(t) for t in tasks} == {t["id"] for t in sql_tasks}
            for row in sql_tasks:
                cells = tasks[str(row["id"])]
                assert cells[0] == f"task-{row['id']}" and cells[1] == row["state"]
                assert cells[5] == f"{row['attempts']}/{row['max_attempts']}"

            queued_only = await load(f"{base}/?state=queued", profile)
            assert set(queued_only.rows("tasks", "data-task")) == {str(parked_task)}

            # One task's whole history, reached by its operation name as well as its id.
            history = await load(f"{base}/tasks/task-{parked_task}", profile, shots, "task")
            by_operation = await load(f"{base}/tasks/{operation}", profile)
            events = [cells[2] for _a, cells in history.tables["events"][1:]]
            sql_events = [
                r["event"]
                for r in await pool.fetch(
                    "SELECT event FROM task_events WHERE task_id = $1 ORDER BY id", parked_task
                )
            ]
            assert events == sql_events
            assert events[:2] == ["queued", "leased"] and events[-1] == "requeued"
            assert [c[2] for _a, c in by_operation.tables["events"][1:]] == sql_events
            leased_row = history.tables["events"][2][1]
            assert flaky in leased_row[4] and EVIL in leased_row[4]  # where it ran
            reason_row = history.tables["events"][3][1]
            assert "reason=" in reason_row[5]  # why it was retried
            summary = dict((c[0], c[1]) for _a, c in history.tables["summary"])
            assert summary["attempts"] == "1 of 3"
            assert operation in summary["operations"]

            missing = await load(f"{base}/tasks/task-999999", profile)
            assert "events" not in missing.tables
            parked_reader.cancel()


def _status_of(url: str, token: str | None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def http_status(base: str, path: str, token: str | None) -> int:
    """The HTTP status of GET `base + path`, sending `token` as a Bearer header if any."""
    return await asyncio.to_thread(_status_of, base + path, token)


async def test_status_page_access_by_bearer_token(server):
    """Scripts send the token as a Bearer header; a wrong one is refused, /metrics is open."""
    base = f"http://127.0.0.1:{server.metrics_port}"
    assert await http_status(base, "/", TOKEN) == 200
    assert await http_status(base, "/", "wrong") == 403
    assert await http_status(base, "/", None) == 401
    assert await http_status(base, "/tasks/task-1", None) == 401
    assert await http_status(base, "/metrics", None) == 200


async def test_with_tokens_the_pages_and_task_rpcs_need_the_admin_scope(database_url, tmp_path):
    """`[auth] mode = "tokens"`: the real TokenVerifier decides; admin reads, a client
    token, a revoked one or none do not; `/metrics` stays open for Prometheus."""
    from expbuild.db import tokens as db_tokens
    from tests.secured import CLIENT_SCOPES, channel, make_token, secured_settings

    settings = secured_settings(tmp_path / "cas", metrics_address="127.0.0.1:0")
    app = ServerApp(settings, database_url)
    await app.start()
    try:
        admin = await make_token(app.pool, "ops", "admin")
        client = await make_token(app.pool, "ci", *CLIENT_SCOPES)
        revoked = await make_token(app.pool, "old-ops", "admin")
        await db_tokens.revoke_token(app.pool, "old-ops")
        base = f"http://127.0.0.1:{app.metrics_port}"
        assert await http_status(base, "/", admin) == 200
        assert await http_status(base, "/", client) == 403
        assert await http_status(base, "/", revoked) == 403
        assert await http_status(base, "/", None) == 401
        assert await http_status(base, "/metrics", None) == 200

        # The browser login: ?token= sets the cookie, and the cookie alone then reads.
        profile = tmp_path / "chromium"
        login = await load(f"{base}/?token={admin}", profile)
        assert "queue" in login.tables
        assert "queue" in (await load(f"{base}/", profile)).tables

        for token, allowed in ((admin, True), (client, False)):
            async with channel(app, token) as ch:
                stub = worker_pb2_grpc.WorkerAdminServiceStub(ch)
                if allowed:
                    await stub.ListTasks(worker_pb2.ListTasksRequest())
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.ListTasks(worker_pb2.ListTasksRequest())
                    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.GetTaskHistory(worker_pb2.GetTaskHistoryRequest(task="task-1"))
                    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await app.stop(grace=0.5)
