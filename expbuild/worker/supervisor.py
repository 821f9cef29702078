"""Run one command under the launcher, in its own cgroup when possible, within its limits.

The `host` and `sandbox` backends share this: they differ only in the command line
(sandbox: bwrap plus the action's command) and its working directory. Here:

- the action's cgroup is created (when the host allows it) and its limits written;
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
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from expbuild.config import LimitsSettings
from expbuild.worker import limits as limit_checks
from expbuild.worker.cgroups import ActionCgroup, CgroupSupport

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


class Supervisor:
    """Starts commands under the launcher; one per backend, shared by concurrent actions."""

    def __init__(self, limits: LimitsSettings, *, terminate_grace: float = 1.0):
        self.limits = limits
        self.terminate_grace = terminate_grace
        self.cgroups = CgroupSupport.detect() if limits.cgroups else None
        self.zygote = Zygote()
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
        """Let the zygote go and wait for it; call once no action runs any more."""
        await self.zygote.close()

    async def run(self, command: Command, *, name: str, timeout: float | None) -> Finished:
        """Run `command` to completion, timeout or cancellation (which propagates)."""
        group = self._create_cgroup(name)
        try:
            finished = await self._run(command, group, timeout)
            # Shells and bwrap report a child's death by signal N as exit code 128 + N;
            # such a code counts as that signal when looking for the limit hit.
            signum = finished.signal or limit_checks.death_signal(finished.exit_code)
            reason = self._limit_hit(finished, signum, group, command.stderr_path)
        finally:
            if group is not None:
                # Shielded: a second cancellation must not leave processes or cgroups behind.
                await asyncio.shield(group.destroy())
        if reason:
            return replace(finished, limit_exceeded=reason)
        return finished

    def _create_cgroup(self, name: str) -> ActionCgroup | None:
        if self.cgroups is None:
            return None
        try:
            return self.cgroups.create(
                name or os.urandom(4).hex(),
                memory=self.limits.memory,
                max_processes=self.limits.max_processes,
                cpus=self.limits.cpus,
            )
        except OSError as exc:
            log.warning("Cannot create a cgroup for %s (%s); running without one", name, exc)
            return None

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
        reason = limit_checks.cpu_time_exceeded(limits, signum, finished.cpu_seconds)
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


class _Launched:
    """A running launcher, whichever way it was started."""

    async def wait(self) -> None:
        raise NotImplementedError

    def send_signal(self, signum: int) -> None:
        raise NotImplementedError

    async def returncode(self) -> int | None:
        """As subprocess reports it (-N for signal N); None if unknown. After wait()."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ExecLaunched(_Launched):
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


class _ZygoteLaunched(_Launched):
    """A launcher the zygote forked: not our child, so watched and signalled by pidfd."""

    def __init__(self, pid: int, pidfd: int, reply: socket.socket):
        self.pid = pid
        self.pidfd = pidfd
        self.reply = reply  # the zygote sends the exit code here once it reaped the launcher

    async def wait(self) -> None:
        await _readable(self.pidfd)  # a pidfd polls readable once its process has exited

    def send_signal(self, signum: int) -> None:
        if self.pidfd < 0:
            return
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    async def returncode(self) -> int | None:
        try:
            data = await asyncio.wait_for(_receive(self.reply, 64, 0), 5.0)
            return int(marshal.loads(data[0])) if data and data[0] else None
        except (TimeoutError, OSError, ValueError, EOFError, TypeError):
            return None

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.reply.close()


class Zygote:
    """One long-lived `launcher.py --zygote` per Supervisor, started on first use.

    Each action's launcher is then a fork of it rather than a new interpreter (tens of
    milliseconds saved per action). Anything unexpected makes `launch` return None, and
    the caller takes the exec path for that action; if the zygote cannot be started (or
    pidfds are unavailable), it is not tried again.
    """

    def __init__(self) -> None:
        self.usable = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self._retired: list[subprocess.Popen] = []  # zygotes let go, not reaped yet
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _ensure(self) -> socket.socket | None:
        with self._lock:
            if (
                self.process is not None
                and self.process.poll() is None
                and self.control is not None
            ):
                return self.control
            self._discard()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-S",
                        str(LAUNCHER),
                        "--zygote",
                        str(theirs.fileno()),
                        str(os.getpid()),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    env={},
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            except OSError as exc:
                log.warning(
                    "Cannot start the launcher zygote (%s); starting each launcher anew", exc
                )
                ours.close()
                self.usable = False
                return None
            finally:
                theirs.close()
            ours.setblocking(False)
            self.control = ours
            return ours

    def _discard(self) -> None:
        """Let the current zygote go: EOF on its socket makes it leave once idle.

        Never starts a thread or waits: it also runs from `__del__`, possibly during
        interpreter shutdown, where starting a thread blocks forever (Python 3.11).
        """
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.process is not None:
            self._retired.append(self.process)
            self.process = None
        # Reap those already gone, without blocking.
        self._retired = [p for p in self._retired if p.poll() is None]

    async def close(self, timeout: float = 10.0) -> None:
        """Stop using the zygote and wait (off the loop) until every one we started left."""
        with self._lock:
            self._discard()
            retired, self._retired = self._retired, []
        for process in retired:
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                log.warning("The launcher zygote %d did not leave; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)

    def __del__(self) -> None:
        # Closing the socket is enough for it to leave; no thread, no wait (see _discard).
        if self.control is not None:
            self.control.close()

    async def launch(self, message: bytes, fds: tuple[int, int, int]) -> _ZygoteLaunched | None:
        """Have the zygote fork a launcher with (stdout, stderr, status) as its descriptors."""
        for attempt in (1, 2):  # a dead zygote is restarted once
            control = self._ensure()
            if control is None:
                return None
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            try:
                try:
                    await _send(control, message, [*fds, theirs.fileno()])
                finally:
                    theirs.close()
                reply = await _receive(ours, 64, 1)
            except OSError as exc:
                reply = None
                log.debug("The launcher zygote did not take the action (%s)", exc)
            if reply and reply[0] and len(reply[1]) == 1:
                try:
                    return _ZygoteLaunched(int(marshal.loads(reply[0])), reply[1][0], ours)
                except (ValueError, EOFError, TypeError):
                    os.close(reply[1][0])
            elif reply:
                for fd in reply[1]:
                    os.close(fd)
            ours.close()
            with self._lock:
                alive = (
                    self.control is control
                    and self.process is not None
                    and self.process.poll() is None
                )
                if alive:
                    return None  # it refused this one (could not fork?): the exec path
                if self.control is control:
                    if attempt == 1:
                        log.warning("The launcher zygote is gone; starting another")
                    self._discard()
        return None


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def _send(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    while True:
        try:
            socket.send_fds(sock, [message], fds)
            return
        except BlockingIOError:
            await _writable(sock.fileno())


async def _receive(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]] | None:
    """One message and its descriptors; None at EOF."""
    while True:
        try:
            data, fds, _flags, _address = socket.recv_fds(sock, size, max_fds)
        except BlockingIOError:
            await _readable(sock.fileno())
            continue
        if not data and not fds:
            return None
        return data, fds


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
