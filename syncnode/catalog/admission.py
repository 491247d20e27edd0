"""The admission step and signing: what a received event must pass before it is stored,
and how this node's own events are signed (rules in :mod:`syncnode.authority`).

Owns the ``origins`` table (certificates by node id), the ``unknown_tombstones`` bounds
and :meth:`Admission.apply`, the one path by which received events enter the catalog.

Invariants:

- A received event is stored only if its body hashes to its id and decodes, its
  signature verifies against the certificate of its origin (or the policy accepts it
  unsigned), its clock is within the bound, and a delete naming unknown puts stays
  within the per-origin and total bounds.
- A certificate a peer offered is stored in ``origins`` only once an event of that
  origin verified against it.
- Every event this node makes is signed with the node's key (:class:`NoSigner` otherwise).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import events as ev
from ..ids import check_hash
from .model import (
    ApplyResult,
    NoSigner,
)
from .part import Part

if TYPE_CHECKING:
    pass


class Admission(Part):
    """Signing of local events, admission and application of received ones.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

    def _sign(self, event: ev.AnyEvent) -> ev.AnyEvent:
        """This node's event, signed (every event made here is; :meth:`_insert` puts the
        node's certificate into ``origins``, to be sent along with its events)."""
        if self._signer is None:
            if self._signer_of is None:
                raise NoSigner(f"catalog {self.path} was opened without the node key; "
                               "open the node's data folder to make events")
            signer = self._signer_of()
            if signer.origin != self.node_id:
                raise NoSigner(f"the key given to catalog {self.path} is that of node "
                               f"{signer.origin}, not {self.node_id}")
            self._signer = signer
        return self._signer.sign(event)

    def _origin_key(self, db: sqlite3.Connection, origin: str) -> Any:
        """The public key of ``origin``: cached, from ``origins``, or from a certificate
        a peer offered (then remembered in ``origins``). None if unknown."""
        from ..signing import OriginCertificateError, OriginKeys

        if self._keys is None:
            self._keys = OriginKeys()
        key = self._keys.get(origin)
        if key is not None:
            return key
        row = db.execute("SELECT cert FROM origins WHERE node_id=?", (origin,)).fetchone()
        der = bytes(row[0]) if row else self._offered.get(origin)
        if der is None:
            return None
        try:
            key = self._keys.add(origin, der)
        except OriginCertificateError:
            return None
        if row is None:
            db.execute("INSERT OR IGNORE INTO origins (node_id, cert) VALUES (?, ?)",
                       (origin, der))
        return key

    def _admit(self, db: sqlite3.Connection, eid: bytes, event: ev.Event,
               limit: int) -> str | None:
        """Why a received event is refused, or None if it may be stored."""
        from ..signing import verify

        policy = self.policy
        if not ev.is_signed(event):
            refusal = policy.unsigned_refusal(event.origin)
            if refusal is not None:
                return refusal
        else:
            key = self._origin_key(db, event.origin)
            if key is None:
                return (f"no certificate for origin {event.origin[:80]}: the peer must send "
                        "it with the events")
            if not verify(event, key):
                return f"signature does not verify against the certificate of {event.origin}"
        refusal = policy.clock_refusal(event.hlc, limit)
        if refusal is not None:
            return refusal
        if isinstance(event, ev.DeleteEvent):
            return self._unknown_tombstone_refusal(db, eid, event)
        return None

    def _unknown_tombstone_refusal(self, db: sqlite3.Connection, eid: bytes,
                                   event: ev.DeleteEvent) -> str | None:
        """Why a delete naming puts not received yet cannot wait for them (bounds)."""
        unknown = sum(1 for p in set(event.removes) if db.execute(
            "SELECT 1 FROM events WHERE id=?", (bytes.fromhex(p),)).fetchone() is None)
        if not unknown:
            return None
        policy = self.policy
        if policy.unknown_ttl_s != float("inf"):
            db.execute("DELETE FROM unknown_tombstones WHERE received < ?",
                       (int(time.time() - policy.unknown_ttl_s),))
        mine = db.execute("SELECT count(*) FROM unknown_tombstones WHERE origin=?",
                          (event.origin,)).fetchone()[0]
        if mine + unknown > policy.max_unknown_per_origin:
            return (f"delete names {unknown} events not received here and origin "
                    f"{event.origin} already has {mine} such names waiting (limit "
                    f"{policy.max_unknown_per_origin}); retried once those events arrive")
        total = db.execute("SELECT count(*) FROM unknown_tombstones").fetchone()[0]
        if total + unknown > policy.max_unknown_total:
            return (f"delete names {unknown} events not received here and {total} such "
                    f"names are waiting (limit {policy.max_unknown_total}); retried later")
        return None

    def _removed_on_arrival(self, db: sqlite3.Connection, put_id: bytes,
                            put_origin: str) -> bool:
        """Whether a put not stored yet would be born removed: a stored delete that has
        authority over it names it."""
        if db.execute("SELECT 1 FROM tombstones WHERE put_id=? LIMIT 1",
                      (put_id,)).fetchone() is not None:
            return True
        return any(self.policy.may_remove(r[0], put_origin) for r in db.execute(
            "SELECT origin FROM unknown_tombstones WHERE put_id=?", (put_id,)))

    def _take_unknown_tombstones(self, db: sqlite3.Connection, put_id: bytes,
                                 put_origin: str) -> None:
        """A put arrived: the deletes that waited for it and have authority over it
        become its tombstones; the others are dropped."""
        rows = db.execute("SELECT delete_id, origin FROM unknown_tombstones WHERE put_id=?",
                          (put_id,)).fetchall()
        if not rows:
            return
        db.executemany("INSERT OR IGNORE INTO tombstones VALUES (?, ?)",
                       ((put_id, r[0]) for r in rows
                        if self.policy.may_remove(r[1], put_origin)))
        db.execute("DELETE FROM unknown_tombstones WHERE put_id=?", (put_id,))

    def offer_certificates(self, ders: Iterable[bytes]) -> None:
        """Certificates a peer sent with events, kept in memory by the origin id each one
        proves (the SHA-256 of its DER); one is stored in ``origins`` only once an event
        of that origin verified against it."""
        from ..signing import certificate_origin

        with self._lock:
            for der in ders:
                if len(self._offered) >= 4096:
                    self._offered.clear()
                self._offered[certificate_origin(der)] = der

    def add_origin_certificate(self, der: bytes) -> str:
        """Remember a certificate (e.g. this node's own) under the id it proves."""
        from ..signing import certificate_origin

        origin = certificate_origin(der)
        with self._lock:
            if self._db.execute("SELECT 1 FROM origins WHERE node_id=?",
                                (origin,)).fetchone() is not None:
                return origin
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO origins (node_id, cert) VALUES (?, ?)",
                       (origin, der))
        return origin

    def certificates_for(self, eids: Iterable[str]) -> list[bytes]:
        """The certificates of the origins of these events (those this node holds), to
        send along with them."""
        raw = [bytes.fromhex(check_hash(e, "event id")) for e in eids]
        out: dict[str, bytes] = {}
        with self._read() as db:
            for i in range(0, len(raw), 500):
                part = raw[i:i + 500]
                out.update((r[0], bytes(r[1])) for r in db.execute(
                    "SELECT o.node_id, o.cert FROM origins o WHERE o.node_id IN "
                    "(SELECT DISTINCT origin FROM events WHERE id IN "
                    f"({', '.join('?' * len(part))}))", part))
        return list(out.values())

    def unknown_tombstone_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM unknown_tombstones").fetchone()[0]

    def apply(self, received: Iterable[tuple[str, bytes] | ev.Checked],
              blob_present: Callable[[str], bool] | None = None, *,
              local: bool = False) -> ApplyResult:
        """Apply events received from a peer: (hex id, body) pairs. Idempotent.

        Each body must hash to its id and decode (checked here unless the item is already
        :class:`~syncnode.events.Checked`), and pass the admission step
        (:meth:`_admit`: signature, clock bound, bounds on tombstones of unknown puts)
        unless ``local`` (events this node made itself, e.g. replayed from its ingest
        journal); a put that is not already removed needs its blob present
        (``blob_present``), otherwise it is rejected, not inserted.
        """
        result = ApplyResult()
        dirty_leaves: set[int] = set()
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        max_hlc = 0
        limit = ev.hlc_limit(self.policy.max_clock_skew_ms or 0)
        checked, result.rejected = ev.check_all(received)
        with self._write() as db:
            for eid, body, event in checked:
                raw = bytes.fromhex(eid)
                if db.execute("SELECT 1 FROM events WHERE id=?", (raw,)).fetchone():
                    continue  # already here (a replay): nothing to check or insert
                if not local:
                    refusal = self._admit(db, raw, event, limit)
                    if refusal is not None:
                        result.rejected[eid] = refusal
                        continue
                if (isinstance(event, ev.PutEvent) and blob_present is not None
                        and not blob_present(event.blob)
                        and not self._removed_on_arrival(db, raw, event.origin)):
                    result.rejected[eid] = f"blob {event.blob} not present"
                    continue
                max_hlc = max(max_hlc, event.hlc)
                if self._insert(db, raw, body, event, dirty_leaves, dirty_sops, freed):
                    result.inserted.append(eid)
            self._observe(db, max_hlc, limit if self.policy.max_clock_skew_ms is not None
                          else ev.MAX_OBSERVED_HLC)
            result.freed_blobs = self._finish(db, dirty_leaves, dirty_sops, freed)
        return self._inserted(result)
