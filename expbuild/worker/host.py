"""The `host` backend: run the action as a plain process on the worker's machine.

Each action runs under its own launcher (`expbuild.worker.launcher`), in its own session
and, where the worker may create cgroups, a cgroup of its own for the action's duration
(kept in a pool between actions, emptied and reset). No process survives its action:
on timeout, on cancellation and after the main process exits, the launcher kills the
command's process group and every orphan re-parented to it (it is a child subreaper,
so daemons that called setsid are caught too), and the cgroup is emptied with SIGKILL.
Output goes straight to files in the action directory, never through worker memory.

Environment: the process sees exactly the Command's environment variables, as REAPI
requires, with one practical exception: if the Command sets no `PATH`, `DEFAULT_PATH`
is used so that commands such as `["echo", "hi"]` work without one.
"""

from __future__ import annotations

import errno
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from expbuild.config import LimitsSettings
from expbuild.worker.action_user import ActionUser
from expbuild.worker.execution import ExecutionOutcome, ExecutionRequest
from expbuild.worker.supervisor import Command, Finished, Supervisor

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Shell conventions for "could not run": 127 not found, 126 found but not executable.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126


class HostExecutor:
    """Runs commands directly on the host, one launcher (and pooled cgroup) per action."""

    def __init__(
        self,
        *,
        terminate_grace: float = 1.0,
        limits: LimitsSettings | None = None,
        user: ActionUser | None = None,
        pool_key: str = "",
    ):
        # terminate_grace: how long the command gets between SIGTERM and SIGKILL.
        # pool_key: what names this worker's pooled cgroups (its work_dir).
        self.user = user
        self.supervisor = Supervisor(
            limits or LimitsSettings(),
            terminate_grace=terminate_grace,
            user=user,
            pool_key=pool_key,
        )

    async def close(self) -> None:
        await self.supervisor.close()

    def platform(self) -> dict[str, tuple[str, ...]]:
        return {}

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        environment = dict(request.environment)
        environment.setdefault("PATH", DEFAULT_PATH)
        if not request.arguments:
            return not_started(request, EXIT_NOT_FOUND, "the command has no arguments")
        program = request.arguments[0]
        executable = find_program(program, environment["PATH"], request.working_directory)
        if executable is None:
            return not_started(
                request,
                EXIT_NOT_FOUND,
                f"{program}: command not found (searched PATH={environment['PATH']})",
            )
        finished = await self.supervisor.run(
            Command(
                arguments=request.arguments,
                executable=executable,
                environment=environment,
                cwd=request.working_directory,
                stdout_path=request.stdout_path,
                stderr_path=request.stderr_path,
            ),
            name=request.name,
            timeout=request.timeout,
        )
        return outcome_of(finished, request, program, executable)


def outcome_of(
    finished: Finished, request: ExecutionRequest, program: str, executable: str
) -> ExecutionOutcome:
    """The outcome to report; a command that never ran gets the shell's 126/127."""
    error = finished.start_error
    if error is not None:
        if error.stage != "exec":
            raise RuntimeError(
                f"could not start the action ({error.stage}: {error.message}"
                + (f": {error.filename})" if error.filename else ")")
            )
        code = EXIT_NOT_FOUND if error.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
        reason = error.message
        if error.filename and error.filename != executable:
            reason = f"{reason}: {error.filename}"
        return not_started(request, code, f"{program}: cannot execute: {reason}", append=True)
    return finished_outcome(finished)


def finished_outcome(finished: Finished) -> ExecutionOutcome:
    """The outcome of a command the supervisor ran to its end."""
    return ExecutionOutcome(
        exit_code=finished.exit_code,
        timed_out=finished.timed_out,
        started_at=finished.started_at,
        completed_at=finished.completed_at,
        limit_exceeded=finished.limit_exceeded,
    )


def find_program(program: str, search_path: str, working_directory: Path) -> str | None:
    """The file to execute for `program`, or None when PATH has no such executable.

    A name with a slash is used as given: the child resolves it relative to the working
    directory after changing into it (so a script sees its `$0` unchanged) and the exec
    call reports what is wrong with it. A bare name is looked up on the Command's PATH,
    whose relative entries are relative to the working directory, as REAPI allows.
    """
    if "/" in program:
        return program
    for entry in search_path.split(os.pathsep):
        candidate = working_directory / entry / program  # an absolute entry replaces the base
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def not_started(
    request: ExecutionRequest, code: int, message: str, *, append: bool = False
) -> ExecutionOutcome:
    """An outcome for a command that never ran, with the reason in its stderr."""
    started_at = _now()
    # A few bytes to local files: not worth a thread hop.
    with open(request.stdout_path, "ab" if append else "wb"):  # noqa: ASYNC230
        pass
    with open(request.stderr_path, "ab" if append else "wb") as stderr:  # noqa: ASYNC230
        stderr.write(f"expbuild worker: {message}\n".encode())
    log.info("Command could not be started: %s", message)
    return ExecutionOutcome(
        exit_code=code, timed_out=False, started_at=started_at, completed_at=_now()
    )


def _now() -> datetime:
    return datetime.now(UTC)
