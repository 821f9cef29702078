"""Tasks are `task-<id>` outside the database (workers, logs); the id inside."""

from __future__ import annotations

from expbuild.errors import InvalidArgument
from expbuild.text import quoted


def task_name(task_id: int) -> str:
    return f"task-{task_id}"


def parse_task_name(text: str) -> int:
    """The task id of `task-42` (or `42`); InvalidArgument for anything else."""
    raw = text.removeprefix("task-")
    if not raw.isdigit() or not raw.isascii():
        raise InvalidArgument(f"task id {quoted(text)} is not a task id such as 'task-42'")
    return int(raw)
