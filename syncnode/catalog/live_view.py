"""The live view and the read models built on it: instances (live versions), C-FIND
(:mod:`syncnode.catalog.find`), blobs referenced, counts and studies for status.

Invariants: read-only (never writes); every query here runs on the catalog's own
connection under its lock, or on a read-only connection of its own (C-FIND).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..ids import check_hash, check_uid
from . import attrs as find_attrs
from . import find as find_model
from .model import (
    _SEQ_OF,
    PUT_COLUMNS,
    Instance,
)
from .part import Part


class LiveView(Part):
    """Queries of the live view, blob references and status counts.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

    def instances(self, *, study: str | None = None, series: str | None = None,
                  sop: str | None = None, patient_id: str | None = None,
                  modality: str | None = None, date_from: str | None = None,
                  date_to: str | None = None, limit: int | None = None,
                  offset: int = 0) -> list[Instance]:
        where: list[str] = ["live=1"]
        params: list[Any] = []
        for col, val, is_uid in (("study_instance_uid", study, True),
                                 ("series_instance_uid", series, True),
                                 ("sop_instance_uid", sop, True),
                                 ("patient_id", patient_id, False),
                                 ("modality", modality, False)):
            if val is not None:
                where.append(f"{col}=?")
                params.append(check_uid(val, col) if is_uid else val)
        if date_from:
            where.append("study_date >= ?")
            params.append(date_from)
        if date_to:
            where.append("study_date <= ?")
            params.append(date_to)
        sql = (f"SELECT event_id, {', '.join(PUT_COLUMNS)} FROM puts WHERE {' AND '.join(where)}"
               " ORDER BY study_instance_uid, series_instance_uid, sop_instance_uid")
        if limit is not None:
            if not (0 <= limit < 2**63 and 0 <= offset < 2**63):
                raise ValueError("limit and offset must be between 0 and 2**63 - 1")
            sql += " LIMIT ? OFFSET ?"
            params += [limit, offset]
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_instance(r) for r in rows]

    def live_count(self, study_uid: str) -> int:
        """Live instances of a study."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM puts WHERE live=1 AND "
                                        "study_instance_uid=?", (study_uid,)).fetchone()[0])

    def index_find_attributes(self, blob_path: Callable[[str], Path],
                              limit: int | None = None) -> int:
        """Read the C-FIND attributes of the live blobs not indexed yet (see
        :mod:`syncnode.catalog.attrs`); return how many blobs were read."""
        return find_attrs.index_missing(self.path, blob_path, limit)

    def index_find_attributes_of(self, blob_path: Callable[[str], Path], blobs: list[str]
                                 ) -> int:
        """:meth:`index_find_attributes` for these blobs only (just stored, still cached)."""
        return find_attrs.index_blobs(self.path, blob_path, blobs)

    def find(self, q: find_model.FindQuery) -> Iterator[dict[str, Any]]:
        """C-FIND matches (see :mod:`syncnode.catalog.find`), streamed from a read-only
        connection of the query's own."""
        return find_model.find(self.path, q)

    def retrieve_set(self, *, patient_id: str | None = None,
                     study_uids: Iterable[str] | None = None,
                     series_uids: Iterable[str] | None = None,
                     sop_uids: Iterable[str] | None = None) -> list[Instance]:
        """The live instances a C-MOVE/C-GET identifier names by its unique keys (PS3.4
        C.4.2.2.1/C.4.3.2.1): each given key must match (a UID list matches any of its
        UIDs); a key that is None is not constrained. At least one key must be given."""
        where: list[str] = ["live=1"]
        params: list[Any] = []
        if patient_id is not None:
            where.append("patient_id=?")
            params.append(patient_id)
        for col, uids in (("study_instance_uid", study_uids),
                          ("series_instance_uid", series_uids),
                          ("sop_instance_uid", sop_uids)):
            if uids is None:
                continue
            listed = [check_uid(u, col) for u in uids]
            if not listed:
                return []
            where.append(f"{col} IN ({', '.join('?' * len(listed))})")
            params.extend(listed)
        if len(where) == 1:
            raise ValueError("a retrieve names at least one unique key")
        sql = (f"SELECT event_id, {', '.join(PUT_COLUMNS)} FROM puts WHERE {' AND '.join(where)}"
               " ORDER BY study_instance_uid, series_instance_uid, sop_instance_uid")
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_instance(r) for r in rows]

    def instance(self, sop_uid: str) -> Instance | None:
        found = self.instances(sop=sop_uid)
        return found[0] if found else None

    def put_event(self, eid: str) -> Instance | None:
        with self._lock:
            row = self._db.execute(f"SELECT event_id, {', '.join(PUT_COLUMNS)} FROM puts "
                                   f"WHERE seq=({_SEQ_OF})", (bytes.fromhex(check_hash(eid)),)
                                   ).fetchone()
        return _instance(row) if row else None

    def put_for_blob(self, blob_hash: str) -> Instance | None:
        """A put event (not removed) whose blob this is: its size and chunk-list hash."""
        with self._lock:
            row = self._db.execute(f"SELECT event_id, {', '.join(PUT_COLUMNS)} FROM puts "
                                   "WHERE blob=? AND removed=0 LIMIT 1",
                                   (check_hash(blob_hash, "blob hash"),)).fetchone()
        return _instance(row) if row else None

    def blobs_of_puts(self, eids: Iterable[str]) -> dict[str, tuple[str, int, str]]:
        """Event id -> (blob, size, transfer syntax) for the put events among ``eids`` held
        here, read from their rows (no event body decoded; removed ones included)."""
        out: dict[str, tuple[str, int, str]] = {}
        with self._lock:
            for e in eids:
                row = self._db.execute(
                    "SELECT p.blob, p.size, p.transfer_syntax_uid FROM events e "
                    "JOIN puts p ON p.seq = e.seq WHERE e.id=?",
                    (bytes.fromhex(check_hash(e, "event id")),)).fetchone()
                if row is not None:
                    out[e] = (row[0], row[1], row[2])
        return out

    def referenced_blobs(self) -> set[str]:
        """Blobs some put that is not removed refers to: the blobs this node must hold."""
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT DISTINCT blob FROM puts WHERE removed=0")}

    def blob_referenced(self, blob_hash: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM puts WHERE blob=? AND removed=0 LIMIT 1",
                                    (blob_hash,)).fetchone() is not None

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            events, puts, deletes = db.execute(
                "SELECT count(*), coalesce(sum(kind='put'), 0), coalesce(sum(kind='delete'), 0) "
                "FROM events").fetchone()
            instances, studies, series, live_bytes = db.execute(
                "SELECT count(*), count(DISTINCT study_instance_uid), "
                "count(DISTINCT series_instance_uid), coalesce(sum(size), 0) "
                "FROM puts WHERE live=1").fetchone()
            blobs, blob_bytes = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM "
                "(SELECT blob, max(size) AS size FROM puts WHERE removed=0 GROUP BY blob)"
            ).fetchone()
        return {"events": events, "put_events": puts, "delete_events": deletes,
                "instances": instances, "studies": studies, "series": series,
                "instance_bytes": live_bytes, "blobs": blobs, "blob_bytes": blob_bytes}

    def studies(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid, min(study_date), group_concat(DISTINCT modality), "
                "count(*), count(DISTINCT series_instance_uid), sum(size) FROM puts "
                "WHERE live=1 GROUP BY study_instance_uid ORDER BY study_instance_uid"
            ).fetchall()
        return [{"study_instance_uid": r[0], "study_date": r[1], "modalities": r[2] or "",
                 "instances": r[3], "series": r[4], "bytes": r[5]} for r in rows]

    def study_arrivals(self, limit: int = 20, window: int = 5000) -> list[dict[str, Any]]:
        """The ``limit`` live studies whose last instance arrived here most recently, among
        the last ``window`` events (bounded work per call: the dashboard asks on every
        change): when its first and its last live instance entered this catalog (unix
        seconds, by any path: import, C-STORE, pull). The last arrival is when the study
        became complete here, as far as this node can know."""
        with self._read() as db:
            top = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            recent = db.execute(
                "SELECT study_instance_uid FROM puts WHERE live=1 AND seq > ? "
                "GROUP BY study_instance_uid ORDER BY max(seq) DESC LIMIT ?",
                (top - window, limit)).fetchall()
            rows = []
            for (study,) in recent:  # each by the live-by-study index
                n, size, first, last = db.execute(
                    "SELECT count(*), sum(p.size), min(e.received), max(e.received) FROM puts p "
                    "JOIN events e ON e.seq = p.seq WHERE p.study_instance_uid = ? "
                    "AND p.live = 1", (study,)).fetchone()
                rows.append({"study_instance_uid": study, "instances": n, "bytes": size,
                             "first_arrived": float(first), "arrived": float(last)})
        return rows


def _instance(row: tuple) -> Instance:
    return Instance(row[0].hex(), *row[1:])
