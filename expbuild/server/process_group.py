"""`expbuild server --processes N`: N replica processes on one host, sharing its ports.

Replicas keep no state of their own, so a host with several cores runs several of them.
The parent (`ProcessGroup`) does no gRPC work; it

- holds `[server] address` (and `worker_address`) so that only its children can listen
  beside it (`expbuild.server.shared_port`), each child with SO_REUSEPORT: the kernel
  spreads incoming connections over them;
- starts child 0 alone first (it migrates the database; a bad configuration or an
  unreachable database then ends the start with that child's one error line), then the
  others; child 0 is also the housekeeper (reaper, queue gauges, CAS size and eviction);
- restarts a child that dies, after a delay that doubles while it keeps dying (0.5 s up to
  30 s), and gives up (exit 1) when one fails to start `MAX_START_FAILURES` times in a row;
- serves `[server] metrics_address` once for all: the children write their metrics to
  files in a private directory (prometheus-client's multiprocess mode) that the parent
  aggregates, and the status pages, from a pool of its own;
- forwards SIGTERM/SIGINT to every child, waits for them to drain, and exits 0.

A child runs `expbuild server --child-of PARENT:INDEX:FD`, an internal option: it dies with
its parent (PR_SET_PDEATHSIG), and writes a line to FD once it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry, multiprocess

from expbuild.auth.verifier import TokenVerifier
from expbuild.config import Settings, parse_address
from expbuild.db.pool import create_pool
from expbuild.server import http
from expbuild.server.shared_port import hold_port

log = logging.getLogger(__name__)

MAX_START_FAILURES = 5
FIRST_RESTART_DELAY = 0.5
LAST_RESTART_DELAY = 30.0
# A child that served this long before dying starts again at the first delay.
STABLE_SECONDS = 60.0
# How long children may drain after SIGTERM before they are killed.
STOP_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """CPUs this process may run on: its affinity, bounded by its cgroup's CPU quota (a
    container limited to 2 CPUs on a 64-core host gets 2)."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """The smallest `cpu.max` quota (in CPUs) of this process's cgroup v2 and its parents."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:
        return None
    root = Path("/sys/fs/cgroup")
    folder, smallest = root / own.lstrip("/"), None
    while True:
        with contextlib.suppress(OSError, ValueError):
            quota, period = (folder / "cpu.max").read_text().split()
            if quota != "max":
                cpus = int(quota) / int(period)
                smallest = cpus if smallest is None else min(smallest, cpus)
        if folder == root or root not in folder.parents:
            return smallest
        folder = folder.parent


@dataclass(frozen=True)
class ChildRole:
    """What a child is told on its command line: `PARENT_PID:INDEX:READY_FD`."""

    parent_pid: int
    index: int
    ready_fd: int

    @classmethod
    def parse(cls, text: str) -> ChildRole:
        parent, index, fd = (int(part) for part in text.split(":"))
        return cls(parent, index, fd)

    def __str__(self) -> str:
        return f"{self.parent_pid}:{self.index}:{self.ready_fd}"

    def die_with_parent(self) -> None:
        """SIGKILL this process when the parent dies, even by kill -9: an orphan would keep
        serving the port with nobody to stop it."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent_pid:  # it died before prctl took effect
            raise SystemExit(1)

    def report_ready(self) -> None:
        with os.fdopen(self.ready_fd, "wb") as pipe:
            pipe.write(b"ready\n")


class ChildFailed(Exception):
    """A child kept failing to start; the message says which and how."""


@dataclass
class ProcessGroup:
    settings: Settings
    database_url: str
    count: int
    # How to run `expbuild server` (with its --config and --verbose); `--child-of` is added.
    command: list[str]
    children: dict[int, asyncio.subprocess.Process] = field(default_factory=dict)
    metrics_port: int | None = None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0) or until a child cannot start (its exit code when
        child 0 fails at its first start, having said why; ChildFailed later)."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        with contextlib.ExitStack() as stack:
            s = self.settings.server
            self.ports = [hold_port(s.address, "server.address")]
            stack.callback(self.ports[0].close)
            if s.worker_address:
                self.ports.append(hold_port(s.worker_address, "server.worker_address"))
                stack.callback(self.ports[1].close)
            self.metrics_dir = tempfile.mkdtemp(prefix="expbuild-metrics-")
            stack.callback(shutil.rmtree, self.metrics_dir, True)
            async with contextlib.AsyncExitStack() as operators:
                await self._serve_operators(operators)
                return await self._supervise()

    def request_stop(self) -> None:
        if self._stop.is_set():
            return
        log.info("Stopping %d server processes", len(self.children))
        self._stop.set()
        for child in self.children.values():
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)

    async def _serve_operators(self, stack: contextlib.AsyncExitStack) -> None:
        """The metrics endpoint and status pages, served here once for every child."""
        s, database = self.settings.server, self.settings.database
        if not s.metrics_address:
            return
        pool: asyncpg.Pool = await create_pool(
            self.database_url, 1, 2, wait=database.connect_wait.total_seconds()
        )
        stack.push_async_callback(pool.close)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.metrics_dir)
        verifier = TokenVerifier(pool, self.settings.auth.cache_ttl.total_seconds())
        host, port = parse_address(s.metrics_address, "server.metrics_address")
        runner, self.metrics_port = await http.start(
            pool, host, port, http.status_access(self.settings.auth.mode, verifier), registry
        )
        stack.push_async_callback(runner.cleanup)

    async def _supervise(self) -> int:
        self._served = {index: asyncio.Event() for index in range(self.count)}
        slots = {0: asyncio.create_task(self._keep_running(0), name="server-process-0")}
        started = asyncio.create_task(self._served[0].wait())
        await asyncio.wait([started, slots[0]], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if slots[0].done():  # child 0 could not start (and said why), or a signal came
            return slots[0].result()
        for index in range(1, self.count):
            slots[index] = asyncio.create_task(
                self._keep_running(index), name=f"server-process-{index}"
            )
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait([stopping, *slots.values()], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        self.request_stop()  # a slot that gave up ends the others too
        done, pending = await asyncio.wait(slots.values(), timeout=STOP_TIMEOUT)
        for child in self.children.values():
            if child.returncode is None:
                log.warning("Server process (pid %d) still running; killing it", child.pid)
                child.kill()
        await asyncio.gather(*pending, return_exceptions=True)
        for slot in done:
            if slot.exception() is not None:
                raise slot.exception()  # type: ignore[misc]
        return 0

    async def _keep_running(self, index: int) -> int:
        """Run child `index`, again and again until stopped (0). Returns the exit code of
        child 0 when its very first start fails; raises ChildFailed when a child fails to
        start MAX_START_FAILURES times in a row."""
        loop = asyncio.get_running_loop()
        failures, delay = 0, FIRST_RESTART_DELAY
        while True:
            child, ready = await self._start_child(index)
            started = loop.time()
            served = await ready
            if served:
                failures = 0
                self._report_served(index)
            code = await child.wait()
            multiprocess.mark_process_dead(child.pid, self.metrics_dir)
            if self._stop.is_set():
                return 0
            if not served:
                if not self._served[0].is_set():
                    return code or 1
                failures += 1
                if failures >= MAX_START_FAILURES:
                    raise ChildFailed(
                        f"server process {index} failed to start {failures} times in a row "
                        f"(last: {_exit_reason(code)}); see its log above"
                    )
            if loop.time() - started > STABLE_SECONDS:
                delay = FIRST_RESTART_DELAY
            log.error(
                "Server process %d (pid %d) %s; restarting it in %.1f s",
                index,
                child.pid,
                _exit_reason(code),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
                return 0
            delay = min(delay * 2, LAST_RESTART_DELAY)

    def _report_served(self, index: int) -> None:
        if self._served[index].is_set():
            log.info("Server process %d serves again", index)
            return
        self._served[index].set()
        if all(event.is_set() for event in self._served.values()):
            ports = ", ".join(port.address for port in self.ports)
            log.info("%d server processes serving %s", self.count, ports)

    async def _start_child(
        self, index: int
    ) -> tuple[asyncio.subprocess.Process, asyncio.Task[bool]]:
        """Spawn child `index`; the task says whether it reported serving (False: it exited
        first)."""
        read_end, write_end = os.pipe()
        try:
            role = ChildRole(os.getpid(), index, write_end)
            child = await asyncio.create_subprocess_exec(
                *self.command,
                "--child-of",
                str(role),
                env=self._child_environment(),
                pass_fds=(write_end,),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)  # the child's copy is the only one: EOF when it exits
        self.children[index] = child
        if self._stop.is_set():  # a signal arrived while it was being spawned
            child.send_signal(signal.SIGTERM)
        return child, asyncio.create_task(_reports_ready(read_end))

    def _child_environment(self) -> dict[str, str]:
        s = self.settings.server
        env = {
            **os.environ,
            "EXPBUILD_DATABASE__URL": self.database_url,
            "EXPBUILD_SERVER__ADDRESS": self.ports[0].address,
            "EXPBUILD_SERVER__METRICS_ADDRESS": "",  # the parent serves it
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
        }
        if s.worker_address:
            env["EXPBUILD_SERVER__WORKER_ADDRESS"] = self.ports[1].address
        return env


async def _reports_ready(read_end: int) -> bool:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0)
    )
    try:
        return await reader.readline() == b"ready\n"
    finally:
        transport.close()


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def child_command(config: str | None, verbose: bool) -> list[str]:
    """`expbuild server` as this interpreter runs it, with the parent's --config/--verbose."""
    command = [sys.executable, "-m", "expbuild", "server"]
    if config:
        command += ["--config", config]
    if verbose:
        command.append("--verbose")
    return command
