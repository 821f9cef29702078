"""Conformance: real Bazel (Debian's bazel-bootstrap, 4.2.3) against a real ExpBuild.

A module-scoped fixture starts an `expbuild server` process (fresh database cloned from the
migrated template, its own CAS directory, a free loopback port) and one `expbuild worker
daemon` process. Bazel then builds `tests/bazel/workspace` (copied to a temporary folder)
in two modes:

- `remote_executor`: `--remote_executor=grpc://...`, every action runs on the worker;
- `remote_cache`: `--remote_cache=grpc://...` only, actions run locally and are uploaded.

In each mode: a first build, `bazel clean`, a second build that must be served entirely from
the remote cache; the outputs of both builds are checked, and a deliberately failing action
is built on its own. Each mode runs again building without the bytes: `+toplevel`
(--remote_download_toplevel: intermediate outputs must not reach bazel-bin) and `+minimal`
(--remote_download_minimal: no output does; every CAS blob is then aged, the second build's
cache hits refresh what they name, an eviction pass bounded to one byte removes the rest,
and a build after `bazel clean` that downloads the top-level outputs must be all cache hits). `test_local_build_offline` builds the workspace without any remote, to
tell a broken harness from a server problem. Wall times are printed in the terminal summary.

Bazel is looked up as `$EXPBUILD_TEST_BAZEL` or `bazel` on PATH. Without it the tests are
skipped, except under CI=true, where they fail (install Debian's `bazel-bootstrap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expbuild.cas.eviction import EvictionReport, evict_to_size
from expbuild.cas.store import FileStore
from tests import figures
from tests.conftest import create_from_template, drop_database
from tests.postgres import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

BAZEL_DIR = Path(__file__).parent / "bazel"
WORKSPACE = BAZEL_DIR / "workspace"
# Stand-ins for the repositories that sh_binary/sh_test make Bazel 4.2.3 fetch.
STAND_INS = ("rules_cc", "rules_java", "remote_coverage_tools")
# Commands that load packages, and so take --override_repository.
LOADING_COMMANDS = {"build", "test", "run", "info", "query", "cquery", "aquery", "fetch"}
# Each remote mode also builds without the bytes: `+minimal` downloads no output,
# `+toplevel` only those of the requested targets (--remote_download_minimal / _toplevel).
MODES = (
    "remote_executor",
    "remote_cache",
    "remote_executor+minimal",
    "remote_cache+minimal",
    "remote_executor+toplevel",
    "remote_cache+toplevel",
)
TEST_VAR = "expbuild conformance value: 42"
FAILURE_LINE = "expbuild-conformance: deliberate failure"
PARALLEL = 24
JOBS = 8
_counter = itertools.count()

# -- what the workspace must produce ------------------------------------------------------------

LARGE = b"".join(b"expbuild-large-line-%07d\n" % i for i in range(200_000))
INPUT = (WORKSPACE / "data" / "input.txt").read_bytes()
OTHER = (WORKSPACE / "data" / "other.txt").read_bytes()
CHAIN_1 = b"ECHO\nDELTA\nCHARLIE\nBRAVO\nALPHA\nstep-1\n"
TREE = {
    "input.txt": INPUT,
    "other.txt": OTHER,
    "sub/nested.txt": b"nested file\n",
    "sub/deeper/leaf.txt": b"deeper file\n",
    "sub/tool.sh": b"#!/bin/sh\necho tree-tool\n",
}
EXPECTED: dict[str, dict[str, bytes]] = {
    "a_sources": {"with_sources.txt": (INPUT + OTHER).upper()},
    "b_chain": {"chain_1.txt": CHAIN_1, "chain_2.txt": CHAIN_1 + b"step-2\n6\n"},
    "c_large": {
        "large.bin": LARGE,
        "large_digest.txt": b"%d\n%s\n" % (len(LARGE), hashlib.sha256(LARGE).hexdigest().encode()),
    },
    "d_tree": {
        **{f"tree/{name}": data for name, data in TREE.items()},
        "tree_listing.txt": b"".join(
            b"./%s %d\n" % (name.encode(), len(data)) for name, data in sorted(TREE.items())
        )
        + b"deeper file\ntree-tool\n",
    },
    "e_action_env": {"action_env.txt": f"EXPBUILD_TEST_VAR={TEST_VAR}\n".encode()},
    "g_parallel": {f"parallel/{i}.txt": b"parallel-%d\n%d\n" % (i, i * i) for i in range(PARALLEL)},
    "h_tool": {"tool_user.txt": b"tool-ran-with hello\n"},
}
TARGET = "//:everything"
# Outputs of actions that //:everything reaches only through other actions: with
# --remote_download_toplevel they stay in the CAS and never reach bazel-bin.
INTERMEDIATE = {"chain_1.txt", "large.bin", *(f"tree/{name}" for name in TREE)}

# -- timings, shown at the end of the run -------------------------------------------------------


def record_time(label: str, seconds: float, note: str = "") -> None:
    figures.record("bazel conformance: wall times", f"{label:<45} {seconds:7.2f}s  {note}")


# -- Bazel --------------------------------------------------------------------------------------


def find_bazel() -> str:
    bazel = os.environ.get("EXPBUILD_TEST_BAZEL") or shutil.which("bazel")
    if bazel:
        return bazel
    message = "bazel not found: `apt-get install -y bazel-bootstrap` (or set EXPBUILD_TEST_BAZEL)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; the Bazel conformance tests may not be skipped in CI")
    pytest.skip(message)


@pytest.fixture(scope="module")
def bazel_exe() -> str:
    return find_bazel()


_SUMMARY = re.compile(r"^INFO: (\d+) process(?:es)?(?:: (.*?))?\.?$", re.MULTILINE)
_ELAPSED = re.compile(r"Elapsed time: ([\d.]+)s(?:, Critical Path: ([\d.]+)s)?")


def parse_process_summary(output: str) -> tuple[int, dict[str, int]]:
    """Bazel's last `INFO: N processes: a internal, b remote cache hit, c remote.` line.

    Returns the total and the count per kind; `INFO: 0 processes.` gives (0, {}).
    """
    found = _SUMMARY.findall(output)
    if not found:
        raise AssertionError(f"no process summary line in Bazel's output:\n{output[-3000:]}")
    total, kinds = found[-1]
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (kinds or "").split(","))):
        number, _, kind = part.partition(" ")
        counts[kind.strip()] = counts.get(kind.strip(), 0) + int(number)
    if sum(counts.values()) != int(total):
        raise AssertionError(f"process summary does not add up: {found[-1]!r}")
    return int(total), counts


@dataclasses.dataclass
class BazelResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> tuple[int, dict[str, int]]:
        return parse_process_summary(self.stderr)

    def elapsed(self) -> str:
        match = _ELAPSED.search(self.stderr)
        if not match:
            return ""
        text = f"bazel elapsed {match.group(1)}s"
        return text + (f", critical path {match.group(2)}s" if match.group(2) else "")

    def describe(self) -> str:
        return (
            f"$ bazel {' '.join(self.args)}\nexit {self.returncode} after {self.wall:.1f}s\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-12000:]}"
        )


class Bazel:
    """One Bazel server (its own output root) on one copy of tests/bazel."""

    def __init__(self, exe: str, copy: Path, root: Path):
        self.exe = exe
        self.workspace = copy / "workspace"
        self.root = root
        self.overrides = [
            f"--override_repository={name}={copy / 'local_repos' / name}" for name in STAND_INS
        ]
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("EXPBUILD_", "BAZEL", "USE_BAZEL"))
        }
        # HOME elsewhere: nothing under ~/.cache; TEST_TMPDIR would also relocate the root.
        self.env.update(HOME=str(home), LC_ALL="C.UTF-8")
        self.env.pop("TEST_TMPDIR", None)
        self.startup = [
            f"--output_user_root={root / 'output_user_root'}",
            "--nohome_rc",
            "--max_idle_secs=900",
        ]

    def run(self, command: str, *args: str, timeout: float = 900) -> BazelResult:
        overrides = self.overrides if command in LOADING_COMMANDS else []
        started = time.monotonic()
        proc = subprocess.run(
            [self.exe, *self.startup, command, *overrides, *args],
            cwd=self.workspace,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return BazelResult(
            [command, *args], proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started
        )

    def info(self, key: str, *flags: str) -> Path:
        info = self.run("info", *flags, key)
        assert info.returncode == 0, info.describe()
        return Path(info.stdout.strip().splitlines()[-1])

    def bazel_bin(self, *flags: str) -> Path:
        return self.info("bazel-bin", *flags)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.run("shutdown", timeout=60)


def common_flags(extra_env: str) -> list[str]:
    return [
        f"--jobs={JOBS}",
        f"--action_env=EXPBUILD_TEST_VAR={TEST_VAR}",
        # A different action key per mode, so that one mode's results are not the other's
        # cache hits in the shared server (--host_action_env: tools built for the host).
        f"--action_env=EXPBUILD_CONFORMANCE_MODE={extra_env}",
        f"--host_action_env=EXPBUILD_CONFORMANCE_MODE={extra_env}",
        f"--test_env=EXPBUILD_CONFORMANCE_MODE={extra_env}",
        "--verbose_failures",
        "--remote_timeout=120",
    ]


def mode_flags(mode: str, port: int, *, download: str | None = None) -> list[str]:
    """Bazel's flags for `mode` (`remote_executor`, `remote_cache`, `local`, each remote one
    optionally `+minimal` or `+toplevel`); `download` overrides what it downloads."""
    base, _, download_mode = mode.partition("+")
    download = download or download_mode
    endpoint = f"grpc://127.0.0.1:{port}"
    if base == "remote_executor":
        flags = [f"--remote_executor={endpoint}", "--spawn_strategy=remote"]
    elif base == "remote_cache":
        flags = [f"--remote_cache={endpoint}"]
    elif base == "local":
        flags = []
    else:
        raise ValueError(mode)
    flags += common_flags(mode)  # the whole mode: its own action keys
    if download:
        flags.append(f"--remote_download_{download}")
    return flags


def snapshot(bazel_bin: Path) -> dict[str, bytes | None]:
    files: dict[str, bytes | None] = {}
    for outputs in EXPECTED.values():
        for name in outputs:
            path = bazel_bin / name
            files[name] = path.read_bytes() if path.is_file() else None
    return files


def check_outputs(files: dict[str, bytes | None], case: str, *, top_level_only=False) -> None:
    """The case's outputs in bazel-bin; with `top_level_only` (--remote_download_toplevel)
    the INTERMEDIATE ones must not have been downloaded."""
    problems = []
    for name, want in EXPECTED[case].items():
        got = files.get(name)
        if top_level_only and name in INTERMEDIATE:
            if got is not None:
                problems.append(f"{name}: downloaded, but it is no top-level output")
        elif got is None:
            problems.append(f"{name}: missing from bazel-bin")
        elif got != want:
            shown = (
                got[:300]
                if len(got) < 4096
                else f"<{len(got)} bytes, sha256 {hashlib.sha256(got).hexdigest()}>"
            )
            wanted = (
                want[:300]
                if len(want) < 4096
                else f"<{len(want)} bytes, sha256 {hashlib.sha256(want).hexdigest()}>"
            )
            problems.append(f"{name}: got {shown!r}, want {wanted!r}")
    assert not problems, "\n".join(problems)


def check_every_output(bazel: Bazel, flags: list[str]) -> None:
    """Every case's outputs are in bazel-bin, each with its expected content."""
    files = snapshot(bazel.bazel_bin(*flags))
    for case in EXPECTED:
        check_outputs(files, case)


def copy_tree(dest: Path) -> Path:
    """tests/bazel (workspace and stand-in repositories) copied: Bazel never writes there."""
    shutil.copytree(BAZEL_DIR, dest, ignore=shutil.ignore_patterns("bazel-*", "*.md"))
    return dest


# -- ExpBuild processes -------------------------------------------------------------------------


def expbuild_command() -> list[str]:
    script = Path(sys.executable).parent / "expbuild"
    return [str(script)] if script.exists() else [sys.executable, "-m", "expbuild"]


@dataclasses.dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 80) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclasses.dataclass
class Cluster:
    port: int
    server: Process
    worker: Process
    database: str
    cas: Path

    def logs(self, lines: int = 80) -> str:
        return "\n".join(
            f"--- {p.name} log ({p.log}), last {lines} lines, exit={p.proc.poll()} ---\n"
            + p.tail(lines)
            for p in (self.server, self.worker)
        )


def start(name: str, args: list[str], env: dict[str, str], folder: Path) -> Process:
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*expbuild_command(), *args],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Process(name, proc, log)


def wait_for_health(port: int, server: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {server.proc.returncode}:\n{server.tail()}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.2)
    raise AssertionError(f"server not healthy after {timeout}s ({last}):\n{server.tail()}")


def wait_for_log(process: Process, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in process.log.read_text(errors="replace"):
            return
        if process.proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(
        f"{process.name}: no {needle!r} in its log (exit={process.proc.poll()}):\n{process.tail()}"
    )


@pytest.fixture(scope="module")
def cluster(bazel_exe, postgres_admin_url, tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("expbuild-bazel")
    name = f"expbuild_bazel_{os.getpid()}_{next(_counter)}"
    database_url = asyncio.run(create_from_template(postgres_admin_url, name))
    port = free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("EXPBUILD_")}
    server_env = {
        **base_env,
        "EXPBUILD_DATABASE__URL": database_url,
        "EXPBUILD_SERVER__ADDRESS": f"127.0.0.1:{port}",
        # "" should switch /metrics off, but the settings loader reads an empty value as
        # "unset" (the default 127.0.0.1:9464, shared by parallel runs): use a free port.
        "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "EXPBUILD_CAS__ROOT": str(folder / "cas"),
    }
    worker_env = {
        **base_env,
        "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": str(JOBS),
        "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(folder / "work"),
        "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
    }
    processes: list[Process] = []
    failed_before = request.session.testsfailed
    try:
        server = start("server", ["server"], server_env, folder)
        processes.append(server)
        wait_for_health(port, server)
        worker = start(
            "worker",
            ["worker", "daemon", "--server", f"http://127.0.0.1:{port}"],
            worker_env,
            folder,
        )
        processes.append(worker)
        wait_for_log(worker, "registered successfully")
        yield Cluster(port, server, worker, name, folder / "cas")
    finally:
        for process in reversed(processes):
            process.stop()
        if request.session.testsfailed > failed_before:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            for process in processes:
                text = f"\n===== {process.name} log: {process.log} =====\n{process.tail(200)}\n"
                if reporter is not None:
                    reporter.write_line(text)
                else:
                    print(text)
        with contextlib.suppress(Exception):
            asyncio.run(drop_database(postgres_admin_url, name))


# -- one Bazel per mode, and its builds ---------------------------------------------------------


@dataclasses.dataclass
class ModeRun:
    mode: str
    bazel: Bazel
    flags: list[str]
    cluster: Cluster
    first: BazelResult | None = None
    second: BazelResult | None = None
    first_files: dict[str, bytes | None] = dataclasses.field(default_factory=dict)
    second_files: dict[str, bytes | None] = dataclasses.field(default_factory=dict)
    # +minimal: CAS eviction after the second build, then a build that downloads.
    eviction: EvictionReport | None = None
    later: BazelResult | None = None
    later_files: dict[str, bytes | None] = dataclasses.field(default_factory=dict)

    @property
    def download(self) -> str:
        """What Bazel downloads: "" (everything), "minimal" or "toplevel"."""
        return self.mode.partition("+")[2]

    def context(self, result: BazelResult | None) -> str:
        text = result.describe() if result else "<bazel did not run>"
        return f"mode {self.mode}\n{text}\n{self.cluster.logs()}"


# How old every CAS blob is made to look before the +minimal modes' second build: the
# eviction after it removes whatever that build did not use.
AGED = 24 * 3600.0


def age_blobs(cas: Path, seconds: float) -> None:
    """Make every blob look last used `seconds` ago (no waiting for time to pass)."""
    then = time.time() - seconds
    for path in (cas / "sha256").rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def evict_unused(cas: Path, min_age: float) -> EvictionReport:
    """An eviction pass over the server's CAS that would leave nothing unused for
    `min_age` seconds: the bound is one byte."""
    return asyncio.run(evict_to_size(FileStore(cas), 1, min_age=min_age))


@pytest.fixture(scope="module", params=MODES)
def mode_run(request, bazel_exe, cluster, tmp_path_factory):
    mode = request.param
    folder = tmp_path_factory.mktemp(f"bazel-{mode.replace('+', '-')}")
    bazel = Bazel(bazel_exe, copy_tree(folder / "bazel"), folder)
    run = ModeRun(mode, bazel, mode_flags(mode, cluster.port), cluster)
    try:
        run.first = bazel.run("build", *run.flags, TARGET)
        record_time(f"{mode}: first build", run.first.wall, run.first.elapsed())
        if run.first.returncode == 0:
            bazel_bin = bazel.bazel_bin(*run.flags)
            run.first_files = snapshot(bazel_bin)
            clean = bazel.run("clean")
            assert clean.returncode == 0, clean.describe()
            assert not (bazel_bin / "with_sources.txt").exists(), "bazel clean left outputs"
            if run.download == "minimal":
                age_blobs(cluster.cas, AGED)
            run.second = bazel.run("build", *run.flags, TARGET)
            record_time(f"{mode}: build after clean", run.second.wall, run.second.elapsed())
            if run.second.returncode == 0:
                run.second_files = snapshot(bazel_bin)
            if run.second.returncode == 0 and run.download == "minimal":
                # The outputs Bazel never downloaded live only in the CAS, named by action
                # cache entries that the second build hit. Evict everything else, then use
                # them: a build that downloads the top-level outputs.
                run.eviction = evict_unused(cluster.cas, AGED / 2)
                clean = bazel.run("clean")
                assert clean.returncode == 0, clean.describe()
                later_flags = mode_flags(mode, cluster.port, download="toplevel")
                run.later = bazel.run("build", *later_flags, TARGET)
                record_time(f"{mode}: build after eviction", run.later.wall, run.later.elapsed())
                if run.later.returncode == 0:
                    run.later_files = snapshot(bazel.bazel_bin(*later_flags))
        yield run
    finally:
        bazel.shutdown()


# -- tests --------------------------------------------------------------------------------------


def test_first_build_succeeds(mode_run: ModeRun):
    first = mode_run.first
    assert first is not None and first.returncode == 0, mode_run.context(first)
    total, kinds = first.summary()
    executed = {k: n for k, n in kinds.items() if k != "internal"}
    # a(1) + b(2) + c(2) + d(2) + e(1) + g(24) + h(2) actions; Bazel may cache none of them
    # locally on a first build.
    assert sum(executed.values()) >= 34, (kinds, mode_run.context(first))
    if mode_run.mode.startswith("remote_executor"):
        assert set(executed) == {"remote"}, (
            f"every action should run remotely: {kinds}\n{mode_run.context(first)}"
        )
    else:
        assert not any("remote" in k for k in executed), (
            f"the remote cache was empty, nothing could hit it: {kinds}\n{mode_run.context(first)}"
        )


def test_build_after_clean_is_all_remote_cache_hits(mode_run: ModeRun):
    second = mode_run.second
    assert second is not None and second.returncode == 0, mode_run.context(second)
    total, kinds = second.summary()
    executed = {k: n for k, n in kinds.items() if k != "internal"}
    assert executed and set(executed) == {"remote cache hit"}, (
        f"after `bazel clean` every action should be a remote cache hit, got {kinds}\n"
        f"{mode_run.context(second)}"
    )
    first_total, first_kinds = mode_run.first.summary()
    assert executed["remote cache hit"] == sum(
        n for k, n in first_kinds.items() if k != "internal"
    ), (first_kinds, kinds)


@pytest.mark.parametrize("build", ["first", "after_clean"])
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_outputs(mode_run: ModeRun, case: str, build: str):
    result = mode_run.first if build == "first" else mode_run.second
    assert result is not None and result.returncode == 0, mode_run.context(result)
    files = mode_run.first_files if build == "first" else mode_run.second_files
    # With --remote_cache the first build runs its actions here: their outputs are local,
    # whatever Bazel would download. Cache hits are where it downloads less.
    ran_here = build == "first" and not mode_run.mode.startswith("remote_executor")
    download = "" if ran_here else mode_run.download
    if download == "minimal":
        downloaded = [name for name in EXPECTED[case] if files.get(name) is not None]
        assert not downloaded, f"--remote_download_minimal downloaded {downloaded}"
        # Their bytes stayed in the CAS: the build after eviction downloads them.
        later = mode_run.later
        assert later is not None and later.returncode == 0, mode_run.context(later)
        check_outputs(mode_run.later_files, case, top_level_only=True)
    else:
        check_outputs(files, case, top_level_only=download == "toplevel")


def test_outputs_left_in_the_cas_survive_eviction(mode_run: ModeRun):
    """Build without the bytes: outputs Bazel never downloaded stay in the CAS while the
    action cache entries naming them live. Every blob was made to look a day old before
    the second build; its cache hits refreshed what they name; an eviction pass bounded to
    one byte then removed everything else; a later build finds every entry complete."""
    if mode_run.download != "minimal":
        pytest.skip("the +minimal modes run the eviction")
    report = mode_run.eviction
    assert report is not None, mode_run.context(mode_run.second)
    assert report.removed > 0, f"the eviction pass had nothing to remove: {report}"
    later = mode_run.later
    assert later is not None and later.returncode == 0, mode_run.context(later)
    _, kinds = later.summary()
    executed = {k: n for k, n in kinds.items() if k != "internal"}
    assert executed and set(executed) == {"remote cache hit"}, (
        f"an action ran again after eviction, so a blob its cache entry named was gone: "
        f"{kinds}\n{mode_run.context(later)}"
    )


def test_deliberate_failure(mode_run: ModeRun):
    """f. exit 3 and a known stderr line: Bazel fails and shows the line; never cached."""
    for attempt in (1, 2):
        result = mode_run.bazel.run("build", *mode_run.flags, "//:deliberate_failure")
        record_time(f"{mode_run.mode}: failing build #{attempt}", result.wall, result.elapsed())
        assert result.returncode != 0, mode_run.context(result)
        assert FAILURE_LINE in result.stderr, mode_run.context(result)
        assert "(Exit 3)" in result.stderr, mode_run.context(result)
        assert "Build did NOT complete successfully" in result.stderr, mode_run.context(result)


SH_TEST = "//sh:hello_test"
SH_TEST_LINE = "expbuild-conformance: sh_test passed"


def check_sh_test_logs(
    bazel: Bazel, flags: list[str], result: BazelResult, *, minimal: bool = False
) -> None:
    testlogs = bazel.info("bazel-testlogs", *flags) / "sh" / "hello_test"
    log = testlogs / "test.log"
    assert log.is_file(), f"no {log}\n{result.describe()}"
    assert SH_TEST_LINE in log.read_text(errors="replace"), log.read_text(errors="replace")
    if minimal:
        return  # --remote_download_minimal fetches test.log only; the rest stays remote
    assert (testlogs / "test.xml").is_file(), f"no test.xml\n{result.describe()}"
    outputs = testlogs / "test.outputs" / "outputs.zip"
    assert outputs.is_file(), f"no undeclared outputs zip\n{result.describe()}"
    with zipfile.ZipFile(outputs) as archive:
        assert archive.read("extra.txt") == b"undeclared output\n"


def test_sh_test(mode_run: ModeRun):
    """i. `bazel test` of an sh_test (running an sh_binary), then again after a clean."""
    bazel, flags = mode_run.bazel, mode_run.flags
    first = bazel.run("test", *flags, SH_TEST)
    record_time(f"{mode_run.mode}: bazel test", first.wall, first.elapsed())
    assert first.returncode == 0, mode_run.context(first)
    assert re.search(r"//sh:hello_test\s+PASSED", first.output), mode_run.context(first)
    _, kinds = first.summary()
    executed = {k: n for k, n in kinds.items() if k != "internal"}
    if mode_run.mode.startswith("remote_executor"):
        assert set(executed) == {"remote"}, (kinds, mode_run.context(first))
    else:
        assert executed and not any("remote" in k for k in executed), (kinds, first.describe())
    minimal = mode_run.download == "minimal"
    check_sh_test_logs(bazel, flags, first, minimal=minimal)

    clean = bazel.run("clean")
    assert clean.returncode == 0, clean.describe()
    second = bazel.run("test", *flags, SH_TEST)
    record_time(f"{mode_run.mode}: bazel test after clean", second.wall, second.elapsed())
    assert second.returncode == 0, mode_run.context(second)
    assert re.search(r"//sh:hello_test\s+\(cached\) PASSED", second.output), mode_run.context(
        second
    )
    _, kinds = second.summary()
    executed = {k: n for k, n in kinds.items() if k != "internal"}
    assert set(executed) == {"remote cache hit"}, (kinds, mode_run.context(second))
    check_sh_test_logs(bazel, flags, second, minimal=minimal)


def test_no_errors_logged(mode_run: ModeRun):
    """Whatever Bazel saw, the server and the worker logged no error or traceback."""
    problems = []
    for process in (mode_run.cluster.server, mode_run.cluster.worker):
        for line in process.log.read_text(errors="replace").splitlines():
            if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line):
                problems.append(f"{process.name}: {line}")
    assert not problems, "\n".join(problems[:50]) + "\n" + mode_run.cluster.logs(200)


# The fan-out target: 24 independent actions, at most JOBS at once.
FAN_OUT = "//:parallel"


def test_fan_out_remote_execution_against_local(bazel_exe, cluster, tmp_path):
    """Issue #10 point 9: the wall time of building the fan-out target with remote
    execution next to the same build run locally, both by a warm Bazel (a first build,
    `bazel clean`, then the measured one). Printed in the terminal summary; nothing here
    is timed, only that every action ran where it should."""
    bazel = Bazel(bazel_exe, copy_tree(tmp_path / "bazel"), tmp_path)
    measured: dict[str, BazelResult] = {}
    try:
        for mode, kinds_wanted in (("local", None), ("remote_executor", {"remote"})):
            # Remote results are not taken from the action cache: every action executes.
            flags = [*mode_flags(mode, cluster.port), "--noremote_accept_cached"]
            flags.append(f"--action_env=EXPBUILD_FAN_OUT={tmp_path.name}")
            for _ in range(2):
                clean = bazel.run("clean")
                assert clean.returncode == 0, clean.describe()
                result = bazel.run("build", *flags, FAN_OUT)
                assert result.returncode == 0, result.describe()
                total, kinds = result.summary()
                executed = {k: n for k, n in kinds.items() if k != "internal"}
                assert sum(executed.values()) >= PARALLEL, (kinds, result.describe())
                if kinds_wanted is None:
                    assert not any("remote" in k for k in executed), kinds
                else:
                    assert set(executed) == kinds_wanted, kinds  # executed, no cache hit
            measured[mode] = result
    finally:
        bazel.shutdown()
    local, remote = measured["local"], measured["remote_executor"]
    record_time(f"fan-out {FAN_OUT}: local build", local.wall, local.elapsed())
    record_time(
        f"fan-out {FAN_OUT}: remote execution build",
        remote.wall,
        f"{remote.elapsed()}; {remote.wall / local.wall:.2f}x the local build's wall time",
    )


def test_local_build_offline(bazel_exe, tmp_path):
    """The workspace builds with no remote at all: the harness itself works offline."""
    bazel = Bazel(bazel_exe, copy_tree(tmp_path / "bazel"), tmp_path)
    try:
        flags = mode_flags("local", 0)
        result = bazel.run("build", *flags, TARGET)
        record_time("local (no remote): build", result.wall, result.elapsed())
        assert result.returncode == 0, result.describe()
        total, kinds = result.summary()
        assert not any("remote" in k for k in kinds), kinds
        files = snapshot(bazel.bazel_bin(*flags))
        for case in EXPECTED:
            check_outputs(files, case)
        failure = bazel.run("build", *flags, "//:deliberate_failure")
        assert failure.returncode != 0 and FAILURE_LINE in failure.stderr, failure.describe()
        test = bazel.run("test", *flags, SH_TEST)
        assert test.returncode == 0, test.describe()
        check_sh_test_logs(bazel, flags, test)
    finally:
        bazel.shutdown()


def test_parse_process_summary():
    out = (
        "INFO: Elapsed time: 3.2s, Critical Path: 1.0s\n"
        "INFO: 36 processes: 2 internal, 34 remote cache hit.\n"
        "INFO: Build completed successfully, 36 total actions\n"
    )
    assert parse_process_summary(out) == (36, {"internal": 2, "remote cache hit": 34})
    assert parse_process_summary("INFO: 1 process: 1 internal.\n") == (1, {"internal": 1})
    assert parse_process_summary("INFO: 0 processes.\n") == (0, {})
    mixed = "INFO: 5 processes: 1 internal, 2 linux-sandbox, 2 remote.\n"
    assert parse_process_summary(mixed) == (5, {"internal": 1, "linux-sandbox": 2, "remote": 2})
