"""The client side of the launcher zygote (`launcher.py --zygote`).

The zygote is a long-lived fork server: each action's launcher is forked from it
instead of starting a fresh interpreter. We talk to it over a SOCK_SEQPACKET socket
pair: one message per action (the marshalled spec plus the action's stdout, stderr and
status descriptors and a reply socket), answered with the launcher's pid and a pidfd.
A launcher forked this way is not our child, so it is watched and signalled by pidfd,
and the zygote reports its exit code on the reply socket once it reaped it.
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
from pathlib import Path

log = logging.getLogger(__name__)


class ZygoteLaunched:
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

    def __init__(self, launcher: Path) -> None:
        self.launcher = launcher
        self.usable = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self._retired: list[subprocess.Popen] = []  # zygotes let go, not reaped yet
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _running(self) -> socket.socket | None:
        """The control socket of a live zygote, else None. Call with the lock held."""
        if self.process is not None and self.process.poll() is None and self.control is not None:
            return self.control
        return None

    async def _control(self) -> socket.socket | None:
        """The live zygote's socket; starting one (a fork and exec) happens off the loop."""
        with self._lock:
            control = self._running()
        return control if control is not None else await asyncio.to_thread(self._ensure)

    def _ensure(self) -> socket.socket | None:
        with self._lock:
            if (control := self._running()) is not None:
                return control
            self._discard()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",
                        "-S",
                        str(self.launcher),
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

    async def launch(self, message: bytes, fds: tuple[int, int, int]) -> ZygoteLaunched | None:
        """Have the zygote fork a launcher with (stdout, stderr, status) as its descriptors."""
        for attempt in (1, 2):  # a dead zygote is restarted once
            control = await self._control()
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
                    return ZygoteLaunched(int(marshal.loads(reply[0])), reply[1][0], ours)
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
