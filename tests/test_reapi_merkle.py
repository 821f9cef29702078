"""One Merkle tree builder: the client's input roots and the worker's output directories
name the same local tree with the same digests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from expbuild.client.tree import merkle_tree_from_directory
from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.errors import FailedPrecondition, InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.merkle import serialize
from expbuild.worker.outputs import collect_outputs

Format = re_pb2.Command.OutputDirectoryFormat


def make_tree(root: Path, names: list[str]) -> None:
    """The same tree whatever order `names` come in: files, an executable, a symlink,
    an empty directory."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif name == "link":
            os.symlink("sub/b.txt", path)
        else:
            path.write_bytes(name.encode())
            path.chmod(0o755 if name.endswith(".sh") else 0o644)


NAMES = ["a.txt", "run.sh", "sub/b.txt", "sub/deep/c.txt", "empty/", "link", "Z.txt"]


def test_input_root_and_output_directory_of_one_tree_have_one_digest(tmp_path):
    make_tree(tmp_path / "in", NAMES)
    make_tree(tmp_path / "work" / "out", list(reversed(NAMES)))  # other creation order
    inputs = merkle_tree_from_directory(tmp_path / "in")

    command = re_pb2.Command(output_paths=["out"], output_directory_format=Format.DIRECTORY_ONLY)
    collected = collect_outputs(command, tmp_path / "work")
    (output,) = collected.result.output_directories
    assert Digest.from_proto(output.root_directory_digest) == inputs.root_digest

    # Both hold every Directory of the tree under its digest (the worker leaves out the
    # empty blob, which every CAS has).
    directories = {d for d, blob in inputs.blobs.items() if isinstance(blob, bytes)}
    assert directories - {EMPTY} <= set(collected.blobs)
    root = re_pb2.Directory.FromString(inputs.blobs[inputs.root_digest])  # type: ignore[arg-type]
    assert [f.name for f in root.files] == ["Z.txt", "a.txt", "run.sh"]  # code point order
    assert [f.is_executable for f in root.files] == [False, False, True]
    assert [d.name for d in root.directories] == ["empty", "sub"]
    assert [(s.name, s.target) for s in root.symlinks] == [("link", "sub/b.txt")]
    assert digest_of(serialize(root)) == inputs.root_digest


def test_each_side_refuses_what_it_cannot_carry_in_its_own_words(tmp_path):
    make_tree(tmp_path / "in", ["a.txt"])
    os.symlink("/etc/passwd", tmp_path / "in" / "abs")
    with pytest.raises(InvalidArgument, match="only relative symlinks can be sent"):
        merkle_tree_from_directory(tmp_path / "in")

    make_tree(tmp_path / "work" / "out", ["a.txt"])
    os.symlink("/etc/passwd", tmp_path / "work" / "out" / "abs")
    command = re_pb2.Command(output_paths=["out"])
    with pytest.raises(FailedPrecondition, match="only relative symlink targets can be outputs"):
        collect_outputs(command, tmp_path / "work")
