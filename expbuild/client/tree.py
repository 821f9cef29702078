"""Merkle trees of REAPI `Directory` messages: building input roots, checking and
materializing trees fetched from the CAS.

Directories are serialized deterministically with entries sorted by name, so the same
files, modes and symlinks always give the same root digest, on any machine.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import shutil
import stat
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from google.protobuf.message import DecodeError
from google.rpc import code_pb2

from expbuild.aio import gather_or_cancel
from expbuild.client.cas import CasClient
from expbuild.digest import Digest, digest_of
from expbuild.errors import FailedPrecondition, InvalidArgument, NotFound, RemoteError
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.merkle import DirectoryContents, TreeBuilder, serialize
from expbuild.reapi.status import missing_blob

# How many small files materialize fetches in one read_available call, by total size: bounds
# the memory held while still amortizing round trips.
_SMALL_FILE_GROUP_BYTES = 16 * 1024 * 1024
_PARALLEL_DOWNLOADS = 8


@dataclass
class MerkleTree:
    """An input tree ready to upload.

    `blobs` holds every Directory (serialized, as bytes) and every file (as the local Path
    to read it from) that the tree references, keyed by digest; identical contents appear
    once. Pass it to `CasClient.upload`.
    """

    root_digest: Digest
    blobs: dict[Digest, bytes | Path]


# -- building ---------------------------------------------------------------------------


class _InputRules:
    """Inputs: what cannot be sent is refused here, where the user can fix it."""

    def name(self, name: str, path: str) -> str:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(
                f"{path}: the name is not valid UTF-8, which REAPI paths must be"
            ) from None
        return name

    def symlink_target(self, path: str) -> str:
        target = os.readlink(path)
        if os.path.isabs(target):
            # Such a link would point into the worker's filesystem, not the input tree;
            # materialize refuses it, so refuse it here where the user can fix it.
            raise InvalidArgument(
                f"input symlink {path} points to the absolute path {target}; only relative "
                "symlinks can be sent (pass the target itself as an input instead)"
            )
        return target

    def unsupported(self, path: str, mode: int) -> Exception:
        return InvalidArgument(
            f"input {path} is not a regular file, directory or symlink "
            "(sockets, pipes and devices cannot be sent)"
        )

    def collision(self, path: str) -> Exception:
        return InvalidArgument(f"input {path} collides with another input of that name")


def _merkle_tree(builder: TreeBuilder, root: DirectoryContents) -> MerkleTree:
    root_digest, _ = builder.close(root)
    blobs: dict[Digest, bytes | Path] = dict(builder.files)
    for digest, directory in builder.directories.items():
        blobs.setdefault(digest, serialize(directory))
    return MerkleTree(root_digest=root_digest, blobs=blobs)


def _components(key: str) -> list[str]:
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\0" in part:
            raise InvalidArgument(
                f"input name {key!r} is not a relative path of plain names "
                "(no leading '/', no empty, '.' or '..' parts)"
            )
    return parts


def merkle_tree_from_paths(entries: Mapping[str, Path]) -> MerkleTree:
    """An input root where each key (a relative name like "src" or "a/b.txt") holds the
    local file or directory it maps to.

    Directories are added recursively; files keep their owner-executable bit; symlinks
    inside directories become SymlinkNodes with their relative target unchanged, while a
    key's own path is followed if it is a symlink. Parent directories of nested keys are
    created. Raises `NotFound` for a path that does not exist and `InvalidArgument` for a
    bad key, two inputs claiming the same name, an absolute symlink, or a special file.
    Reads every file to hash it: call it via `asyncio.to_thread` from async code.
    """
    builder = TreeBuilder(_InputRules())
    root = DirectoryContents()
    for key in sorted(entries):
        path = Path(entries[key])
        parts = _components(key)
        parent = root
        for i, part in enumerate(parts[:-1]):
            if part in parent.files or part in parent.symlinks:
                raise InvalidArgument(
                    f"input {key!r} needs {'/'.join(parts[: i + 1])!r} to be a directory, "
                    "but another input is a file there"
                )
            parent = parent.directories.setdefault(part, DirectoryContents())
        name = parts[-1]
        if parent.has(name):
            raise InvalidArgument(f"two inputs are named {key!r}; give them different names")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFound(f"input {path} does not exist") from None
        if stat.S_ISDIR(st.st_mode):
            sub = parent.directories[name] = DirectoryContents()
            builder.scan(path, sub)
        elif stat.S_ISREG(st.st_mode):
            parent.files[name] = builder.file_node(name, path, st.st_mode)
        else:
            raise InvalidArgument(f"input {path} is not a regular file or directory")
    return _merkle_tree(builder, root)


def merkle_tree_from_directory(path: Path) -> MerkleTree:
    """The tree whose root is local directory `path` itself (same rules as
    `merkle_tree_from_paths`)."""
    if not path.exists():
        raise NotFound(f"directory {path} does not exist")
    if not path.is_dir():
        raise InvalidArgument(f"{path} is not a directory")
    builder = TreeBuilder(_InputRules())
    root = DirectoryContents()
    builder.scan(path, root)
    return _merkle_tree(builder, root)


# -- checking ---------------------------------------------------------------------------


def _place(where: str) -> str:
    return f"directory {where!r}" if where else "the root directory"


def validate_directory(directory: re_pb2.Directory, where: str) -> None:
    """Raise `InvalidArgument` unless `directory` is safe to lay out on disk.

    Refuses names that are empty, ".", "..", or contain "/" or NUL; a name used twice
    (across files, directories and symlinks); entries not sorted by name; malformed
    digests; empty symlink targets. `where` is the directory's path inside the tree ("" for
    the root) and appears in the message along with the offending entry.
    """
    seen: dict[str, str] = {}
    groups: list[tuple[str, list[str]]] = [
        ("file", [n.name for n in directory.files]),
        ("directory", [n.name for n in directory.directories]),
        ("symlink", [n.name for n in directory.symlinks]),
    ]
    for kind, names in groups:
        previous: str | None = None
        for name in names:
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise InvalidArgument(
                    f"{_place(where)}: {kind} name {name!r} is not allowed (names must be "
                    "non-empty, not '.' or '..', without '/' or NUL)"
                )
            if name in seen:
                clash = (
                    "appears twice" if seen[name] == kind else f"is also the name of a {seen[name]}"
                )
                raise InvalidArgument(f"{_place(where)}: {kind} {name!r} {clash}")
            if previous is not None and name < previous:
                raise InvalidArgument(
                    f"{_place(where)}: {kind} {name!r} comes after {previous!r}; entries must "
                    "be sorted by name"
                )
            seen[name] = kind
            previous = name
    nodes: list[re_pb2.FileNode | re_pb2.DirectoryNode] = [*directory.files, *directory.directories]
    for node in nodes:
        try:
            Digest.from_proto(node.digest)
        except InvalidArgument as e:
            raise InvalidArgument(f"{_place(where)}: entry {node.name!r}: {e}") from None
    for link in directory.symlinks:
        if not link.target:
            raise InvalidArgument(f"{_place(where)}: symlink {link.name!r} has an empty target")


def _check_symlink(link_path: str, target: str) -> None:
    if os.path.isabs(target) or target.startswith("/"):
        raise InvalidArgument(
            f"symlink {link_path!r} points to the absolute path {target!r}; only targets "
            "inside the tree are allowed"
        )
    # Lexical check: the tree is laid out fresh, so no other symlink can redirect `..`.
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    if resolved == ".." or resolved.startswith("../"):
        raise InvalidArgument(
            f"symlink {link_path!r} points to {target!r}, which is outside the tree"
        )


# -- materializing ----------------------------------------------------------------------


# Up to this many directories (the root is one) are created on the event loop.
_INLINE_DIRECTORIES = 4


@dataclass
class _Layout:
    directories: list[str] = field(default_factory=list)
    # digest -> every (relative path, executable) that holds that content
    files: dict[Digest, list[tuple[str, bool]]] = field(default_factory=lambda: defaultdict(list))
    symlinks: list[tuple[str, str]] = field(default_factory=list)


# Loads the Directory messages of one level of the tree; a digest left out of the result
# is missing from the CAS.
DirectoryLoader = Callable[[list[Digest]], Awaitable[dict[Digest, re_pb2.Directory]]]


def _missing_blobs(missing: list[tuple[str, str, Digest]]) -> FailedPrecondition:
    """The error for blobs of the tree the CAS lacks: (kind, path in the tree, digest) for
    each, every digest once.

    FAILED_PRECONDITION with one REAPI MISSING violation per blob is what tells a client
    (Bazel, `expbuild run`) to upload them and try again.
    """

    def what(kind: str, path: str) -> str:
        return "the root directory" if kind == "directory" and not path else f"{kind} {path!r}"

    violations = [
        missing_blob(digest, f"{what(kind, path)} ({digest}) is not in the CAS")
        for kind, path, digest in missing
    ]
    named = ", ".join(f"{what(kind, path)} ({digest})" for kind, path, digest in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return FailedPrecondition(
        f"{len(missing)} blob(s) of the tree are not in the CAS: {named}{more}", violations
    )


async def _plan(root_digest: Digest, load: DirectoryLoader, location: str) -> _Layout:
    """Walk the tree level by level, validating each Directory once.

    Symlinks are checked as if the tree sat at `location` inside the tree of allowed
    targets.
    """
    layout = _Layout()
    level: dict[Digest, list[str]] = {root_digest: [""]}
    while level:
        loaded = await load(list(level))
        missing = [("directory", places[0], d) for d, places in level.items() if d not in loaded]
        if missing:
            raise _missing_blobs(missing)
        next_level: dict[Digest, list[str]] = defaultdict(list)
        for digest, places in level.items():
            directory = loaded[digest]
            validate_directory(directory, places[0])
            for where in places:
                layout.directories.append(where)
                for f in directory.files:
                    path = posixpath.join(where, f.name)
                    layout.files[Digest.from_proto(f.digest)].append((path, f.is_executable))
                for d in directory.directories:
                    next_level[Digest.from_proto(d.digest)].append(posixpath.join(where, d.name))
                for link in directory.symlinks:
                    path = posixpath.join(where, link.name)
                    _check_symlink(posixpath.join(location, path), link.target)
                    layout.symlinks.append((path, link.target))
        level = next_level
    return layout


def _parse_directory(digest: Digest, data: bytes) -> re_pb2.Directory:
    directory = re_pb2.Directory()
    try:
        directory.ParseFromString(data)
    except DecodeError:
        raise InvalidArgument(f"blob {digest} is not a Directory message") from None
    return directory


# Creates the files of a tree: gets every (path, executable) that must hold each content,
# returns the digests the CAS lacks. Once one is missing, the others need not be placed.
PlaceFiles = Callable[[Mapping[Digest, Sequence[tuple[Path, bool]]]], Awaitable[list[Digest]]]


class BlobSource(Protocol):
    """Where `materialize` gets blobs from: the CAS itself, or a cache in front of it."""

    async def read_available(
        self, digests: Iterable[Digest]
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        """Like `CasClient.read_available`: the blobs found, and the digests missing."""
        ...

    async def place_files(
        self, files: Mapping[Digest, Sequence[tuple[Path, bool]]]
    ) -> list[Digest]:
        """A `PlaceFiles`."""
        ...


@dataclass
class CasSource:
    """Every blob downloaded from `cas`; files land with mode 0o755 or 0o644."""

    cas: CasClient

    async def read_available(
        self, digests: Iterable[Digest]
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        return await self.cas.read_available(digests)

    async def place_files(
        self, files: Mapping[Digest, Sequence[tuple[Path, bool]]]
    ) -> list[Digest]:
        return await download_files(self.cas, files)


def _write_files(items: list[tuple[Path, bool, bytes]]) -> None:
    for path, executable, data in items:
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o755 if executable else 0o644)


def _copy_file(source: Path, destination: Path, executable: bool) -> None:
    shutil.copyfile(source, destination)
    os.chmod(destination, 0o755 if executable else 0o644)


async def download_files(
    cas: CasClient, files: Mapping[Digest, Sequence[tuple[Path, bool]]]
) -> list[Digest]:
    """Write each content to all its (path, executable) places, mode 0o755 or 0o644.

    Each distinct content is downloaded once (small ones in batches, large ones streamed
    to disk), several at a time, then copied to its other places. Parent directories
    must exist; existing files are overwritten. Returns the digests the CAS lacks, all of
    them: after the first one is seen nothing more is downloaded, and the rest are
    checked with FindMissingBlobs.
    """
    slots = asyncio.Semaphore(_PARALLEL_DOWNLOADS)
    # Blobs found missing, and blobs not fetched because the tree was incomplete already:
    # those are only checked with FindMissingBlobs, so the error lists every missing blob.
    missing: list[Digest] = []
    skipped: list[Digest] = []

    async def fetch_small(group: list[Digest]) -> None:
        async with slots:
            if missing:
                skipped.extend(group)
                return
            contents, absent = await cas.read_available(group)
            if absent:
                missing.extend(absent)
                return
            items = [
                (path, executable, contents[digest])
                for digest in group
                for path, executable in files[digest]
            ]
            await asyncio.to_thread(_write_files, items)

    async def fetch_large(digest: Digest) -> None:
        async with slots:
            if missing:
                skipped.append(digest)
                return
            (first, first_executable), *others = files[digest]
            try:
                await cas.read_to_file(digest, first, first_executable)
            except NotFound:
                missing.append(digest)
                return
            for path, executable in others:
                await asyncio.to_thread(_copy_file, first, path, executable)

    groups: list[list[Digest]] = []
    group: list[Digest] = []
    group_bytes = 0
    large: list[Digest] = []
    for digest, places in files.items():
        if not places:
            continue
        if not cas.fits_in_batch(digest):
            large.append(digest)
            continue
        if group and group_bytes + digest.size_bytes > _SMALL_FILE_GROUP_BYTES:
            groups.append(group)
            group, group_bytes = [], 0
        group.append(digest)
        group_bytes += digest.size_bytes
    if group:
        groups.append(group)

    await gather_or_cancel([*(fetch_small(g) for g in groups), *(fetch_large(d) for d in large)])
    if missing and skipped:
        missing.extend(await cas.find_missing(skipped))
    return missing


async def _lay_out(source: BlobSource, layout: _Layout, target: Path) -> None:
    def make_directories() -> None:
        for where in layout.directories:
            (target / where).mkdir(parents=True, exist_ok=True)

    if len(layout.directories) <= _INLINE_DIRECTORIES:
        make_directories()  # a few mkdirs cost less than the hop to a thread
    else:
        await asyncio.to_thread(make_directories)

    files = {
        digest: [(target / path, executable) for path, executable in places]
        for digest, places in layout.files.items()
    }
    missing = set(await source.place_files(files))
    if missing:
        raise _missing_blobs(
            [("file", layout.files[d][0][0], d) for d in layout.files if d in missing]
        )

    def make_symlinks() -> None:
        for relative, link_target in layout.symlinks:
            os.symlink(link_target, target / relative)

    if layout.symlinks:
        await asyncio.to_thread(make_symlinks)


async def materialize(
    cas: CasClient,
    root_digest: Digest,
    target: Path,
    *,
    location: str = "",
    source: BlobSource | None = None,
) -> None:
    """Lay out the tree rooted at Directory `root_digest` under `target`.

    Fetches the root and every descendant Directory, validating each
    (`validate_directory`), then creates the directories, downloads the files (each
    distinct content once; small ones batched, large ones streamed) with mode 0o755 or
    0o644, and creates the symlinks. Refuses (InvalidArgument) symlinks with absolute
    targets or targets outside the tree. `target` is created if needed and should be
    empty: files already there with the same names are overwritten, others are kept.

    Blobs missing from the CAS raise `FailedPrecondition` with one MISSING violation
    (subject `blobs/<hash>/<size>`) per missing blob: every missing Directory of the
    first level that has any, or else every missing file. Nothing is downloaded after
    the first missing file is seen; the rest are checked with FindMissingBlobs.

    `location` is where `target` sits inside the tree symlinks may point into (e.g.
    "out/dir" for an output directory, whose symlinks may point to sibling outputs);
    the default "" means the tree itself is that root.

    `source` replaces the plain downloads from `cas` (Directory reads and file
    placement), e.g. with a worker's local blob cache; the tree walk stays the same.
    Without one, the Directory messages come from one GetTree call (see `_tree_loader`).
    """
    if source is None:
        load = await _tree_loader(cas, root_digest)
        source = CasSource(cas)
    else:
        load = _source_loader(source)
    layout = await _plan(root_digest, load, location)
    await _lay_out(source, layout, target)


def _source_loader(source: BlobSource) -> DirectoryLoader:
    async def load(digests: list[Digest]) -> dict[Digest, re_pb2.Directory]:
        blobs, _ = await source.read_available(digests)
        return {d: _parse_directory(d, data) for d, data in blobs.items()}

    return load


async def _tree_loader(cas: CasClient, root_digest: Digest) -> DirectoryLoader:
    """A loader answering from the whole tree, fetched up front with GetTree.

    GetTree leaves out directories the CAS lacks; those, and any directory whose message
    does not re-serialize to the digest naming it, are read directly by the loader, so a
    missing one is reported exactly as a level-by-level walk would report it.
    """
    try:
        directories = await cas.get_tree(root_digest)
    except NotFound:
        directories = []  # the root itself is missing: the walk reports it
    except RemoteError as e:
        if e.code != code_pb2.UNIMPLEMENTED:
            raise
        directories = []  # a server without GetTree: every level is read directly
    known = {digest_of(serialize(d)): d for d in directories}
    direct = _source_loader(CasSource(cas))

    async def load(digests: list[Digest]) -> dict[Digest, re_pb2.Directory]:
        found = {d: known[d] for d in digests if d in known}
        rest = [d for d in digests if d not in found]
        if rest:
            found.update(await direct(rest))
        return found

    return load


async def materialize_tree(
    cas: CasClient, tree: re_pb2.Tree, target: Path, *, location: str = ""
) -> None:
    """Lay out an output directory given as a REAPI `Tree` (root plus all children) under
    `target`; same guarantees and `location` as `materialize`, but only file contents are
    fetched.

    Raises `InvalidArgument` if a DirectoryNode refers to a directory the Tree lacks.
    """
    by_digest = {digest_of(serialize(child)): child for child in tree.children}
    root_digest = digest_of(serialize(tree.root))
    by_digest[root_digest] = tree.root

    async def load(digests: list[Digest]) -> dict[Digest, re_pb2.Directory]:
        missing = [d for d in digests if d not in by_digest]
        if missing:
            raise InvalidArgument(
                f"output tree refers to directory {missing[0]} it does not contain"
            )
        return {d: by_digest[d] for d in digests}

    layout = await _plan(root_digest, load, location)
    await _lay_out(CasSource(cas), layout, target)
