"""The exporter: instances that arrived from peers go to the local PACS by C-STORE.

Outbox
------
Tables in the catalog database file (their SQL is the catalog's outbox read model,
:mod:`syncnode.catalog.outbox`):

- ``outbox``: one row per (destination, put event): ``state`` is ``pending``, ``done``
  (the PACS answered a success status), ``failed`` (given up, with ``last_error``) or
  ``skipped`` (the instance is no longer live: deleted or superseded). ``attempts`` and
  ``next_attempt`` (Unix time) drive retries and survive restarts.
- ``outbox_cursor``: per destination, the last catalog event ``seq`` already scanned,
  plus the destination's last error and last contact.

Each destination (``AE@HOST:PORT``) has one worker thread, using the node's catalog.
It is woken when the catalog takes new events (a catalog listener), and otherwise
sleeps until the next retry is due or ``poll_interval`` passes (a fallback for events
written by another process). A round: (1) scan events after the cursor; put events whose
origin is not this node are enqueued and the cursor advanced, in one transaction (so an event is
enqueued exactly once per destination; puts from this node came from the local PACS
and are never sent back); (2) take the due pending items (up to ``BATCH``), open one
association proposing, for each (SOP class, stored transfer syntax) pair, exactly that
syntax (plus Explicit VR Little Endian for a deflated instance, which can be inflated
without decoding); (3) send each item's stored data set bytes as they are: a known-good
blob (:mod:`syncnode.knowngood`) without hashing it again, any other after verifying it
against its chunk hashes (a damaged blob is never sent); (4) record each outcome.

Storage commitment: for a destination listed in ``export_commitment`` (its AE title or
``AE@HOST:PORT``), after each batch the exporter asks the PACS, on the same association, to
commit what it took (N-ACTION, Storage Commitment Push Model) and records the Transaction
UID on those items. The PACS's N-EVENT-REPORT - on that association (waited for up to
``COMMIT_REPORT_WAIT``) or later on a new association to this node's SCP, as Orthanc does
- marks each item committed (or not, with the PACS's failure reason). ``done`` means
"sent"; ``committed`` counts the ones the PACS confirmed (``syncnode status``).

Deletes: when instances sent to a destination are deleted here - ``syncnode rm``, the
admin API, a rejection note, or tombstones admitted from a peer - the outbox queues a
``reject`` item (see :mod:`syncnode.catalog.outbox`) and the worker sends that
destination an IOCM rejection note (:func:`syncnode.rejection.make_note`: a Key Object
Selection in Explicit VR Little Endian naming exactly the deleted instances it had
received, one study per note), by C-STORE like any item: same retries, same outcomes,
same storage commitment. When a rejection note received here caused the deletes, that
note itself is queued and sent instead (as an instance). A made note's reason is the one
given to the delete (``rm --reason``), else the destination's ``export_reject_reason``;
a note for a peer's deletes waits ``peer_delete_hold`` seconds first, so that when the
peer deleted because of a rejection note - which reaches this node and is exported as an
instance - no second note is sent.

An item is ``done`` only on 0x0000 or the warnings 0xB000, 0xB006, 0xB007. Outcomes
are written in short transactions of up to ``OUTCOME_BATCH`` items, never held across
network I/O. Transient
failures (cannot connect, association rejected or aborted, no response, 0xA7xx out of
resources, 0x0110 processing failure) retry with capped exponential backoff with jitter,
indefinitely. Other failure statuses, and a transfer syntax the PACS refuses when
sending would need transcoding, are retried ``PERMANENT_ATTEMPTS`` times and then
``failed`` with the reason. Nothing is ever sent twice on purpose: an item leaves
``pending`` in the transaction that records its success; a crash between the PACS's
success and that commit can resend the items of the unrecorded outcomes (at most
``OUTCOME_BATCH``; C-STORE of the same instance is idempotent at a PACS).

:func:`syncnode.catalog.outbox.outbox_status` reads the counts for ``syncnode status``.
Logs name UIDs, AE titles and statuses; never patient data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import sqlite3
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import build_context

from ..audit import AuditLog
from ..blobstore import BlobError, BlobStore
from ..catalog import CatalogError
from ..catalog.outbox import OutboxItem, Outcome, OutcomeKind
from ..catalog.outbox import outbox_status as outbox_status  # re-exported
from ..config import parse_ae_address
from ..dicomfile import dataset_offset
from ..local import LocalNode
from ..rejection import REASONS, make_note
from ..retry import backoff
from .transport import PduLimits, SyncnodeAE

log = logging.getLogger("syncnode.dicom.exporter")

SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BATCH = 100
MAX_CONTEXTS = 100  # per association (the protocol allows 128)
SCAN_LIMIT = 2000
PERMANENT_ATTEMPTS = 3
OUTCOME_BATCH = 50  # outcomes written per transaction (a crash may resend up to this many)
IN_MEMORY_LIMIT = 16 << 20  # blobs up to this size are sent from verified memory
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
COMMIT_REPORT_WAIT = 2.0  # seconds an export association waits for a report on itself
# seconds a rejection note for a peer's deletes waits: the peer's own note, if it deleted
# because of one, travels with its tombstones and is exported as an instance instead
PEER_DELETE_HOLD = 30.0


def _transient(status: int) -> bool:
    return (status & 0xFF00) == 0xA700 or status in (0x0110, 0x0211, 0x0213)


Item = OutboxItem


class Destination:
    """One export target and its worker thread."""

    def __init__(self, exporter: Exporter, address: str) -> None:
        self.exporter = exporter
        self.address = address
        self.ae_title, self.host, self.port = parse_ae_address(address)
        self.thread = threading.Thread(target=self._run, name=f"dicom-export-{self.ae_title}",
                                       daemon=True)
        self.outbox = exporter.node.catalog.outbox
        self.failures = 0
        self.blocked_until = 0.0
        self.assoc: Any = None
        self._outcomes: list[Outcome] = []
        # ask this PACS for storage commitment of what it took (``export_commitment``)
        self.commitment = self.ae_title in exporter.commitment or address in exporter.commitment
        self._awaited = ""
        self._report_seen = threading.Event()
        # the reason of rejection notes for deletes that were given none
        self.reject_code = (exporter.reject_codes.get(address)
                            or exporter.reject_codes.get(self.ae_title)
                            or exporter.reject_code)

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        ex = self.exporter
        self.outbox.register(self.address)
        while not ex.stopping.is_set():
            try:
                while self.enqueue_new() >= SCAN_LIMIT and not ex.stopping.is_set():
                    pass
                worked = False
                if time.time() >= self.blocked_until:
                    try:
                        worked = self.send_due()
                    finally:
                        self.flush_outcomes()
            except (sqlite3.Error, CatalogError) as exc:  # e.g. its disk is full: retried
                log.error("export to %s: catalog error: %s", self.address, exc)
                worked = False
            except Exception:  # a bug must not end the worker: log it, retry later
                log.exception("export to %s failed", self.address)
                self.blocked_until = time.time() + self.exporter.backoff_cap
                worked = False
            if not worked:
                # woken when the catalog takes new events (Exporter.wake); the interval
                # only covers events another process wrote, and retries coming due
                ex.wakeup.wait(self.idle_wait())
                ex.wakeup.clear()

    def idle_wait(self) -> float:
        """How long to sleep with nothing to do: the poll interval, or less if a blocked
        destination or a retry comes due sooner."""
        wait = self.exporter.poll_interval
        now = time.time()
        if self.blocked_until > now:
            wait = min(wait, self.blocked_until - now)
        due = self.outbox.next_attempt(self.address)
        if due is not None:
            wait = min(wait, max(0.0, due - now))
        return max(wait, 0.01)

    def enqueue_new(self) -> int:
        """Enqueue put events from peers after the cursor; return how many events scanned."""
        scanned, queued = self.outbox.enqueue_new(self.address, self.exporter.node_id,
                                                  SCAN_LIMIT, self.reject_code,
                                                  self.exporter.peer_delete_hold)
        if queued:
            log.info("export to %s: %d items queued", self.address, queued)
        return scanned

    def due_items(self) -> list[Item]:
        return self.outbox.due(self.address, BATCH)

    def send_due(self) -> bool:
        """Send one batch of due items over one association. True if anything was due."""
        items = self.due_items()
        if not items:
            return False
        live = []
        for it in items:
            if it.kind == "reject":
                if self.prepare_note(it):
                    live.append(it)
            elif it.live:
                live.append(it)
            else:
                self.finish(it, "skipped", "instance is no longer live (deleted or replaced)")
        pairs: list[tuple[str, str]] = []
        batch: list[Item] = []
        for it in live:
            pair = (it.sop_class_uid, it.transfer_syntax_uid)
            if pair not in pairs:
                if len(pairs) >= MAX_CONTEXTS:
                    break
                pairs.append(pair)
            batch.append(it)
        if batch:
            self.send_batch(batch, pairs)
        return True

    def prepare_note(self, it: Item) -> bool:
        """Make the rejection note of a ``reject`` item (``it.note``); False if nothing is
        left for it to reject (the item is then skipped)."""
        what = self.outbox.note_contents(it.id, self.exporter.node_id)
        if what.subject is None:
            why = ("the instances are live again here" if what.dropped_live and
                   not what.dropped_exported else
                   "their own rejection note is exported" if what.dropped_exported and
                   not what.dropped_live else "nothing left to reject")
            self.finish(it, "skipped", why)
            log.info("export to %s: rejection note %s not sent: %s", self.address,
                     it.sop_instance_uid, why)
            return False
        it.note = make_note(what.key, what.code, what.subject, what.rejected, what.made)
        it.size = len(it.note)
        log.info("export to %s: rejection note %s (%s, %s) for %d instances of study %s",
                 self.address, it.sop_instance_uid, what.code, REASONS[what.code],
                 len(what.rejected), what.subject.study_instance_uid)
        return True

    # -- sending -------------------------------------------------------------------------
    def send_batch(self, batch: list[Item], pairs: list[tuple[str, str]]) -> None:
        ex = self.exporter
        # Verification too: the association stands even if every storage context is
        # refused, so each item can be failed with its own reason.
        contexts = [build_context("1.2.840.10008.1.1")]
        if self.commitment:
            contexts.append(build_context(STORAGE_COMMITMENT))
        for sop_class, ts in pairs:
            syntaxes = [ts] + ([EXPLICIT_LE] if ts == DEFLATED else [])
            contexts.append(build_context(sop_class, syntaxes))
        ae = SyncnodeAE(ex.ae_title, PduLimits(max_pdata=ex.max_pdu))
        ae.acse_timeout = 30
        ae.dimse_timeout = ex.dimse_timeout
        ae.network_timeout = 60
        ae.connection_timeout = 10
        try:
            assoc = ae.associate(self.host, self.port, contexts=contexts,
                                 ae_title=self.ae_title, max_pdu=ex.max_pdu,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, _socket_timeout),
                                               (evt.EVT_N_EVENT_REPORT, self._on_report)])
        except (OSError, RuntimeError, ValueError) as exc:
            self.destination_failed(f"cannot associate: {exc}")
            return
        if not assoc.is_established:
            why = ("association rejected by" if assoc.is_rejected else
                   "no association with")
            self.destination_failed(f"{why} {self.address} (refused, unreachable or aborted)"
                                    if not assoc.is_rejected else f"{why} {self.address}")
            return
        self.assoc = assoc
        delivered: list[Item] = []
        tried = 0
        try:
            for n, it in enumerate(batch):
                if ex.stopping.is_set():
                    break
                if not assoc.is_established:
                    self.destination_failed("association lost during the batch")
                    return
                tried += 1
                if self.send_one(assoc, it, n + 1):
                    delivered.append(it)
            if self.commitment and delivered and assoc.is_established:
                self.flush_outcomes()  # (the items are done before they are asked about)
                self.request_commitment(assoc, delivered)
        finally:
            self.assoc = None
            if assoc.is_established:
                assoc.release()
            self.audit_batch(delivered, tried - len(delivered))
        self.db_contact_ok()

    # -- storage commitment (as SCU) -------------------------------------------------------
    def request_commitment(self, assoc: Any, delivered: list[Item]) -> None:
        """Ask the PACS to commit what this association delivered (N-ACTION, PS3.4 J.3.2).
        The items count as committed only when its N-EVENT-REPORT says so: on this
        association (waited for up to ``COMMIT_REPORT_WAIT``) or later on a new one to
        this node's SCP (:meth:`Exporter.commitment_report`)."""
        uid = f"2.25.{uuid.uuid4().int}"
        self.outbox.commitment_requested(uid, [it.id for it in delivered])
        info = Dataset()
        info.TransactionUID = uid
        refs = []
        for it in delivered:
            ref = Dataset()
            ref.ReferencedSOPClassUID = it.sop_class_uid
            ref.ReferencedSOPInstanceUID = it.sop_instance_uid
            refs.append(ref)
        info.ReferencedSOPSequence = refs
        self._awaited = uid
        self._report_seen.clear()
        try:
            with _reactor_paused(assoc):  # (pynetdicom's own pause races the reactor)
                status, _reply = assoc.send_n_action(info, 1, STORAGE_COMMITMENT,
                                                     STORAGE_COMMITMENT_INSTANCE)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("export to %s: storage commitment request failed: %s",
                        self.address, exc)
            return
        code = int(status.get("Status", 0xC000)) if status else None
        if code != 0x0000:
            log.warning("export to %s: storage commitment request %s answered %s",
                        self.address, uid, "nothing" if code is None else f"0x{code:04X}")
            return
        log.info("export to %s: storage commitment %s requested for %d instances",
                 self.address, uid, len(delivered))
        self._report_seen.wait(COMMIT_REPORT_WAIT)

    def _on_report(self, event: evt.Event) -> tuple[int, None]:
        """An N-EVENT-REPORT on the export association (a PACS that reports at once)."""
        try:
            info = event.event_information
        except Exception:  # undecodable: the PACS's error
            return 0x0110, None
        uid = str(info.get("TransactionUID", "") or "").strip()
        ok = self.exporter.commitment_report(uid, info)
        if uid == self._awaited:
            self._report_seen.set()
        return (0x0000 if ok else 0x0110), None

    def audit_batch(self, delivered: list[Item], not_delivered: int) -> None:
        """One ``exported`` entry per association: what reached the PACS, by study."""
        trail = self.exporter.audit
        if trail is None or not (delivered or not_delivered):
            return
        catalog = self.exporter.node.catalog
        studies = set()
        for it in delivered:
            inst = catalog.instance(it.sop_instance_uid)
            if inst is not None:
                studies.add(inst.study_instance_uid)
        trail.record("exported", "node", "success" if delivered else "failure",
                     destination=self.address, instances=len(delivered),
                     failed=not_delivered, bytes=sum(it.size for it in delivered),
                     studies=studies)

    def send_one(self, assoc: Any, it: Item, msg_id: int) -> bool:
        """Send one instance; True if the PACS took it."""
        ex = self.exporter
        ts = it.transfer_syntax_uid
        cx = _accepted(assoc, it.sop_class_uid, ts)
        inflate = False
        if cx is None and ts == DEFLATED:
            cx = _accepted(assoc, it.sop_class_uid, EXPLICIT_LE)
            inflate = cx is not None
        if cx is None:
            reason = (f"{self.ae_title} did not accept {UID(it.sop_class_uid).name} in "
                      f"{UID(ts).name}; sending it otherwise would need transcoding")
            self.item_failed(it, reason, permanent=True)
            return False
        try:
            payload = self.payload(it, inflate)
        except (BlobError, OSError, ValueError, zlib.error) as exc:
            self.item_failed(it, f"stored blob cannot be read: {exc}", permanent=True)
            return False
        status_ds = send_store(assoc, cx.context_id, msg_id, it.sop_class_uid,
                               it.sop_instance_uid, payload)
        if status_ds is None:
            self.item_failed(it, "no response from the PACS (timeout or association lost)",
                             permanent=False)
            return False
        status = int(status_ds.get("Status", 0xC000))
        if status in SUCCESS_STATUSES:
            self.finish(it, "done", "" if status == 0 else f"warning 0x{status:04X}")
            ex.sent += 1
            return True
        comment = str(status_ds.get("ErrorComment", "") or "")[:200]
        reason = f"status 0x{status:04X}" + (f": {comment}" if comment else "")
        self.item_failed(it, reason, permanent=not _transient(status))
        return False

    def payload(self, it: Item, inflate: bool) -> io.BytesIO | tuple[Path, int]:
        """The data set bytes to send, checked against the blob's chunk hashes."""
        if it.note is not None:  # a rejection note made here
            return io.BytesIO(it.note[dataset_offset(it.note[:65536]):])
        if inflate:
            return io.BytesIO(_inflated(self.exporter.store, it.blob))
        return stored_payload(self.exporter.store, it.blob, it.size)

    # -- bookkeeping ---------------------------------------------------------------------
    def _record(self, kind: OutcomeKind, params: tuple[Any, ...]) -> None:
        """Queue an outcome; :meth:`flush_outcomes` writes them in one short transaction
        (a synchronous commit per instance would cost a device flush each)."""
        self._outcomes.append((kind, params))
        if len(self._outcomes) >= OUTCOME_BATCH:
            self.flush_outcomes()

    def flush_outcomes(self) -> None:
        outcomes, self._outcomes = self._outcomes, []
        self.outbox.record_outcomes(outcomes)

    def finish(self, it: Item, state: str, note: str = "") -> None:
        self._record("finish", (state, note, time.time(), it.id))
        if state == "done":
            log.debug("exported %s to %s", it.sop_instance_uid, self.address)

    def item_failed(self, it: Item, reason: str, permanent: bool) -> None:
        attempts = it.attempts + 1
        now = time.time()
        if permanent and attempts >= PERMANENT_ATTEMPTS:
            self._record("fail", (attempts, reason, now, it.id))
            log.warning("export of %s to %s failed for good: %s", it.sop_instance_uid,
                        self.address, reason)
            return
        delay = backoff(attempts, self.exporter.backoff_base, self.exporter.backoff_cap)
        self._record("retry", (attempts, now + delay, reason, now, it.id))
        log.warning("export of %s to %s failed (attempt %d, retry in %.1f s): %s",
                    it.sop_instance_uid, self.address, attempts, delay, reason)

    def destination_failed(self, reason: str) -> None:
        self.failures += 1
        delay = backoff(self.failures, self.exporter.backoff_base, self.exporter.backoff_cap)
        self.blocked_until = time.time() + delay
        self.outbox.destination_failed(self.address, reason, self.failures)
        log.warning("export to %s: %s (retry in %.1f s)", self.address, reason, delay)

    def db_contact_ok(self) -> None:
        self.failures = 0
        self.blocked_until = 0.0
        self.outbox.destination_ok(self.address)


def _socket_timeout(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.settimeout(120)


def _accepted(assoc: Any, sop_class: str, ts: str) -> Any:
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts:
            return cx
    return None


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_command(sop_class: str, sop_instance: str, message_id: int,
                  priority: int = 0x0002) -> bytes:
    """The command set of a C-STORE-RQ with a data set (implicit VR little endian,
    PS3.7 9.3.1.1): the bytes pynetdicom would send, encoded directly."""
    body = b"".join([
        _implicit(0x00000002, _ui(sop_class)),
        _implicit(0x00000100, struct.pack("<H", 0x0001)),
        _implicit(0x00000110, struct.pack("<H", message_id & 0xFFFF)),
        _implicit(0x00000700, struct.pack("<H", priority)),
        _implicit(0x00000800, struct.pack("<H", 0x0001)),
        _implicit(0x00001000, _ui(sop_instance)),
    ])
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def _pdv_pdu(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value item (PS3.8 9.3.5)."""
    return struct.pack(">BBIIBB", 0x04, 0, 6 + len(fragment), 2 + len(fragment), context_id,
                       control) + bytes(fragment)


def _fragments(payload: io.BytesIO | tuple[Path, int], size: int) -> Iterator[bytes]:
    if isinstance(payload, tuple):
        path, offset = payload
        with open(path, "rb") as f:
            f.seek(offset)
            while block := f.read(size):
                yield block
        return
    view = payload.getbuffer()
    for i in range(0, len(view), size):
        yield bytes(view[i:i + size])


def _send_gathered(sock: socket.socket, command: bytes, context_id: int, data: memoryview,
                   size: int) -> None:
    """The command PDU, then ``data`` as P-DATA-TF PDUs of at most ``size`` bytes of value,
    written with scatter/gather (``sendmsg``): the PDU headers are the only bytes made."""
    buffers: list[bytes | memoryview] = [command]
    n = len(data)
    for i in range(0, n, size):
        fragment = data[i:i + size]
        last = i + size >= n
        buffers.append(struct.pack(">BBIIBB", 0x04, 0, 6 + len(fragment), 2 + len(fragment),
                                   context_id, 0x02 if last else 0x00))
        buffers.append(fragment)
    if n == 0:
        buffers.append(struct.pack(">BBIIBB", 0x04, 0, 6, 2, context_id, 0x02))
    while buffers:
        batch = buffers[:IOV_BATCH]
        sent = sock.sendmsg(batch)
        # drop what went out; a partial write leaves the rest of one buffer
        while sent and buffers:
            first = buffers[0]
            if sent >= len(first):
                sent -= len(first)
                buffers.pop(0)
            else:
                buffers[0] = memoryview(first)[sent:]
                sent = 0


IOV_BATCH = 512  # buffers per sendmsg (the system's limit is at least 1024)


def send_store(assoc: Any, context_id: int, msg_id: int, sop_class: str, sop_instance: str,
               payload: io.BytesIO | tuple[Path, int]) -> Dataset | None:
    """Send one C-STORE request and wait for its response; None if there was none.

    pynetdicom hands every P-DATA PDU through its DUL thread and state machine; with a
    PACS that reads 16 KiB PDUs (Orthanc's default) that is ~33 round trips through
    Python per 0.5 MB instance. Here the PDUs are framed directly and written to the
    association's socket in large writes, while the association is established (state
    Sta6, where sending P-DATA does not change state) and its reactor is paused; the
    response is received by pynetdicom as usual.
    """
    # the peer's maximum PDU length: on an association it accepted (C-GET), the requester's
    peer = assoc.requestor if getattr(assoc, "is_acceptor", False) else assoc.acceptor
    peer_max = int(peer.maximum_length or 0)
    size = max(peer_max - 6, 1024) if peer_max else 1 << 20
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is None:
        return None
    try:
        with _reactor_paused(assoc):
            command = _pdv_pdu(context_id, 0x03, store_command(sop_class, sop_instance, msg_id))
            if isinstance(payload, io.BytesIO) and not isinstance(sock, ssl.SSLSocket):
                _send_gathered(sock, command, context_id, payload.getbuffer(), size)
                _cx, rsp = assoc.dimse.get_msg(block=True)
                return _response_status(assoc, rsp)
            out = [command]
            pending = len(out[0])
            fragments = _fragments(payload, size)
            block = next(fragments, b"")
            while True:
                nxt = next(fragments, None)
                out.append(_pdv_pdu(context_id, 0x00 if nxt is not None else 0x02, block))
                pending += len(out[-1])
                if pending >= (1 << 20) or nxt is None:
                    sock.sendall(b"".join(out))
                    out, pending = [], 0
                if nxt is None:
                    break
                block = nxt
            _cx, rsp = assoc.dimse.get_msg(block=True)
    except OSError as exc:  # (also: the reactor did not pause)
        log.warning("sending to the PACS failed: %s", exc)
        assoc.abort()
        return None
    return _response_status(assoc, rsp)


def _exchange(assoc: Any, req: C_STORE, context_id: int) -> Dataset | None:
    """pynetdicom's send_c_store after the data set is prepared: send, wait, check."""
    with _reactor_paused(assoc):
        assoc.dimse.send_msg(req, context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
    return _response_status(assoc, rsp)


@contextlib.contextmanager
def _reactor_paused(assoc: Any) -> Iterator[None]:
    """Pause the association's reactor while this thread talks on the association itself,
    as pynetdicom's own send_c_store does. A :class:`~.transport.FastAssociation` is
    paused by taking its turn lock (re-entrant: the C-GET handler runs in the reactor's
    own thread), which waits for the reactor to finish what it is doing; otherwise by
    pynetdicom's checkpoint and ``_is_paused`` flag (waited for up to 5 s)."""
    assoc._reactor_checkpoint.clear()
    turn = getattr(assoc, "_turn", None)
    if turn is not None:
        if not turn.acquire(timeout=60):
            assoc._reactor_checkpoint.set()
            raise OSError("the association's reactor did not pause within 60 s")
        try:
            yield
        finally:
            assoc._reactor_checkpoint.set()
            turn.release()
        return
    deadline = time.monotonic() + 5
    while not assoc._is_paused and time.monotonic() < deadline:
        time.sleep(0.0001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def _response_status(assoc: Any, rsp: Any) -> Dataset | None:
    """The status data set of a C-STORE response; None (handled as pynetdicom does) if
    there was no response."""
    if rsp is None:
        assoc._handle_no_response()
        return None
    return assoc._check_received_status(rsp)


def stored_payload(store: BlobStore, blob: str, size: int) -> io.BytesIO | tuple[Path, int]:
    """A stored instance's data set bytes as :func:`send_store` takes them: in memory up to
    ``IN_MEMORY_LIMIT``, else the blob file and the data set offset (streamed from it, so
    a large multi-frame instance does not fill memory).

    Known-good blobs (:mod:`syncnode.knowngood`: unchanged since they were hashed intact)
    are read without hashing; any other is checked against its chunk hashes first (whole,
    before a byte is sent) and raises :class:`BlobError` when damaged: it is never sent.
    Raises ValueError when the blob is not a Part-10 file."""
    if size <= IN_MEMORY_LIMIT:
        data = store.read_known_whole(blob)
        return io.BytesIO(memoryview(data)[dataset_offset(data[:65536]):])
    known = store.open_known(blob)
    if known is None:
        for _ in store.read_verified(blob):  # verify the whole blob (noted known good)
            pass
        known = store.open(blob), 0
    f, _size = known
    with f:
        head = f.read(65536)
    return (store.path(blob), dataset_offset(head))


def _inflated(store: BlobStore, blob: str) -> bytes:
    """A deflated instance's data set, inflated (= its explicit VR little endian bytes)."""
    data = store.read_known_whole(blob)
    body = data[dataset_offset(data[:65536]):]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    return inflater.decompress(body) + inflater.flush()


class Exporter:
    """Runs one :class:`Destination` worker per configured PACS."""

    def __init__(self, node: LocalNode, destinations: list[str], *, ae_title: str,
                 poll_interval: float = 5.0, backoff_base: float = 1.0,
                 backoff_cap: float = 60.0, max_pdu: int = 262_144,
                 dimse_timeout: float = 120.0, audit: AuditLog | None = None,
                 commitment: list[str] | None = None, reject_code: str = "113001",
                 reject_codes: dict[str, str] | None = None,
                 peer_delete_hold: float = PEER_DELETE_HOLD) -> None:
        self.node = node
        self.reject_code = reject_code
        self.reject_codes = dict(reject_codes or {})
        self.peer_delete_hold = peer_delete_hold
        self.commitment = set(commitment or [])
        self.audit = audit
        self.node_id = node.node_id.compact
        self.store = BlobStore(node.data)
        self.ae_title = ae_title
        self.poll_interval = poll_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_pdu = max_pdu
        self.dimse_timeout = dimse_timeout
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.sent = 0
        self.destinations = [Destination(self, a) for a in dict.fromkeys(destinations)]
        # new events from peers wake the workers at once (the poll is only a fallback)
        node.catalog.add_listener(lambda _result: self.wake())

    def start(self) -> None:
        for d in self.destinations:
            d.thread.start()

    def commitment_report(self, transaction_uid: str, info: Dataset) -> bool:
        """A PACS's storage commitment report (N-EVENT-REPORT, on the export association
        or on a new one to this node's SCP): its items become committed or not. False if
        the Transaction UID is not one of ours."""
        held = {str(i.get("ReferencedSOPInstanceUID", "") or "")
                for i in info.get("ReferencedSOPSequence", None) or []}
        failed = {str(i.get("ReferencedSOPInstanceUID", "") or ""):
                  int(i.get("FailureReason", 0x0110) or 0x0110)
                  for i in info.get("FailedSOPSequence", None) or []}
        settled = self.node.catalog.outbox.commitment_reported(transaction_uid, held, failed)
        for d in self.destinations:
            if d._awaited == transaction_uid:
                d._report_seen.set()
        if not settled:
            log.warning("storage commitment report for unknown transaction %s",
                        transaction_uid)
            return False
        log.info("storage commitment %s: %d committed, %d not", transaction_uid,
                 len(held), len(failed))
        return True

    def wake(self) -> None:
        self.wakeup.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.wakeup.set()
        for d in self.destinations:
            assoc = d.assoc
            if assoc is not None and assoc.is_established:
                assoc.abort()
        deadline = time.monotonic() + timeout
        for d in self.destinations:
            if d.thread.is_alive():
                d.thread.join(max(0.1, deadline - time.monotonic()))
