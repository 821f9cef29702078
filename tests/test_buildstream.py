"""A real client: BuildStream 2.8.1 builds a tiny project through a real ExpBuild.

BuildStream (`tests/buildstream/requirements.txt`) lives in its own venv, `.venv-buildstream`
(`make venv-buildstream`, which .ci/run calls); the test makes it when it is missing. Its
wheel carries buildbox-casd, which BuildStream starts and which talks REAPI to ExpBuild.

An `expbuild server` process and one `expbuild worker daemon` with the `sandbox` backend
and the input root as `/` (`sandbox_root = "root"`, BuildStream's actions bring their own
system): the project's sysroot is Debian's static busybox, imported by `base.bst`.

- `hello.bst` (manual) and `report.bst` (script) build remotely; their artifacts hold
  what the commands wrote. The manual element's Command asks for the output path
  `../../../buildstream-install` from the working directory `buildstream/tiny/hello.bst`, and
  BuildStream sends `OSFamily=linux`: the two things that stopped every element before.
- The local cache is wiped and the same build is answered from ExpBuild's action cache:
  no new task is queued, and the artifacts are the same.
- `broken.bst` fails: BuildStream reports the command's exit code and output, and
  ExpBuild recorded the exit code.

Without bwrap, a static busybox or BuildStream the test is skipped, except under
CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from expbuild.proto import remote_execution_pb2 as re_pb2
from tests.conftest import create_from_template, drop_database
from tests.postgres import free_port
from tests.processes import Process, start, wait_for_log, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HERE = Path(__file__).parent / "buildstream"
REPO = Path(__file__).parent.parent
BST_VENV = REPO / ".venv-buildstream"
HELLO = b"hello from buildstream\n"
REPORT = HELLO + b"script element ran\n"
_counter = itertools.count()


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; the BuildStream test may not be skipped in CI")
    pytest.skip(message)


def find_bst() -> Path:
    """`$EXPBUILD_TEST_BST`, or BuildStream in .venv-buildstream (made when missing)."""
    configured = os.environ.get("EXPBUILD_TEST_BST")
    if configured:
        return Path(configured)
    bst = BST_VENV / "bin" / "bst"
    if not (BST_VENV / ".installed").exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(BST_VENV)], capture_output=True, text=True
        )
        installed = made.returncode == 0 and subprocess.run(
            [str(BST_VENV / "bin" / "pip"), "install", "-q", "-r", str(HERE / "requirements.txt")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if not installed or installed.returncode != 0:
            shutil.rmtree(BST_VENV, ignore_errors=True)
            detail = (installed.stderr if installed else made.stderr)[-2000:]
            _unavailable(f"could not install BuildStream (`make venv-buildstream`):\n{detail}")
        (BST_VENV / ".installed").touch()
    return bst


def static_busybox() -> Path:
    busybox = shutil.which("busybox")
    if busybox:
        ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True)
        if "not a dynamic executable" in ldd.stdout + ldd.stderr:
            return Path(busybox)
    _unavailable("needs a static busybox (apt-get install busybox-static)")
    raise AssertionError("unreachable")


def make_project(folder: Path) -> Path:
    """tests/buildstream/project with files/sysroot: busybox and the applets it uses."""
    project = folder / "project"
    shutil.copytree(HERE / "project", project)
    bin_dir = project / "files" / "sysroot" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy(static_busybox(), bin_dir / "busybox")
    for applet in ("sh", "echo", "cat", "mkdir", "cp", "rm", "true", "false"):
        (bin_dir / applet).symlink_to("busybox")
    return project


@dataclasses.dataclass
class Bst:
    exe: Path
    project: Path
    folder: Path
    port: int

    @property
    def cache(self) -> Path:
        return self.folder / "bst-cache"

    def config(self) -> Path:
        url = f"http://127.0.0.1:{self.port}"
        path = self.folder / "buildstream.conf"
        path.write_text(
            f"cachedir: {self.cache}\n"
            f"logdir: {self.folder / 'bst-logs'}\n"
            "scheduler:\n  on-error: continue\n"
            "remote-execution:\n"
            f"  execution-service:\n    url: {url}\n"
            f"  storage-service:\n    url: {url}\n"
            f"  action-cache-service:\n    url: {url}\n"
        )
        return path

    def run(self, *args: str) -> subprocess.CompletedProcess:
        home = self.folder / "home"
        home.mkdir(exist_ok=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("EXPBUILD_", "XDG_"))},
            "HOME": str(home),
        }
        return subprocess.run(
            [str(self.exe), "--no-interactive", "--no-colors", "-c", str(self.config()), *args],
            cwd=self.project,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )

    def checkout(self, element: str, name: str) -> dict[str, bytes]:
        target = self.folder / name
        done = self.run("artifact", "checkout", element, "--directory", str(target))
        assert done.returncode == 0, done.stderr[-4000:]
        return {
            str(path.relative_to(target)): path.read_bytes()
            for path in sorted(target.rglob("*"))
            if path.is_file()
        }


@dataclasses.dataclass
class Builds:
    bst: Bst
    cas: Path
    database_url: str
    server: Process
    worker: Process
    first: subprocess.CompletedProcess
    first_tasks: list
    first_artifacts: dict[str, dict[str, bytes]]
    replay: subprocess.CompletedProcess | None = None
    replay_tasks: list = dataclasses.field(default_factory=list)
    replay_artifacts: dict[str, dict[str, bytes]] = dataclasses.field(default_factory=dict)
    broken: subprocess.CompletedProcess | None = None

    def context(self, result: subprocess.CompletedProcess | None) -> str:
        shown = "" if result is None else f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        return (
            f"{shown}\n--- server ---\n{self.server.log()[-4000:]}"
            f"\n--- worker ---\n{self.worker.log()[-4000:]}"
        )

    def query(self, statement: str, *args):
        async def fetch():
            conn = await asyncpg.connect(self.database_url)
            try:
                return await conn.fetch(statement, *args)
            finally:
                await conn.close()

        return asyncio.run(fetch())

    def tasks(self) -> list:
        """Every task ExpBuild ran, with its action and exit code."""
        return self.query(
            "SELECT t.id, t.action_digest, (e.detail->>'exit_code')::int AS exit_code "
            "FROM tasks t JOIN task_events e ON e.task_id = t.id AND e.event = 'completed' "
            "ORDER BY t.id"
        )

    def blob(self, digest: str) -> bytes:
        sha = digest.partition("/")[0]
        return (self.cas / "sha256" / sha[:2] / sha).read_bytes()


@pytest.fixture(scope="module")
def builds(postgres_admin_url, tmp_path_factory):
    if shutil.which("bwrap") is None:
        _unavailable("needs bubblewrap for the sandbox backend (apt-get install bubblewrap)")
    exe = find_bst()
    folder = tmp_path_factory.mktemp("buildstream")
    project = make_project(folder)
    name = f"expbuild_bst_{os.getpid()}_{next(_counter)}"
    database_url = asyncio.run(create_from_template(postgres_admin_url, name))
    port = free_port()
    processes: list[Process] = []
    try:
        server = start(
            "server",
            ["expbuild", "server"],
            folder,
            {
                "EXPBUILD_DATABASE__URL": database_url,
                "EXPBUILD_SERVER__ADDRESS": f"127.0.0.1:{port}",
                "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
                "EXPBUILD_CAS__ROOT": str(folder / "cas"),
            },
        )
        processes.append(server)
        wait_healthy(f"127.0.0.1:{port}", server, timeout=60)
        worker = start(
            "worker",
            ["expbuild", "worker", "daemon", "--server", f"http://127.0.0.1:{port}"],
            folder,
            {
                "EXPBUILD_WORKER__MAX_CONCURRENT_TASKS": "2",
                "EXPBUILD_WORKER__BACKEND__TYPE": "sandbox",
                "EXPBUILD_WORKER__BACKEND__SANDBOX_ROOT": "root",
                "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(folder / "work"),
                "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
            },
        )
        processes.append(worker)
        wait_for_log(worker, "registered successfully", timeout=60)

        bst = Bst(exe, project, folder, port)
        first = bst.run("build", "hello.bst", "report.bst")
        run = Builds(bst, folder / "cas", database_url, server, worker, first, [], {})
        if first.returncode == 0:
            run.first_tasks = run.tasks()
            run.first_artifacts = {
                "hello": bst.checkout("hello.bst", "first-hello"),
                "report": bst.checkout("report.bst", "first-report"),
            }
            shutil.rmtree(bst.cache)  # BuildStream's local cache: artifacts and its CAS
            run.replay = bst.run("build", "hello.bst", "report.bst")
            run.replay_tasks = run.tasks()
            if run.replay.returncode == 0:
                run.replay_artifacts = {
                    "hello": bst.checkout("hello.bst", "replay-hello"),
                    "report": bst.checkout("report.bst", "replay-report"),
                }
        run.broken = bst.run("build", "broken.bst")
        yield run
    finally:
        for process in reversed(processes):
            process.stop()
        with contextlib.suppress(Exception):
            asyncio.run(drop_database(postgres_admin_url, name))


def test_manual_and_script_elements_build_remotely(builds: Builds):
    assert builds.first.returncode == 0, builds.context(builds.first)
    assert builds.first_artifacts["hello"] == {"usr/share/hello/hello.txt": HELLO}
    assert builds.first_artifacts["report"] == {"report.txt": REPORT}
    # Both ran on the worker (BuildStream had nothing to answer them from).
    rows = builds.first_tasks
    assert [row["exit_code"] for row in rows] == [0, 0], rows
    # What made these elements fail before: the manual element's output path climbs out
    # of its working directory to the install root, and the platform says `linux`.
    commands = []
    for row in rows:
        action = re_pb2.Action.FromString(builds.blob(row["action_digest"]))
        command_digest = f"{action.command_digest.hash}/{action.command_digest.size_bytes}"
        commands.append(re_pb2.Command.FromString(builds.blob(command_digest)))
    manual = next(c for c in commands if c.working_directory == "buildstream/tiny/hello.bst")
    assert "../../../buildstream-install" in manual.output_paths
    for command in commands:
        platform = {p.name: p.value for p in command.platform.properties}
        assert platform["OSFamily"] == "linux", platform


def test_a_build_with_the_local_cache_wiped_replays_from_the_action_cache(builds: Builds):
    assert builds.replay is not None, builds.context(builds.first)
    assert builds.replay.returncode == 0, builds.context(builds.replay)
    output = builds.replay.stdout + builds.replay.stderr
    assert output.count("Action result found in action cache") == 2, builds.context(builds.replay)
    assert builds.replay_tasks == builds.first_tasks, "the replay ran something again"
    assert builds.replay_artifacts == builds.first_artifacts


def test_a_failing_element_reports_its_exit_code_and_log(builds: Builds):
    broken = builds.broken
    assert broken is not None and broken.returncode != 0, builds.context(broken)
    output = broken.stdout + broken.stderr
    assert "Command 'exit 7' failed with exitcode 7" in output, builds.context(broken)
    assert "broken.bst - about to fail on purpose" in output, builds.context(broken)
    logs = list((builds.bst.folder / "bst-logs").rglob("broken/*-build.*.log"))
    assert logs and any(
        "about to fail on purpose" in log.read_text(errors="replace") for log in logs
    )
    # ExpBuild ran it and recorded the action's exit code: BuildStream's batch script runs
    # each command in a subshell, prints its code (7, above) and exits 1. A failed run is
    # not cached.
    [event] = [row for row in builds.tasks() if row["exit_code"] != 0]
    assert event["exit_code"] == 1
    cached = builds.query(
        "SELECT count(*) AS n FROM action_cache WHERE action_digest = $1", event["action_digest"]
    )
    assert cached[0]["n"] == 0
