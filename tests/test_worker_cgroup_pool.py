"""The worker's pool of per-action cgroups (`expbuild.worker.cgroups.CgroupPool`).

Real cgroups on this host (the tests need root or a delegated subtree) and real
processes through the Supervisor: a pooled cgroup is reused only empty, with nothing of
the previous action's usage visible to the next, and no pool cgroup outlives its
worker, even one that crashed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from expbuild.config import LimitsSettings
from expbuild.worker.cgroups import POOL_PREFIX, CgroupSupport, pool_key
from expbuild.worker.supervisor import Command, Finished, Supervisor
from tests.waiting import wait_until

MiB = 1024 * 1024
CGROUPS = CgroupSupport.detect()
MEMORY_CGROUP = CGROUPS is not None and (
    "memory" in CGROUPS.v1
    or CGROUPS.unified is not None
    and "memory" in (CGROUPS.unified / "cgroup.controllers").read_text().split()
)
pytestmark = pytest.mark.skipif(CGROUPS is None, reason="this process may not create cgroups")
needs_memory_cgroup = pytest.mark.skipif(
    not MEMORY_CGROUP, reason="no memory cgroup may be created here"
)
# dd allocates its whole block before reading: a memory hog in one standard command.
MEMORY_HOG = ("/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1")


def command(tmp_path: Path, *arguments: str) -> Command:
    return Command(
        arguments=list(arguments),
        executable=arguments[0],
        environment={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        stdout_path=tmp_path / "stdout",
        stderr_path=tmp_path / "stderr",
    )


def pool_directories(key: str) -> list[Path]:
    """Every cgroup directory of worker `key`'s pools, in every hierarchy."""
    assert CGROUPS is not None
    prefix = f"{POOL_PREFIX}{pool_key(key)}-"
    return sorted(p for parent in CGROUPS.parents() for p in parent.glob(f"{prefix}*"))


def unique_key(tmp_path: Path) -> str:
    return str(tmp_path / "work")  # what a worker passes: its work_dir


async def run(supervisor: Supervisor, tmp_path: Path, *arguments: str) -> Finished:
    return await supervisor.run(command(tmp_path, *arguments), name="test", timeout=60)


@needs_memory_cgroup
async def test_an_oom_in_a_pooled_cgroup_is_not_seen_by_the_next_action(tmp_path):
    supervisor = Supervisor(LimitsSettings(memory=64 * MiB), pool_key=unique_key(tmp_path))
    try:
        hog = await run(supervisor, tmp_path, *MEMORY_HOG)
        assert hog.limit_exceeded == "action exceeded its memory limit of 64MiB"
        assert hog.memory_peak is not None and hog.memory_peak > 32 * MiB

        quiet = await run(supervisor, tmp_path, "/bin/sh", "-c", "echo fine")
        assert supervisor.pool is not None
        assert (supervisor.pool.created, supervisor.pool.reused) == (1, 1)  # the same cgroup
        assert quiet.exit_code == 0
        assert quiet.limit_exceeded is None
        # Its own peak, not the hog's (a shell and echo: a few MiB at most).
        assert quiet.memory_peak is not None and quiet.memory_peak < 16 * MiB
    finally:
        await supervisor.close()


async def test_a_leftover_process_is_killed_before_the_cgroup_is_reused(tmp_path):
    """A process in the action's cgroup that the launcher does not know of (here: one
    the test moves in) is killed when the action ends, before the next one starts."""
    key = unique_key(tmp_path)
    supervisor = Supervisor(LimitsSettings(), pool_key=key)
    stranger = await asyncio.create_subprocess_exec("sleep", "300")
    try:
        go = tmp_path / "go"
        action = asyncio.create_task(
            run(supervisor, tmp_path, "/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done")
        )
        directories = await wait_until(
            lambda: pool_directories(key), what="the pool's cgroup directories"
        )
        for directory in directories:
            (directory / "cgroup.procs").write_text(str(stranger.pid))
        go.touch()
        assert (await action).exit_code == 0
        # Killed by the pool (it is our child, so we reap it).
        assert await asyncio.wait_for(stranger.wait(), 10) == -signal.SIGKILL
        assert all((d / "cgroup.procs").read_text() == "" for d in pool_directories(key))

        again = await run(supervisor, tmp_path, "/bin/sh", "-c", "cat /proc/self/cgroup")
        assert again.exit_code == 0
        assert supervisor.pool is not None and supervisor.pool.reused == 1
    finally:
        if stranger.returncode is None:
            stranger.kill()
            await stranger.wait()
        await supervisor.close()


async def test_the_pool_is_as_large_as_the_concurrency_and_close_removes_it(tmp_path):
    key = unique_key(tmp_path)
    supervisor = Supervisor(LimitsSettings(max_processes=100), pool_key=key)
    try:
        folders = [tmp_path / str(n) for n in range(3)]
        for folder in folders:
            folder.mkdir()
        for _ in range(2):
            finished = await asyncio.gather(
                *(run(supervisor, folder, "/bin/sleep", "0.2") for folder in folders)
            )
            assert [f.exit_code for f in finished] == [0, 0, 0]
        for folder in folders:
            await run(supervisor, folder, "/bin/true")
        assert supervisor.pool is not None
        assert (supervisor.pool.created, supervisor.pool.reused) == (3, 6)
        assert len(pool_directories(key)) >= 3
    finally:
        await supervisor.close()
    assert pool_directories(key) == []


# A worker that crashes (SIGKILL: no cleanup, no finalizer) with an idle pool cgroup.
CRASHING_WORKER = """
import asyncio, os, signal, sys
from pathlib import Path
from expbuild.config import LimitsSettings
from expbuild.worker.supervisor import Command, Supervisor

async def main():
    folder = Path(sys.argv[2])
    supervisor = Supervisor(LimitsSettings(max_processes=100), pool_key=sys.argv[1])
    finished = await supervisor.run(
        Command(["/bin/true"], "/bin/true", {}, folder, folder / "out", folder / "err"),
        name="crash",
        timeout=60,
    )
    assert finished.exit_code == 0
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_restarted_worker_removes_only_its_crashed_predecessors_cgroups(tmp_path):
    key, other_key = unique_key(tmp_path), str(tmp_path / "another-worker")
    crashed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_WORKER,
        key,
        str(tmp_path),
        cwd=Path(__file__).resolve().parent.parent,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await asyncio.wait_for(crashed.communicate(), 120)
    assert crashed.returncode == -signal.SIGKILL, errors.decode()
    left = pool_directories(key)
    assert left, "the crashed worker left no pool cgroup to sweep"

    # Alive meanwhile: another worker's pool, and a pool of the same key in a live process.
    other = Supervisor(LimitsSettings(), pool_key=other_key)
    live_same_key = Supervisor(LimitsSettings(), pool_key=key)
    restarted = None
    try:
        await run(other, tmp_path, "/bin/true")
        await run(live_same_key, tmp_path, "/bin/true")
        theirs = pool_directories(other_key)
        ours_alive = [p for p in pool_directories(key) if p not in left]
        assert theirs and ours_alive

        restarted = Supervisor(LimitsSettings(), pool_key=key)
        assert not any(p.exists() for p in left)
        assert all(p.exists() for p in theirs + ours_alive)
    finally:
        for supervisor in (other, live_same_key, restarted):
            if supervisor is not None:
                await supervisor.close()
    assert pool_directories(key) == pool_directories(other_key) == []


async def test_an_action_that_made_cgroups_of_its_own_gets_no_reuse(tmp_path):
    """As root, an action may create cgroups inside its own: the whole tree is removed
    (its processes killed), and the next action gets a fresh cgroup."""
    assert CGROUPS is not None
    if CGROUPS.unified is None or os.geteuid() != 0:
        pytest.skip("needs root and a v2 tracking cgroup")
    key = unique_key(tmp_path)
    supervisor = Supervisor(LimitsSettings(), pool_key=key)
    mount = CGROUPS.unified
    while mount.parent != mount and (mount.parent / "cgroup.controllers").exists():
        mount = mount.parent
    script = (
        f'sub="{mount}$(sed -n "s/^0:://p" /proc/self/cgroup)/sub"; '
        'mkdir "$sub" || exit 1; sleep 300 & echo $! > "$sub/cgroup.procs"'
    )
    try:
        made = await run(supervisor, tmp_path, "/bin/sh", "-c", script)
        assert made.exit_code == 0, (tmp_path / "stderr").read_text()
        assert supervisor.pool is not None and not supervisor.pool.idle
        assert pool_directories(key) == []
        await run(supervisor, tmp_path, "/bin/true")
        assert (supervisor.pool.created, supervisor.pool.reused) == (2, 0)
    finally:
        await supervisor.close()
