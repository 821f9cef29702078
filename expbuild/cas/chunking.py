"""SplitBlob and SpliceBlob (REAPI v2.12): a large blob as a list of content-defined
chunks, and a blob assembled from chunks already in the CAS.

Split cuts the stored blob with FastCDC 2020 (`pyfastcdc`: normalisation level 2, an
average of 512 KiB, chunks between a quarter and four times that), stores every chunk
as a blob of its own and returns their digests in order. The chunking is this server's
choice (`ChunkingFunction.UNKNOWN` in the answer): the FastCDC parameters REAPI defines
for clients to chunk identically (its MD5-derived gear table) are not advertised.

Splice streams the chunks, in order, into a temporary file while hashing it and publishes
it only when the result matches the requested digest: nothing a client claims is trusted,
and a failed splice leaves nothing behind. Blocking: run both in a thread.
"""

from __future__ import annotations

import os
from typing import Final

from pyfastcdc import FastCDC

from expbuild.cas.layout import read_file_chunks, unlink_quiet
from expbuild.cas.store import FileStore
from expbuild.digest import EMPTY, Digest, digest_of, new_hasher
from expbuild.errors import InvalidArgument, NotFound

AVERAGE_CHUNK = 512 * 1024
NORMALIZATION: Final = 2


def split_blob(store: FileStore, digest: Digest) -> list[Digest]:
    """The digests of `digest`'s chunks, each stored; NotFound if the blob is not stored."""
    if digest == EMPTY:
        return []
    if not store.layout.present(digest, touch=True):
        raise NotFound(f"blob {digest} is not in the CAS")
    chunker = FastCDC(AVERAGE_CHUNK, normalized_chunking=NORMALIZATION)
    chunks: list[Digest] = []
    total = 0
    try:
        for chunk in chunker.cut_file(os.fspath(store.path_of(digest))):
            data = bytes(chunk.data)
            chunk_digest = digest_of(data)
            store.put_blocking(chunk_digest, data)  # a blob under one chunk is its own chunk
            chunks.append(chunk_digest)
            total += len(data)
    except FileNotFoundError:
        raise NotFound(f"blob {digest} left the CAS while it was being split") from None
    if total != digest.size_bytes:
        raise NotFound(f"blob {digest} changed size while it was being split")
    return chunks


def splice_blob(store: FileStore, digest: Digest, chunks: list[Digest]) -> Digest:
    """Store `digest` as the concatenation of `chunks` (all in the CAS), verified."""
    missing = [c for c in chunks if not store.layout.present(c, touch=True)]
    if missing:
        raise NotFound(
            f"{len(missing)} of the {len(chunks)} chunks are not in the CAS, e.g. {missing[0]}"
        )
    total = sum(c.size_bytes for c in chunks)
    if total != digest.size_bytes:
        raise InvalidArgument(
            f"the chunks add up to {total} bytes, blob_digest {digest} says {digest.size_bytes}"
        )
    if store.layout.present(digest, touch=True):
        return digest  # already stored; its bytes were verified when they were
    tmp = store.layout.new_temp_path(digest)
    try:
        hasher = new_hasher()
        with open(tmp, "xb") as out:
            for chunk in chunks:
                try:
                    with open(store.path_of(chunk), "rb") as source:
                        for data in read_file_chunks(source):
                            hasher.update(data)
                            out.write(data)
                except FileNotFoundError:
                    raise NotFound(f"chunk {chunk} left the CAS during the splice") from None
            got = Digest(hasher.hexdigest(), total)
            if got != digest:
                raise InvalidArgument(
                    f"the chunks concatenate to {got}, not to blob_digest {digest}"
                )
            store.layout.finish_file(out)
        store.layout.publish(tmp, store.path_of(digest))
    except BaseException:
        unlink_quiet(tmp)
        raise
    return digest


__all__ = ["AVERAGE_CHUNK", "split_blob", "splice_blob"]
