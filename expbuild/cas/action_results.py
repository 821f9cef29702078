"""ActionResults against the CAS: is everything they name still there, a worker's
report with blobs inline, and inlining outputs into answers.

A cached ActionResult is only useful if every blob it names can still be read: Bazel
builds on top of a cache hit without checking, and fails late if an output is gone. So
the server checks completeness before it answers from the action cache, and treats an
incomplete entry as a miss (the action runs again and the entry is replaced).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError

from expbuild.cas.store import FileStore
from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.errors import InvalidArgument, NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2

_M = TypeVar("_M", re_pb2.Tree, re_pb2.Directory)

# Never inline more than this in one response, whatever the client asks.
MAX_INLINE_BYTES = 1024 * 1024


def _digest(message: re_pb2.Digest) -> Digest | None:
    if not message.hash:
        return None
    try:
        return Digest.from_proto(message)
    except InvalidArgument:
        return None


async def missing_blobs(store: FileStore, result: re_pb2.ActionResult) -> list[Digest]:
    """Every blob `result` names (files, std streams, trees and the files inside them, the
    Directory messages of a `root_directory_digest` and what they hold) that the store no
    longer has. The present ones are touched: the eviction's LRU sees them as just used,
    so an entry's outputs stay as long as the entry is hit (build without the bytes).
    One thread hop, none for a result that names only empty blobs (a no-op's)."""
    if _names_only_empty_blobs(result):
        return []
    return await asyncio.to_thread(_BlobWalk(store, {}).missing, result, ())


def _names_only_empty_blobs(result: re_pb2.ActionResult) -> bool:
    """No output directory, and every other digest empty (always present) or unset."""
    if result.output_directories:
        return False
    named = [result.stdout_digest, result.stderr_digest, *(f.digest for f in result.output_files)]
    return all(not d.hash or (d.hash == EMPTY.hash and d.size_bytes == 0) for d in named)


class _BlobWalk:
    """Blocking: what a result names, found in `inline` (blobs at hand) or the store."""

    def __init__(self, store: FileStore, inline: Mapping[Digest, bytes]):
        self.store, self.inline = store, inline
        self.named: set[Digest] = set()

    def _have(self, digests: Iterable[Digest]) -> list[Digest]:
        """The missing ones of `digests`, in first-seen order; the present ones touched."""
        missing = []
        for digest in dict.fromkeys(digests):
            self.named.add(digest)
            if digest not in self.inline and not self.store.has_blocking(digest, touch=True):
                missing.append(digest)
        return missing

    def _read(self, digest: Digest) -> bytes | None:
        if (data := self.inline.get(digest)) is not None:
            return data
        try:
            return self.store.get_blocking(digest)
        except (NotFound, OSError):
            return None

    def _parse(self, kind: type[_M], digest: Digest) -> _M | None:
        """The blob as a `kind` message; None if it cannot be read or is not one (then
        the outputs it stands for cannot be read back either)."""
        blob = self._read(digest)
        if blob is None:
            return None
        try:
            return kind.FromString(blob)
        except DecodeError:
            return None

    def missing(self, result: re_pb2.ActionResult, logs: Iterable[Digest]) -> list[Digest]:
        wanted: list[Digest] = list(logs)
        for field in (result.stdout_digest, result.stderr_digest):
            if (d := _digest(field)) is not None:
                wanted.append(d)
        wanted += [d for f in result.output_files if (d := _digest(f.digest)) is not None]
        trees = [d for o in result.output_directories if (d := _digest(o.tree_digest)) is not None]
        roots = [
            d
            for o in result.output_directories
            if (d := _digest(o.root_directory_digest)) is not None
        ]
        missing = self._have(wanted + trees)
        for tree_digest in dict.fromkeys(trees):
            if tree_digest in missing:
                continue
            tree = self._parse(re_pb2.Tree, tree_digest)
            if tree is None:
                missing.append(tree_digest)
                continue
            missing += self._have(
                d
                for directory in (tree.root, *tree.children)
                for f in directory.files
                if (d := _digest(f.digest)) is not None
            )
        return missing + self._missing_under(roots)

    def _missing_under(self, directories: list[Digest]) -> list[Digest]:
        """The blobs missing from the Directory trees rooted at `directories`."""
        missing: list[Digest] = []
        seen: set[Digest] = set()
        level = list(dict.fromkeys(directories))
        while level:
            seen.update(level)
            gone = self._have(level)
            missing += gone
            files: list[Digest] = []
            children: list[Digest] = []
            for digest in level:
                if digest in gone:
                    continue
                directory = self._parse(re_pb2.Directory, digest)
                if directory is None:
                    missing.append(digest)
                    continue
                files += [d for f in directory.files if (d := _digest(f.digest)) is not None]
                children += [
                    d for c in directory.directories if (d := _digest(c.digest)) is not None
                ]
            missing += self._have(files)
            level = [d for d in dict.fromkeys(children) if d not in seen]
        return missing


def store_reported_blobs(
    store: FileStore,
    result: re_pb2.ActionResult,
    logs: Iterable[Digest],
    inline: Sequence[tuple[Digest, bytes]],
) -> list[Digest]:
    """A worker's report: write its `inline` blobs once all is well, else nothing.

    Blocking, one thread hop for the whole report. Raises `InvalidArgument` naming the
    first inline blob whose data does not match its digest, or that neither `result` nor
    `logs` (the ExecuteResponse's server logs) names. Returns the blobs named that are
    neither inline nor in the store; when there are any, nothing was written.
    """
    blobs: dict[Digest, bytes] = {}
    for digest, data in inline:
        actual = digest_of(data)
        if actual != digest:
            raise InvalidArgument(f"inline blob {digest}: its data is blob {actual}")
        blobs[digest] = data
    walk = _BlobWalk(store, blobs)
    missing = walk.missing(result, logs)
    for digest in blobs:
        if digest not in walk.named:
            raise InvalidArgument(f"inline blob {digest} is named by nothing in the result")
    if missing:
        return missing
    for digest, data in blobs.items():
        store.put_blocking(digest, data)
    return []


async def inline_outputs(
    store: FileStore,
    result: re_pb2.ActionResult,
    *,
    stdout: bool,
    stderr: bool,
    files: Sequence[str] = (),
    limit: int = MAX_INLINE_BYTES,
) -> None:
    """Fill stdout_raw / stderr_raw / OutputFile.contents as asked, within `limit` bytes."""
    budget = limit

    async def take(digest_field: re_pb2.Digest) -> bytes | None:
        nonlocal budget
        digest = _digest(digest_field)
        if digest is None or digest.size_bytes > budget:
            return None
        try:
            data = await store.get(digest)
        except NotFound:
            return None
        budget -= len(data)
        return data

    if stdout and not result.stdout_raw and (data := await take(result.stdout_digest)) is not None:
        result.stdout_raw = data
    if stderr and not result.stderr_raw and (data := await take(result.stderr_digest)) is not None:
        result.stderr_raw = data
    wanted = set(files)
    for output in result.output_files:
        if output.path in wanted and not output.contents:
            if (data := await take(output.digest)) is not None:
                output.contents = data
