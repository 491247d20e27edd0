"""Fast durable ingest for the SCP: write and install blobs first, make them durable per batch.

:class:`syncnode.blobstore.BlobWriter` makes every blob durable on its own (fsync of the
file, of its chunk list, of three folders): five or six device flushes per instance,
which on a virtual disk cost more than everything else the SCP does. Here the same
files are written in the same layout, but durability is established once per *batch*:

1. :class:`SpoolWriter` streams bytes into ``tmp/blob-<pid>-<random>.tmp`` (the blob
   store's temp-file naming, so ``clean_tmp`` collects leftovers), hashing as it goes
   (whole BLAKE3 and per 1 MiB chunk).
2. :func:`install` puts it in place exactly as the blob store does (chunk list renamed
   before the blob, blob read-only, identical bytes stored once) but without syncing.
3. :func:`make_durable` syncs the batch: one ``syncfs(2)`` of the data folder's
   filesystem (file data, chunk lists, renames and new folders in one journal commit),
   or, where ``syncfs`` is unavailable, an fsync of every file and folder involved.
4. Only after that are the put events inserted (a synchronous catalog transaction), and
   only after *that* is anyone told "stored".

Invariants kept from the blob store: a blob file in ``blobs/`` is always whole (it is
renamed in only after it is complete), has its chunk list once both are durable, and
no catalog event points at a blob before :func:`make_durable` returned for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from ..blobstore import (
    HAVE_SYNCFS,
    BlobInfo,
    BlobStore,
    ChunkHasher,
    StoreFull,
    fsync_dir,
    has_chunk_file,
    sync_filesystem,
    write_file,
)

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                 ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):
    _libc = None
    _sync_file_range = None
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait
_EARLY_WRITEBACK = 256 << 10  # start writing back every this many bytes received


# SYNCNODE_NO_SYNCFS=1 forces the per-file fsync path (read once, at import).
_USE_SYNCFS = HAVE_SYNCFS and os.environ.get("SYNCNODE_NO_SYNCFS", "") == ""


def have_syncfs() -> bool:
    return _USE_SYNCFS


class SpoolWriter:
    """A blob being received: a temp file in the store's tmp folder, hashed while written."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.tmp_path = store.tmp_name("blob")
        self._file: BinaryIO | None = open(self.tmp_path, "xb", buffering=0)  # noqa: SIM115
        self._hasher = ChunkHasher()
        self._unsynced = 0

    @property
    def size(self) -> int:
        return self._hasher.size

    def write(self, data: bytes | memoryview) -> None:
        if self._file is None:
            raise OSError(errno.EBADF, "write after finish or abort")
        try:
            view = memoryview(data)
            while view:
                n = self._file.write(view)
                view = view[n:]
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull("no space left for the blob store") from exc
            raise
        self._hasher.update(data)
        self._unsynced += len(data)
        if self._unsynced >= _EARLY_WRITEBACK and _sync_file_range is not None:
            # Let the disk start on these bytes now; the batch sync then waits less.
            _sync_file_range(self._file.fileno(), 0, 0, _SFR_WRITE)
            self._unsynced = 0

    def flush(self) -> None:
        """Hand buffered bytes to the OS (so the temp file can be read back)."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self.abort()
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFull("no space left for the blob store") from exc
                raise

    def install(self) -> BlobInfo:
        """Close, and put the bytes in place as a blob (not yet durable: see module doc)."""
        self.flush()
        if self._file is None:
            raise OSError(errno.EBADF, "install after abort")
        self._file.close()
        self._file = None
        digest, chunk_digests = self._hasher.finish()
        try:
            return install(self.store, self.tmp_path, digest, self._hasher.size, chunk_digests)
        except OSError as exc:
            self.tmp_path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull("no space left for the blob store") from exc
            raise

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


def install(store: BlobStore, tmp: Path, digest: str, size: int, chunk_digests: bytes
            ) -> BlobInfo:
    """The blob store's install step without syncing (see :func:`make_durable`)."""
    final = store.path(digest)
    chunks = tuple(chunk_digests[i:i + 32].hex() for i in range(0, len(chunk_digests), 32))
    cpath = store.chunks_path(digest)
    listed = has_chunk_file(chunk_digests)  # a one-chunk blob's list is its hash
    if final.is_file():
        tmp.unlink(missing_ok=True)
        if listed and not cpath.is_file():
            _write_chunks(store, cpath, chunk_digests)
        return BlobInfo(digest, size, chunks, created=False)
    final.parent.mkdir(parents=True, exist_ok=True)
    if listed:
        _write_chunks(store, cpath, chunk_digests)
    os.replace(tmp, final)
    os.chmod(final, 0o444)
    return BlobInfo(digest, size, chunks, created=True)


def _write_chunks(store: BlobStore, cpath: Path, chunk_digests: bytes) -> None:
    tmp = store.tmp_name("chunks")
    write_file(tmp, chunk_digests)
    os.replace(tmp, cpath)


def make_durable(store: BlobStore, blobs: Iterable[str]) -> None:
    """Make the given installed blobs (and their chunk lists and folders) durable."""
    if have_syncfs():
        sync_filesystem(store.root)
        return
    folders: set[Path] = set()
    for h in blobs:
        final = store.path(h)
        for p in (store.chunks_path(h), final):
            if p != final and not p.exists():  # one chunk: no list file
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        folders.update((final.parent, final.parent.parent, final.parent.parent.parent))
    for d in sorted(folders, key=lambda x: len(x.parts), reverse=True):
        fsync_dir(d)
