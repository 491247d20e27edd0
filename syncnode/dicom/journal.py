"""The SCP's ingest journal: put events made durable together with their blobs.

A C-STORE may be acknowledged only once its blob and its put event are durable. Doing
that with the catalog directly costs another flush in sequence (the catalog's synchronous
commit after the blob's), because the event must never be durable before its blob.
Here the put event (its id and canonical body, exactly what the catalog will hold) is
appended to ``<data>/dicom-ingest.journal`` *before* the batch's blobs are installed
(:meth:`syncnode.blobstore.BlobStore.install_staged`): its first ``syncfs`` takes the
blobs' bytes and the journal to disk, the second the blobs' names, and only then does
the SCP answer Success. A background thread then inserts the journaled events into the
catalog (synchronous transactions, many events each) and empties the journal once
everything in it is in the catalog.

Crash safety: after a crash the journal may hold a record whose blob never got its name
(the crash came between the two syncs); such a record was never acknowledged. On start,
:meth:`IngestJournal.recover` replays every intact record (length, CRC-32, and the event
id must hash its body) whose blob is present and re-hashes correctly, skips the others,
and stops at a torn tail. Replaying an event the catalog already has changes nothing
(events are a set). So every acknowledged instance ends up in the catalog, and the
catalog never points at a missing or damaged blob.

Between the answer and the catalog insert, nothing else references the blob, so a
concurrent garbage collection (``syncnode gc``, or a delete freeing identical bytes)
could remove it. Each journaled blob therefore also gets hard links in
``tmp/dicom-keep/`` (blob and chunk list), made right after the renames (durable with
them) and removed once the event is in the catalog; a blob found missing at insert or
replay time is put back from them.

The events are this node's own, signed when recorded; the catalog takes them as local
(no admission step), so that records left by a version that did not sign yet replay too.

Record format: ``b"SNJ1"``, payload length (u32 LE), CRC-32 of the payload (u32 LE),
payload = 32-byte event id + event body. Events are built by the catalog's one factory,
:meth:`syncnode.catalog.Catalog.build_local_puts`, which ``import`` uses too (this node as
origin, the catalog's clock, the same validation and attribute clean-up); an instance
that has a version with the same bytes that is not deleted, in the catalog or journaled,
gets no new event. The built events are handed to the catalog as they are (never decoded
or hashed again); only a replay decodes and checks what it reads back.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from .. import events as ev
from ..blobstore import CHUNK_SIZE, BlobInfo, BlobStore, StoreFull
from ..catalog import Catalog, LocalPut
from ..dicomfile import InstanceInfo, same_dataset
from ..signing import Signer

log = logging.getLogger("syncnode.dicom")

JOURNAL_FILE = "dicom-ingest.journal"
_MAGIC = b"SNJ1"
_HEADER = struct.Struct("<4sII")
_MAX_RECORD = ev.MAX_EVENT_BYTES + 32
APPLY_BATCH = 512
APPLY_LINGER = 0.05  # seconds the catalog writer waits for more events before a commit


def _decoded(eid: str, body: bytes) -> LocalPut:
    """A journaled event this object did not build (a caller's own record): checked."""
    event = ev.decode_checked(eid, body)
    if not isinstance(event, ev.PutEvent):
        raise ev.InvalidEvent(f"journaled event {eid} is not a put")
    return LocalPut(eid, event, body)


class IngestJournal:
    """Append-only journal of the SCP's put events, applied to the catalog in background."""

    def __init__(self, data_dir: Path, catalog_path: Path, node_id: str, store: BlobStore,
                 on_applied: Callable[[int], None] | None = None, *,
                 signer: Signer) -> None:
        self.path = Path(data_dir) / JOURNAL_FILE
        self.node_id = node_id
        self.signer = signer  # every event this node makes is signed (syncnode.signing)
        self.store = store
        self.on_applied = on_applied
        # written by the applier only; it signs the events this journal builds
        self.catalog = Catalog(catalog_path, node_id=node_id, signer=lambda: signer)
        self.keep_dir = store.tmp_dir / "dicom-keep"
        self.keep_dir.mkdir(exist_ok=True)
        self._lock = threading.Condition()
        self._pending: list[LocalPut] = []  # journaled, durable, not yet applied
        self._unapplied = 0  # records in the journal file not yet in the catalog
        self._batch_start = 0  # journal length before the last record() (see abandon)
        self._journaled: dict[str, tuple[str, str]] = {}  # SOP UID -> (blob, event id)
        self._sop_of: dict[str, str] = {}  # event id -> SOP UID, for journaled events
        self._built: dict[str, LocalPut] = {}  # event id -> the event, for journaled ones
        self._closing = False
        self.applied = 0
        self.recovered = self.recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._thread = threading.Thread(target=self._apply_loop, name="dicom-journal",
                                        daemon=True)
        self._thread.start()

    # -- writing (the committer's leader thread) ------------------------------------------
    def record(self, items: list[tuple[InstanceInfo, BlobInfo]],
               staged: dict[str, Path] | None = None) -> list[tuple[str, bool, bytes | None]]:
        """Append events for these instances (not yet durable: see :meth:`durable`).

        Returns (event id, new, body or None) per item. The events come from the
        catalog's one factory (:meth:`syncnode.catalog.Catalog.build_local_puts`: same
        validation, attribute clean-up, clock and duplicate rule as ``import``); all are
        built and checked before anything is written, so an invalid item raises
        :class:`~syncnode.catalog.InvalidLocalPut` and appends nothing. ``staged``: the
        files of blobs not installed yet (hash -> temp file), for comparing data sets with
        versions already held (an instance imported, then sent, adds nothing).
        """
        where = dict(staged or {})

        def same_instance(held: str, new: str) -> bool:
            return same_dataset(self.store.path(held), where.get(new) or self.store.path(new))

        out: list[tuple[str, bool, bytes | None]] = []
        records: list[bytes] = []
        with self._lock:
            built = self.catalog.build_local_puts(
                [(info.to_dict(), blob) for info, blob in items], self._journaled,
                same_instance)
            batch: dict[str, tuple[str, str]] = {}
            for put in built:
                if put.body is None or put.event is None:
                    out.append((put.event_id, False, None))
                    continue
                payload = bytes.fromhex(put.event_id) + put.body
                records.append(_HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload))
                               + payload)
                batch[put.event.sop_instance_uid] = (put.event.blob, put.event_id)
                self._built[put.event_id] = put
                out.append((put.event_id, True, put.body))
            self._batch_start = os.lseek(self._fd, 0, os.SEEK_END)
            if records:
                data = b"".join(records)
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                self._unapplied += len(records)
                self._journaled.update(batch)
                self._sop_of.update({eid: sop for sop, (_b, eid) in batch.items()})
        return out

    def abandon(self, results: list[tuple[str, bool, bytes | None]]) -> None:
        """The batch just recorded (``results`` of :meth:`record`) was not made durable:
        take its records back out of the journal, so that the same instance sent again
        gets a new record instead of being taken for one already on its way."""
        new = [eid for eid, _new, body in results if body is not None]
        if not new:
            return
        with self._lock:
            os.ftruncate(self._fd, self._batch_start)
            self._unapplied -= len(new)
            for eid in new:
                self._forget(eid)

    def _forget(self, eid: str) -> None:
        """Stop counting a journaled event as on its way (under the lock)."""
        self._built.pop(eid, None)
        sop = self._sop_of.pop(eid, None)
        if sop is not None and self._journaled.get(sop, ("", ""))[1] == eid:
            del self._journaled[sop]

    def durable(self, records: list[tuple[str, bytes]]) -> None:
        """These journaled events ((id, body) as :meth:`record` returned them) are now
        durable: hand them to the catalog writer (as built: not decoded again)."""
        if records:
            with self._lock:
                self._pending.extend(self._built.get(eid) or _decoded(eid, body)
                                     for eid, body in records)
                self._lock.notify_all()

    # -- applying (background) ----------------------------------------------------------
    def _apply_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait(1.0)
                if not self._pending and self._closing:
                    return
                # Let a few more arrive: one catalog commit (and flush) for many events.
                deadline = time.monotonic() + APPLY_LINGER
                while len(self._pending) < APPLY_BATCH and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                batch = self._pending[:APPLY_BATCH]
                del self._pending[:APPLY_BATCH]
            try:
                for put in batch:
                    self._restore(put.event.blob if put.event is not None else "")
                result = self.catalog.insert_local_puts(batch, blob_present=self.store.has)
            except Exception as exc:  # keep the events journaled; retry them shortly
                if isinstance(exc, StoreFull):  # expected while the disk is full: one line
                    log.error("catalog insert of %d journaled events failed (retried each "
                              "second): %s", len(batch), exc)
                else:
                    log.exception("catalog insert of %d journaled events failed", len(batch))
                with self._lock:
                    self._pending[:0] = batch
                    self._lock.wait(1.0)
                continue
            for eid, why in result.rejected.items():
                log.error("journaled event %s rejected by the catalog: %s", eid, why)
            with self._lock:
                self._unapplied -= len(batch)
                self.applied += len(batch)
                for put in batch:
                    blob = put.event.blob if put.event is not None else ""
                    if blob and put.event_id not in result.rejected:
                        for name in (blob, f"{blob}.chunks"):
                            (self.keep_dir / name).unlink(missing_ok=True)
                    self._forget(put.event_id)
                if self._unapplied == 0:
                    os.ftruncate(self._fd, 0)  # all in the catalog (a replay would be a no-op)
                    self._release_all()
                self._lock.notify_all()
            if self.on_applied is not None:
                try:
                    self.on_applied(len(batch))
                except Exception:  # a listener's failure must not stop the journal
                    log.exception("on_applied listener failed")

    def wait_applied(self, timeout: float = 30.0) -> bool:
        """Block until every durable record is in the catalog (used at shutdown, tests)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending and self._unapplied == 0,
                                       timeout)

    def close(self) -> None:
        self.wait_applied(60.0)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(30)
        os.close(self._fd)
        self.catalog.close()

    # -- keeping journaled blobs alive ----------------------------------------------------
    def keep(self, blob_hash: str) -> None:
        """Hard-link a blob and its chunk list into the keep folder (after its rename,
        before the sync that makes the rename durable)."""
        for src, name in ((self.store.chunks_path(blob_hash), f"{blob_hash}.chunks"),
                          (self.store.path(blob_hash), blob_hash)):
            try:
                os.link(src, self.keep_dir / name)
            except FileExistsError:
                pass
            except FileNotFoundError:
                if name == blob_hash or not self._one_chunk(self.store.path(blob_hash)):
                    raise  # (a blob of one chunk has no chunk list file)

    @staticmethod
    def _one_chunk(blob_path: Path) -> bool:
        return blob_path.stat().st_size <= CHUNK_SIZE

    def _restore(self, blob_hash: str) -> None:
        """Put back a journaled blob that was removed before its event reached the catalog."""
        if not blob_hash or self.store.has(blob_hash):
            return
        kept = self.keep_dir / blob_hash
        if not kept.exists():
            return
        final = self.store.path(blob_hash)
        final.parent.mkdir(parents=True, exist_ok=True)
        for name, dst in ((f"{blob_hash}.chunks", self.store.chunks_path(blob_hash)),
                          (blob_hash, final)):
            try:
                os.link(self.keep_dir / name, dst)
            except FileExistsError:
                pass
            except FileNotFoundError:
                if name == blob_hash or not self._one_chunk(self.keep_dir / blob_hash):
                    raise  # (a blob of one chunk has no chunk list file)
        log.warning("blob %s of a journaled event was removed before it was recorded; "
                    "restored", blob_hash)

    def _release_all(self) -> None:
        for f in self.keep_dir.iterdir():
            f.unlink(missing_ok=True)

    # -- recovery -------------------------------------------------------------------------
    def recover(self) -> int:
        """Replay the journal left by a previous run (see the module doc). Returns how many
        events were taken into the catalog."""
        if not self.path.exists():
            return 0
        good: list[ev.Checked] = []
        skipped = 0
        with open(self.path, "rb") as f:
            while True:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    break
                magic, length, crc = _HEADER.unpack(head)
                if magic != _MAGIC or length > _MAX_RECORD:
                    break
                payload = f.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    break  # torn tail: never acknowledged
                eid, body = payload[:32].hex(), payload[32:]
                try:
                    event = ev.decode_checked(eid, body)
                except ev.InvalidEvent:
                    skipped += 1
                    continue
                if isinstance(event, ev.PutEvent):
                    self._restore(event.blob)
                if not isinstance(event, ev.PutEvent) or self.store.verify(event.blob):
                    skipped += 1  # blob absent or damaged: this one was not acknowledged
                    continue
                good.append(ev.Checked(eid, body, event))
        inserted = 0
        for i in range(0, len(good), APPLY_BATCH):
            inserted += len(self.catalog.apply(good[i:i + APPLY_BATCH],
                                               blob_present=self.store.has,
                                               local=True).inserted)
        if good or skipped:
            log.info("ingest journal replayed: %d events (%d new), %d skipped", len(good),
                     inserted, skipped)
        with open(self.path, "r+b") as f:
            f.truncate(0)
            os.fsync(f.fileno())
        self._release_all()
        return inserted
