"""What a small action skips on the worker (issue #10, worker CPU per action).

- Outputs and logs that are few and small are gathered on the event loop, not in a thread.
- The zygote and each launcher name themselves, so `ps` and profiles tell them apart.
- An action directory its action left bare is emptied and kept for the next action.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from expbuild.config import LimitsSettings
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.worker.execution import ExecutionRequest
from expbuild.worker.host import HostExecutor
from expbuild.worker.inputs import (
    SPARE_LOG_BYTES,
    SPARE_PREFIX,
    ActionDirectories,
    ActionDirectory,
)
from expbuild.worker.runner import _outputs_are_small, gather_outputs


def action_directory(tmp_path: Path) -> ActionDirectory:
    root = tmp_path / "root"
    root.mkdir()
    for name in ("stdout", "stderr"):
        (tmp_path / name).write_bytes(b"")
    return ActionDirectory(tmp_path, root, root, tmp_path / "stdout", tmp_path / "stderr")


def test_small_outputs_are_gathered_inline(tmp_path):
    directory = action_directory(tmp_path)
    command = re_pb2.Command(arguments=["true"], output_paths=["a", "missing"])
    (directory.input_root / "a").write_bytes(b"x" * 1000)
    directory.stdout_path.write_bytes(b"hello\n")
    assert _outputs_are_small(command, directory)
    result, blobs, error = gather_outputs(command, directory, LimitsSettings())
    assert error is None and [f.path for f in result.output_files] == ["a"]
    assert len(blobs) == 2  # `a` and stdout


@pytest.mark.parametrize("case", ["large stdout", "large output", "output directory", "many"])
def test_large_or_many_outputs_go_to_a_thread(tmp_path, case):
    directory = action_directory(tmp_path)
    paths = ["a"]
    if case == "large stdout":
        directory.stdout_path.write_bytes(b"x" * (65 * 1024))
    elif case == "large output":
        (directory.input_root / "a").write_bytes(b"x" * (65 * 1024))
    elif case == "output directory":
        (directory.input_root / "a").mkdir()
    else:
        paths = [f"f{n}" for n in range(17)]
    command = re_pb2.Command(arguments=["true"], output_paths=paths)
    assert not _outputs_are_small(command, directory)


async def shell(executor: HostExecutor, tmp_path: Path, script: str) -> str:
    """`script`'s stdout, run by `executor` as an action (its parent is its launcher)."""
    outcome = await executor.execute(
        ExecutionRequest(
            arguments=["/bin/sh", "-c", script],
            environment={},
            working_directory=tmp_path,
            stdout_path=tmp_path / "stdout",
            stderr_path=tmp_path / "stderr",
            timeout=30,
        )
    )
    assert outcome.exit_code == 0, (tmp_path / "stderr").read_text()
    return (tmp_path / "stdout").read_text()


async def test_the_zygote_and_launchers_name_themselves(tmp_path):
    executor = HostExecutor(limits=LimitsSettings(cgroups=False))
    try:
        assert await shell(executor, tmp_path, "cat /proc/$PPID/comm") == "expbuild-launch\n"
        zygote = executor.supervisor.zygote.pid
        assert Path(f"/proc/{zygote}/comm").read_text() == "expbuild-zygote\n"
    finally:
        await executor.close()


# -- action directories: a bare one is kept and reused, anything else removed ------------


def make_bare(directories: ActionDirectories, task: str = "t") -> Path:
    path = directories.create(task, 1)
    (path / "stdout").write_bytes(b"out\n")
    (path / "stderr").write_bytes(b"")
    return path


async def test_a_bare_action_directory_is_reused_emptied(tmp_path):
    directories = ActionDirectories(tmp_path)
    first = make_bare(directories)
    inode = first.stat().st_ino
    await directories.remove(first)
    assert not first.exists()
    (spare,) = directories.spares
    assert (spare / "stdout").read_bytes() == b""  # the last action's output is gone
    second = directories.create("u", 1)
    assert second.name.startswith("u-1-") and second.stat().st_ino == inode
    assert list((second / "root").iterdir()) == []
    await directories.remove(second)
    await directories.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change", ["file in root", "root mode", "root xattr", "extra file", "large log"]
)
async def test_an_action_directory_that_is_not_bare_is_removed(tmp_path, change):
    directories = ActionDirectories(tmp_path)
    path = make_bare(directories)
    root = path / "root"
    if change == "file in root":
        (root / "left").write_text("x")
    elif change == "root mode":
        root.chmod(0o777 if stat.S_IMODE(root.stat().st_mode) != 0o777 else 0o755)
    elif change == "root xattr":
        os.setxattr(root, "user.left", b"x")
    elif change == "large log":
        (path / "stderr").write_bytes(b"x" * (SPARE_LOG_BYTES + 1))
    else:
        (path / "core").write_text("x")
    await directories.remove(path)
    assert directories.spares == []
    assert list(tmp_path.iterdir()) == []


async def test_spares_of_a_dead_worker_are_removed_at_start(tmp_path):
    dead = tmp_path / f"{SPARE_PREFIX}999999999.1-1"
    (dead / "root").mkdir(parents=True)
    live = ActionDirectories(tmp_path)
    await live.remove(make_bare(live))
    (own,) = live.spares
    ActionDirectories(tmp_path)  # another worker starting in the same work_dir
    assert not dead.exists()
    assert own.exists()  # this process is alive: its spare stays
    await live.close()
    assert not own.exists()
