"""Writing files so that a crash leaves the old version or the new one, never a mix.

The pattern everywhere: write a temp file in the same folder, fsync it, rename it over
the target, fsync the folder (the rename itself is only durable once the folder is).
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path


def _load_libc() -> ctypes.CDLL | None:
    """The C library, for the two Linux calls the os module lacks (syncfs,
    sync_file_range); None elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_SYNCFS = getattr(_LIBC, "syncfs", None)
_SYNC_FILE_RANGE = getattr(_LIBC, "sync_file_range", None)
if _SYNC_FILE_RANGE is not None:
    _SYNC_FILE_RANGE.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
                                 ctypes.c_uint]
    _SYNC_FILE_RANGE.restype = ctypes.c_int
_SFR_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback, do not wait


def sync_filesystem(path: Path) -> None:
    """Flush all dirty data and metadata of the filesystem holding ``path`` to disk
    (Linux ``syncfs``; elsewhere the whole-system ``sync``)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


def start_writeback(fd: int) -> None:
    """Let the disk start on a file's dirty pages now, without waiting (Linux
    ``sync_file_range``), so that a later sync has less left to wait for. A hint: does
    nothing where unavailable."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SFR_WRITE)


_FADVISE = getattr(os, "posix_fadvise", None)


def drop_cached(path: Path) -> None:
    """Let the kernel drop the cached pages of ``path`` (``POSIX_FADV_DONTNEED``). Only
    clean pages go: call it after the bytes are synced. A hint: does nothing where
    unavailable or on a file already gone."""
    if _FADVISE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # deleted since (collected): nothing cached to drop
        return
    try:
        _FADVISE(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``) atomically and durably."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
