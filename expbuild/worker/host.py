"""The `host` backend: run the action as a plain process on the worker's machine.

Each action runs in its own session (and so its own process group), which lets the worker
stop the action together with everything it spawned: on timeout, on cancellation, and
after the main process exits (an action must not leave background processes behind).
Output goes straight to files in the action directory, never through worker memory.

Environment: the process sees exactly the Command's environment variables, as REAPI
requires, with one practical exception: if the Command sets no `PATH`, `DEFAULT_PATH`
is used so that commands such as `["echo", "hi"]` work without one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from expbuild.worker.executor import ExecutionOutcome, ExecutionRequest

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Shell conventions for "could not run": 127 not found, 126 found but not executable.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126


class HostExecutor:
    """Runs commands directly on the host, one process group per action."""

    def __init__(self, *, terminate_grace: float = 1.0):
        # How long the process group gets between SIGTERM and SIGKILL.
        self.terminate_grace = terminate_grace

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        environment = dict(request.environment)
        environment.setdefault("PATH", DEFAULT_PATH)
        started_at = _now()
        # Creating two local files is quick; not worth a thread hop.
        stdout = open(request.stdout_path, "wb")  # noqa: ASYNC230, SIM115
        stderr = open(request.stderr_path, "wb")  # noqa: ASYNC230, SIM115
        with stdout, stderr:
            if not request.arguments:
                return _not_started(
                    stderr, EXIT_NOT_FOUND, "the command has no arguments", started_at
                )
            program = request.arguments[0]
            executable = find_program(program, environment["PATH"], request.working_directory)
            if executable is None:
                return _not_started(
                    stderr,
                    EXIT_NOT_FOUND,
                    f"{program}: command not found (searched PATH={environment['PATH']})",
                    started_at,
                )
            try:
                process = await asyncio.create_subprocess_exec(
                    *request.arguments,
                    executable=executable,
                    cwd=request.working_directory,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
            except OSError as exc:
                code = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
                reason = exc.strerror or str(exc)
                if exc.filename and os.fsdecode(exc.filename) != str(executable):
                    reason = f"{reason}: {os.fsdecode(exc.filename)}"
                return _not_started(
                    stderr, code, f"{program}: cannot execute: {reason}", started_at
                )
        # The child holds its own copies of the descriptors; ours are closed above.
        timed_out = False
        try:
            await asyncio.wait_for(process.wait(), request.timeout)
        except TimeoutError:
            timed_out = True
            log.info(
                "Command timed out after %gs; stopping process group %d",
                request.timeout,
                process.pid,
            )
            await self._stop_group(process)
        except asyncio.CancelledError:
            log.info("Execution cancelled; stopping process group %d", process.pid)
            await self._stop_group(process)
            raise
        finally:
            # Whatever the action left running in its group goes now. The group id cannot
            # have been reused while any member lives, so this never hits a stranger.
            _signal_group(process.pid, signal.SIGKILL)
        return ExecutionOutcome(
            exit_code=exit_code(process.returncode),
            timed_out=timed_out,
            started_at=started_at,
            completed_at=_now(),
        )

    async def _stop_group(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the whole group, then SIGKILL it if the leader outlives the grace."""
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.terminate_grace)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()


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


def exit_code(returncode: int | None) -> int:
    """asyncio reports death by signal N as -N; report 128 + N like a shell does."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _not_started(stderr, code: int, message: str, started_at: datetime) -> ExecutionOutcome:
    stderr.write(f"expbuild worker: {message}\n".encode())
    log.info("Command could not be started: %s", message)
    return ExecutionOutcome(
        exit_code=code, timed_out=False, started_at=started_at, completed_at=_now()
    )


def _now() -> datetime:
    return datetime.now(UTC)
