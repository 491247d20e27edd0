"""Spooling a C-STORE's bytes into the blob store, hashed as they arrive.

:class:`SpoolWriter` streams the data set into ``tmp/blob-<pid>-<random>.tmp`` (the blob
store's temp-file naming, so ``clean_tmp`` collects leftovers), hashing as it goes (whole
BLAKE3 and per 1 MiB chunk), and starts the disk on the bytes early. :meth:`SpoolWriter.stage`
hands the finished file over as a :class:`~syncnode.blobstore.StagedBlob`; the SCP's
committer installs a whole batch of them with :meth:`BlobStore.install_staged`, the same
path import and peer pulls take: one filesystem sync for every temp file (and the ingest
journal), the renames, a second sync for the renames. So a file in ``blobs/`` is whole
even after a power loss, and nothing is acknowledged before it is durable.
"""

from __future__ import annotations

import errno
from typing import BinaryIO

from ..blobstore import BlobStore, ChunkHasher, StagedBlob, enospc_as_store_full
from ..durable import start_writeback

_EARLY_WRITEBACK = 256 << 10  # start writing back every this many bytes received


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
            with enospc_as_store_full():
                view = memoryview(data)
                while view:
                    n = self._file.write(view)
                    view = view[n:]
        except OSError:
            self.abort()
            raise
        self._hasher.update(data)
        self._unsynced += len(data)
        if self._unsynced >= _EARLY_WRITEBACK:
            start_writeback(self._file.fileno())  # the batch's sync then waits less
            self._unsynced = 0

    def flush(self) -> None:
        """Hand buffered bytes to the OS (so the temp file can be read back)."""
        if self._file is not None:
            try:
                with enospc_as_store_full():
                    self._file.flush()
            except OSError:
                self.abort()
                raise

    def stage(self) -> StagedBlob:
        """Close, and hand the file over for :meth:`BlobStore.install_staged` (which
        makes it durable before renaming it in). The caller then owns the temp file."""
        self.flush()
        if self._file is None:
            raise OSError(errno.EBADF, "stage after abort")
        self._file.close()
        self._file = None
        digest, chunk_digests = self._hasher.finish()
        return StagedBlob(self.tmp_path, digest, self._hasher.size, chunk_digests)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)

