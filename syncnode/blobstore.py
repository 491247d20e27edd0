"""The blob store: exact DICOM file bytes, named by their BLAKE3-256 hash.

Layout under the data folder::

    blobs/ab/cd/<hash>          the bytes, read-only once written
    blobs/ab/cd/<hash>.chunks   BLAKE3-256 digest of every 1 MiB chunk, concatenated (32 bytes
                                each); only for blobs of more than one chunk: the chunk list
                                of a blob of one chunk is its own hash (none for an empty one)
    tmp/                        files being written (``*.tmp``) and partial pulls (``*.part``)

Invariants:

- A blob is whole or absent. Bytes go to a temp file that is fsynced, then renamed
  into place, then the folder is fsynced. Nothing is ever written in place.
- A blob's chunk list is renamed into place *before* the blob, so a present blob always
  has its chunk list (a crash can leave a chunk list without a blob; that is harmless
  and collected). Most instances fit in one chunk and need no file for it, which saves a
  file creation per instance on import and on every pull.
- Identical bytes are stored once: writing a blob that exists discards the temp file.
- Paths are built only from strings that passed :func:`syncnode.ids.check_hash`.
- Memory does not grow with the size of a blob: everything streams in chunk-sized
  pieces.
- Every blob hashed and found intact (installed, verified, or read whole with
  :meth:`BlobStore.read_verified`) is noted in the data folder's :class:`KnownGood`
  record with its file's stat; one found damaged or deleted is dropped from it.
  :meth:`BlobStore.read_known` reads a blob whose file is unchanged since without hashing
  it again (for DICOMweb, C-GET/C-MOVE and the exporter; see :mod:`syncnode.knowngood`
  for what that trusts).
- What a node receives from a peer does not stay in the page cache
  (:meth:`BlobStore.drop_cached`, called by :meth:`syncnode.local.LocalNode.settle_received`
  once the puts are applied and the headers indexed for C-FIND, both reading the bytes
  from memory), the way ``dd oflag=nocache`` and backup tools do. A sync of gigabytes
  then does not push the host's working set (the PACS's own) out of memory, and the next
  group is written into the pages just freed instead of into new ones, which costs far
  less CPU on a VM whose host backs guest memory only on first touch. The price: the
  first viewer of a new study reads it from disk. Keeping only the header cached is not
  possible: the kernel caches a file in folios of up to 2 MiB and drops only whole ones.
  What arrives locally (import, C-STORE, STOW-RS) stays cached: every peer is about to
  pull it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import blake3

from .durable import drop_cached, fsync_dir, sync_filesystem
from .ids import check_hash
from .knowngood import Fingerprint, KnownGood, fingerprint
from .perpath import PerPath

CHUNK_SIZE = 1 << 20
TRANSFER_SUFFIXES = (".part", ".offer")
FREE_RESERVE = 8 << 20  # bytes a transfer must leave free (catalog commits, logs)
LOW_SPACE_TRANSFER_AGE = 600.0  # seconds unwritten before a transfer file goes when short
DIGEST_SIZE = 32
_READ_SIZE = CHUNK_SIZE
KNOWN_READ_SIZE = 4 << 20  # pieces of a known-good blob read without hashing
_EMPTY_HASH = blake3.blake3(b"").hexdigest()


class BlobError(Exception):
    """Base class for blob store errors."""


class LocalStoreError(Exception):
    """This node's own storage failed (disk full, I/O error, catalog unusable): nothing a
    peer did, and not the network. Sync pauses with the peer and retries with backoff."""


class BlobHashMismatch(BlobError):
    """Bytes received for a blob do not hash to the name they were promised under."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"blob hash mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class BlobMissing(BlobError, FileNotFoundError):
    """The blob is not in the store."""


class StoreFull(BlobError, LocalStoreError):
    """The disk holding the data folder is full (or its quota is used up).

    Deliberately not an OSError: callers that treat OSError as "the network failed"
    would show a full local disk as an unreachable peer."""


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk, or a full quota


@contextlib.contextmanager
def enospc_as_store_full() -> Iterator[None]:
    """Raise StoreFull for an OSError saying there is no space (ENOSPC, EDQUOT) inside."""
    try:
        yield
    except StoreFull:
        raise
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise StoreFull("no space left for the blob store") from exc
        raise


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What the store knows about one blob."""

    hash: str
    size: int
    chunks: tuple[str, ...]
    created: bool  # False when identical bytes were already stored
    # the same list as raw concatenated digests, when the store has it at hand
    chunk_digests: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def chunks_root(self) -> str:
        """BLAKE3 of the concatenated chunk digests: binds the chunk list to an event."""
        raw = self.chunk_digests
        return chunks_root(bytes.fromhex("".join(self.chunks)) if raw is None else raw)


@dataclass(frozen=True, slots=True)
class BlobDamage:
    hash: str
    reason: str


def chunks_root(chunk_digests: bytes) -> str:
    return blake3.blake3(chunk_digests).hexdigest()


def has_chunk_file(chunk_digests: bytes) -> bool:
    """Whether a blob with this chunk list keeps it in a ``.chunks`` file (more than one
    chunk); otherwise the list is implied by the blob's hash."""
    return len(chunk_digests) > DIGEST_SIZE


def implied_chunk_list(blob_hash: str, size: int) -> bytes:
    """The chunk list of a blob of at most one chunk: its own digest, or nothing if empty."""
    return bytes.fromhex(blob_hash) if size else b""


def chunk_hexes(chunk_digests: bytes) -> tuple[str, ...]:
    """A concatenated chunk list as one hex digest per chunk."""
    return tuple(chunk_digests[i : i + DIGEST_SIZE].hex()
                 for i in range(0, len(chunk_digests), DIGEST_SIZE))


def chunk_count(size: int) -> int:
    """Number of chunks of a blob of ``size`` bytes (an empty blob has none)."""
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


@dataclass(frozen=True, slots=True)
class StagedBlob:
    """A fully written, hashed temp file waiting to be installed with others."""

    tmp: Path
    digest: str
    size: int
    chunk_digests: bytes
    chunks_tmp: Path | None = None  # its chunk list, already in a temp file (not synced)
    read_only: bool = False  # tmp already has the mode of a blob (0o444)

    def info(self, created: bool) -> BlobInfo:
        return BlobInfo(self.digest, self.size, chunk_hexes(self.chunk_digests), created,
                        self.chunk_digests)


class ChunkHasher:
    """Whole BLAKE3 and the per-1 MiB chunk digests, hashing every byte once.

    While a blob fits in one chunk its single chunk digest *is* the whole digest, so the
    first chunk is only buffered (at most 1 MiB); it is hashed separately only if the blob
    grows past it.
    """

    def __init__(self) -> None:
        self.whole = blake3.blake3()
        self.size = 0
        self._first: bytearray | None = bytearray()
        self._chunk = blake3.blake3()
        self._in_chunk = 0
        self.digests = bytearray()

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.whole.update(view)
        self.size += len(view)
        if self._first is not None:
            room = CHUNK_SIZE - len(self._first)
            if len(view) <= room:
                self._first += view
                return
            self._first += view[:room]
            self.digests += blake3.blake3(self._first).digest()
            self._first = None
            view = view[room:]
        while view:
            take = min(len(view), CHUNK_SIZE - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK_SIZE:
                self.digests += self._chunk.digest()
                self._chunk = blake3.blake3()
                self._in_chunk = 0

    def finish(self) -> tuple[str, bytes]:
        if self._first is not None:  # one chunk (or none, for an empty blob)
            digest = self.whole.digest()
            return digest.hex(), (digest if self.size else b"")
        if self._in_chunk:
            self.digests += self._chunk.digest()
            self._in_chunk = 0
        return self.whole.hexdigest(), bytes(self.digests)


def hash_chunks(data: bytes | memoryview) -> tuple[str, bytes]:
    """Whole BLAKE3 (hex) and the concatenated chunk digests of bytes held in memory: the
    same result as :class:`ChunkHasher`. A blob of one chunk is hashed once."""
    view = memoryview(data).cast("B")
    whole = blake3.blake3(view).digest()
    if len(view) <= CHUNK_SIZE:
        return whole.hex(), (whole if len(view) else b"")
    return whole.hex(), b"".join(blake3.blake3(view[i : i + CHUNK_SIZE]).digest()
                                 for i in range(0, len(view), CHUNK_SIZE))


def write_file(path: Path, data: bytes | memoryview | list[bytes], *,
               exclusive: bool = True) -> None:
    """Write ``data`` (bytes, or the pieces it came in) to ``path``, created (``exclusive``:
    it must not exist; else truncated); no fsync. On error the file is removed; ENOSPC
    raises StoreFull."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    with enospc_as_store_full():
        fd = os.open(path, flags, 0o666)
        try:
            try:
                pieces = data if isinstance(data, list) else [data]
                left = [memoryview(p).cast("B") for p in pieces if len(p)]
                while left:  # writev may write less than asked
                    n = os.writev(fd, left[:_IOV_MAX])
                    while n and left:
                        if n >= len(left[0]):
                            n -= len(left.pop(0))
                        else:
                            left[0], n = left[0][n:], 0
            finally:
                os.close(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise


_IOV_MAX = 1024


_NO_COPY_FILE_RANGE = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
)


def copy_fd(src: int, dst: int, expected: int = 0) -> int:
    """Copy ``src`` from its offset to its end into ``dst``; return the byte count.

    In the kernel (``copy_file_range``: the bytes do not pass through this process, about
    40% less CPU than read + write) where the file systems allow it, else by read/write.
    ``expected``: the size ``fstat`` gave, to tell the end of the file from a file system
    whose copy_file_range says 0 instead of refusing. Raises StoreFull on ENOSPC.
    """
    total = 0
    in_kernel = hasattr(os, "copy_file_range")
    with enospc_as_store_full():
        while True:
            if in_kernel:
                try:
                    n = os.copy_file_range(src, dst, max(expected - total, CHUNK_SIZE))
                except OSError as exc:
                    if exc.errno not in _NO_COPY_FILE_RANGE:
                        raise
                    in_kernel = False
                    continue
                if n == 0 and total < expected:
                    in_kernel = False
                    continue
            else:
                block = memoryview(os.read(src, _READ_SIZE))
                n = len(block)
                while block:
                    block = block[os.write(dst, block):]
            if n == 0:
                return total
            total += n


class BlobWriter:
    """Streams bytes into a temp file, hashing as it goes; ``commit`` makes it a blob."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self.tmp_path = store.tmp_name("blob")
        self._file: BinaryIO | None = open(self.tmp_path, "xb")  # noqa: SIM115 (held until commit/close)
        self._hasher = ChunkHasher()
        self._staged = False

    @property
    def size(self) -> int:
        return self._hasher.size

    def write(self, data: bytes | memoryview) -> None:
        if self._file is None:
            raise BlobError("write after commit or abort")
        try:
            with enospc_as_store_full():
                self._file.write(data)
        except OSError:
            self.abort()
            raise
        self._hasher.update(data)

    def flush(self) -> None:
        """Hand buffered bytes to the OS so the temp file can be read back (no fsync)."""
        if self._file is not None:
            self._file.flush()

    def stage(self, expected_hash: str | None = None) -> StagedBlob:
        """Finish writing without making anything durable yet: hand the result to
        :meth:`BlobStore.install_staged` together with others. Raises BlobHashMismatch."""
        if self._file is None:
            raise BlobError("stage after commit or abort")
        try:
            with enospc_as_store_full():
                self._file.close()
        except OSError:
            self.abort()
            raise
        self._file = None
        digest, chunk_digests = self._hasher.finish()
        if expected_hash is not None and digest != expected_hash:
            self.tmp_path.unlink(missing_ok=True)
            raise BlobHashMismatch(expected_hash, digest)
        self._staged = True
        return StagedBlob(self.tmp_path, digest, self.size, chunk_digests)

    def commit(self, expected_hash: str | None = None, *, sync_dir: bool = True) -> BlobInfo:
        """Make the written bytes a blob. Raises BlobHashMismatch (and stores nothing)."""
        if self._file is None:
            raise BlobError("commit after commit or abort")
        try:
            with enospc_as_store_full():
                self._file.flush()
                os.fsync(self._file.fileno())
        except OSError:
            self.abort()
            raise
        self._file.close()
        self._file = None
        digest, chunk_digests = self._hasher.finish()
        if expected_hash is not None and digest != expected_hash:
            self.tmp_path.unlink(missing_ok=True)
            raise BlobHashMismatch(expected_hash, digest)
        try:
            return self._store._install(self.tmp_path, digest, self.size, chunk_digests, sync_dir)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        if self._staged:  # the temp file now belongs to the StagedBlob
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # no-op after a commit


# one record per blob folder, whichever object of this process reads or writes it
_known_good_of = PerPath(KnownGood, resolve=True)


@dataclass
class _Promised:
    """Bytes promised to transfers of this process into one data folder that may not be
    on disk yet (see :meth:`BlobStore.promise_room`)."""

    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_promised_of = PerPath(_Promised, resolve=True)


class RoomPromise:
    """Room promised to one transfer: counted against the free space of the data folder
    until :meth:`release` (idempotent), when the transfer's bytes are on disk or it failed."""

    def __init__(self, promised: _Promised, size: int) -> None:
        self._promised, self.size = promised, size

    def release(self) -> None:
        with self._promised.lock:
            self._promised.bytes -= self.size
            self.size = 0


class BlobStore:
    """Content-addressed files under ``<data>/blobs`` with temp files in ``<data>/tmp``."""

    def __init__(self, data_dir: Path | str) -> None:
        data_dir = Path(data_dir)
        self.root = data_dir / "blobs"
        self.tmp_dir = data_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # shared by every store object of this process on the same folder (the DICOM SCP
        # installs with its own object; DICOMweb reads with the node's)
        self.known_good = _known_good_of(self.root)
        self._dirty_dirs: set[Path] = set()
        self._dirty_lock = threading.Lock()
        self._folders: set[Path] = set()  # fan-out folders known to exist
        self._tmp_prefix = secrets.token_hex(4)
        self._tmp_seq = itertools.count()
        self._promised = _promised_of(self.root)  # shared like known_good

    # -- paths ---------------------------------------------------------------------------
    def path(self, blob_hash: str) -> Path:
        h = check_hash(blob_hash, "blob hash")
        return self.root / h[:2] / h[2:4] / h

    def chunks_path(self, blob_hash: str) -> Path:
        p = self.path(blob_hash)
        return p.with_name(p.name + ".chunks")

    def part_path(self, blob_hash: str) -> Path:
        """Where a pull of this blob keeps its partial bytes between attempts."""
        return self.tmp_dir / f"{check_hash(blob_hash, 'blob hash')}.part"

    # -- reading -------------------------------------------------------------------------
    def has(self, blob_hash: str) -> bool:
        return self.path(blob_hash).is_file()

    def size(self, blob_hash: str) -> int:
        try:
            return self.path(blob_hash).stat().st_size
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {blob_hash} is not in the store") from exc

    def open(self, blob_hash: str) -> BinaryIO:
        try:
            return open(self.path(blob_hash), "rb")
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {blob_hash} is not in the store") from exc

    def chunk_digests(self, blob_hash: str) -> bytes:
        """The concatenated 32-byte chunk digests of a stored blob."""
        try:
            return self.chunks_path(blob_hash).read_bytes()
        except FileNotFoundError as exc:
            try:
                size = self.path(blob_hash).stat().st_size
            except FileNotFoundError:
                raise BlobMissing(f"blob {blob_hash} is not in the store") from exc
            if size <= CHUNK_SIZE:  # one chunk (or none): the list is implied
                return implied_chunk_list(blob_hash, size)
            raise BlobMissing(f"chunk list of blob {blob_hash} is missing") from exc

    def chunks(self, blob_hash: str) -> list[str]:
        return list(chunk_hexes(self.chunk_digests(blob_hash)))

    def read_verified(self, blob_hash: str, start: int = 0,
                      end: int | None = None) -> Iterator[bytes]:
        """Yield bytes [start, end) of a blob, each covering chunk checked against its digest.

        Raises BlobError as soon as a chunk does not match: damaged bytes are never
        handed out (and the blob is no longer known good). A whole blob read to its end
        is noted as known good.
        """
        digests = self.chunk_digests(blob_hash)
        with self.open(blob_hash) as f:
            st = os.fstat(f.fileno())  # before any byte is read: what the hashes vouch for
            size = st.st_size
            if len(digests) != chunk_count(size) * DIGEST_SIZE:  # cut on a chunk boundary
                self.known_good.forget(blob_hash)
                raise BlobError(f"blob {blob_hash} is damaged: its size does not match "
                                "its chunk list")
            if size == 0 and blob_hash != _EMPTY_HASH:  # (no chunk to check: cut to nothing)
                self.known_good.forget(blob_hash)
                raise BlobError(f"blob {blob_hash} is damaged: it is empty")
            end = size if end is None else min(end, size)
            index = start // CHUNK_SIZE
            f.seek(index * CHUNK_SIZE)
            pos = index * CHUNK_SIZE
            whole = start == 0 and end == size
            while pos < end:
                # (exactly what is left: asking for a whole chunk of a smaller file costs
                # a 1 MiB allocation and its shrinking, ~4x the read itself)
                chunk = f.read(min(CHUNK_SIZE, size - pos))
                want = digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
                if not chunk or blake3.blake3(chunk).digest() != want:
                    self.known_good.forget(blob_hash)
                    raise BlobError(f"blob {blob_hash} is damaged at chunk {index}")
                lo = max(start - pos, 0)
                hi = min(end - pos, len(chunk))
                pos += len(chunk)
                index += 1
                if whole and pos >= size:  # every chunk checked (before the last yield:
                    self.known_good.record(blob_hash, st)  # a reader may stop there)
                yield chunk[lo:hi]
            if whole and size == 0:
                self.known_good.record(blob_hash, st)

    def read_known(self, blob_hash: str, piece: int = KNOWN_READ_SIZE) -> Iterator[bytes]:
        """Yield a whole blob in pieces of up to ``piece`` bytes: without hashing when its
        file is unchanged since it was last found intact (:mod:`syncnode.knowngood`),
        else through :meth:`read_verified` (which notes it for the next time). For
        serving DICOMweb clients, C-GET/C-MOVE and the exporter."""
        try:
            fd = os.open(self.path(blob_hash), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {blob_hash} is not in the store") from exc
        try:
            st = os.fstat(fd)
            if self.known_good.matches(blob_hash, st):
                left, pos = st.st_size, 0
                while left > 0:
                    data = os.pread(fd, min(piece, left), pos)
                    if not data:
                        raise BlobError(f"blob {blob_hash} is shorter than it was when "
                                        "verified")
                    pos += len(data)
                    left -= len(data)
                    yield data
                return
        finally:
            os.close(fd)
        yield from self.read_verified(blob_hash)

    def read_known_whole(self, blob_hash: str) -> bytes:
        """A whole (small) blob, as :meth:`read_known` reads it, in one piece."""
        pieces = list(self.read_known(blob_hash, piece=1 << 62))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def open_known(self, blob_hash: str) -> tuple[BinaryIO, int] | None:
        """The blob's file opened for reading, and its size, when it is unchanged since it
        was last found intact; None when it must be read verified. The caller closes the
        file."""
        f = self.open(blob_hash)
        try:
            st = os.fstat(f.fileno())
            if self.known_good.matches(blob_hash, st):
                return f, st.st_size
        except BaseException:
            f.close()
            raise
        f.close()
        return None

    def known_fingerprint(self, blob_hash: str, *, prefetch: bool = False
                          ) -> Fingerprint | None:
        """The :func:`~syncnode.knowngood.fingerprint` of the blob's file when it is known
        good (None: read it verified). ``prefetch``: ask the kernel to start reading it
        into the page cache, for a sender (``sendfile``) that must not wait on the disk.
        Whoever opens the file later compares its stat with this fingerprint."""
        known = self.open_known(blob_hash)
        if known is None:
            return None
        f, size = known
        with f:
            if prefetch and size and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, size, os.POSIX_FADV_WILLNEED)
            return fingerprint(os.fstat(f.fileno()))

    def read_range(self, blob_hash: str, start: int = 0,
                   end: int | None = None) -> Iterator[bytes]:
        """Yield bytes [start, end) of a blob as stored, *not* checked against its hash, in
        pieces that end on chunk boundaries (the first may start inside a chunk).

        Only for a reader whose receiver verifies every chunk itself before trusting it (a
        peer pulling or taking a push: :class:`syncnode.transfer.PartialBlob`), and reports
        a mismatch so that this node re-hashes the blob (:mod:`syncnode.damage`). Anything
        else reads through :meth:`read_verified`. Raises BlobMissing, or BlobError if the
        file is shorter than the range (a cut blob).
        """
        try:
            fd = os.open(self.path(blob_hash), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise BlobMissing(f"blob {blob_hash} is not in the store") from exc
        try:
            size = os.fstat(fd).st_size
            end = size if end is None else min(end, size)
            pos = start
            while pos < end:
                piece = os.pread(fd, min(CHUNK_SIZE - pos % CHUNK_SIZE, end - pos), pos)
                if not piece:
                    raise BlobError(f"blob {blob_hash} is damaged: it ends at {pos} bytes")
                pos += len(piece)
                yield piece
        finally:
            os.close(fd)

    def iter_hashes(self) -> Iterator[str]:
        for d1 in sorted(self.root.iterdir()):
            if not d1.is_dir():
                continue
            for d2 in sorted(d1.iterdir()):
                if not d2.is_dir():
                    continue
                for f in sorted(d2.iterdir()):
                    if len(f.name) == 64 and not f.name.endswith(".chunks"):
                        yield f.name

    # -- writing -------------------------------------------------------------------------
    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put_stream(self, source: BinaryIO, expected_hash: str | None = None,
                   *, sync_dir: bool = True) -> BlobInfo:
        with self.writer() as w:
            while True:
                block = source.read(_READ_SIZE)
                if not block:
                    break
                w.write(block)
            return w.commit(expected_hash, sync_dir=sync_dir)

    def put_file(self, path: Path | str, *, sync_dir: bool = True) -> BlobInfo:
        with open(path, "rb") as f:
            return self.put_stream(f, sync_dir=sync_dir)

    def put_bytes(self, data: bytes, *, sync_dir: bool = True) -> BlobInfo:
        with self.writer() as w:
            w.write(data)
            return w.commit(sync_dir=sync_dir)

    def install_verified(self, path: Path, digest: str, size: int, chunk_digests: bytes,
                         *, sync_dir: bool = True) -> BlobInfo:
        """Move a file whose hash and chunk list the caller computed while writing it (and
        fsynced) into the store, without reading it again."""
        check_hash(digest, "blob hash")
        return self._install(path, digest, size, chunk_digests, sync_dir)

    def _install(self, tmp: Path, digest: str, size: int, chunk_digests: bytes,
                 sync_dir: bool) -> BlobInfo:
        final = self.path(digest)
        chunks = chunk_hexes(chunk_digests)
        if final.is_file():
            tmp.unlink(missing_ok=True)
            if has_chunk_file(chunk_digests) and not self.chunks_path(digest).is_file():
                self._write_chunks(digest, chunk_digests)  # repair a lost chunk list
                self._mark_dirty(final.parent, sync_dir)
            return BlobInfo(digest, size, chunks, False, chunk_digests)
        final.parent.mkdir(parents=True, exist_ok=True)
        if has_chunk_file(chunk_digests):
            self._write_chunks(digest, chunk_digests)
        os.replace(tmp, final)
        os.chmod(final, 0o444)
        self.known_good.record(digest, os.stat(final))  # hashed as it was written
        self._mark_dirty(final.parent, sync_dir)
        return BlobInfo(digest, size, chunks, True, chunk_digests)

    def _write_chunks(self, digest: str, chunk_digests: bytes) -> None:
        cpath = self.chunks_path(digest)
        cpath.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._chunks_tmp(chunk_digests, fsync=True), cpath)

    @enospc_as_store_full()
    def _chunks_tmp(self, chunk_digests: bytes, *, fsync: bool) -> Path:
        tmp = self.tmp_name("chunks")
        with open(tmp, "xb") as f:
            f.write(chunk_digests)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        return tmp

    def new_tmp(self) -> tuple[Path, int]:
        """A new, empty temp file for a blob (already read-only, as a blob is) and a
        read-write descriptor of it (the caller closes it, and removes the file unless it
        stages it)."""
        tmp = self.tmp_name("blob")
        with enospc_as_store_full():
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return tmp, fd

    @enospc_as_store_full()
    def stage_tmp(self, tmp: Path, content: bytes | None = None) -> StagedBlob:
        """Stage a temp file of :meth:`new_tmp` that the caller has written and closed, for
        :meth:`install_staged`: hash it (``content``: its whole content, when the caller
        read it back anyway; else it is read here) and write its chunk list beside it (no
        fsync), and make sure its fan-out folder exists. Raises StoreFull."""
        if content is None:
            hasher = ChunkHasher()
            with open(tmp, "rb", buffering=0) as f:
                while block := f.read(_READ_SIZE):
                    hasher.update(block)
            digest, chunk_digests, size = *hasher.finish(), hasher.size
        else:
            (digest, chunk_digests), size = hash_chunks(content), len(content)
        ctmp = (self._chunks_tmp(chunk_digests, fsync=False)
                if has_chunk_file(chunk_digests) else None)
        try:
            self._make_folder(self.path(digest).parent)  # here, not in install_staged's loop
        except BaseException:
            if ctmp is not None:
                ctmp.unlink(missing_ok=True)
            raise
        return StagedBlob(tmp, digest, size, chunk_digests, ctmp, read_only=True)

    def tmp_name(self, kind: str) -> Path:
        """A new temp file name, ``<kind>-<pid>-<16 hex>.tmp`` (the form :meth:`clean_tmp`
        recognises), unique: a random prefix per store object and a counter (no system
        call per name)."""
        unique = f"{self._tmp_prefix}{next(self._tmp_seq):08x}"
        return self.tmp_dir / f"{kind}-{os.getpid()}-{unique}.tmp"

    @enospc_as_store_full()
    def install_staged(self, staged: list[StagedBlob], *,
                       before_final_sync: Callable[[list[BlobInfo]], None] | None = None
                       ) -> list[BlobInfo]:
        """Make a group of staged blobs durable and present, at the cost of two filesystem
        syncs for the whole group instead of several fsyncs per blob.

        Order: every temp file (blob and chunk list) is written, then the filesystem is
        synced, so their bytes are on disk *before* any rename; then the renames, then a
        second sync makes the renames durable. A crash at any point leaves each blob whole
        or absent. ``before_final_sync`` is called after the renames with the blobs'
        infos, for changes that should become durable with them (the SCP's keep links).
        """
        if not staged:
            return []
        chunk_tmps = [s.chunks_tmp or (self._chunks_tmp(s.chunk_digests, fsync=False)
                                       if has_chunk_file(s.chunk_digests) else None)
                      for s in staged]
        sync_filesystem(self.tmp_dir)
        infos = []
        for s, ctmp in zip(staged, chunk_tmps, strict=True):
            final = self.path(s.digest)
            if final.is_file():
                s.tmp.unlink(missing_ok=True)
                if ctmp is not None:
                    if self.chunks_path(s.digest).is_file():
                        ctmp.unlink(missing_ok=True)
                    else:  # repair a lost chunk list
                        os.replace(ctmp, self.chunks_path(s.digest))
                infos.append(s.info(created=False))
                continue
            self._make_folder(final.parent)
            try:
                self._place(ctmp, s.tmp, final)
            except FileNotFoundError:  # the folder was removed behind our back: again
                if final.parent.is_dir():
                    raise
                self._folders.discard(final.parent)
                self._make_folder(final.parent)
                self._place(ctmp, s.tmp, final)
            if not s.read_only:
                os.chmod(final, 0o444)
            infos.append(s.info(created=True))
        if before_final_sync is not None:
            before_final_sync(infos)
        for s, info in zip(staged, infos, strict=True):
            if info.created:  # hashed as it was written (stat after the keep links)
                with contextlib.suppress(FileNotFoundError):
                    self.known_good.record(s.digest, os.stat(self.path(s.digest)))
        sync_filesystem(self.root)
        return infos

    def drop_cached(self, blobs: Iterable[str]) -> None:
        """Let these blobs' pages leave the page cache (bytes from a peer, once read by
        what reads them next; module docstring). Only for installed blobs: their pages are
        clean (on disk), the only ones the kernel drops."""
        for blob in blobs:
            drop_cached(self.path(blob))

    def _place(self, chunks_tmp: Path | None, tmp: Path, final: Path) -> None:
        """Rename a blob (its chunk list first, if it has one) into place."""
        if chunks_tmp is not None:
            os.replace(chunks_tmp, final.with_name(final.name + ".chunks"))
        os.replace(tmp, final)

    def _make_folder(self, folder: Path) -> None:
        """``mkdir -p`` a fan-out folder, once per store object (folders are never removed)."""
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)

    def _mark_dirty(self, folder: Path, sync_now: bool) -> None:
        with self._dirty_lock:
            self._dirty_dirs.update((folder, folder.parent, folder.parent.parent))
        if sync_now:
            self.flush_dirs()

    def flush_dirs(self) -> None:
        """Fsync every folder a rename touched since the last flush: makes renames durable.
        Safe to call from several threads."""
        with self._dirty_lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)

    def delete(self, blob_hash: str) -> bool:
        """Remove a blob and its chunk list. Returns whether the blob existed."""
        path = self.path(blob_hash)
        self.known_good.forget(blob_hash)
        existed = path.exists()
        path.unlink(missing_ok=True)
        self.chunks_path(blob_hash).unlink(missing_ok=True)
        return existed

    # -- housekeeping --------------------------------------------------------------------
    def clean_tmp(self, transfers_older_than: float | None = None) -> int:
        """Remove temp files left by processes that no longer run, and, with
        ``transfers_older_than`` (seconds), the ``.part``/``.offer`` files of transfers
        not written to for that long (abandoned: a live transfer writes every chunk)."""
        removed = 0
        for f in self.tmp_dir.glob("*.tmp"):
            parts = f.name.split("-")
            if len(parts) >= 3 and parts[1].isdigit() and _pid_alive(int(parts[1])):
                continue
            f.unlink(missing_ok=True)
            removed += 1
        if transfers_older_than is not None:
            removed += self.clean_transfers(transfers_older_than)[0]
        return removed

    def transfers(self) -> Iterator[tuple[Path, os.stat_result]]:
        """The files of unfinished transfers: ``<hash>.part`` (a verified prefix) and
        ``<hash>.offer`` (what a pushing peer announced)."""
        for f in self.tmp_dir.iterdir():
            if f.suffix in TRANSFER_SUFFIXES:
                try:
                    yield f, f.stat()
                except FileNotFoundError:
                    continue  # finished or cleaned meanwhile

    def clean_transfers(self, older_than: float) -> tuple[int, int]:
        """Remove transfer files not modified for ``older_than`` seconds; (files, bytes)."""
        cutoff = time.time() - older_than
        files = size = 0
        for f, st in list(self.transfers()):
            if st.st_mtime < cutoff:
                f.unlink(missing_ok=True)
                files += 1
                size += st.st_size
        return files, size

    def free_bytes(self) -> int:
        """Space left on the filesystem of the data folder for this process."""
        st = os.statvfs(self.tmp_dir)
        return st.f_bavail * st.f_frsize

    def ensure_room(self, size: int, reserve: int = FREE_RESERVE,
                    stale_after: float = LOW_SPACE_TRANSFER_AGE) -> None:
        """Raise StoreFull unless ``size`` more bytes fit and ``reserve`` stays free (for
        the catalog and everything else), besides the room promised to transfers under
        way (:meth:`promise_room`). When short, transfers abandoned for ``stale_after``
        seconds are removed first."""
        promised = self._promised.bytes
        if self.free_bytes() - promised - size >= reserve:
            return
        self.clean_transfers(stale_after)
        free = self.free_bytes()
        if free - promised - size < reserve:
            under_way = f", {promised} promised to transfers under way" if promised else ""
            raise StoreFull(f"no space for {size} more bytes: {free} free{under_way}, "
                            f"{reserve} kept in reserve")

    @property
    def promised_bytes(self) -> int:
        """Room promised to transfers under way (into this data folder, this process)."""
        return self._promised.bytes

    def promise_room(self, size: int, reserve: int = FREE_RESERVE,
                     stale_after: float = LOW_SPACE_TRANSFER_AGE) -> RoomPromise:
        """:meth:`ensure_room`, then count ``size`` as taken until the promise is released.
        Transfers checked one by one against the same free space would otherwise each see
        the room the others are about to fill, and together eat into the reserve the
        catalog's commits need. (Bytes a transfer already wrote count twice until it
        ends: the error is on the safe side and bounded by the transfers in flight.)"""
        with self._promised.lock:
            self.ensure_room(size, reserve, stale_after)
            self._promised.bytes += size
        return RoomPromise(self._promised, size)

    def verify(self, blob_hash: str) -> BlobDamage | None:
        """Re-hash one blob and its chunk list; None when both are intact. Either way the
        known-good record follows the answer."""
        damage, st = self._verify(blob_hash)
        if damage is None and st is not None:
            self.known_good.record(blob_hash, st)
        else:
            self.known_good.forget(blob_hash)
        return damage

    def _verify(self, blob_hash: str) -> tuple[BlobDamage | None, os.stat_result | None]:
        try:
            with self.open(blob_hash) as f:
                st = os.fstat(f.fileno())  # before reading: what the hash vouches for
                hasher = ChunkHasher()
                while block := f.read(_READ_SIZE):
                    hasher.update(block)
        except BlobMissing:
            return BlobDamage(blob_hash, "missing"), None
        digest, chunk_digests = hasher.finish()
        if digest != blob_hash:
            return BlobDamage(blob_hash, f"content hashes to {digest}"), None
        try:
            stored = self.chunk_digests(blob_hash)
        except BlobMissing:
            return BlobDamage(blob_hash, "chunk list missing"), None
        if stored != chunk_digests:
            return BlobDamage(blob_hash, "chunk list does not match the content"), None
        return None, st

    def verify_all(self, hashes: Iterable[str] | None = None
                   ) -> Iterator[tuple[str, BlobDamage | None]]:
        for h in (self.iter_hashes() if hashes is None else hashes):
            yield h, self.verify(h)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
