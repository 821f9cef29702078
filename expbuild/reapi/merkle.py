"""Merkle trees: local directories as canonical REAPI `Directory` messages.

One builder for the client's input roots and the worker's output directories. Entries
are sorted by name (code point order, which is the UTF-8 byte order REAPI specifies) and
messages serialized deterministically, so the same files, modes and symlinks give the
same digests on any machine. What counts as a bad entry (an absolute symlink, a socket,
a name that is not UTF-8) and how it is reported differs between the two, so the caller
passes an `EntryRules`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from expbuild.digest import Digest, digest_of, digest_of_file
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.node_properties import node_properties


def serialize(message: re_pb2.Directory | re_pb2.Tree) -> bytes:
    """The canonical bytes of a message, the ones its digest is computed over."""
    return message.SerializeToString(deterministic=True)


def is_executable(mode: int) -> bool:
    return bool(mode & stat.S_IXUSR)


class EntryRules(Protocol):
    """What a caller accepts while a local directory is read, and the error for the rest."""

    def name(self, name: str, path: str) -> str:
        """`name` (of the entry at `path`) if it can be a REAPI name; raise otherwise."""
        ...

    def symlink_target(self, path: str) -> str:
        """The target of the symlink at `path` if it may be sent; raise otherwise."""
        ...

    def unsupported(self, path: str, mode: int) -> Exception:
        """The error for an entry that is no regular file, directory or symlink."""
        ...

    def collision(self, path: str) -> Exception:
        """The error for an entry whose name the directory holds already."""
        ...


@dataclass
class DirectoryContents:
    """A directory being assembled: entries by name, subdirectories still open."""

    files: dict[str, re_pb2.FileNode] = field(default_factory=dict)
    directories: dict[str, DirectoryContents] = field(default_factory=dict)
    symlinks: dict[str, re_pb2.SymlinkNode] = field(default_factory=dict)
    # Set only when node properties are asked for (Command.output_node_properties).
    properties: re_pb2.NodeProperties | None = None

    def has(self, name: str) -> bool:
        return name in self.files or name in self.directories or name in self.symlinks


class TreeBuilder:
    """Reads local directories into `DirectoryContents` and closes them into Directory
    messages, recording every file (as its path) and every Directory by digest.

    Reads and hashes every file: call it from a thread in async code.
    """

    def __init__(self, rules: EntryRules, wanted_properties: frozenset[str] = frozenset()) -> None:
        self.rules = rules
        # Node properties to record on every node (`mtime`, `unix_mode`); none by default,
        # so that input roots hash the same on every machine.
        self.wanted_properties = wanted_properties
        self.files: dict[Digest, Path] = {}
        # Every Directory closed so far, children before their parents.
        self.directories: dict[Digest, re_pb2.Directory] = {}

    def file_node(
        self, name: str, path: Path, mode: int, st: os.stat_result | None = None
    ) -> re_pb2.FileNode:
        digest = digest_of_file(path)
        self.files.setdefault(digest, path)
        return re_pb2.FileNode(
            name=name,
            digest=digest.to_proto(),
            is_executable=is_executable(mode),
            node_properties=self._properties(st),
        )

    def _properties(self, st: os.stat_result | None) -> re_pb2.NodeProperties | None:
        if st is None or not self.wanted_properties:
            return None
        return node_properties(st, self.wanted_properties)

    def scan(self, path: Path, into: DirectoryContents) -> None:
        """Add the contents of local directory `path` to `into`, recursively."""
        with os.scandir(path) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        for entry in entries:
            name = self.rules.name(entry.name, entry.path)
            if into.has(name):
                raise self.rules.collision(entry.path)
            st = entry.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                target = self.rules.symlink_target(entry.path)
                into.symlinks[name] = re_pb2.SymlinkNode(
                    name=name, target=target, node_properties=self._properties(st)
                )
            elif stat.S_ISDIR(mode):
                sub = into.directories[name] = DirectoryContents(properties=self._properties(st))
                self.scan(Path(entry.path), sub)
            elif stat.S_ISREG(mode):
                into.files[name] = self.file_node(name, Path(entry.path), mode, st)
            else:
                raise self.rules.unsupported(entry.path, mode)

    def close(self, contents: DirectoryContents) -> tuple[Digest, re_pb2.Directory]:
        """The canonical Directory for `contents` and its digest; its subdirectories are
        closed (and recorded) first."""
        message = re_pb2.Directory(
            files=[contents.files[n] for n in sorted(contents.files)],
            directories=[
                re_pb2.DirectoryNode(
                    name=n, digest=self.close(contents.directories[n])[0].to_proto()
                )
                for n in sorted(contents.directories)
            ],
            symlinks=[contents.symlinks[n] for n in sorted(contents.symlinks)],
            node_properties=contents.properties,
        )
        digest = digest_of(serialize(message))
        self.directories.setdefault(digest, message)
        return digest, message

    def read(self, path: Path) -> tuple[Digest, re_pb2.Directory]:
        """The Directory of local directory `path` itself (see `scan` and `close`)."""
        contents = DirectoryContents(properties=self._properties(os.lstat(path)))
        self.scan(path, contents)
        return self.close(contents)
