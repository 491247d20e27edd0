"""Receiving a blob piece by piece, verified as it arrives, resumable after a drop.

A transfer knows the blob's hash, its size and its chunk list (1 MiB chunks) before the
first byte arrives. The chunk list is trusted only if its BLAKE3 equals the ``chunks``
field of the put event that named the blob (or, without an event, only provisionally:
the whole-blob hash decides at the end).

Bytes go to ``tmp/<hash>.part``. Only whole verified chunks are ever appended, so the
part file is always a verified prefix of the blob: after a drop or a crash, the next
attempt re-checks the prefix and resumes at its end — at most one chunk is transferred
twice. At the end the whole file is hashed once more and renamed into the store; a blob
whose bytes do not match is never stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from .blobstore import (
    CHUNK_SIZE,
    DIGEST_SIZE,
    BlobHashMismatch,
    BlobInfo,
    BlobStore,
    StagedBlob,
    chunk_count,
    chunks_root,
    implied_chunk_list,
    write_file,
)


class TransferError(Exception):
    """The sender sent something that does not verify; the message says what."""


class ChunkMismatch(TransferError):
    def __init__(self, blob: str, index: int) -> None:
        super().__init__(f"chunk {index} of blob {blob} does not match its hash")
        self.blob = blob
        self.index = index


class PartialBlob:
    """The receiving side of one blob transfer. Not thread-safe; one writer per blob."""

    def __init__(self, store: BlobStore, blob: str, size: int, chunk_digests: bytes,
                 expected_chunks_root: str | None = None) -> None:
        if len(chunk_digests) != chunk_count(size) * DIGEST_SIZE:
            raise TransferError(f"chunk list of blob {blob} has {len(chunk_digests) // 32} "
                                f"entries, a blob of {size} bytes has {chunk_count(size)}")
        if expected_chunks_root is not None and chunks_root(chunk_digests) != expected_chunks_root:
            raise TransferError(f"chunk list of blob {blob} does not match its put event")
        self.store = store
        self.blob = blob
        self.size = size
        self.digests = chunk_digests
        self.path: Path = store.part_path(blob)
        self._buf = bytearray()
        self._whole = blake3.blake3()  # of the verified prefix: no re-read at the end
        self.offset = self._resume()  # bytes verified on disk
        self.resumed_from = self.offset
        self._file = open(self.path, "r+b" if self.path.exists() else "w+b")  # noqa: SIM115 (held until commit/close)
        self._file.truncate(self.offset)
        self._file.seek(self.offset)

    def _resume(self) -> int:
        """Length of the verified prefix already in the part file (whole chunks only)."""
        if not self.path.exists():
            return 0
        good = 0
        with open(self.path, "rb") as f:
            index = 0
            while chunk := f.read(CHUNK_SIZE):
                last = good + len(chunk) == self.size
                if (len(chunk) < CHUNK_SIZE and not last) or not self._chunk_ok(index, chunk):
                    break
                self._whole.update(chunk)
                good += len(chunk)
                index += 1
        return good

    def _chunk_ok(self, index: int, chunk: bytes | bytearray | memoryview) -> bool:
        want = self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        return blake3.blake3(chunk).digest() == want

    @property
    def complete(self) -> bool:
        return self.offset >= self.size

    @property
    def next_chunk_size(self) -> int:
        """How many bytes the next :meth:`write_chunk` call takes (0 when complete)."""
        return min(CHUNK_SIZE, self.size - self.offset)

    @property
    def pending(self) -> int:
        """Bytes received but not yet verified (less than one chunk)."""
        return len(self._buf)

    def write_chunk(self, chunk: bytes | bytearray | memoryview) -> None:
        """Verify and append exactly the next chunk. Blocking (hash + write): run it in a
        worker thread; BLAKE3 and file writes release the GIL."""
        if len(chunk) != self.next_chunk_size:
            raise TransferError(f"chunk of {len(chunk)} bytes for blob {self.blob} at "
                                f"{self.offset}, expected {self.next_chunk_size}")
        index = self.offset // CHUNK_SIZE
        if not self._chunk_ok(index, chunk):
            raise ChunkMismatch(self.blob, index)
        self._file.write(chunk)
        self._whole.update(chunk)
        self.offset += len(chunk)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Accept the next bytes in any sizes (which must start at ``offset + pending``)."""
        if self.offset + len(self._buf) + len(data) > self.size:
            raise TransferError(f"sender sent more than the {self.size} bytes of blob {self.blob}")
        self._buf += data
        while self._buf and len(self._buf) >= self.next_chunk_size:
            take = self.next_chunk_size
            try:
                self.write_chunk(bytes(self._buf[:take]))
            except TransferError:
                self._buf.clear()
                raise
            del self._buf[:take]

    def close(self, *, durable: bool = True) -> None:
        """Keep the verified prefix for a later attempt; drop unverified bytes.

        ``durable=False`` skips the fsync: a later attempt re-verifies the prefix chunk by
        chunk anyway, so an unsynced part file can cost bytes after a power loss, never
        correctness."""
        if not self._file.closed:
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
            self._file.close()
        self._buf.clear()

    def stage(self, *, durable: bool = False) -> StagedBlob:
        """Check the whole hash and hand the part file over for a group install
        (:meth:`BlobStore.install_staged`, which makes it durable before the rename).
        ``durable``: fsync it now, for an install of this one blob (:meth:`finish`)."""
        if not self.complete:
            raise TransferError(f"blob {self.blob} incomplete: {self.offset} of {self.size} bytes")
        self.close(durable=durable)
        digest = self._whole.hexdigest()
        if digest != self.blob:
            self.path.unlink(missing_ok=True)
            raise BlobHashMismatch(self.blob, digest)
        return StagedBlob(self.path, digest, self.size, self.digests)

    def finish(self) -> BlobInfo:
        """Check the whole hash and move the blob into the store, durably, on its own."""
        s = self.stage(durable=True)
        return self.store.install_verified(s.tmp, s.digest, s.size, s.chunk_digests)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def stage_whole(store: BlobStore, blob: str, data: bytes | list[bytes],
                expected_chunks_root: str | None = None) -> StagedBlob:
    """Verify a blob of at most one chunk received in one piece (or in the pieces it came
    in) and write it to its part file for a group install. One hash: a one-chunk blob's
    only chunk digest is its hash. Blocking: run it in a worker thread."""
    pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    size = sum(map(len, pieces))
    if size > CHUNK_SIZE:
        raise TransferError(f"blob {blob}: {size} bytes is more than one chunk")
    digests = implied_chunk_list(blob, size)
    if expected_chunks_root is not None and chunks_root(digests) != expected_chunks_root:
        raise TransferError(f"chunk list of blob {blob} does not match its put event")
    hasher = blake3.blake3()
    for p in pieces:
        hasher.update(p)
    if hasher.hexdigest() != blob:
        if size:
            raise ChunkMismatch(blob, 0)
        raise BlobHashMismatch(blob, hasher.hexdigest())
    path = store.part_path(blob)
    write_file(path, pieces, exclusive=False)
    return StagedBlob(path, blob, size, digests)
