"""What an execution backend is given and returns: run one Command in a prepared directory.

A backend receives everything already on disk (input root materialized, output parent
directories created) and only runs the process. Cancelling the `execute` coroutine must
stop the action and everything it started before the cancellation propagates; the agent
relies on that when the server cancels a task or the worker shuts down.

Backends (`[worker.backend] type`): `host` (a plain process tree, `expbuild.worker.host`),
`sandbox` (bubblewrap, `expbuild.worker.sandbox`), `docker` (a container per action,
`expbuild.worker.docker`). Each applies `[worker.limits]` its own way and reports a limit
it enforced in `ExecutionOutcome.limit_exceeded`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

from expbuild.worker.action_user import ActionUser


@dataclass(frozen=True)
class ExecutionRequest:
    arguments: Sequence[str]
    # Exactly the Command's environment variables; backends add nothing but what they document.
    environment: Mapping[str, str]
    working_directory: Path  # absolute; inside the input root
    stdout_path: Path
    stderr_path: Path
    timeout: float | None  # seconds; None: no limit
    # The materialized input root (what sandboxes mount); None: the working directory.
    input_root: Path | None = None
    # The action's platform properties (`container-image`, `network`, ...), name -> values.
    platform: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Names the action's container (docker), so that it can be found and killed; the
    # host and sandbox backends log it with the pooled cgroup the action runs in.
    name: str = ""

    @property
    def root(self) -> Path:
        return self.input_root or self.working_directory

    def property(self, name: str) -> str | None:
        """The (last) value of platform property `name`, or None."""
        values = self.platform.get(name)
        return values[-1] if values else None


@dataclass(frozen=True)
class ExecutionOutcome:
    # The process's exit status; death by signal N is reported as 128 + N, as shells do.
    exit_code: int
    timed_out: bool
    started_at: datetime
    completed_at: datetime
    # Set when a `[worker.limits]` limit stopped the action: which one, for the status
    # message (e.g. "action exceeded its memory limit of 256MiB").
    limit_exceeded: str | None = None


class Executor(Protocol):
    """An execution backend (`[worker.backend] type`)."""

    # Who actions run as; None: the worker's own user (`expbuild.worker.action_user`).
    user: ActionUser | None

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        """Run the command to completion or until its timeout.

        A command that cannot be started (missing or non-executable program) is an
        ordinary failed outcome with a message in the stderr file, never an exception.
        A problem of the backend itself (no container image, engine unreachable) raises
        an `ExpBuildError` whose status the runner reports.
        """
        ...

    def platform(self) -> dict[str, tuple[str, ...]]:
        """Platform properties this backend offers on top of the detected ones."""
        ...

    async def close(self) -> None:
        """Release what the backend keeps between actions (the launcher zygote); call it
        once no action runs any more. Nothing may be left for `__del__` to clean up."""
        ...
