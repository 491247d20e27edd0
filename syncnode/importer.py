"""``syncnode import``: ingest DICOM files and folders into the node.

Each file is copied into a blob-store temp file while it is hashed, the *copy* is
inspected (so the bytes checked are the bytes stored), and only then committed. Accepted
files are recorded in the catalog in batches: the blobs of a batch are made durable
(folder fsyncs) before the one transaction that inserts their events, so a crash at any
moment leaves every event pointing at a whole blob. A rejected file leaves nothing
behind and is reported with its reason; the rest of the import goes on.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .blobstore import StagedBlob, StoreFull
from .dicomfile import InvalidDicom, inspect_file
from .local import LocalNode

BATCH_FILES = 128
WORKERS = 2
IN_FLIGHT = 6
BATCH_BYTES = 256 << 20
_COPY_BLOCK = 1 << 20


@dataclass(slots=True)
class ImportReport:
    files: int = 0
    imported: int = 0  # new instances (a new event)
    unchanged: int = 0  # the node already had these exact bytes for this instance
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def to_dict(self) -> dict[str, object]:
        return {"files": self.files, "imported": self.imported, "unchanged": self.unchanged,
                "bytes": self.bytes,
                "failed": [{"path": p, "reason": r} for p, r in self.failed]}


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under the given files and folders, in a stable order."""
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    f = Path(root) / name
                    if f.is_file():
                        yield f
        else:
            yield p


ProgressFn = Callable[[Path, int], None]


def import_paths(node: LocalNode, paths: Iterable[Path],
                 progress: ProgressFn | None = None) -> ImportReport:
    """Import files; ``progress(path, nbytes)`` is called once per file processed."""
    report = ImportReport()
    node.store.clean_tmp()  # what an earlier, killed import left behind
    batch: list[tuple[dict[str, str], StagedBlob]] = []
    batch_bytes = 0

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        blobs = node.store.install_staged([staged for _, staged in batch])
        items = [(attrs, blob) for (attrs, _), blob in zip(batch, blobs, strict=True)]
        for _eid, new in node.catalog.add_local_puts(items, blob_present=node.store.has):
            if new:
                report.imported += 1
            else:
                report.unchanged += 1
        batch, batch_bytes = [], 0

    def settle(path: Path, job: Future[tuple[dict[str, str], StagedBlob]]) -> None:
        nonlocal batch_bytes
        report.files += 1
        size = 0
        try:
            entry = job.result()
        except InvalidDicom as exc:
            report.failed.append((str(path), exc.reason))
        except StoreFull:
            flush()
            raise
        except OSError as exc:
            report.failed.append((str(path), f"cannot read: {exc.strerror or exc}"))
        else:
            batch.append(entry)
            size = entry[1].size
            report.bytes += size
            batch_bytes += size
            if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                flush()
        if progress:
            progress(path, size)

    # Copying, hashing and inspecting run in WORKERS threads (file I/O and BLAKE3 release
    # the GIL); results are settled in file order, at most IN_FLIGHT ahead.
    in_flight: deque[tuple[Path, Future[tuple[dict[str, str], StagedBlob]]]] = deque()
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="import") as pool:
        try:
            for path in iter_files(paths):
                in_flight.append((path, pool.submit(_ingest_file, node, path)))
                if len(in_flight) >= IN_FLIGHT:
                    settle(*in_flight.popleft())
            while in_flight:
                settle(*in_flight.popleft())
        finally:
            for _, job in in_flight:  # on an error: staged files of unsettled jobs go
                if not job.cancel() and job.exception() is None:
                    job.result()[1].tmp.unlink(missing_ok=True)
    flush()
    return report


def _ingest_file(node: LocalNode, path: Path) -> tuple[dict[str, str], StagedBlob]:
    with open(path, "rb") as src, node.store.writer() as writer:
        while block := src.read(_COPY_BLOCK):
            writer.write(block)
        writer.flush()
        info = inspect_file(writer.tmp_path)
        staged = writer.stage()
    return info.to_dict(), staged
