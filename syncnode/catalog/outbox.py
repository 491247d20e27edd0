"""The DICOM exporter's outbox: per destination, the put events from peers still to be
sent, the rejection notes that tell it about deletes, and what became of each
(``outbox``, ``outbox_cursor``; created by migration 2; notes by migration 6).

The cursor is the last ``events.seq`` scanned for a destination: scanning is
incremental and each event is queued at most once per destination (``UNIQUE (dest,
event_id)``). Only puts whose origin is another node are queued (what this node stored
itself came from the PACS side). Outcomes are written in batches (one transaction,
one flush, for many items); a crash may resend up to a batch, which a PACS accepts
as a duplicate.

Deletes: a scanned delete event (made here or admitted from a peer) whose tombstone
took effect on a put already sent to the destination (``done``) queues a ``reject`` item
in the same transaction: the deletes of one scan, per study and reason, in notes of at
most :data:`~syncnode.rejection.NOTE_REFERENCES` references. A note's key (its
``event_id``) is derived from the destination, the code and its delete event ids, and
its SOP Instance UID from the key, so a note is queued once and is the same object
whenever it is sent. Its reason: the one given to the delete here (``delete_reasons``),
else that of a rejection note that rejected the instance here, else the destination's
default. A delete caused by a rejection note received here (``delete_reasons.note``)
queues that note itself instead, as a ``put`` item (once per destination): the PACS
gets the same note, not one made here. What it finally references is decided when it is sent
(:meth:`Outbox.note_contents`): not an instance that is live again, nor one whose own
rejection note is exported to the PACS anyway.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import blake3

from .. import events as ev
from ..rejection import (
    EXPLICIT_VR_LE,
    KEY_OBJECT_SELECTION,
    NOTE_REFERENCES,
    NoteSubject,
    Rejected,
    note_uid,
)

if TYPE_CHECKING:
    from .core import Catalog

log = logging.getLogger("syncnode.catalog.outbox")


@dataclass
class OutboxItem:
    """One queued instance, joined with its put (empty fields if the put is gone)."""

    id: int
    event_id: bytes
    sop_instance_uid: str
    attempts: int
    live: bool
    blob: str
    size: int
    sop_class_uid: str
    transfer_syntax_uid: str
    kind: str = "put"  # or "reject": a rejection note made here (see note_contents)
    note: bytes | None = None  # a reject item's note, as sent (set by the exporter)


@dataclass
class NoteContents:
    """What a ``reject`` item's note says, read when it is sent."""

    key: bytes
    code: str
    made: datetime
    subject: NoteSubject | None  # None when nothing is left to reject
    rejected: list[Rejected]
    dropped_live: int = 0  # live again here: not rejected
    dropped_exported: int = 0  # their own rejection note is exported anyway


OutcomeKind = Literal["finish", "retry", "fail"]
Outcome = tuple[OutcomeKind, tuple[Any, ...]]

_OUTCOME_SQL: dict[str, str] = {
    # (state, note, updated, id)
    "finish": "UPDATE outbox SET state=?, last_error=?, updated=? WHERE id=?",
    # (attempts, next_attempt, reason, updated, id)
    "retry": "UPDATE outbox SET attempts=?, next_attempt=?, last_error=?, updated=? "
             "WHERE id=?",
    # (attempts, reason, updated, id)
    "fail": "UPDATE outbox SET state='failed', attempts=?, last_error=?, updated=? "
            "WHERE id=?",
}


class Outbox:
    """The outbox of a :class:`~syncnode.catalog.Catalog` (``catalog.outbox``)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def register(self, dest: str) -> None:
        with self._catalog._write() as db:
            db.execute("INSERT OR IGNORE INTO outbox_cursor (dest) VALUES (?)", (dest,))

    def enqueue_new(self, dest: str, node_id: str, limit: int, reject_code: str = "113001",
                    peer_hold: float = 0.0) -> tuple[int, int]:
        """Queue the peers' put events after the cursor (at most ``limit`` scanned), and
        a rejection note for the deletes among them of instances already sent to ``dest``
        (``reject_code``: the destination's default reason; a note for a peer's deletes
        waits ``peer_hold`` seconds, time for that peer's own rejection note, if it made
        the deletes for one, to arrive). Return (events scanned, items queued)."""
        with self._catalog._write() as db:
            row = db.execute("SELECT seq FROM outbox_cursor WHERE dest=?", (dest,)).fetchone()
            cursor = row[0] if row else 0
            rows = db.execute(
                "SELECT e.seq, e.id, e.kind, e.origin, p.sop_instance_uid, "
                "CASE WHEN e.kind = 'delete' THEN e.body END FROM events e "
                "LEFT JOIN puts p ON p.seq = e.seq WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
                (cursor, limit)).fetchall()
            now = time.time()
            new = [(dest, seq, eid, sop, now, now) for seq, eid, kind, origin, sop, _ in rows
                   if kind == "put" and origin != node_id and sop is not None]
            if new:
                db.executemany(
                    "INSERT OR IGNORE INTO outbox (dest, seq, event_id, sop_instance_uid, "
                    "enqueued, updated) VALUES (?, ?, ?, ?, ?, ?)", new)
            deletes = [(seq, bytes(eid), origin, bytes(body))
                       for seq, eid, kind, origin, _, body in rows if kind == "delete"]
            notes = (_queue_notes(db, dest, node_id, deletes, reject_code, peer_hold, now)
                     if deletes else 0)
            if rows:
                db.execute("UPDATE outbox_cursor SET seq=? WHERE dest=?", (rows[-1][0], dest))
        return len(rows), len(new) + notes

    def note_contents(self, item_id: int, node_id: str) -> NoteContents:
        """What the rejection note of a ``reject`` item says now: its reason, when its
        deletes were made, the rejected instances (not those live again here, nor those
        whose own rejection note is exported anyway: a put of another node, live here)
        and the patient and study they belong to (the put events' values, and those read
        from their blobs while held: ``find_attrs``)."""
        with self._catalog._read() as db:
            key, code, made = db.execute(
                "SELECT o.event_id, n.code, n.made FROM outbox o JOIN outbox_notes n "
                "ON n.item = o.id WHERE o.id=?", (item_id,)).fetchone()
            refs = db.execute(
                "SELECT p.seq, p.sop_class_uid, p.sop_instance_uid, p.series_instance_uid, "
                "EXISTS (SELECT 1 FROM puts q WHERE q.sop_instance_uid = p.sop_instance_uid "
                "AND q.live = 1), "
                "EXISTS (SELECT 1 FROM rejected r JOIN puts k ON k.sop_instance_uid = r.note "
                "WHERE r.sop_instance_uid = p.sop_instance_uid AND k.live = 1 "
                "AND k.origin != ?) "
                "FROM outbox_note_refs f JOIN puts p ON p.seq = f.put_seq WHERE f.item=? "
                "ORDER BY p.seq", (node_id, item_id)).fetchall()
            out = NoteContents(bytes(key), str(code), datetime.fromtimestamp(made, UTC),
                               None, [])
            seqs: list[int] = []
            seen: set[str] = set()
            for seq, sop_class, sop, series, live_again, exported in refs:
                if live_again:
                    out.dropped_live += 1
                elif exported:
                    out.dropped_exported += 1
                elif sop not in seen:
                    seen.add(sop)
                    seqs.append(seq)
                    out.rejected.append(Rejected(sop_class, sop, series))
            if seqs:
                out.subject = _subject(db, seqs)
        return out

    def due(self, dest: str, limit: int) -> list[OutboxItem]:
        """Pending items whose next attempt is due, oldest first. A ``reject`` item is
        live (its note is made when it is sent), a Key Object Selection in Explicit VR
        Little Endian."""
        with self._catalog._read() as db:
            rows = db.execute(
                "SELECT o.id, o.event_id, o.sop_instance_uid, o.attempts, coalesce(p.live, 0), "
                "coalesce(p.blob, ''), coalesce(p.size, 0), coalesce(p.sop_class_uid, ''), "
                "coalesce(p.transfer_syntax_uid, ''), o.kind FROM outbox o "
                "LEFT JOIN puts p ON p.seq = o.seq AND o.kind = 'put' "
                "WHERE o.dest=? AND o.state='pending' AND o.next_attempt <= ? "
                "ORDER BY o.id LIMIT ?", (dest, time.time(), limit)).fetchall()
        out = []
        for r in rows:
            if r[9] == "reject":
                out.append(OutboxItem(r[0], r[1], r[2], r[3], True, "", 0,
                                      KEY_OBJECT_SELECTION, EXPLICIT_VR_LE, "reject"))
            else:
                out.append(OutboxItem(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7],
                                      r[8]))
        return out

    def next_attempt(self, dest: str) -> float | None:
        """When the earliest pending item of a destination comes due (Unix time)."""
        with self._catalog._read() as db:
            row = db.execute("SELECT min(next_attempt) FROM outbox WHERE dest=? AND "
                             "state='pending'", (dest,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def record_outcomes(self, outcomes: list[Outcome]) -> None:
        """Write item outcomes in one transaction: ``("finish", (state, note, updated,
        id))``, ``("retry", (attempts, next_attempt, reason, updated, id))``,
        ``("fail", (attempts, reason, updated, id))``."""
        if not outcomes:
            return
        with self._catalog._write() as db:
            for kind, params in outcomes:
                db.execute(_OUTCOME_SQL[kind], params)

    def destination_failed(self, dest: str, reason: str, failures: int) -> None:
        with self._catalog._write() as db:
            db.execute("UPDATE outbox_cursor SET last_error=?, failures=? WHERE dest=?",
                       (reason, failures, dest))

    def commitment_requested(self, transaction_uid: str, ids: list[int]) -> None:
        """Items sent (``done``) for which the PACS was asked to commit, under this
        Transaction UID."""
        with self._catalog._write() as db:
            db.executemany("UPDATE outbox SET commit_uid=?, committed=0 WHERE id=?",
                           [(transaction_uid, i) for i in ids])

    def commitment_reported(self, transaction_uid: str, held: set[str],
                            failed: dict[str, int]) -> int:
        """Record a PACS's storage commitment report: the items of this transaction whose
        SOP Instance UID it holds are committed, those it reported failed get -1 and the
        reason. Returns how many items the report settled."""
        now = time.time()
        with self._catalog._write() as db:
            rows = db.execute("SELECT id, sop_instance_uid FROM outbox WHERE commit_uid=?",
                              (transaction_uid,)).fetchall()
            settled = 0
            for item_id, sop in rows:
                if sop in held:
                    db.execute("UPDATE outbox SET committed=1, updated=? WHERE id=?",
                               (now, item_id))
                    settled += 1
                elif sop in failed:
                    db.execute("UPDATE outbox SET committed=-1, last_error=?, updated=? "
                               "WHERE id=?", (f"not committed by the PACS: failure reason "
                                              f"0x{failed[sop]:04X}", now, item_id))
                    settled += 1
        return settled

    def destination_ok(self, dest: str) -> None:
        with self._catalog._write() as db:
            db.execute("UPDATE outbox_cursor SET last_error='', failures=0, last_contact=? "
                       "WHERE dest=?", (time.time(), dest))

    def status(self) -> dict[str, Any]:
        """See :func:`outbox_status`."""
        with self._catalog._read() as db:
            return _status(db)


def outbox_status(catalog_path: Path | str) -> dict[str, Any]:
    """Per destination: pending / done / failed / skipped counts, due now, last error and
    the first failed items with their reasons. Empty if nothing was ever exported. Reads
    the file read-only (``syncnode status`` without ``run``; an old catalog unmigrated)."""
    path = Path(catalog_path)
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        return _status(db)
    finally:
        db.close()


def _status(db: sqlite3.Connection) -> dict[str, Any]:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "outbox" not in tables or "outbox_cursor" not in tables:
        return {}

    def empty() -> dict[str, Any]:
        return {"pending": 0, "done": 0, "failed": 0, "skipped": 0, "committed": 0,
                "awaiting_commitment": 0, "not_committed": 0, "last_error": "",
                "last_contact": 0.0, "consecutive_failures": 0, "failed_items": [],
                "rejection_notes": {"pending": 0, "done": 0, "failed": 0, "skipped": 0,
                                    "committed": 0}}

    out: dict[str, Any] = {}
    for dest, last_error, last_contact, failures in db.execute(
            "SELECT dest, last_error, last_contact, failures FROM outbox_cursor ORDER BY dest"):
        out[dest] = {**empty(), "last_error": last_error, "last_contact": last_contact,
                     "consecutive_failures": failures}
    columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
    kind = "kind" if "kind" in columns else "'put'"  # (schema 6: rejection notes)
    for dest, item_kind, state, n in db.execute(
            f"SELECT dest, {kind}, state, count(*) FROM outbox GROUP BY 1, 2, 3"):
        st = out.setdefault(dest, empty())
        (st if item_kind == "put" else st["rejection_notes"])[state] = n
    if "committed" in columns:  # (schema 5: storage commitment)
        for dest, item_kind, committed, n in db.execute(
                f"SELECT dest, {kind}, committed, count(*) FROM outbox WHERE commit_uid != '' "
                "AND state='done' GROUP BY 1, 2, 3"):
            key = {1: "committed", -1: "not_committed"}.get(committed,
                                                            "awaiting_commitment")
            st = out.setdefault(dest, empty())
            if item_kind == "put":
                st[key] = n
            elif key == "committed":
                st["rejection_notes"]["committed"] = n
    for dest, sop, err in db.execute(
            "SELECT dest, sop_instance_uid, last_error FROM outbox WHERE state='failed' "
            "ORDER BY id LIMIT 50"):
        out[dest]["failed_items"].append({"sop_instance_uid": sop, "reason": err})
    now = time.time()
    for dest, n, oldest in db.execute(
            "SELECT dest, count(*), min(enqueued) FROM outbox WHERE state='pending' "
            "GROUP BY dest"):
        out[dest]["oldest_pending_seconds"] = round(now - oldest, 1) if n else 0.0
    return out


def _queue_notes(db: sqlite3.Connection, dest: str, node_id: str,
                 deletes: list[tuple[int, bytes, str, bytes]], default_code: str,
                 peer_hold: float, now: float) -> int:
    """Queue the ``reject`` items for scanned delete events (seq, id, origin, body): see
    the module docstring. Returns how many were queued."""
    # (study, code) -> [(delete seq, delete id, put seqs, hlc, from a peer)]
    groups: dict[tuple[str, str], list[tuple[int, bytes, list[int], int, bool]]] = {}
    queued = 0
    for seq, delete_id, origin, body in deletes:
        try:
            event = ev.decode(body)
        except ev.InvalidEvent as exc:  # (one stored under older rules): never blocks export
            log.warning("export to %s: delete %s not read for a rejection note: %s", dest,
                        delete_id.hex(), exc)
            continue
        if not isinstance(event, ev.DeleteEvent):
            continue
        put_seqs: list[int] = []
        study = ""
        for put_hex in event.removes:
            put_id = bytes.fromhex(put_hex)
            sent = db.execute("SELECT o.seq, p.study_instance_uid FROM outbox o JOIN puts p "
                              "ON p.seq = o.seq WHERE o.dest=? AND o.event_id=? AND "
                              "o.kind='put' AND o.state='done'", (dest, put_id)).fetchone()
            if sent is None or db.execute(
                    "SELECT 1 FROM tombstones WHERE put_id=? AND delete_id=?",
                    (put_id, delete_id)).fetchone() is None:
                continue  # not sent there, or a delete without effect (authority)
            put_seqs.append(sent[0])
            study = sent[1]
        if not put_seqs:
            continue
        given = db.execute("SELECT code, note FROM delete_reasons WHERE delete_id=?",
                           (delete_id,)).fetchone()
        if given is not None and given[1]:
            forwarded = _forward_note(db, dest, node_id, str(given[1]), now)
            if forwarded is not None:
                queued += forwarded
                continue
        row = given or db.execute("SELECT code FROM rejected WHERE sop_instance_uid=?",
                                  (event.sop_instance_uid,)).fetchone()
        code = str(row[0]) if row else default_code
        groups.setdefault((study, code), []).append(
            (seq, delete_id, put_seqs, event.hlc, origin != node_id))
    for (study, code), entries in groups.items():
        chunk: list[tuple[int, bytes, list[int], int, bool]] = []
        refs = 0
        for entry in entries:
            if chunk and refs + len(entry[2]) > NOTE_REFERENCES:
                queued += _queue_note(db, dest, study, code, chunk, peer_hold, now)
                chunk, refs = [], 0
            chunk.append(entry)
            refs += len(entry[2])
        if chunk:
            queued += _queue_note(db, dest, study, code, chunk, peer_hold, now)
    return queued


def _forward_note(db: sqlite3.Connection, dest: str, node_id: str, note: str,
                  now: float) -> int | None:
    """The rejection note ``note`` received here caused a delete: the PACS is sent that
    note itself (its put queued like a peer's: 1 if newly queued, 0 if it already was),
    or nothing if it is a peer's note (exported anyway: 0). None if the note is not live
    here any more (a note is made instead)."""
    row = db.execute("SELECT seq, event_id, origin FROM puts WHERE sop_instance_uid=? AND "
                     "live=1 ORDER BY seq DESC LIMIT 1", (note,)).fetchone()
    if row is None:
        return None
    if row[2] != node_id:
        return 0
    return db.execute("INSERT OR IGNORE INTO outbox (dest, seq, event_id, sop_instance_uid, "
                      "enqueued, updated) VALUES (?, ?, ?, ?, ?, ?)",
                      (dest, row[0], row[1], note, now, now)).rowcount


def _queue_note(db: sqlite3.Connection, dest: str, study: str, code: str,
                chunk: list[tuple[int, bytes, list[int], int, bool]], peer_hold: float,
                now: float) -> int:
    key = blake3.blake3(b"\0".join([dest.encode(), code.encode(),
                                     *sorted(e[1] for e in chunk)])).digest()
    due = now + peer_hold if any(e[4] for e in chunk) else 0.0
    cur = db.execute("INSERT OR IGNORE INTO outbox (dest, seq, event_id, sop_instance_uid, "
                     "next_attempt, enqueued, updated, kind) VALUES (?, ?, ?, ?, ?, ?, ?, "
                     "'reject')", (dest, max(e[0] for e in chunk), key, note_uid(key), due,
                                   now, now))
    if not cur.rowcount:
        return 0
    item = cur.lastrowid
    made = max(e[3] for e in chunk) >> ev.HLC_COUNTER_BITS
    db.execute("INSERT INTO outbox_notes (item, code, study_instance_uid, made) VALUES "
               "(?, ?, ?, ?)", (item, code, study, made / 1000.0))
    db.executemany("INSERT OR IGNORE INTO outbox_note_refs (item, put_seq) VALUES (?, ?)",
                   [(item, s) for e in chunk for s in e[2]])
    return 1


def _subject(db: sqlite3.Connection, seqs: list[int]) -> NoteSubject:
    """The patient and study of the first of these puts whose blob was indexed (else of
    the first), as a rejection note copies them."""
    rows = db.execute(
        "SELECT p.study_instance_uid, p.patient_id, p.study_date, f.patient_name, "
        "f.patient_birth_date, f.patient_sex, f.study_time, f.accession_number, f.study_id, "
        "f.referring_physician_name FROM puts p LEFT JOIN find_attrs f USING (blob) "
        f"WHERE p.seq IN ({','.join('?' * len(seqs[:500]))}) "
        "ORDER BY f.blob IS NULL, p.seq LIMIT 1", seqs[:500]).fetchone()
    study, patient_id, study_date, *found = rows
    (name, birth, sex, study_time, accession, study_id,
     referring) = (str(v or "") for v in found)
    return NoteSubject(study, patient_id, name, birth, sex, study_date,
                       study_time.split(".")[0], accession, study_id, referring)
