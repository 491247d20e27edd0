"""Deletes: tombstones made by this node, and the garbage collection of blobs that no
put references any more.

Invariants:

- A delete names the current, not removed, versions of an instance (at most
  ``events.REMOVES_PER_DELETE`` per event) and is signed like every local event.
- A blob is deleted only under the write lock and only if no put that is not removed
  refers to it, so no concurrent put can start referring to it while it goes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .. import events as ev
from ..ids import check_uid
from .model import (
    ApplyResult,
)
from .part import Part


class Deletes(Part):
    """Deleting instances and studies; collecting unreferenced blobs.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

    def delete_instances(self, sop_uids: Iterable[str]) -> ApplyResult:
        """Tombstone the current versions of these instances. Unknown UIDs are ignored."""
        return self._delete_where("sop_instance_uid=?",
                                  [check_uid(u, "SOP Instance UID") for u in sop_uids])

    def delete_study(self, study_uid: str) -> ApplyResult:
        check_uid(study_uid, "Study Instance UID")
        with self._lock:
            sops = [r[0] for r in self._db.execute(
                "SELECT DISTINCT sop_instance_uid FROM puts WHERE study_instance_uid=? "
                "AND removed=0", (study_uid,))]
        return self.delete_instances(sops)

    def _delete_where(self, where: str, params: list[str]) -> ApplyResult:
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
