"""The no-op load of issue #10, per component, for one or more versions of the code.

For each code tree given (`--code DIR`, and `--baseline REF` for a git revision of this
checkout, exported to a scratch directory), in the same run and against the same
PostgreSQL: a server replica and 2 worker daemons of 4 slots each start as real processes
from that tree; this process is the client. Every action is unique (its Command and Action
are uploaded, then executed with skip_cache_lookup), so none is a cache hit. Printed per
tree, side by side:

- actions/s with 8 clients, and the CPU each component spent per action over that phase
  (utime+stime from /proc of the server's, each worker's and PostgreSQL's process trees);
- p50/p99 at 1 client and where that time went (the task's events, the worker's
  ExecutedActionMetadata, the client's clock);
- cached replay through Execute at 1 client (actions/s, p50) and at 8 (actions/s: the
  server's own throughput, no worker involved);
- server CPU per FindMissingBlobs call (8 clients): about the least any RPC costs, to
  read the per-action figures against (a no-op action is ~5 RPCs);
- a 64 MiB ByteStream write and read (MB/s).

With `--server-processes N` (repeatable), each tree is measured once per N with
`expbuild server --processes N` (the server's CPU is then its whole process tree's).

The machine is shared and noisy: compare the columns of one run, not runs.

    .venv/bin/python bench/noop_load.py --baseline 783a216 --code .
    .venv/bin/python bench/noop_load.py --server-processes 1 --server-processes 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.queue_throughput import fresh_database  # noqa: E402
from expbuild.client.actions import build_action, build_command  # noqa: E402
from expbuild.client.cas import CasClient  # noqa: E402
from expbuild.client.channel import open_channel  # noqa: E402
from expbuild.client.execution import ExecutionClient  # noqa: E402
from expbuild.client.tree import serialize  # noqa: E402
from expbuild.digest import digest_of  # noqa: E402
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc  # noqa: E402
from expbuild.proto import remote_execution_pb2 as re_pb2  # noqa: E402
from tests.postgres import find_postgres, free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
WORKERS = 2
SLOTS = 4
CACHED_REPEATS = 10  # the serial phase's actions, replayed this many times by 8 clients
MiB = 1 << 20


# --- CPU from /proc -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
    return tree


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def process_cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` alone (not its children)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return sum(int(f) for f in stat[stat.rindex(")") + 2 :].split()[11:13]) / TICKS


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of `root` and every live descendant, plus what their reaped children used."""
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        stack.extend(tree.get(pid, []))
    return total / TICKS


# --- processes ------------------------------------------------------------------------------


@dataclass
class Deployment:
    label: str
    code: Path
    server: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    address: str = ""
    logs: Path | None = None
    worker_count: int = WORKERS
    # Where workers dial (a proxy's address, for bench/round_trips.py); empty: the server.
    worker_address: str = ""
    # Extra settings of every worker (e.g. `--limits`: each action gets memory, pids and
    # cpu cgroups, not just the tracking one).
    worker_settings: dict[str, str] = field(default_factory=dict)
    # `[server] processes`; None: the tree's default (older trees do not know the key).
    processes: int | None = None

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.code), **extra}

    def start(self, database_url: str, scratch: Path, address: str = "") -> None:
        self.address = address or f"127.0.0.1:{free_port()}"
        self.logs = scratch
        scratch.chmod(0o755)  # actions run as nobody, who must reach the work dirs inside
        common = {
            "EXPBUILD_DATABASE__URL": database_url,
            "EXPBUILD_SERVER__ADDRESS": self.address,
            "EXPBUILD_SERVER__METRICS_ADDRESS": "",
            "EXPBUILD_CAS__ROOT": str(scratch / "cas"),
            "EXPBUILD_EXECUTION__BACKEND": "scheduler",
        }
        server = dict(common)
        if self.processes is not None:
            server["EXPBUILD_SERVER__PROCESSES"] = str(self.processes)
        self.server = self._spawn("server", ["server"], server)
        for n in range(self.worker_count):
            worker_env = {
                "EXPBUILD_WORKER__SERVER_URL": f"http://{self.worker_address or self.address}",
                "EXPBUILD_WORKER__NAME": f"bench-{n}",
                "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": str(SLOTS),
                "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(scratch / f"work-{n}"),
                **self.worker_settings,
            }
            self.workers.append(self._spawn(f"worker-{n}", ["worker", "daemon"], worker_env))

    def _spawn(self, name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen:
        assert self.logs is not None
        with open(self.logs / f"{name}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "expbuild", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(extra),
                cwd=self.logs,
            )

    def log_tails(self, lines: int = 15) -> str:
        """The end of each process's log (the scratch directory is removed afterwards)."""
        assert self.logs is not None
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        for process in [*self.workers, self.server]:
            if process and process.poll() is None:
                process.terminate()
        for process in [*self.workers, self.server]:
            if process:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()


async def wait_for_workers(db: asyncpg.Connection, count: int, deployment: Deployment) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for process in [deployment.server, *deployment.workers]:
            if process is not None and process.poll() is not None:
                raise SystemExit(f"{deployment.label}: a process exited:\n{deployment.log_tails()}")
        with contextlib.suppress(asyncpg.UndefinedTableError):
            online = await db.fetchval("SELECT count(*) FROM workers WHERE state = 'online'")
            if online >= count:
                return
        await asyncio.sleep(0.2)
    raise SystemExit(f"{deployment.label}: workers never came online:\n{deployment.log_tails()}")


# --- the load -------------------------------------------------------------------------------


@dataclass
class Figures:
    rate_8: float = 0.0
    cpu_ms: dict[str, float] = field(default_factory=dict)
    p50_1: float = 0.0
    p99_1: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    cached_rate: float = 0.0
    cached_p50: float = 0.0
    cached_rate_8: float = 0.0
    cached_server_cores: float = 0.0
    transactions: float = 0.0
    write_mbs: float = 0.0
    read_mbs: float = 0.0
    rpc_cpu_ms: float = 0.0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class Load:
    def __init__(self, cas: CasClient, execution: ExecutionClient, tag: str):
        self.cas, self.execution, self.tag = cas, execution, tag
        self.root = serialize(re_pb2.Directory())
        self.serial = 0

    def next_action(self) -> tuple[dict, object]:
        self.serial += 1
        command = serialize(build_command(["true", f"{self.tag}-{self.serial}"]))
        action = serialize(build_action(digest_of(command), digest_of(self.root)))
        return {digest_of(command): command, digest_of(action): action}, digest_of(action)

    async def one(self, *, skip_cache: bool = True, digest=None) -> tuple[float, float, object]:
        """(latency, wall end time, response) of one unique action: upload, then Execute."""
        started = time.perf_counter()
        if digest is None:
            blobs, digest = self.next_action()
            await self.cas.upload(blobs)
        response = await self.execution.execute(digest, skip_cache_lookup=skip_cache)
        assert response.result.exit_code == 0, response
        return time.perf_counter() - started, time.time(), (digest, response)

    async def many(self, count: int, clients: int, **kwargs) -> tuple[list, float]:
        results: list = []
        gate = asyncio.Semaphore(clients)

        async def run(digest=None) -> None:
            async with gate:
                results.append(await self.one(digest=digest, **kwargs))

        digests = kwargs.pop("digests", None)
        started = time.perf_counter()
        if digests:
            await asyncio.gather(*(run(d) for d in digests))
        else:
            await asyncio.gather(*(run() for _ in range(count)))
        return results, time.perf_counter() - started


async def transactions(db: asyncpg.Connection) -> int:
    return await db.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    )


def _ts(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


async def stage_breakdown(db: asyncpg.Connection, results: list) -> dict[str, float]:
    """Median ms per stage of the serial actions, from the task's events and the worker's
    ExecutedActionMetadata (all clocks are this machine's)."""
    digests = [str(digest) for _, _, (digest, _) in results]
    rows = await db.fetch(
        """SELECT t.action_digest, e.event, extract(epoch FROM e.at)::float8 AS at
           FROM tasks t JOIN task_events e ON e.task_id = t.id
           WHERE t.action_digest = ANY($1::text[])""",
        digests,
    )
    events: dict[str, dict[str, float]] = {}
    for r in rows:
        events.setdefault(r["action_digest"], {})[r["event"]] = r["at"]
    stages: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        stages.setdefault(name, []).append(seconds * 1000)

    for latency, ended, (digest, response) in results:
        e = events.get(str(digest), {})
        m = response.result.execution_metadata
        if not {"queued", "leased", "completed"} <= e.keys():
            continue
        started = ended - latency
        add("upload + Execute → queued", e["queued"] - started)
        add("queued → leased", e["leased"] - e["queued"])
        add("leased → worker start", _ts(m.worker_start_timestamp) - e["leased"])
        add(
            "input fetch",
            _ts(m.input_fetch_completed_timestamp) - _ts(m.input_fetch_start_timestamp),
        )
        add("execution", _ts(m.execution_completed_timestamp) - _ts(m.execution_start_timestamp))
        add(
            "output upload",
            _ts(m.output_upload_completed_timestamp) - _ts(m.output_upload_start_timestamp),
        )
        add("worker, other", 0.0)  # filled below
        stages["worker, other"][-1] = (
            (_ts(m.worker_completed_timestamp) - _ts(m.worker_start_timestamp)) * 1000
            - stages["input fetch"][-1]
            - stages["execution"][-1]
            - stages["output upload"][-1]
        )
        add("worker done → completed", e["completed"] - _ts(m.worker_completed_timestamp))
        add("completed → client has it", ended - e["completed"])
    return {name: statistics.median(values) for name, values in stages.items()}


async def bytestream(target: str, size: int) -> tuple[float, float]:
    """MB/s of one `size`-byte ByteStream write and read, 1 MiB messages, no client checks."""
    data = os.urandom(size)
    digest = digest_of(data)
    options = [("grpc.max_receive_message_length", 8 * MiB)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = bytestream_pb2_grpc.ByteStreamStub(channel)
        name = f"uploads/bench-{time.time_ns()}/blobs/{digest.hash}/{digest.size_bytes}"

        async def requests():
            for offset in range(0, size, MiB):
                yield bytestream_pb2.WriteRequest(
                    resource_name=name if offset == 0 else "",
                    write_offset=offset,
                    data=data[offset : offset + MiB],
                    finish_write=offset + MiB >= size,
                )

        started = time.perf_counter()
        await stub.Write(requests())
        write = size / (time.perf_counter() - started) / 1e6
        started = time.perf_counter()
        got = 0
        async for reply in stub.Read(
            bytestream_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")
        ):
            got += len(reply.data)
        read = size / (time.perf_counter() - started) / 1e6
        assert got == size
    return write, read


async def measure(deployment: Deployment, admin_url: str, args) -> Figures:
    name = "expbuild_bench_noop_" + re.sub(r"\W", "_", deployment.label).strip("_")
    url = await fresh_database(admin_url, name)
    db = await asyncpg.connect(url)
    postmaster = await db.fetchval("SELECT pg_backend_pid()")
    postmaster = parent_pid(postmaster)
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="expbuild-bench-") as scratch:
        # Actions run as nobody, who must be able to enter the work directories.
        os.chmod(scratch, 0o755)
        deployment.start(url, Path(scratch))
        try:
            await wait_for_workers(db, WORKERS, deployment)
            async with open_channel(deployment.address) as channel:
                cas = await CasClient.connect(channel)
                load = Load(cas, ExecutionClient(channel), deployment.label)
                await cas.upload({digest_of(load.root): load.root})
                await load.many(args.warmup, args.clients)

                serial, _ = await load.many(args.serial, 1)
                latencies = [r[0] for r in serial]
                figures.p50_1 = statistics.median(latencies) * 1000
                figures.p99_1 = percentile(latencies, 0.99) * 1000
                figures.stages = await stage_breakdown(db, serial)

                pids = {"server": deployment.server.pid, "postgres": postmaster}
                pids.update({f"worker {n}": w.pid for n, w in enumerate(deployment.workers)})
                profilers = start_profilers(args.profile, deployment, pids)
                commits = await transactions(db)
                daemons = {f"worker {n} daemon": w.pid for n, w in enumerate(deployment.workers)}
                before = {k: tree_cpu_seconds(p) for k, p in pids.items()}
                before.update({k: process_cpu_seconds(p) for k, p in daemons.items()})
                done, wall = await load.many(args.actions, args.clients)
                after = {k: tree_cpu_seconds(p) for k, p in pids.items()}
                after.update({k: process_cpu_seconds(p) for k, p in daemons.items()})
                stop_profilers(profilers)
                await asyncio.sleep(1.5)  # backends report their counts within a second
                figures.transactions = (await transactions(db) - commits - 1) / len(done)
                figures.rate_8 = len(done) / wall
                figures.cpu_ms = {k: (after[k] - before[k]) * 1000 / len(done) for k in after}
                figures.cpu_ms["workers"] = sum(
                    figures.cpu_ms[f"worker {n}"] for n in range(WORKERS)
                )
                # The daemons' own Python process vs what they start (zygote, launchers,
                # the commands themselves).
                figures.cpu_ms["workers' daemons alone"] = sum(
                    figures.cpu_ms[f"worker {n} daemon"] for n in range(WORKERS)
                )

                digests = [r[2][0] for r in serial]
                await load.one(skip_cache=False, digest=digests[0])  # the first hit warms up
                hits, wall = await load.many(0, 1, skip_cache=False, digests=digests)
                figures.cached_rate = len(hits) / wall
                figures.cached_p50 = statistics.median(r[0] for r in hits) * 1000
                # The server alone (no worker): what more server processes can speed up.
                server_before = tree_cpu_seconds(deployment.server.pid)
                hits, wall = await load.many(
                    0, args.clients, skip_cache=False, digests=digests * CACHED_REPEATS
                )
                figures.cached_rate_8 = len(hits) / wall
                # Above 1.0 only with several processes: one Python process is one core.
                figures.cached_server_cores = (
                    tree_cpu_seconds(deployment.server.pid) - server_before
                ) / wall

                figures.rpc_cpu_ms = await server_cpu_per_call(cas, deployment, args.clients)
                figures.write_mbs, figures.read_mbs = await bytestream(deployment.address, 64 * MiB)
        finally:
            deployment.stop()
            await db.close()
            conn = await asyncpg.connect(admin_url)
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.close()
    return figures


async def server_cpu_per_call(cas: CasClient, deployment: Deployment, clients: int) -> float:
    """Server CPU (ms) per FindMissingBlobs of two present blobs, `clients` at a time: about
    the least one RPC costs (gRPC, the event loop, the servicer's wrapping; two stats)."""
    blobs = {digest_of(b"bench rpc %d" % n): b"bench rpc %d" % n for n in range(2)}
    await cas.upload(blobs)
    calls, gate = 2000, asyncio.Semaphore(clients)

    async def one() -> None:
        async with gate:
            assert not await cas.find_missing(list(blobs))

    before = tree_cpu_seconds(deployment.server.pid)
    await asyncio.gather(*(one() for _ in range(calls)))
    return (tree_cpu_seconds(deployment.server.pid) - before) * 1000 / calls


def start_profilers(folder: str | None, deployment: Deployment, pids: dict) -> list:
    """py-spy samples of the server and worker 0 over the throughput phase (collapsed
    stacks, one file each), when `--profile DIR` asks for them."""
    if not folder:
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    label = re.sub(r"\W", "_", deployment.label).strip("_")
    return [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(pids[name]),
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--subprocesses",  # the children of `expbuild server --processes N`
                "--output",
                str(Path(folder) / f"{label}-{name.replace(' ', '')}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in ("server", "worker 0")
    ]


def stop_profilers(profilers: list) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        profiler.wait(30)


def export_revision(revision: str) -> Path:
    """The tree of `revision` of this checkout, in a scratch directory kept between runs."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", revision],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    target = Path(tempfile.gettempdir()) / f"expbuild-bench-{commit}"
    if not (target / "expbuild").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def median_figures(runs: list[Figures]) -> Figures:
    """Figure by figure, the median of the rounds (the machine is shared: one round may
    meet another job's burst)."""

    def mid(values):
        return statistics.median(values)

    first = runs[0]
    return Figures(
        rate_8=mid([r.rate_8 for r in runs]),
        cpu_ms={k: mid([r.cpu_ms[k] for r in runs]) for k in first.cpu_ms},
        p50_1=mid([r.p50_1 for r in runs]),
        p99_1=mid([r.p99_1 for r in runs]),
        stages={k: mid([r.stages.get(k, float("nan")) for r in runs]) for k in first.stages},
        cached_rate=mid([r.cached_rate for r in runs]),
        cached_p50=mid([r.cached_p50 for r in runs]),
        cached_rate_8=mid([r.cached_rate_8 for r in runs]),
        cached_server_cores=mid([r.cached_server_cores for r in runs]),
        rpc_cpu_ms=mid([r.rpc_cpu_ms for r in runs]),
        transactions=mid([r.transactions for r in runs]),
        write_mbs=mid([r.write_mbs for r in runs]),
        read_mbs=mid([r.read_mbs for r in runs]),
    )


# Issue #10's table: its "today" (measured by whoever filed it, another method and hour,
# so not comparable with this run's columns) and its goal, by the row they belong to.
ISSUE = {
    "server": ("23.9", "≤ 5"),
    "workers": ("13.3", "≤ 5"),
    "postgres": ("7.2", "≤ 3"),
    "rate": ("~28", "≥ 100"),
    "p50": ("58 / 81", "≤ 10 / 30"),
    "cached": ("~104/s, 8.9", "≥ 300/s"),
    "bytestream": ("~114 / ~326", "≥ 250 / ≥ 650"),
}


def table(columns: dict[str, Figures], args) -> str:
    labels = ["issue's today", "goal", *columns]
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, fmt, get, issue: str = "") -> None:
        today, goal = ISSUE.get(issue, ("", ""))
        rows.append((name, [today, goal, *(fmt(get(figures)) for figures in columns.values())]))

    components = [
        "server",
        "workers",
        *(f"worker {n}" for n in range(WORKERS)),
        "workers' daemons alone",
        "postgres",
    ]
    for component in components:
        row(
            f"{component} CPU per no-op action (ms)",
            "{:.1f}".format,
            lambda f, c=component: f.cpu_ms.get(c, float("nan")),
            component,
        )
    row(
        "PostgreSQL transactions per no-op action (polls, heartbeats included)",
        "{:.1f}".format,
        lambda f: f.transactions,
    )
    row(
        f"no-op actions/s, {args.clients} clients, {WORKERS} workers × {SLOTS}",
        "{:.1f}".format,
        lambda f: f.rate_8,
        "rate",
    )
    row(
        "no-op p50 / p99 at 1 client (ms)",
        lambda v: f"{v[0]:.1f} / {v[1]:.1f}",
        lambda f: (f.p50_1, f.p99_1),
        "p50",
    )
    for stage in next(iter(columns.values())).stages:
        row(
            f"  {stage} (p50 ms)", "{:.1f}".format, lambda f, s=stage: f.stages.get(s, float("nan"))
        )
    row(
        "cached replay through Execute, 1 client (/s, p50 ms)",
        lambda v: f"{v[0]:.0f}/s, {v[1]:.1f}",
        lambda f: (f.cached_rate, f.cached_p50),
        "cached",
    )
    row(
        f"cached replay through Execute, {args.clients} clients (/s)",
        "{:.0f}".format,
        lambda f: f.cached_rate_8,
    )
    row(
        "  the server's CPU over it (cores busy)",
        "{:.2f}".format,
        lambda f: f.cached_server_cores,
    )
    row(
        "server CPU per FindMissingBlobs call, the least an RPC costs (ms)",
        "{:.2f}".format,
        lambda f: f.rpc_cpu_ms,
    )
    row(
        "ByteStream 64 MiB write / read (MB/s)",
        lambda v: f"{v[0]:.0f} / {v[1]:.0f}",
        lambda f: (f.write_mbs, f.read_mbs),
        "bytestream",
    )
    width = max(len(name) for name, _ in rows) + 2
    cells = [
        max(len(label), *(len(values[i]) for _, values in rows)) + 2
        for i, label in enumerate(labels)
    ]
    lines = [
        "figure".ljust(width)
        + "".join(label.rjust(w) for label, w in zip(labels, cells, strict=True))
    ]
    for name, values in rows:
        lines.append(
            name.ljust(width) + "".join(v.rjust(w) for v, w in zip(values, cells, strict=True))
        )
    return "\n".join(lines)


# `--limits`: what a production worker would set, so that every action has a memory,
# a pids and a cpu cgroup (four cgroups on a v1 host with a v2 tracking hierarchy).
LIMITS = {
    "EXPBUILD_WORKER__LIMITS__MEMORY": "1GiB",
    "EXPBUILD_WORKER__LIMITS__MAX_PROCESSES": "1000",
    "EXPBUILD_WORKER__LIMITS__CPUS": "2",
}


def planned(args) -> list[Deployment]:
    deployments = []
    settings = LIMITS if args.limits else {}
    if args.baseline:
        deployments.append(
            Deployment(
                f"today ({args.baseline})", export_revision(args.baseline), worker_settings=settings
            )
        )
    for code in args.code or ["."]:
        path = Path(code).resolve()
        label = "new" if path == ROOT else path.name
        if not args.server_processes:
            deployments.append(Deployment(label, path, worker_settings=settings))
        for count in args.server_processes:
            deployments.append(
                Deployment(
                    f"{label}, {count} proc.", path, processes=count, worker_settings=settings
                )
            )
    return deployments


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="git revision measured as 'today'")
    parser.add_argument(
        "--code", action="append", default=[], metavar="DIR", help="a tree to measure"
    )
    parser.add_argument("--actions", type=int, default=300, help="actions of the throughput phase")
    parser.add_argument("--serial", type=int, default=100, help="actions of the 1-client phase")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--server-processes",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="run the server tree(s) with `--processes N`; repeat to compare (e.g. 1 and 2)",
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the server and a worker into DIR")
    parser.add_argument(
        "--limits", action="store_true", help="workers with memory, process and CPU limits"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; each figure is their median"
    )
    args = parser.parse_args()
    deployments = planned(args)

    runs: dict[str, list[Figures]] = {d.label: [] for d in deployments}
    with find_postgres() as (source, admin_url):
        for round_ in range(args.rounds):
            for deployment in deployments:
                print(
                    f"round {round_ + 1}/{args.rounds}: measuring {deployment.label} "
                    f"from {deployment.code} ...",
                    file=sys.stderr,
                )
                deployment.workers = []
                runs[deployment.label].append(await measure(deployment, admin_url, args))
    columns = {label: median_figures(figures) for label, figures in runs.items()}
    print(
        f"No-op load (PostgreSQL from {source}; {os.cpu_count()} cores shared with other work; "
        f"each figure the median of {args.rounds} interleaved round(s); compare columns of "
        "this run, not runs):"
    )
    print(table(columns, args))


if __name__ == "__main__":
    asyncio.run(main())
