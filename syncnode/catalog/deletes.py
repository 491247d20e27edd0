"""Deletes: tombstones made by this node, and the garbage collection of blobs that no
put references any more.

Invariants:

- A delete names the current, not removed, versions of an instance (at most
  ``events.REMOVES_PER_DELETE`` per event) and is signed like every local event.
- A blob is deleted only under the write lock and only if no put that is not removed
  refers to it, so no concurrent put can start referring to it while it goes.
- The tombstones follow the delete-authority rules in force (``may_delete``,
  ``delete_authority``): when they change, :meth:`Deletes.reconcile_authority` adds the
  tombstones a delete now has authority for and lifts those it lost, except where the
  put's blob was already collected (that put stays removed: nothing could serve it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import events as ev
from ..ids import check_uid
from .model import (
    _SEQ_OF,
    ApplyResult,
)
from .part import Part

AUTHORITY_META = "delete_authority"  # meta key: the rules the tombstones were made under


@dataclass(slots=True)
class Reconciled:
    """What :meth:`Deletes.reconcile_authority` changed."""

    removed: int = 0  # puts a delete now has authority over: removed
    restored: int = 0  # puts whose only deletes lost their authority: live again
    kept_removed: int = 0  # would be restored, but their blob was already collected
    freed_blobs: set[str] = field(default_factory=set)


class Deletes(Part):
    """Deleting instances and studies; collecting unreferenced blobs.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

    def delete_instances(self, sop_uids: Iterable[str], reason: str | None = None,
                         note: str = "") -> ApplyResult:
        """Tombstone the current versions of these instances. Unknown UIDs are ignored.
        ``reason``: a rejection code (CID 7011) remembered with the deletes (table
        ``delete_reasons``, local) for the rejection notes the exporter sends; ``note``:
        the SOP Instance UID of the rejection note received here that caused them."""
        return self._delete_where("sop_instance_uid=?",
                                  [check_uid(u, "SOP Instance UID") for u in sop_uids],
                                  reason, note)

    def delete_study(self, study_uid: str, reason: str | None = None) -> ApplyResult:
        check_uid(study_uid, "Study Instance UID")
        with self._lock:
            sops = [r[0] for r in self._db.execute(
                "SELECT DISTINCT sop_instance_uid FROM puts WHERE study_instance_uid=? "
                "AND removed=0", (study_uid,))]
        return self.delete_instances(sops, reason)

    def delete_reason(self, delete_id: str) -> str | None:
        """The rejection code given to a delete made here, if one was."""
        with self._read() as db:
            row = db.execute("SELECT code FROM delete_reasons WHERE delete_id=?",
                             (bytes.fromhex(delete_id),)).fetchone()
        return str(row[0]) if row else None

    def _delete_where(self, where: str, params: list[str], reason: str | None = None,
                      note: str = "") -> ApplyResult:
        result = ApplyResult()
        dirty_leaves: set[int] = set()
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        with self._write() as db:
            for param in params:
                puts = sorted(r[0].hex() for r in db.execute(
                    f"SELECT event_id FROM puts WHERE {where} AND removed=0", (param,)))
                for i in range(0, len(puts), ev.REMOVES_PER_DELETE):
                    event = ev.DeleteEvent(origin=self.node_id, hlc=self._tick(db),
                                           sop_instance_uid=param,
                                           removes=tuple(puts[i:i + ev.REMOVES_PER_DELETE]))
                    body = ev.encode(event := self._sign(event))
                    eid = ev.event_id(body)
                    if self._insert(db, bytes.fromhex(eid), body, event, dirty_leaves,
                                    dirty_sops, freed):
                        result.inserted.append(eid)
                        if reason is not None:
                            db.execute("INSERT OR REPLACE INTO delete_reasons (delete_id, "
                                       "code, note) VALUES (?, ?, ?)",
                                       (bytes.fromhex(eid), reason, note))
            result.freed_blobs = self._finish(db, dirty_leaves, dirty_sops, freed)
        return self._inserted(result)

    def collect_garbage(self, candidates: Iterable[str], delete: Callable[[str], bool]) -> int:
        """Delete the candidate blobs that nothing references, under the write lock so no
        concurrent put can start referring to one while it goes."""
        removed = 0
        with self._write() as db:
            for b in candidates:
                if db.execute("SELECT 1 FROM puts WHERE blob=? AND removed=0 LIMIT 1",
                              (b,)).fetchone() is None and delete(b):
                    removed += 1
        return removed

    def _authority_rules(self) -> str:
        p = self.policy
        rules: dict[str, object] = {"delete_authority": p.delete_authority,
                                    "may_delete": sorted(p.may_delete)}
        if p.lineage:  # renewed nodes' ids (absent, the rules read as before renewals)
            rules["lineage"] = sorted(p.lineage.items())
        return json.dumps(rules, sort_keys=True)

    def reconcile_authority(self, blob_present: Callable[[str], bool]) -> Reconciled:
        """Make the tombstones follow the delete-authority rules of :attr:`policy` if they
        were made under other rules (or under rules not recorded): every stored delete
        removes the known puts it now has authority over, and a put whose every delete
        lost its authority is live again if its blob is still here. Returns what changed;
        the blobs in ``freed_blobs`` are for the caller to collect. One transaction; a
        no-op when the rules are those recorded."""
        out = Reconciled()
        rules = self._authority_rules()
        if self.get_meta(AUTHORITY_META) == rules:
            return out
        may_remove = self.policy.may_remove
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        with self._write() as db:
            lost: dict[bytes, list[bytes]] = {}  # put -> deletes that lost authority
            for put_id, delete_id, d_origin, p_origin in db.execute(
                    "SELECT t.put_id, t.delete_id, d.origin, p.origin FROM tombstones t "
                    "JOIN events d ON d.id = t.delete_id "
                    "JOIN events p ON p.id = t.put_id").fetchall():
                if not may_remove(d_origin, p_origin):
                    lost.setdefault(bytes(put_id), []).append(bytes(delete_id))
            for put_id, deletes in lost.items():
                others = db.execute("SELECT count(*) FROM tombstones WHERE put_id=?",
                                    (put_id,)).fetchone()[0] - len(deletes)
                seq, sop, blob = db.execute("SELECT seq, sop_instance_uid, blob FROM puts "
                                            f"WHERE seq=({_SEQ_OF})", (put_id,)).fetchone()
                if not others and not blob_present(blob):
                    out.kept_removed += 1  # nothing to serve it with: stays removed
                    continue
                db.executemany("DELETE FROM tombstones WHERE put_id=? AND delete_id=?",
                               ((put_id, d) for d in deletes))
                if not others:
                    db.execute("UPDATE puts SET removed=0 WHERE seq=?", (seq,))
                    dirty_sops.add(sop)
                    out.restored += 1
            for delete_id, body in db.execute(
                    "SELECT id, body FROM events WHERE kind='delete'").fetchall():
                event = ev.decode(bytes(body))
                assert isinstance(event, ev.DeleteEvent), delete_id
                for put_hex in event.removes:
                    put_id = bytes.fromhex(put_hex)
                    row = db.execute("SELECT blob, sop_instance_uid, removed, seq, origin "
                                     f"FROM puts WHERE seq=({_SEQ_OF})", (put_id,)).fetchone()
                    if row is None or not may_remove(event.origin, row[4]):
                        continue
                    if db.execute("INSERT OR IGNORE INTO tombstones VALUES (?, ?)",
                                  (put_id, delete_id)).rowcount and not row[2]:
                        db.execute("UPDATE puts SET removed=1, live=0 WHERE seq=?", (row[3],))
                        dirty_sops.add(row[1])
                        freed.add(row[0])
                        out.removed += 1
            out.freed_blobs = self._finish(db, set(), dirty_sops, freed)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (AUTHORITY_META, rules))
        return out
