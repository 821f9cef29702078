"""The execution backend interface: run one Command in a prepared directory.

A backend receives everything already on disk (input root materialized, output parent
directories created) and only runs the process. Cancelling the `execute` coroutine must
stop the action and everything it started before the cancellation propagates; the agent
relies on that when the server cancels a task or the worker shuts down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from expbuild.config import BackendSettings


@dataclass(frozen=True)
class ExecutionRequest:
    arguments: Sequence[str]
    # Exactly the Command's environment variables; backends add nothing but what they document.
    environment: Mapping[str, str]
    working_directory: Path  # absolute; inside the input root
    stdout_path: Path
    stderr_path: Path
    timeout: float | None  # seconds; None: no limit


@dataclass(frozen=True)
class ExecutionOutcome:
    # The process's exit status; death by signal N is reported as 128 + N, as shells do.
    exit_code: int
    timed_out: bool
    started_at: datetime
    completed_at: datetime


class Executor(Protocol):
    """An execution backend (`[worker.backend] type`)."""

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run the command to completion or until its timeout.

        A command that cannot be started (missing or non-executable program) is an
        ordinary failed outcome with a message in the stderr file, never an exception.
        """
        ...


def make_executor(settings: BackendSettings) -> Executor:
    if settings.type == "host":
        from expbuild.worker.host import HostExecutor

        return HostExecutor()
    raise ValueError(f"worker.backend.type = {settings.type!r} is not supported (use 'host')")
