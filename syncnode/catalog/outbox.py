"""The DICOM exporter's outbox: per destination, the put events from peers still to be
sent, and what became of each (``outbox``, ``outbox_cursor``; created by migration 2).

The cursor is the last ``events.seq`` scanned for a destination: scanning is
incremental and each event is queued at most once per destination (``UNIQUE (dest,
event_id)``). Only puts whose origin is another node are queued (what this node stored
itself came from the PACS side). Outcomes are written in batches (one transaction,
one flush, for many items); a crash may resend up to a batch, which a PACS accepts
as a duplicate.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .core import Catalog


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

    def enqueue_new(self, dest: str, node_id: str, limit: int) -> tuple[int, int]:
        """Queue the peers' put events after the cursor (at most ``limit`` scanned);
        return (events scanned, instances queued)."""
        with self._catalog._write() as db:
            row = db.execute("SELECT seq FROM outbox_cursor WHERE dest=?", (dest,)).fetchone()
            cursor = row[0] if row else 0
            rows = db.execute(
                "SELECT e.seq, e.id, e.kind, e.origin, p.sop_instance_uid FROM events e "
                "LEFT JOIN puts p ON p.seq = e.seq WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
                (cursor, limit)).fetchall()
            now = time.time()
            new = [(dest, seq, eid, sop, now, now) for seq, eid, kind, origin, sop in rows
                   if kind == "put" and origin != node_id and sop is not None]
            if new:
                db.executemany(
                    "INSERT OR IGNORE INTO outbox (dest, seq, event_id, sop_instance_uid, "
                    "enqueued, updated) VALUES (?, ?, ?, ?, ?, ?)", new)
            if rows:
                db.execute("UPDATE outbox_cursor SET seq=? WHERE dest=?", (rows[-1][0], dest))
        return len(rows), len(new)

    def due(self, dest: str, limit: int) -> list[OutboxItem]:
        """Pending items whose next attempt is due, oldest first."""
        with self._catalog._read() as db:
            rows = db.execute(
                "SELECT o.id, o.event_id, o.sop_instance_uid, o.attempts, coalesce(p.live, 0), "
                "coalesce(p.blob, ''), coalesce(p.size, 0), coalesce(p.sop_class_uid, ''), "
                "coalesce(p.transfer_syntax_uid, '') FROM outbox o "
                "LEFT JOIN puts p ON p.seq = o.seq "
                "WHERE o.dest=? AND o.state='pending' AND o.next_attempt <= ? "
                "ORDER BY o.id LIMIT ?", (dest, time.time(), limit)).fetchall()
        return [OutboxItem(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8])
                for r in rows]

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
                "last_contact": 0.0, "consecutive_failures": 0, "failed_items": []}

    out: dict[str, Any] = {}
    for dest, last_error, last_contact, failures in db.execute(
            "SELECT dest, last_error, last_contact, failures FROM outbox_cursor ORDER BY dest"):
        out[dest] = {**empty(), "last_error": last_error, "last_contact": last_contact,
                     "consecutive_failures": failures}
    for dest, state, n in db.execute(
            "SELECT dest, state, count(*) FROM outbox GROUP BY dest, state"):
        out.setdefault(dest, empty())[state] = n
    columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
    if "committed" in columns:  # (schema 5: storage commitment)
        for dest, committed, n in db.execute(
                "SELECT dest, committed, count(*) FROM outbox WHERE commit_uid != '' "
                "AND state='done' GROUP BY dest, committed"):
            key = {1: "committed", -1: "not_committed"}.get(committed,
                                                            "awaiting_commitment")
            out.setdefault(dest, empty())[key] = n
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
