"""Run one command under the launcher, in its own cgroup when possible, within its limits.

The `host` and `sandbox` backends share this: they differ only in the command line
(sandbox: bwrap plus the action's command) and its working directory. Here:

- the action gets a cgroup from the pool (when the host allows cgroups) with its limits
  written and its counters reset, and gives it back emptied (see `expbuild.worker.cgroups`);
- a launcher (`launcher.py`) is started with the command, its environment, rlimits and
  the cgroup: normally forked by the Supervisor's zygote (a long-lived `launcher.py
  --zygote`, which saves a fresh interpreter's start per action), watched and signalled
  through a pidfd since it is not our child; when the zygote cannot take the action
  (message over ZYGOTE_MAX_MESSAGE, no pidfds, it failed twice) a fresh `python
  launcher.py` is exec'd as before, which stays the reference behaviour;
- on timeout or cancellation the launcher is asked to stop (SIGTERM), gets the grace
  period plus a margin, then is killed; the cgroup is emptied with SIGKILL in any case;
- the launcher's status (exit code or signal, CPU time, errors) and the cgroup's
  counters (OOM kills, failed forks) tell which limit, if any, ended the action.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from expbuild.config import LimitsSettings
from expbuild.worker import limits as limit_checks
from expbuild.worker.action_user import ActionUser
from expbuild.worker.cgroups import ActionCgroup, CgroupPool, CgroupSupport
from expbuild.worker.zygote import Zygote

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("launcher.py")
# Beyond its grace period, how long the launcher gets to kill and report before we kill it.
LAUNCHER_MARGIN = 5.0
# Larger zygote messages (long command lines or environments) take the exec path.
ZYGOTE_MAX_MESSAGE = 65536


@dataclass(frozen=True)
class Command:
    arguments: Sequence[str]
    executable: str  # what to exec: absolute, or relative to `cwd`
    environment: Mapping[str, str]
    cwd: Path
    stdout_path: Path
    stderr_path: Path


@dataclass(frozen=True)
class StartError:
    """The command never ran: `stage` is "exec" for a missing or unrunnable program."""

    stage: str
    errno: int | None
    message: str
    filename: str | None


@dataclass(frozen=True)
class Finished:
    exit_code: int  # 128 + N for death by signal N
    signal: int | None
    timed_out: bool
    cpu_seconds: float
    start_error: StartError | None
    started_at: datetime
    completed_at: datetime
    # Set when a limit ended the action (the status message).
    limit_exceeded: str | None = None
    # The most memory the action's cgroup held at once, when it had a memory cgroup.
    memory_peak: int | None = None


class Supervisor:
    """Starts commands under the launcher; one per backend, shared by concurrent actions."""

    def __init__(
        self,
        limits: LimitsSettings,
        *,
        terminate_grace: float = 1.0,
        user: ActionUser | None = None,
        pool_key: str = "",
    ):
        # pool_key: names this worker's pooled cgroups (its work_dir), so that a restart
        # removes the ones a crashed run left and no other worker's.
        self.limits = limits
        self.user = user  # None: commands run as the worker's own user
        self.terminate_grace = terminate_grace
        self.cgroups = CgroupSupport.detect() if limits.cgroups else None
        self.pool = (
            CgroupPool(
                self.cgroups,
                pool_key,
                memory=limits.memory,
                max_processes=limits.max_processes,
                cpus=limits.cpus,
            )
            if self.cgroups is not None
            else None
        )
        self.zygote = Zygote(LAUNCHER)
        if self.cgroups is not None:
            log.info("Actions run in their own cgroups (%s)", self.cgroups.describe())
        else:
            log.info("Actions run without cgroups: limits are rlimits only")
            if limits.max_processes is not None or limits.cpus is not None:
                log.warning(
                    "[worker.limits] max_processes and cpus need cgroups, which this worker "
                    "cannot create; they are not enforced"
                )

    async def close(self) -> None:
        """Let the zygote go and wait for it, remove the pooled cgroups; call once no
        action runs any more."""
        await self.zygote.close()
        if self.pool is not None:
            await self.pool.close()

    async def run(self, command: Command, *, name: str, timeout: float | None) -> Finished:
        """Run `command` to completion, timeout or cancellation (which propagates)."""
        group = self._acquire_cgroup(name)
        try:
            finished = await self._run(command, group, timeout)
            # Shells and bwrap report a child's death by signal N as exit code 128 + N;
            # such a code counts as that signal when looking for the limit hit.
            signum = finished.signal or limit_checks.death_signal(finished.exit_code)
            reason = self._limit_hit(finished, signum, group, command.stderr_path)
            peak = group.memory_peak() if group is not None else None
        finally:
            if group is not None:
                assert self.pool is not None
                # Shielded: a second cancellation must not leave processes or cgroups behind.
                await asyncio.shield(self.pool.release(group))
        return replace(finished, limit_exceeded=reason or None, memory_peak=peak)

    def _acquire_cgroup(self, name: str) -> ActionCgroup | None:
        if self.pool is None:
            return None
        try:
            group = self.pool.acquire()
        except OSError as exc:
            log.warning("Cannot create a cgroup for %s (%s); running without one", name, exc)
            return None
        log.debug("Action %s runs in cgroup %s", name, group.name)
        return group

    async def _run(
        self, command: Command, group: ActionCgroup | None, timeout: float | None
    ) -> Finished:
        enforcement = limit_checks.Enforcement(
            memory_by_cgroup=group is not None and group.memory is not None
        )
        status_read, status_write = os.pipe()
        spec = {
            "executable": command.executable,
            "cwd": str(command.cwd),
            "rlimits": limit_checks.rlimits(self.limits, enforcement),
            "cgroup_procs": group.procs_files if group is not None else [],
            "status_fd": status_write,
            "grace": self.terminate_grace,
            "parent": os.getpid(),
        }
        if self.user is not None:
            spec["user"] = (self.user.uid, self.user.gid)
        started_at = _now()
        try:
            try:
                # Creating two local files is quick; not worth a thread hop.
                stdout = open(command.stdout_path, "wb")  # noqa: ASYNC230, SIM115
                stderr = open(command.stderr_path, "wb")  # noqa: ASYNC230, SIM115
                with stdout, stderr:
                    launcher: _Launched | None = await self._start_in_zygote(
                        spec, command, stdout.fileno(), stderr.fileno(), status_write, group
                    )
                    if launcher is None:
                        launcher = await self._start_exec(
                            spec, command, stdout, stderr, status_write
                        )
            finally:
                os.close(status_write)  # only the launcher holds the write end now
            try:
                timed_out = False
                try:
                    await asyncio.wait_for(launcher.wait(), timeout)
                except TimeoutError:
                    timed_out = True
                    log.info("Command timed out after %gs; stopping it", timeout)
                    await self._stop(launcher, group)
                except asyncio.CancelledError:
                    log.info("Execution cancelled; stopping the command")
                    await asyncio.shield(self._stop(launcher, group))
                    raise
                status = _read_status(status_read)
                if not status:
                    code = await launcher.returncode()
            finally:
                launcher.close()
        finally:
            os.close(status_read)
        if not status:
            code = code if code is not None else -9
            if code >= 0:
                # Whether the command even ran is unknown: never report that as success.
                raise RuntimeError(
                    f"the action's launcher ended without a report (exit status {code})"
                )
            log.warning("The launcher was killed by signal %d before it could report", -code)
            status = {"signal": -code}
        signum = status.get("signal")
        error = status.get("error")
        return Finished(
            exit_code=128 + signum if signum is not None else int(status.get("exit_code", -1)),
            signal=signum,
            timed_out=timed_out,
            cpu_seconds=float(status.get("cpu_seconds", 0.0)),
            start_error=StartError(**error) if error else None,
            started_at=started_at,
            completed_at=_now(),
        )

    async def _start_exec(
        self, spec: dict, command: Command, stdout, stderr, status_write: int
    ) -> _Launched:
        """The reference path: a fresh `python launcher.py` for this action."""
        environment = [f"{k}={v}" for k, v in command.environment.items()]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(LAUNCHER),
            marshal.dumps(spec).hex(),
            str(len(environment)),
            *environment,
            *command.arguments,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env={},
            pass_fds=(status_write,),
            start_new_session=True,
        )
        return _ExecLaunched(process)

    async def _start_in_zygote(
        self,
        spec: dict,
        command: Command,
        stdout: int,
        stderr: int,
        status_write: int,
        group: ActionCgroup | None,
    ) -> _Launched | None:
        """A launcher forked by the zygote, or None when this action must take the exec path."""
        if not self.zygote.usable:
            return None
        environment = dict(command.environment)
        arguments = list(command.arguments)
        strings = [spec["executable"], spec["cwd"], *arguments, *environment, *environment.values()]
        if any("\0" in text for text in strings) or any("=" in name for name in environment):
            return None  # let the exec path fail (or not) exactly as it always has
        try:
            message = marshal.dumps((spec, environment, arguments))
        except ValueError:
            return None
        if len(message) > ZYGOTE_MAX_MESSAGE:
            return None
        # Shielded: once the zygote has forked, the launcher must be known to be stopped.
        start = asyncio.ensure_future(self.zygote.launch(message, (stdout, stderr, status_write)))
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            launched = await start
            if launched is not None:
                try:
                    await asyncio.shield(self._stop(launched, group))
                finally:
                    launched.close()
            raise

    async def _stop(self, launcher: _Launched, group: ActionCgroup | None) -> None:
        """SIGTERM to the launcher (it stops the tree); SIGKILL if it takes too long."""
        launcher.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(launcher.wait(), self.terminate_grace + LAUNCHER_MARGIN)
        except TimeoutError:
            log.warning("The launcher did not stop in time; killing it and its cgroup")
            launcher.send_signal(signal.SIGKILL)
            if group is not None:
                group.kill()
            await launcher.wait()

    def _limit_hit(
        self, finished: Finished, signum: int | None, group: ActionCgroup | None, stderr: Path
    ) -> str | None:
        limits = self.limits
        if finished.timed_out or finished.start_error is not None:
            return None
        if group is not None and group.oom_kills() > 0:
            return limit_checks.memory_exceeded(limits)
        reason = limit_checks.cpu_time_exceeded(
            limits, signum, finished.cpu_seconds, by_signal=finished.signal is not None
        )
        if reason:
            return reason
        if limits.max_output_size is not None and signum == limit_checks.SIGXFSZ:
            return limit_checks.file_size_exceeded(limits)
        if finished.exit_code != 0 and group is not None and group.process_limit_hits() > 0:
            return limit_checks.process_limit_exceeded(limits)
        if (
            finished.exit_code != 0
            and limits.memory is not None
            and (group is None or group.memory is None)
            and limit_checks.says_out_of_memory(stderr)
        ):
            return limit_checks.memory_exceeded(limits)
        return None


class _Launched(Protocol):
    """A running launcher, whichever way it was started (exec'd, or forked by the zygote)."""

    async def wait(self) -> None: ...

    def send_signal(self, signum: int) -> None: ...

    async def returncode(self) -> int | None:
        """As subprocess reports it (-N for signal N); None if unknown. After wait()."""
        ...

    def close(self) -> None: ...


class _ExecLaunched:
    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process

    async def wait(self) -> None:
        await self.process.wait()

    def send_signal(self, signum: int) -> None:
        try:
            self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    async def returncode(self) -> int | None:
        return self.process.returncode

    def close(self) -> None:
        pass  # asyncio owns the process's pipes and reaps it


def _read_status(fd: int) -> dict:
    """The launcher's one JSON report (written in one go, well under the pipe's size)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    try:
        # The launcher runs this same interpreter, so marshal's format matches.
        return marshal.loads(b"".join(chunks)) if chunks else {}
    except (ValueError, EOFError, TypeError):
        return {}


def _now() -> datetime:
    return datetime.now(UTC)
