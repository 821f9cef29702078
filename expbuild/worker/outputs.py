"""Turn what an action left in its working directory into ActionResult outputs.

`collect_outputs` is pure with respect to the network: it walks the declared outputs and
returns the output fields of an ActionResult together with the blobs they name (files
as paths, Tree/Directory messages as bytes). The caller uploads the blobs; only after
that upload succeeds may the result be reported.

Rules (REAPI v2):
- Command.output_node_properties (v2.1) `mtime` / `unix_mode` are set on every output
  node (files, symlinks, and the nodes and Directory messages of output directories).
- Command.output_paths (v2.1) wins over output_files/output_directories (v2.0).
- Paths are relative to the working directory; a missing output is simply absent.
- A symlink at an output path is reported as a symlink with its target text, never
  followed; inside an output directory it becomes a SymlinkNode.
- Only regular files, directories and symlinks can be outputs; anything else (FIFO,
  socket, device) fails the action with a message naming the path.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from expbuild.digest import Digest, digest_of, digest_of_file
from expbuild.errors import FailedPrecondition, InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.merkle import TreeBuilder, is_executable, serialize
from expbuild.reapi.node_properties import node_properties
from expbuild.worker.paths import check_inside, join_inside

_CHUNK = 1024 * 1024

Blob = bytes | Path


class OutputKind(Enum):
    ANY = "output path"  # v2.1 output_paths: whatever is there
    FILE = "output file"  # v2.0 output_files
    DIRECTORY = "output directory"  # v2.0 output_directories


@dataclass(frozen=True)
class DeclaredOutput:
    path: str
    kind: OutputKind


@dataclass
class CollectedOutputs:
    # Only the output_* fields are set; exit code, logs and metadata are the caller's.
    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    # Every non-empty blob the result names (the empty blob is always present in a CAS).
    blobs: dict[Digest, Blob] = field(default_factory=dict)
    # Command.output_node_properties (v2.1): what to report on every output node.
    wanted_properties: frozenset[str] = frozenset()

    def properties(self, st: os.stat_result) -> re_pb2.NodeProperties | None:
        return node_properties(st, self.wanted_properties)

    def add_blob(self, digest: Digest, content: Blob) -> None:
        if not digest.is_empty:
            self.blobs.setdefault(digest, content)


def declared_outputs(command: re_pb2.Command) -> list[DeclaredOutput]:
    """The outputs the command declares, without duplicates, in declaration order."""
    if command.output_paths:
        declared = [DeclaredOutput(p, OutputKind.ANY) for p in command.output_paths]
    else:
        declared = [DeclaredOutput(p, OutputKind.FILE) for p in command.output_files]
        declared += [DeclaredOutput(p, OutputKind.DIRECTORY) for p in command.output_directories]
    seen: set[str] = set()
    unique = []
    for output in declared:
        if output.path not in seen:
            seen.add(output.path)
            unique.append(output)
    return unique


def working_directory(command: re_pb2.Command, input_root: Path) -> Path:
    path = join_inside(input_root, command.working_directory, "working directory")
    check_inside(input_root, path, "working directory", follow_last=True)
    return path


def output_parent_directories(command: re_pb2.Command, input_root: Path) -> list[Path]:
    """The directories the worker creates before the run (REAPI: parents of every output).

    Validates every declared path, so a bad one fails the task before it runs.
    """
    workdir = working_directory(command, input_root)
    parents = [workdir]
    for output in declared_outputs(command):
        path = join_inside(workdir, output.path, output.kind.value)
        check_inside(input_root, path, output.kind.value)
        if path != workdir:
            parents.append(path.parent)
    return parents


def collect_outputs(command: re_pb2.Command, input_root: Path) -> CollectedOutputs:
    """Read the declared outputs of a finished action (blocking; run it in a thread)."""
    workdir = working_directory(command, input_root)
    tree_format = command.output_directory_format
    collected = CollectedOutputs(wanted_properties=frozenset(command.output_node_properties))
    result = collected.result
    for output in declared_outputs(command):
        what = f"{output.kind.value} {output.path!r}"
        path = join_inside(workdir, output.path, output.kind.value)
        check_inside(input_root, path, output.kind.value)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # REAPI: outputs the action did not produce are omitted
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            symlink = re_pb2.OutputSymlink(
                path=output.path,
                target=_symlink_target(path, what),
                node_properties=collected.properties(st),
            )
            {
                OutputKind.ANY: result.output_symlinks,
                OutputKind.FILE: result.output_file_symlinks,
                OutputKind.DIRECTORY: result.output_directory_symlinks,
            }[output.kind].append(symlink)
        elif stat.S_ISREG(mode):
            if output.kind is OutputKind.DIRECTORY:
                raise FailedPrecondition(f"{what} is a regular file, not a directory")
            digest = file_digest(path)
            collected.add_blob(digest, path)
            result.output_files.append(
                re_pb2.OutputFile(
                    path=output.path,
                    digest=digest.to_proto(),
                    is_executable=is_executable(mode),
                    node_properties=collected.properties(st),
                )
            )
        elif stat.S_ISDIR(mode):
            if output.kind is OutputKind.FILE:
                raise FailedPrecondition(f"{what} is a directory, not a regular file")
            result.output_directories.append(
                _output_directory(output.path, path, what, tree_format, collected)
            )
        else:
            raise InvalidArgument(
                f"{what} is a {file_type(mode)}; only regular files, directories and "
                "symlinks can be outputs"
            )
    return collected


def _symlink_target(path, what: str) -> str:
    """The link's target text. Absolute targets are refused: the server advertises
    SymlinkAbsolutePathStrategy.DISALLOWED, and REAPI says such an output is a
    FAILED_PRECONDITION (clients could not reproduce the link on another machine)."""
    target = _text(os.readlink(path), what)
    if target.startswith("/"):
        raise FailedPrecondition(
            f"{what}: symlink {os.fspath(path)!r} points to the absolute path {target!r}; "
            "only relative symlink targets can be outputs"
        )
    return target


def file_digest(path: Path) -> Digest:
    return digest_of_file(path)


def file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISREG, "regular file"),
    ):
        if test(mode):
            return name
    return f"file of unknown type (mode {mode:o})"


@dataclass
class _OutputRules:
    """Inside output directory `top` (declared as `what`)."""

    what: str
    top: Path

    def name(self, name: str, path: str) -> str:
        return _text(name, f"{self.what}: entry {path!r}")

    def symlink_target(self, path: str) -> str:
        return _symlink_target(path, self.what)

    def unsupported(self, path: str, mode: int) -> Exception:
        inside = os.path.relpath(path, self.top)
        return InvalidArgument(
            f"{self.what} contains {inside!r}, a {file_type(mode)}; only regular files, "
            "directories and symlinks can be outputs"
        )

    def collision(self, path: str) -> Exception:  # a fresh directory: names are unique
        return InvalidArgument(f"{self.what}: entry {path!r} appears twice")


def _output_directory(
    declared: str, path: Path, what: str, tree_format: int, collected: CollectedOutputs
) -> re_pb2.OutputDirectory:
    """Build the directory's Tree (root plus every distinct descendant) and its blobs."""
    builder = TreeBuilder(_OutputRules(what, path), collected.wanted_properties)
    root_digest, root = builder.read(path)
    for digest, file in builder.files.items():
        collected.add_blob(digest, file)
    # Children before parents; the root itself is no descendant of its own.
    descendants = {d: m for d, m in builder.directories.items() if d != root_digest}
    output = re_pb2.OutputDirectory(path=declared)
    Format = re_pb2.Command.OutputDirectoryFormat
    if tree_format in (Format.TREE_ONLY, Format.TREE_AND_DIRECTORY):
        tree = re_pb2.Tree(root=root, children=list(descendants.values()))
        tree_blob = serialize(tree)
        tree_digest = digest_of(tree_blob)
        collected.add_blob(tree_digest, tree_blob)
        output.tree_digest.CopyFrom(tree_digest.to_proto())
    if tree_format in (Format.DIRECTORY_ONLY, Format.TREE_AND_DIRECTORY):
        collected.add_blob(root_digest, serialize(root))
        for digest, directory in descendants.items():
            collected.add_blob(digest, serialize(directory))
        output.root_directory_digest.CopyFrom(root_digest.to_proto())
    return output


def _text(name: str, what: str) -> str:
    """Proto strings must be UTF-8; os functions return undecodable bytes as surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what}: name {name!r} is not valid UTF-8") from None
    return name
