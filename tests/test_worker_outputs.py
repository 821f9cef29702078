"""Output collection: declared outputs on disk -> ActionResult fields, Tree messages and blobs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.errors import FailedPrecondition, InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.merkle import serialize
from expbuild.worker.outputs import (
    collect_outputs,
    declared_outputs,
    file_digest,
    output_parent_directories,
)

Format = re_pb2.Command.OutputDirectoryFormat


def command(
    *,
    paths: list[str] | None = None,
    files: list[str] | None = None,
    directories: list[str] | None = None,
    working_directory: str = "",
    tree_format: int = Format.TREE_ONLY,
) -> re_pb2.Command:
    return re_pb2.Command(
        arguments=["true"],
        output_paths=paths or [],
        output_files=files or [],
        output_directories=directories or [],
        working_directory=working_directory,
        output_directory_format=tree_format,
    )


def write(path: Path, content: bytes = b"", executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o755 if executable else 0o644)
    return path


def blob_bytes(blob: bytes | Path) -> bytes:
    return blob.read_bytes() if isinstance(blob, Path) else blob


def tree_of(collected, output: re_pb2.OutputDirectory) -> re_pb2.Tree:
    digest = Digest.from_proto(output.tree_digest)
    data = blob_bytes(collected.blobs[digest])
    assert digest_of(data) == digest
    return re_pb2.Tree.FromString(data)


# ---- files -------------------------------------------------------------------------


def test_regular_files_with_digest_and_executable_bit(tmp_path):
    write(tmp_path / "out" / "lib.a", b"archive")
    write(tmp_path / "out" / "tool", b"#!/bin/sh\n", executable=True)
    collected = collect_outputs(command(paths=["out/lib.a", "out/tool"]), tmp_path)
    files = {f.path: f for f in collected.result.output_files}
    assert set(files) == {"out/lib.a", "out/tool"}
    assert Digest.from_proto(files["out/lib.a"].digest) == digest_of(b"archive")
    assert not files["out/lib.a"].is_executable
    assert files["out/tool"].is_executable
    assert collected.blobs[digest_of(b"archive")] == tmp_path / "out" / "lib.a"
    assert not collected.result.output_directories
    assert not collected.result.output_symlinks


def test_empty_file_has_empty_digest_and_no_blob(tmp_path):
    write(tmp_path / "empty")
    collected = collect_outputs(command(paths=["empty"]), tmp_path)
    (output,) = collected.result.output_files
    assert Digest.from_proto(output.digest) == EMPTY
    assert EMPTY not in collected.blobs


def test_missing_outputs_are_absent(tmp_path):
    write(tmp_path / "present", b"x")
    collected = collect_outputs(command(paths=["present", "absent", "no/such/dir/file"]), tmp_path)
    assert [f.path for f in collected.result.output_files] == ["present"]


def test_missing_output_below_a_file_is_absent(tmp_path):
    write(tmp_path / "file", b"x")
    collected = collect_outputs(command(paths=["file/child"]), tmp_path)
    assert not collected.result.output_files


def test_paths_are_relative_to_the_working_directory(tmp_path):
    write(tmp_path / "pkg" / "sub" / "gen.h", b"#define X 1\n")
    collected = collect_outputs(command(paths=["gen.h"], working_directory="pkg/sub"), tmp_path)
    (output,) = collected.result.output_files
    assert output.path == "gen.h"
    assert Digest.from_proto(output.digest) == digest_of(b"#define X 1\n")


def test_large_file_digest_is_streamed(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = write(tmp_path / "big.bin", data)
    assert file_digest(path) == digest_of(data)


def test_duplicate_declarations_are_collected_once(tmp_path):
    write(tmp_path / "a", b"a")
    collected = collect_outputs(command(paths=["a", "a"]), tmp_path)
    assert len(collected.result.output_files) == 1


# ---- directories -------------------------------------------------------------------


def test_nested_directory_becomes_a_tree_with_matching_digests(tmp_path):
    write(tmp_path / "out" / "b.txt", b"bee")
    write(tmp_path / "out" / "a.txt", b"ay", executable=True)
    write(tmp_path / "out" / "sub" / "deep" / "c.txt", b"sea")
    write(tmp_path / "out" / "sub" / "d.txt", b"dee")
    (tmp_path / "out" / "link").symlink_to("sub/d.txt")
    collected = collect_outputs(command(paths=["out"]), tmp_path)

    (output,) = collected.result.output_directories
    assert output.path == "out"
    assert not output.HasField("root_directory_digest")
    tree = tree_of(collected, output)

    root = tree.root
    assert [f.name for f in root.files] == ["a.txt", "b.txt"]
    assert root.files[0].is_executable and not root.files[1].is_executable
    assert [(s.name, s.target) for s in root.symlinks] == [("link", "sub/d.txt")]
    assert [d.name for d in root.directories] == ["sub"]

    children = {digest_of(serialize(child)): child for child in tree.children}
    sub = children[Digest.from_proto(root.directories[0].digest)]
    assert [f.name for f in sub.files] == ["d.txt"]
    deep = children[Digest.from_proto(sub.directories[0].digest)]
    assert [f.name for f in deep.files] == ["c.txt"]
    assert len(tree.children) == 2

    # Every file the tree names is in the blob map, with the right content.
    for name, content in (("a.txt", b"ay"), ("b.txt", b"bee")):
        node = next(f for f in root.files if f.name == name)
        assert blob_bytes(collected.blobs[Digest.from_proto(node.digest)]) == content
    assert blob_bytes(collected.blobs[digest_of(b"sea")]) == b"sea"


def test_tree_is_canonical(tmp_path):
    for base in ("one", "two"):
        # Created in different orders: the digests must not care.
        names = ["z", "a", "m"] if base == "one" else ["m", "z", "a"]
        for name in names:
            write(tmp_path / base / name / "f", name.encode())
    collected = collect_outputs(command(paths=["one", "two"]), tmp_path)
    first, second = collected.result.output_directories
    assert first.tree_digest == second.tree_digest
    tree = tree_of(collected, first)
    assert [d.name for d in tree.root.directories] == ["a", "m", "z"]


def test_identical_subdirectories_appear_once_in_children(tmp_path):
    write(tmp_path / "out" / "x" / "same.txt", b"same")
    write(tmp_path / "out" / "y" / "same.txt", b"same")
    collected = collect_outputs(command(paths=["out"]), tmp_path)
    tree = tree_of(collected, collected.result.output_directories[0])
    assert len(tree.children) == 1
    assert tree.root.directories[0].digest == tree.root.directories[1].digest


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    collected = collect_outputs(command(paths=["empty"]), tmp_path)
    (output,) = collected.result.output_directories
    tree = tree_of(collected, output)
    assert tree.root == re_pb2.Directory()
    assert not tree.children


def test_working_directory_itself_as_output_directory(tmp_path):
    write(tmp_path / "wd" / "f", b"f")
    collected = collect_outputs(command(directories=[""], working_directory="wd"), tmp_path)
    (output,) = collected.result.output_directories
    assert output.path == ""
    assert [f.name for f in tree_of(collected, output).root.files] == ["f"]


def test_directory_only_format_uploads_directories(tmp_path):
    write(tmp_path / "out" / "sub" / "f", b"f")
    collected = collect_outputs(
        command(paths=["out"], tree_format=Format.TREE_AND_DIRECTORY), tmp_path
    )
    (output,) = collected.result.output_directories
    root_digest = Digest.from_proto(output.root_directory_digest)
    root = re_pb2.Directory.FromString(collected.blobs[root_digest])
    sub_digest = Digest.from_proto(root.directories[0].digest)
    assert re_pb2.Directory.FromString(collected.blobs[sub_digest]).files[0].name == "f"
    assert tree_of(collected, output).root == root

    only = collect_outputs(command(paths=["out"], tree_format=Format.DIRECTORY_ONLY), tmp_path)
    (output,) = only.result.output_directories
    assert not output.HasField("tree_digest")
    assert Digest.from_proto(output.root_directory_digest) == root_digest


# ---- symlinks ----------------------------------------------------------------------


def test_symlink_output_paths_keep_their_target(tmp_path):
    write(tmp_path / "real.txt", b"real")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file-link").symlink_to("real.txt")
    (tmp_path / "dir-link").symlink_to("dir")
    (tmp_path / "dangling").symlink_to("../nowhere/at/all")
    collected = collect_outputs(command(paths=["file-link", "dir-link", "dangling"]), tmp_path)
    assert [(s.path, s.target) for s in collected.result.output_symlinks] == [
        ("file-link", "real.txt"),
        ("dir-link", "dir"),
        ("dangling", "../nowhere/at/all"),
    ]
    assert not collected.result.output_files
    assert not collected.result.output_directories
    assert not collected.result.output_file_symlinks


def test_absolute_symlink_outputs_are_a_failed_precondition(tmp_path):
    (tmp_path / "abs-link").symlink_to("/etc/passwd")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "inner").symlink_to("/usr")
    with pytest.raises(FailedPrecondition, match="absolute path '/etc/passwd'"):
        collect_outputs(command(paths=["abs-link"]), tmp_path)
    with pytest.raises(FailedPrecondition, match="absolute path '/usr'"):
        collect_outputs(command(paths=["out"]), tmp_path)


def test_v20_symlinks_go_to_their_own_fields(tmp_path):
    write(tmp_path / "real.txt", b"real")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file-link").symlink_to("real.txt")
    (tmp_path / "dir-link").symlink_to("dir")
    collected = collect_outputs(command(files=["file-link"], directories=["dir-link"]), tmp_path)
    assert [(s.path, s.target) for s in collected.result.output_file_symlinks] == [
        ("file-link", "real.txt")
    ]
    assert [(s.path, s.target) for s in collected.result.output_directory_symlinks] == [
        ("dir-link", "dir")
    ]
    assert not collected.result.output_symlinks


def test_output_paths_win_over_v20_fields(tmp_path):
    write(tmp_path / "a", b"a")
    write(tmp_path / "b", b"b")
    cmd = command(paths=["a"], files=["b"])
    assert [o.path for o in declared_outputs(cmd)] == ["a"]
    collected = collect_outputs(cmd, tmp_path)
    assert [f.path for f in collected.result.output_files] == ["a"]


def test_v20_kind_mismatch_is_failed_precondition(tmp_path):
    write(tmp_path / "file", b"x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FailedPrecondition, match="'file' is a regular file, not a directory"):
        collect_outputs(command(directories=["file"]), tmp_path)
    with pytest.raises(FailedPrecondition, match="'dir' is a directory, not a regular file"):
        collect_outputs(command(files=["dir"]), tmp_path)


# ---- refused paths and file types --------------------------------------------------


@pytest.mark.parametrize("path", ["../escape", "a/../../b", "out/.."])
def test_dotdot_is_refused(tmp_path, path):
    with pytest.raises(InvalidArgument, match=r"contains '\.\.'"):
        collect_outputs(command(paths=[path]), tmp_path)
    with pytest.raises(InvalidArgument, match=r"contains '\.\.'"):
        output_parent_directories(command(paths=[path]), tmp_path)


def test_absolute_path_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="is absolute"):
        collect_outputs(command(files=["/etc/passwd"]), tmp_path)


def test_bad_working_directory_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="working directory '../up'"):
        collect_outputs(command(paths=["x"], working_directory="../up"), tmp_path)


def test_output_through_a_symlink_leaving_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    write(outside / "secret", b"secret")
    root.mkdir()
    (root / "escape").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="leads outside the input root"):
        collect_outputs(command(paths=["escape/secret"]), root)


def test_fifo_at_output_path_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InvalidArgument, match=r"output path 'pipe' is a FIFO \(named pipe\)"):
        collect_outputs(command(paths=["pipe"]), tmp_path)


def test_fifo_inside_output_directory_is_refused(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    os.mkfifo(tmp_path / "out" / "sub" / "pipe")
    with pytest.raises(InvalidArgument, match=r"output path 'out' contains 'sub/pipe', a FIFO"):
        collect_outputs(command(paths=["out"]), tmp_path)


# ---- parents created before the run -------------------------------------------------


def test_output_parent_directories(tmp_path):
    cmd = command(
        files=["bin/tool", "top.txt"], directories=["gen/include"], working_directory="wd"
    )
    parents = output_parent_directories(cmd, tmp_path)
    assert set(parents) == {tmp_path / "wd", tmp_path / "wd" / "bin", tmp_path / "wd" / "gen"}
