"""The log of one action, for `ExecuteResponse.server_logs["worker.log"]`.

While a task runs, `capture()` makes an `ActionLog` current (a context variable, so it
follows the task into the asyncio tasks and threads it starts, and concurrent tasks never
see each other's lines). Two things land in it:

- every record ExpBuild's modules log at INFO or above during the task (the
  `ActionLogHandler` on the `expbuild` logger), when the process logs at INFO (the
  worker daemon's default; `--verbose` adds nothing here);
- lines the runner writes with `note()`: how the action is launched (backend, user,
  limits), the input cache's hits and fetches, each stage's duration, and how it ended.

A user then reads in the response why an action was slow or failed, without access to
the worker's own log.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

LOG_NAME = "worker.log"
# A runaway action must not make its log a large blob: lines past this are counted only.
MAX_LINES = 2000
MAX_LINE_CHARS = 2000


@dataclass
class ActionLog:
    task_id: str
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    dropped: int = 0
    # Input blobs found in the worker's cache / downloaded into it, for this action.
    cache_hits: int = 0
    cache_fetched_blobs: int = 0
    cache_fetched_bytes: int = 0

    def note(self, message: str, level: str = "INFO") -> None:
        if len(self.lines) >= MAX_LINES:
            self.dropped += 1
            return
        elapsed = time.monotonic() - self.started
        self.lines.append(f"+{elapsed:8.3f}s {level:<7} {message[:MAX_LINE_CHARS]}")

    def text(self) -> bytes:
        lines = list(self.lines)
        if self.dropped:
            lines.append(f"... {self.dropped} more line(s) not kept")
        return ("\n".join(lines) + "\n").encode()


_current: contextvars.ContextVar[ActionLog | None] = contextvars.ContextVar(
    "expbuild_action_log", default=None
)


def current() -> ActionLog | None:
    return _current.get()


def note(message: str, level: str = "INFO") -> None:
    """Add a line to the running action's log (nothing outside an action)."""
    log = _current.get()
    if log is not None:
        log.note(message, level)


def count_cache_hits(n: int) -> None:
    log = _current.get()
    if log is not None:
        log.cache_hits += n


def count_cache_fetch(size: int) -> None:
    log = _current.get()
    if log is not None:
        log.cache_fetched_blobs += 1
        log.cache_fetched_bytes += size


class ActionLogHandler(logging.Handler):
    """Copies records logged during an action into that action's log."""

    def emit(self, record: logging.LogRecord) -> None:
        log = _current.get()
        if log is None:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break the action
            message = str(record.msg)
        log.note(f"{record.name.removeprefix('expbuild.')}: {message}", record.levelname)


_handler = ActionLogHandler(level=logging.INFO)


@contextlib.contextmanager
def capture(task_id: str) -> Iterator[ActionLog]:
    """Collect the action's log lines while the block runs."""
    logger = logging.getLogger("expbuild")
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    action_log = ActionLog(task_id)
    token = _current.set(action_log)
    try:
        yield action_log
    finally:
        _current.reset(token)
