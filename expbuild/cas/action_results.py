"""ActionResults against the CAS: is everything they name still there, and inlining.

A cached ActionResult is only useful if every blob it names can still be read: Bazel
builds on top of a cache hit without checking, and fails late if an output is gone. So
the server checks completeness before it answers from the action cache, and treats an
incomplete entry as a miss (the action runs again and the entry is replaced).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from expbuild.cas.store import FileStore
from expbuild.digest import Digest
from expbuild.errors import InvalidArgument, NotFound
from expbuild.proto import remote_execution_pb2 as re_pb2

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
    so an entry's outputs stay as long as the entry is hit (build without the bytes)."""
    wanted: list[Digest] = []
    for field in (result.stdout_digest, result.stderr_digest):
        if (d := _digest(field)) is not None:
            wanted.append(d)
    wanted += [d for f in result.output_files if (d := _digest(f.digest)) is not None]
    trees = [d for o in result.output_directories if (d := _digest(o.tree_digest)) is not None]
    roots = [
        d for o in result.output_directories if (d := _digest(o.root_directory_digest)) is not None
    ]
    missing = await store.find_missing(wanted + trees, touch=True)
    present_trees = [t for t in trees if t not in missing]
    for tree_digest, blob in zip(present_trees, await store.get_many(present_trees), strict=True):
        if isinstance(blob, Exception):
            missing.append(tree_digest)
            continue
        try:
            tree = re_pb2.Tree.FromString(blob)
        except DecodeError:
            missing.append(tree_digest)  # not a Tree: the outputs cannot be read back
            continue
        inside = [
            d
            for directory in (tree.root, *tree.children)
            for f in directory.files
            if (d := _digest(f.digest)) is not None
        ]
        missing += await store.find_missing(inside, touch=True)
    missing += await _missing_under(store, roots)
    return missing


async def _missing_under(store: FileStore, directories: list[Digest]) -> list[Digest]:
    """The blobs missing from the Directory trees rooted at `directories` (touching the
    present ones), one level of the trees per round."""
    missing: list[Digest] = []
    seen: set[Digest] = set()
    level = list(dict.fromkeys(directories))
    while level:
        seen.update(level)
        gone = await store.find_missing(level, touch=True)
        missing += gone
        present = [d for d in level if d not in gone]
        files: list[Digest] = []
        children: list[Digest] = []
        for digest, blob in zip(present, await store.get_many(present), strict=True):
            if isinstance(blob, Exception):
                missing.append(digest)
                continue
            try:
                directory = re_pb2.Directory.FromString(blob)
            except DecodeError:
                missing.append(digest)  # not a Directory: the outputs cannot be read back
                continue
            files += [d for f in directory.files if (d := _digest(f.digest)) is not None]
            children += [d for c in directory.directories if (d := _digest(c.digest)) is not None]
        missing += await store.find_missing(files, touch=True)
        level = [d for d in dict.fromkeys(children) if d not in seen]
    return missing


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
