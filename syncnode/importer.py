"""``syncnode import``: ingest DICOM files and folders into the node.

Each file is copied into a blob-store temp file (in the kernel where it can), the *copy*
is read back, inspected and hashed (so the bytes checked are the bytes stored), and only
then committed. Accepted files are recorded in the catalog in batches: the temp files of
a batch are made durable (a filesystem sync) before they are renamed into the store, and
the renames (another sync) before the one transaction that inserts their events, so a
crash at any moment leaves every event pointing at a whole blob. A rejected file leaves
nothing behind and is reported with its reason; the rest of the import goes on. A full
disk is such a reason too (per file, and for every file of a batch whose commit found
the disk or the catalog full): nothing of those files is recorded, and the files that
fit are imported.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .blobstore import BlobStore, StagedBlob, StoreFull, copy_fd
from .dicomfile import InvalidDicom, inspect_bytes, inspect_file, same_dataset
from .local import LocalNode
from .rejection import KEY_OBJECT_SELECTION, InvalidRejectionNote

BATCH_FILES = 128
WORKERS = 2
IN_FLIGHT = 32
BATCH_BYTES = 256 << 20
WHOLE_FILE_MAX = 16 << 20  # a copy up to this size is read back whole, else streamed
DISK_FULL = "not imported: no space left on the node's data disk"

log = logging.getLogger("syncnode.importer")

Entry = tuple[Path, dict[str, str], StagedBlob]


@dataclass(slots=True)
class ImportReport:
    files: int = 0
    imported: int = 0  # new instances (a new event)
    unchanged: int = 0  # the node already had these exact bytes for this instance
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    studies: set[str] = field(default_factory=set)  # Study Instance UIDs of accepted files

    def to_dict(self) -> dict[str, object]:
        return {"files": self.files, "imported": self.imported, "unchanged": self.unchanged,
                "bytes": self.bytes,
                "failed": [{"path": p, "reason": r} for p, r in self.failed]}


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under the given files and folders, in a stable order: in each
    folder its files by name, then its subfolders by name (symlinked folders are not
    followed; symlinked files are). Folders are listed without a stat per file."""
    for p in paths:
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def _walk(folder: Path) -> Iterator[Path]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:  # an unreadable folder is skipped, as os.walk does
        return
    folders = []
    for entry in entries:
        try:
            if entry.is_dir():
                if not entry.is_symlink():
                    folders.append(entry)
            elif entry.is_file():
                yield Path(entry.path)
        except OSError:  # vanished meanwhile
            continue
    for entry in folders:
        yield from _walk(Path(entry.path))


ProgressFn = Callable[[Path, int], None]


def import_paths(node: LocalNode, paths: Iterable[Path],
                 progress: ProgressFn | None = None) -> ImportReport:
    """Import files; ``progress(path, nbytes)`` is called once per file processed."""
    report = ImportReport()
    store = node.store
    store.clean_tmp()  # what an earlier, killed import left behind
    batch: list[Entry] = []
    batch_bytes = 0
    committing: tuple[list[Entry], Future[list[tuple[str, bool]]]] | None = None

    def commit(entries: list[Entry]) -> list[tuple[str, bool]]:
        return commit_staged(node, [(attrs, staged) for _, attrs, staged in entries])

    def committed() -> None:
        nonlocal committing
        if committing is not None:
            (entries, job), committing = committing, None
            try:
                results = job.result()
            except StoreFull:
                # Nothing of this batch is recorded (blobs already renamed are unreferenced
                # and go at the next gc); every file of it is reported.
                for path, _, staged in entries:
                    _discard(staged)
                    report.failed.append((str(path), DISK_FULL))
                    report.bytes -= staged.size
                return
            report.studies.update(attrs["study_instance_uid"] for _, attrs, _ in entries)
            for _eid, new in results:
                if new:
                    report.imported += 1
                else:
                    report.unchanged += 1

    def flush(wait: bool) -> None:
        """Hand the batch to the committer thread (after the previous one: batches are
        committed one at a time, in order), while the workers go on with the next."""
        nonlocal batch, batch_bytes, committing
        committed()
        if batch:
            committing = (batch, committer.submit(commit, batch))
            batch, batch_bytes = [], 0
        if wait:
            committed()

    def settle(path: Path, job: Future[tuple[dict[str, str], StagedBlob]]) -> None:
        nonlocal batch_bytes
        report.files += 1
        size = 0
        try:
            entry = job.result()
        except InvalidDicom as exc:
            report.failed.append((str(path), exc.reason))
        except StoreFull:
            report.failed.append((str(path), DISK_FULL))
        except OSError as exc:
            report.failed.append((str(path), f"cannot read: {exc.strerror or exc}"))
        else:
            refusal = node.refused_as_rejected(entry[0]["sop_instance_uid"])
            if refusal is not None:
                _discard(entry[1])
                report.failed.append((str(path), refusal))
                if progress:
                    progress(path, 0)
                return
            batch.append((path, *entry))
            size = entry[1].size
            report.bytes += size
            batch_bytes += size
            if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                flush(wait=False)
        if progress:
            progress(path, size)

    # Reading, inspecting, hashing and writing a file is one job for one of WORKERS threads
    # (file I/O and BLAKE3 release the GIL); results are settled in file order, at most
    # IN_FLIGHT ahead. A full batch is committed (made durable, then recorded) by one more
    # thread, so the workers do not wait for the filesystem syncs.
    in_flight: deque[tuple[Path, Future[tuple[dict[str, str], StagedBlob]]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-commit") as committer, \
         ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="import") as pool:
        try:
            for path in iter_files(paths):
                in_flight.append((path, pool.submit(_ingest_file, store, path)))
                if len(in_flight) >= IN_FLIGHT:
                    settle(*in_flight.popleft())
            while in_flight:
                settle(*in_flight.popleft())
            flush(wait=True)
        except BaseException:
            for _, job in in_flight:  # staged files of unsettled jobs go
                if not job.cancel() and job.exception() is None:
                    _discard(job.result()[1])
            for _, _, staged in batch:  # and those of a batch not handed to the committer
                _discard(staged)
            raise
    return report


def commit_staged(node: LocalNode, entries: list[tuple[dict[str, str], StagedBlob]]
                  ) -> list[tuple[str, bool]]:
    """Record inspected, staged files in the catalog: the one commit of ``import`` and
    STOW-RS. The temp files are made durable, renamed into the store (durable too), then
    their put events inserted in one transaction; (event id, new?) per entry, in order.
    Raises StoreFull when the disk or the catalog is full (nothing of the batch recorded)."""
    store = node.store
    blobs = store.install_staged([staged for _, staged in entries])
    items = [(attrs, blob) for (attrs, _), blob in zip(entries, blobs, strict=True)]
    # a full catalog disk raises CatalogFull, a StoreFull
    results = node.catalog.add_local_puts(
        items, blob_present=store.has,
        same_instance=lambda held, new: same_dataset(store.path(held), store.path(new)))
    # a file held already under another file meta (e.g. received by C-STORE): the blob
    # just made for it is referenced by nothing
    spare = [b.hash for b, (_eid, new) in zip(blobs, results, strict=True)
             if b.created and not new]
    if spare:
        node.catalog.collect_garbage(spare, store.delete)
    for (attrs, _), blob, (_eid, new) in zip(entries, blobs, results, strict=True):
        if new and attrs["sop_class_uid"] == KEY_OBJECT_SELECTION:
            try:  # an IOCM rejection note: applied once it is stored
                node.apply_rejection(blob.hash)
            except (InvalidRejectionNote, ValueError, OSError) as exc:
                log.warning("Key Object Selection %s: not applied as a rejection note: %s",
                            attrs["sop_instance_uid"], exc)
    return results


def inspect_tmp(store: BlobStore, tmp: Path, size: int) -> tuple[dict[str, str], StagedBlob]:
    """Inspect and stage a temp file of :meth:`BlobStore.new_tmp` that holds a received
    instance (STOW-RS), with the rules of ``import``. Raises InvalidDicom or StoreFull (the
    caller then removes the file)."""
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        content = _read_back(fd, size) if size <= WHOLE_FILE_MAX else None
    finally:
        os.close(fd)
    info = inspect_file(tmp) if content is None else inspect_bytes(content)
    return info.to_dict(), store.stage_tmp(tmp, content)


def _discard(staged: StagedBlob) -> None:
    staged.tmp.unlink(missing_ok=True)
    if staged.chunks_tmp is not None:
        staged.chunks_tmp.unlink(missing_ok=True)


def _ingest_file(store: BlobStore, path: Path) -> tuple[dict[str, str], StagedBlob]:
    # O_NONBLOCK: opening a FIFO must not hang (it is then refused as not a regular file).
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidDicom("not a regular file")
        tmp, dst = store.new_tmp()
        try:
            try:
                size = copy_fd(src, dst, st.st_size)
                # The copy, read back (from the page cache), is what is inspected and hashed:
                # the bytes checked are the bytes stored, whatever happens to the source.
                content = _read_back(dst, size) if size <= WHOLE_FILE_MAX else None
            finally:
                os.close(dst)
            info = inspect_file(tmp) if content is None else inspect_bytes(content)
            staged = store.stage_tmp(tmp, content)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        os.close(src)
    return info.to_dict(), staged


def _read_back(fd: int, size: int) -> bytes:
    parts: list[bytes] = []
    done = 0
    while done < size:
        block = os.pread(fd, size - done, done)
        if not block:
            raise OSError(errno.EIO, "the temp copy is shorter than what was written to it")
        parts.append(block)
        done += len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)
