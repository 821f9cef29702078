"""Input trees built from local files, and the checks applied to trees from a server.

No server involved: these exercise `expbuild.client.tree` and `expbuild.client.actions`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from expbuild.client.actions import (
    build_action,
    build_command,
    platform_from_pairs,
)
from expbuild.client.tree import (
    MerkleTree,
    merkle_tree_from_directory,
    merkle_tree_from_paths,
    validate_directory,
)
from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.errors import InvalidArgument, NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2


def write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def directory(tree: MerkleTree, digest: Digest) -> re_pb2.Directory:
    blob = tree.blobs[digest]
    assert isinstance(blob, bytes), "directories are stored serialized"
    message = re_pb2.Directory()
    message.ParseFromString(blob)
    return message


def child(tree: MerkleTree, parent: re_pb2.Directory, name: str) -> re_pb2.Directory:
    (node,) = [d for d in parent.directories if d.name == name]
    return directory(tree, Digest.from_proto(node.digest))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write(root / "b.txt", b"bee\n")
    write(root / "a.txt", b"ay\n")
    write(root / "run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(root / "nested" / "deeper" / "leaf.txt", b"leaf\n")
    write(root / "nested" / "z.txt", b"zed\n")
    os.symlink("nested/z.txt", root / "link")
    return root


# -- merkle_tree_from_paths ---------------------------------------------------------------


def test_same_content_gives_same_digest_wherever_it_lives(tmp_path: Path, source: Path):
    first = merkle_tree_from_paths({"src": source})
    copy = tmp_path / "elsewhere" / "src"
    for path in sorted(source.rglob("*")):
        target = copy / path.relative_to(source)
        if path.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif path.is_file():
            write(target, path.read_bytes(), path.stat().st_mode & 0o777)
    second = merkle_tree_from_paths({"src": copy})
    assert first.root_digest == second.root_digest
    assert set(first.blobs) == set(second.blobs)


def test_root_digest_is_the_hash_of_the_serialized_root(source: Path):
    tree = merkle_tree_from_paths({"src": source})
    root_bytes = tree.blobs[tree.root_digest]
    assert isinstance(root_bytes, bytes)
    assert digest_of(root_bytes) == tree.root_digest
    for digest, blob in tree.blobs.items():
        data = blob if isinstance(blob, bytes) else blob.read_bytes()
        assert digest_of(data) == digest


def test_changing_a_byte_changes_the_root_digest(source: Path):
    before = merkle_tree_from_paths({"src": source}).root_digest
    write(source / "nested" / "deeper" / "leaf.txt", b"leaF\n")
    assert merkle_tree_from_paths({"src": source}).root_digest != before


def test_entries_are_sorted_by_name(tmp_path: Path):
    for name in ("zeta", "Alpha", "beta", "_under", "0num"):
        write(tmp_path / "in" / name, name.encode())
    for name in ("ydir", "bdir"):
        write(tmp_path / "in" / name / "f", b"x")
    tree = merkle_tree_from_directory(tmp_path / "in")
    root = directory(tree, tree.root_digest)
    names = [f.name for f in root.files]
    assert names == sorted(names) == ["0num", "Alpha", "_under", "beta", "zeta"]
    assert [d.name for d in root.directories] == ["bdir", "ydir"]
    validate_directory(root, "")


def test_executable_bit_is_kept(source: Path):
    tree = merkle_tree_from_directory(source)
    root = directory(tree, tree.root_digest)
    modes = {f.name: f.is_executable for f in root.files}
    assert modes == {"a.txt": False, "b.txt": False, "run.sh": True}


def test_executable_bit_changes_the_digest_but_not_the_file_blob(tmp_path: Path):
    plain = merkle_tree_from_paths({"tool": write(tmp_path / "a" / "tool", b"x", 0o644)})
    executable = merkle_tree_from_paths({"tool": write(tmp_path / "b" / "tool", b"x", 0o755)})
    assert plain.root_digest != executable.root_digest
    assert digest_of(b"x") in plain.blobs and digest_of(b"x") in executable.blobs


def test_symlinks_inside_directories_become_symlink_nodes(source: Path):
    tree = merkle_tree_from_directory(source)
    root = directory(tree, tree.root_digest)
    assert [(s.name, s.target) for s in root.symlinks] == [("link", "nested/z.txt")]
    assert "link" not in [f.name for f in root.files]


def test_dangling_relative_symlink_is_kept_as_is(tmp_path: Path):
    os.makedirs(tmp_path / "d")
    os.symlink("../nowhere", tmp_path / "d" / "dangling")
    tree = merkle_tree_from_directory(tmp_path / "d")
    assert [(s.name, s.target) for s in directory(tree, tree.root_digest).symlinks] == [
        ("dangling", "../nowhere")
    ]


def test_absolute_symlink_is_refused_with_its_path(tmp_path: Path):
    os.makedirs(tmp_path / "d")
    os.symlink("/etc/hostname", tmp_path / "d" / "abs")
    with pytest.raises(InvalidArgument, match="abs.*absolute"):
        merkle_tree_from_directory(tmp_path / "d")


def test_top_level_symlink_is_followed(tmp_path: Path):
    real = write(tmp_path / "real.txt", b"content")
    os.symlink(real, tmp_path / "alias")
    tree = merkle_tree_from_paths({"alias": tmp_path / "alias"})
    root = directory(tree, tree.root_digest)
    assert [f.name for f in root.files] == ["alias"]
    assert Digest.from_proto(root.files[0].digest) == digest_of(b"content")


def test_nested_directories(source: Path):
    tree = merkle_tree_from_paths({"src": source})
    root = directory(tree, tree.root_digest)
    assert [d.name for d in root.directories] == ["src"]
    src = child(tree, root, "src")
    nested = child(tree, src, "nested")
    deeper = child(tree, nested, "deeper")
    assert [f.name for f in nested.files] == ["z.txt"]
    assert [f.name for f in deeper.files] == ["leaf.txt"]
    assert tree.blobs[digest_of(b"leaf\n")] == source / "nested" / "deeper" / "leaf.txt"


def test_keys_with_slashes_create_parent_directories(tmp_path: Path):
    a = write(tmp_path / "one.txt", b"1")
    b = write(tmp_path / "two.txt", b"2")
    tree = merkle_tree_from_paths({"x/y/one.txt": a, "x/two.txt": b})
    root = directory(tree, tree.root_digest)
    x = child(tree, root, "x")
    assert [f.name for f in x.files] == ["two.txt"]
    assert [f.name for f in child(tree, x, "y").files] == ["one.txt"]


def test_identical_files_are_stored_once(tmp_path: Path):
    a = write(tmp_path / "a", b"same")
    b = write(tmp_path / "b", b"same")
    tree = merkle_tree_from_paths({"a": a, "b": b})
    file_blobs = [d for d, blob in tree.blobs.items() if isinstance(blob, Path)]
    assert file_blobs == [digest_of(b"same")]


def test_empty_directory_and_empty_file(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    tree = merkle_tree_from_paths(
        {"empty": tmp_path / "empty", "nothing": write(tmp_path / "nothing", b"")}
    )
    root = directory(tree, tree.root_digest)
    assert Digest.from_proto(root.directories[0].digest) == EMPTY
    assert Digest.from_proto(root.files[0].digest) == EMPTY


def test_no_inputs_is_the_empty_directory():
    assert merkle_tree_from_paths({}).root_digest == EMPTY


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "./a", "a//b", "a/", ".."])
def test_bad_keys_are_refused(tmp_path: Path, key: str):
    f = write(tmp_path / "f", b"x")
    with pytest.raises(InvalidArgument, match="input name"):
        merkle_tree_from_paths({key: f})


def test_missing_path_is_not_found(tmp_path: Path):
    with pytest.raises(NotFound, match="nope"):
        merkle_tree_from_paths({"nope": tmp_path / "nope"})


def test_conflicting_keys_are_refused(tmp_path: Path):
    f = write(tmp_path / "f", b"x")
    with pytest.raises(InvalidArgument, match="'a'"):
        merkle_tree_from_paths({"a": f, "a/b": f})


def test_key_colliding_with_scanned_directory_entry_is_refused(tmp_path: Path, source: Path):
    f = write(tmp_path / "f", b"x")
    with pytest.raises(InvalidArgument, match="src/a.txt"):
        merkle_tree_from_paths({"src": source, "src/a.txt": f})


def test_special_files_are_refused(tmp_path: Path):
    os.makedirs(tmp_path / "d")
    os.mkfifo(tmp_path / "d" / "pipe")
    with pytest.raises(InvalidArgument, match="pipe"):
        merkle_tree_from_directory(tmp_path / "d")


# -- validate_directory -------------------------------------------------------------------


def file_node(name: str, data: bytes = b"x") -> re_pb2.FileNode:
    return re_pb2.FileNode(name=name, digest=digest_of(data).to_proto())


def dir_node(name: str) -> re_pb2.DirectoryNode:
    return re_pb2.DirectoryNode(name=name, digest=EMPTY.to_proto())


def test_valid_directory_passes():
    validate_directory(
        re_pb2.Directory(
            files=[file_node("a"), file_node("b")],
            directories=[dir_node("c")],
            symlinks=[re_pb2.SymlinkNode(name="d", target="a")],
        ),
        "some/dir",
    )


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\0"])
@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_bad_names_are_refused(name: str, kind: str):
    if kind == "file":
        message = re_pb2.Directory(files=[file_node(name)])
    elif kind == "directory":
        message = re_pb2.Directory(directories=[dir_node(name)])
    else:
        message = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name=name, target="x")])
    with pytest.raises(InvalidArgument) as raised:
        validate_directory(message, "out/sub")
    assert repr(name) in str(raised.value)
    assert "out/sub" in str(raised.value)
    assert kind in str(raised.value)


def test_duplicate_file_names_are_refused():
    with pytest.raises(InvalidArgument, match="'a' appears twice"):
        validate_directory(re_pb2.Directory(files=[file_node("a"), file_node("a", b"y")]), "")


def test_same_name_for_file_and_directory_is_refused():
    message = re_pb2.Directory(files=[file_node("a")], directories=[dir_node("a")])
    with pytest.raises(InvalidArgument, match="directory 'a' is also the name of a file"):
        validate_directory(message, "w")


def test_same_name_for_directory_and_symlink_is_refused():
    message = re_pb2.Directory(
        directories=[dir_node("a")], symlinks=[re_pb2.SymlinkNode(name="a", target="x")]
    )
    with pytest.raises(InvalidArgument, match="symlink 'a'"):
        validate_directory(message, "w")


def test_unsorted_entries_are_refused():
    with pytest.raises(InvalidArgument, match="'a' comes after 'b'.*sorted"):
        validate_directory(re_pb2.Directory(files=[file_node("b"), file_node("a")]), "top")
    with pytest.raises(InvalidArgument, match="sorted"):
        validate_directory(re_pb2.Directory(directories=[dir_node("z"), dir_node("y")]), "top")


def test_sorting_is_by_code_point_like_utf8_bytes():
    # "Z" (0x5a) < "_" (0x5f) < "a" (0x61) < "é" (U+00E9)
    validate_directory(re_pb2.Directory(files=[file_node(n) for n in ("Z", "_", "a", "é")]), "")


def test_root_is_named_in_messages():
    with pytest.raises(InvalidArgument, match="root directory"):
        validate_directory(re_pb2.Directory(files=[file_node("..")]), "")


def test_bad_digest_is_refused_with_the_entry_name():
    bad = re_pb2.FileNode(name="f", digest=re_pb2.Digest(hash="abc", size_bytes=1))
    with pytest.raises(InvalidArgument, match="'f'"):
        validate_directory(re_pb2.Directory(files=[bad]), "d")


def test_empty_symlink_target_is_refused():
    with pytest.raises(InvalidArgument, match="'s'.*empty target"):
        validate_directory(re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="s")]), "")


# -- actions ------------------------------------------------------------------------------


def test_command_is_canonical():
    one = build_command(
        ["cc", "-c", "x.c"],
        env={"PATH": "/bin", "LANG": "C"},
        output_paths=["x.o", "lib", "x.o"],
        platform={"OSFamily": "Linux", "ISA": ["x86_64", "x86-64"]},
    )
    two = build_command(
        ["cc", "-c", "x.c"],
        env={"LANG": "C", "PATH": "/bin"},
        output_paths=["lib", "x.o"],
        platform={"ISA": ["x86-64", "x86_64"], "OSFamily": "Linux"},
    )
    assert one.SerializeToString(deterministic=True) == two.SerializeToString(deterministic=True)
    assert [e.name for e in one.environment_variables] == ["LANG", "PATH"]
    assert list(one.output_paths) == ["lib", "x.o"]
    assert not one.output_files and not one.output_directories
    assert [(p.name, p.value) for p in one.platform.properties] == [
        ("ISA", "x86-64"),
        ("ISA", "x86_64"),
        ("OSFamily", "Linux"),
    ]


def test_action_without_platform_leaves_it_unset():
    action = build_action(EMPTY, EMPTY)
    assert not action.HasField("platform") and not action.HasField("timeout")


@pytest.mark.parametrize("path", ["/abs", "../up", "a/../b", ".", "", "a//b"])
def test_bad_output_paths_are_refused(path: str):
    with pytest.raises(InvalidArgument, match="output path"):
        build_command(["true"], output_paths=[path])


def test_platform_pairs():
    assert platform_from_pairs(["OS=Linux", "ISA=a", "ISA=b", "X=y=z", "E="]) == {
        "OS": ["Linux"],
        "ISA": ["a", "b"],
        "X": ["y=z"],
        "E": [""],
    }
    with pytest.raises(InvalidArgument, match="'noequals'"):
        platform_from_pairs(["noequals"])
    with pytest.raises(InvalidArgument, match="'=v'"):
        platform_from_pairs(["=v"])
