"""What a small action skips on the worker (issue #10, worker CPU per action).

- Outputs and logs that are few and small are gathered on the event loop, not in a thread.
- The zygote and each launcher name themselves, so `ps` and profiles tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from expbuild.config import LimitsSettings
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.worker.execution import ExecutionRequest
from expbuild.worker.host import HostExecutor
from expbuild.worker.inputs import ActionDirectory
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


async def test_the_zygote_and_launchers_name_themselves(tmp_path):
    executor = HostExecutor(limits=LimitsSettings(cgroups=False))
    try:
        script = "cat /proc/$PPID/comm"  # the command's parent is its launcher
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
        assert outcome.exit_code == 0
        assert (tmp_path / "stdout").read_text() == "expbuild-launch\n"
        zygote = executor.supervisor.zygote.pid
        assert Path(f"/proc/{zygote}/comm").read_text() == "expbuild-zygote\n"
    finally:
        await executor.close()
