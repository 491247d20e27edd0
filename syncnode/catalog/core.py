"""The catalog's core: the event set and everything derived from it (SQLite, WAL).

Tables (their SQL is here; the schema and its migrations are in
:mod:`syncnode.catalog.schema`):

- ``events``: the grow-only set. ``id`` (32 raw bytes) = BLAKE3 of ``body``, the
  canonical encoding (see :mod:`syncnode.events`). Never updated, never deleted.
- ``puts``: one row per put event, with the indexed attributes, ``removed`` (a delete
  names it) and ``live`` (it is the live version of its SOP Instance UID). Derived.
- ``tombstones``: (put id, delete id) for every known put a delete removes (the delete
  has authority over it, see :mod:`syncnode.authority`). Derived.
- ``unknown_tombstones``: (put id, delete id, delete origin, received) for names of puts
  not received yet, so that a put arriving after its tombstone is born removed when the
  delete has authority over it. Bounded per origin and in all, and by age.
- ``origins``: the certificate of every origin whose signed events this node took, by
  node id (the SHA-256 of the certificate: the id authenticates it). Served with events
  so that any receiver can verify them.
- ``merkle``: digest and count of every non-empty node of the Merkle index. Derived,
  maintained in the same transaction as the inserts that change it.
- ``meta``: the node id and the hybrid logical clock.
- ``peers``, ``peer_state``, ``discovered``: trusted peers, their sync state, nodes seen
  on the LAN.

Invariants:

- Every change happens in one ``BEGIN IMMEDIATE`` transaction, so another process (the
  CLI next to ``syncnode run``) sees the events, the live view and the Merkle index
  change together or not at all.
- The derived tables are a function of the event set alone: applying the same events
  in any order, any number of times, gives the same rows (see the rule in
  :mod:`syncnode.events`).
- A put event that is not removed is inserted only when its blob is in the store; the
  caller checks this inside the same write transaction (``blob_present``).
- Every received event passes the admission step of :meth:`Catalog.apply` (signature,
  clock bound, unknown-tombstone bounds; :mod:`syncnode.authority`) before it is
  stored; this node's own events are signed when made.
- Commits are synchronous (``synchronous=FULL``): once a method returns, its events
  survive a crash or power loss.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import events as ev
from .. import merkle
from ..authority import Policy
from ..blobstore import BlobInfo
from ..ids import InvalidHash, check_hash, check_uid
from ..protocol import PeerError
from . import find as find_model
from .outbox import Outbox
from .retrieved import Retrieved
from .schema import CatalogError, open_database

if TYPE_CHECKING:  # cryptography costs ~80 ms to import: only commands that sign load it
    from ..signing import OriginKeys, Signer

_SEQ_OF = "SELECT seq FROM events WHERE id=?"  # a put's row, found through the events index
PUT_COLUMNS = (
    "sop_instance_uid", "sop_class_uid", "series_instance_uid", "study_instance_uid",
    "patient_id", "modality", "study_date", "transfer_syntax_uid", "blob", "size", "chunks",
    "hlc", "origin",
)


class NoSigner(CatalogError):
    """This catalog was opened without the node's key and cannot make events."""


class BlobNotPresent(CatalogError):
    """A put event whose blob is not in the store cannot be made live."""


SameInstance = Callable[[str, str], bool]
"""(stored blob, new blob) -> whether both hold the same data set (see build_local_puts)."""


class InvalidLocalPut(CatalogError, ValueError):
    """An instance whose attributes cannot make a valid put event (e.g. a UID that is not
    a UID); the message names the field."""


class PutMismatch(CatalogError, PeerError):
    """A peer's put event whose blob is not the DICOM instance it claims to be (another
    SOP Instance UID, Patient ID, modality... or not DICOM at all): refused, and the peer
    that sent it is in error. The message names fields and UIDs, never patient data."""


@dataclass(frozen=True, slots=True)
class LocalPut:
    """A put event built by :meth:`Catalog.build_local_puts`. ``event``/``body`` are None
    when the instance already has a version with these bytes: ``event_id`` is that one."""

    event_id: str
    event: ev.PutEvent | None = None
    body: bytes | None = None

    @property
    def new(self) -> bool:
        return self.body is not None


@dataclass(slots=True)
class ApplyResult:
    """What a batch of events changed."""

    inserted: list[str] = field(default_factory=list)  # hex ids of events new to this node
    freed_blobs: set[str] = field(default_factory=set)  # blobs no put references any more
    rejected: dict[str, str] = field(default_factory=dict)  # id -> reason
    # puts refused because their blob contradicts them (also in ``rejected``)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Instance:
    """A live instance as the catalog lists it."""

    event_id: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str
    study_date: str
    transfer_syntax_uid: str
    blob: str
    size: int
    chunks: str
    hlc: int
    origin: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class Catalog:
    """One node's catalog. Thread-safe (one connection behind a lock); many processes may
    open the same file at once."""

    def __init__(self, path: Path | str, node_id: str | None = None, *,
                 policy: Policy | None = None,
                 signer: Callable[[], Signer] | None = None) -> None:
        """``policy``: the rules for received events (default: the safe defaults of
        :class:`syncnode.authority.Policy` for this node). ``signer``: gives the signer
        of this node's events, called the first time one is made."""
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = open_database(self.path)
        self._db.execute("PRAGMA cache_size=-131072")  # 128 MiB
        # checkpoint the WAL every ~40 MB instead of ~4 MB: fewer rewrites of hot pages
        self._db.execute("PRAGMA wal_autocheckpoint=10000")
        # Merkle node digests as of this connection's view, valid while PRAGMA data_version
        # says no other connection committed (see _write); saves a query per inner node.
        self._merkle_cache: dict[tuple[int, int], merkle.NodeDigest] | None = None
        self._merkle_version: int | None = None
        self._clock = _clock_of(self.path)  # shared by every object on this file (_tick)
        self._ro: sqlite3.Connection | None = None  # see _reader
        self._ro_lock = threading.Lock()
        self._listeners: list[Callable[[ApplyResult], None]] = []
        self.outbox = Outbox(self)  # the DICOM exporter's queue
        self.retrieved = Retrieved(self)  # studies retrieved from each PACS
        with self._write() as db:
            if node_id is not None:
                row = db.execute("SELECT value FROM meta WHERE key='node_id'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('node_id', ?)", (node_id,))
                elif row[0] != node_id:
                    raise CatalogError(
                        f"catalog {self.path} belongs to node {row[0]}, not {node_id}")
        self.node_id = node_id or self.get_meta("node_id") or ""
        self.policy = policy if policy is not None else Policy(local_node=self.node_id)
        self._signer_of = signer
        self._signer: Signer | None = None
        self._keys: OriginKeys | None = None  # parsed origin keys, made on first use
        self._offered: dict[str, bytes] = {}  # origin -> certificate a peer sent

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._ro_lock:
            if self._ro is not None:
                self._ro.close()
                self._ro = None

    def add_listener(self, listener: Callable[[ApplyResult], None]) -> None:
        """Call ``listener(result)`` after every commit through this object that inserted
        events (from the committing thread; it must be quick and must not raise)."""
        self._listeners.append(listener)

    def _inserted(self, result: ApplyResult) -> ApplyResult:
        if result.inserted:
            for listener in list(self._listeners):
                listener(result)
        return result

    def _reader(self) -> sqlite3.Connection:
        """A read-only connection (under ``_ro_lock``) for reads that must not wait for
        this object's writes: in WAL mode it sees the last commit while a write and its
        flush are under way. Opened on first use."""
        if self._ro is None:
            self._ro = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60.0,
                                       isolation_level=None, check_same_thread=False)
            self._ro.execute("PRAGMA busy_timeout=60000")
        return self._ro

    # -- transactions --------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._merkle_version:  # another connection committed meanwhile
                self._merkle_cache, self._merkle_version = None, version
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self._merkle_cache = None
                raise
            else:
                self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db.in_transaction:  # nested in a snapshot or a write: share it
                yield self._db
                return
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def snapshot(self) -> AbstractContextManager[sqlite3.Connection]:
        """A consistent view for several reads (one read transaction): e.g. a Merkle node,
        its children and its ids must agree while another process inserts events."""
        return self._read()

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _tick(self, db: sqlite3.Connection, *, persist: bool = True) -> int:
        """The next timestamp of this node's one clock: after the stored clock and after
        every timestamp issued in this process for this catalog file (events built but
        not yet inserted included, whichever :class:`Catalog` object built them).
        ``persist``: store it in ``meta`` (inside the caller's write transaction)."""
        row = db.execute("SELECT value FROM meta WHERE key='hlc'").fetchone()
        with self._clock.lock:
            hlc = ev.hlc_tick(max(int(row[0]) if row else 0, self._clock.issued))
            self._clock.issued = hlc
        if persist:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)", (str(hlc),))
        return hlc

    def _observe(self, db: sqlite3.Connection, remote: int,
                 limit: int = ev.MAX_OBSERVED_HLC) -> None:
        row = db.execute("SELECT value FROM meta WHERE key='hlc'").fetchone()
        last = int(row[0]) if row else 0
        if remote > last:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)",
                       (str(ev.hlc_observe(last, remote, limit)),))

    # -- authenticity and authority (the admission step; rules in syncnode.authority) ----
    def _sign(self, event: ev.Event) -> ev.Event:
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

    # -- inserting events ----------------------------------------------------------------
    def _insert(self, db: sqlite3.Connection, eid: bytes, body: bytes, event: ev.Event,
                dirty_leaves: set[int], dirty_sops: set[str], freed: set[str]) -> bool:
        cur = db.execute(
            "INSERT OR IGNORE INTO events (id, kind, hlc, origin, body) VALUES (?, ?, ?, ?, ?)",
            (eid, event.kind, event.hlc, event.origin, body))
        if cur.rowcount == 0:
            return False
        if self._signer is not None and event.origin == self._signer.origin:
            # an event of ours: our certificate is served with it
            db.execute("INSERT OR IGNORE INTO origins (node_id, cert) VALUES (?, ?)",
                       (self._signer.origin, self._signer.cert_der))
        dirty_leaves.add(merkle.leaf_index(eid))
        dirty_sops.add(event.sop_instance_uid)
        if isinstance(event, ev.PutEvent):
            self._take_unknown_tombstones(db, eid, event.origin)
            db.execute(
                f"INSERT INTO puts (event_id, {', '.join(PUT_COLUMNS)}, seq, removed) "
                f"SELECT {', '.join(f'?{i + 1}' for i in range(len(PUT_COLUMNS) + 2))}, "
                "EXISTS (SELECT 1 FROM tombstones WHERE put_id=?1)",
                (eid, *(getattr(event, c) for c in PUT_COLUMNS), cur.lastrowid))
        else:
            now = int(time.time())
            for put_hex in event.removes:
                put_id = bytes.fromhex(put_hex)
                row = db.execute("SELECT blob, sop_instance_uid, removed, seq, origin FROM puts "
                                 f"WHERE seq=({_SEQ_OF})", (put_id,)).fetchone()
                if row is None:  # not received yet: wait for it (bounded, see _admit)
                    db.execute("INSERT OR IGNORE INTO unknown_tombstones VALUES (?, ?, ?, ?)",
                               (put_id, eid, event.origin, now))
                    continue
                if not self.policy.may_remove(event.origin, row[4]):
                    continue  # no authority over this put: stored, relayed, no effect here
                db.execute("INSERT OR IGNORE INTO tombstones VALUES (?, ?)", (put_id, eid))
                if not row[2]:
                    db.execute("UPDATE puts SET removed=1, live=0 WHERE seq=?", (row[3],))
                    dirty_sops.add(row[1])
                    freed.add(row[0])
        return True

    def _finish(self, db: sqlite3.Connection, dirty_leaves: set[int], dirty_sops: set[str],
                freed: set[str]) -> set[str]:
        """Recompute what a batch of inserts made stale; return blobs nothing references."""
        db.executemany(
            "UPDATE puts SET live = (event_id = (SELECT event_id FROM puts "
            "WHERE sop_instance_uid=?1 AND removed=0 "
            "ORDER BY hlc DESC, origin DESC, event_id DESC LIMIT 1)) "
            "WHERE sop_instance_uid=?1 AND removed=0", ((sop,) for sop in dirty_sops))
        self._update_merkle(db, dirty_leaves)
        return {b for b in freed if db.execute(
            "SELECT 1 FROM puts WHERE blob=? AND removed=0 LIMIT 1", (b,)).fetchone() is None}

    def _update_merkle(self, db: sqlite3.Connection, dirty_leaves: set[int]) -> None:
        if self._merkle_cache is None:
            self._merkle_cache = {(r[0], r[1]): merkle.NodeDigest(bytes(r[2]), r[3])
                                  for r in db.execute("SELECT level, idx, digest, count "
                                                      "FROM merkle")}
        cache = self._merkle_cache
        level, dirty = merkle.LEAF_LEVEL, dirty_leaves
        while True:
            nodes = []
            for idx in sorted(dirty):
                if level == merkle.LEAF_LEVEL:
                    lo, hi = merkle.id_range(level, idx)
                    if hi is None:
                        rows = db.execute("SELECT id FROM events WHERE id >= ? ORDER BY id",
                                          (lo,))
                    else:
                        rows = db.execute("SELECT id FROM events WHERE id >= ? AND id < ? "
                                          "ORDER BY id", (lo, hi))
                    node = merkle.leaf_digest(r[0] for r in rows)
                else:
                    first = idx * merkle.FANOUT
                    node = merkle.inner_digest([cache.get((level + 1, first + i),
                                                          merkle.EMPTY_NODE)
                                                for i in range(merkle.FANOUT)])
                nodes.append((idx, node))
                if node.count:
                    cache[(level, idx)] = node
                else:
                    cache.pop((level, idx), None)
            db.executemany("INSERT OR REPLACE INTO merkle VALUES (?, ?, ?, ?)",
                           ((level, i, n.digest, n.count) for i, n in nodes if n.count))
            db.executemany("DELETE FROM merkle WHERE level=? AND idx=?",
                           ((level, i) for i, n in nodes if not n.count))
            if level == 0:
                return
            level -= 1
            dirty = {i // merkle.FANOUT for i in dirty}

    @staticmethod
    def _children(db: sqlite3.Connection, level: int, idx: int) -> list[merkle.NodeDigest]:
        first = idx * merkle.FANOUT
        found = {r[0]: merkle.NodeDigest(r[1], r[2]) for r in db.execute(
            "SELECT idx, digest, count FROM merkle WHERE level=? AND idx >= ? AND idx < ?",
            (level + 1, first, first + merkle.FANOUT))}
        return [found.get(first + i, merkle.EMPTY_NODE) for i in range(merkle.FANOUT)]

    def build_local_puts(self, items: Iterable[tuple[dict[str, str], BlobInfo]],
                         in_flight: Mapping[str, tuple[str, str]] | None = None,
                         same_instance: SameInstance | None = None) -> list[LocalPut]:
        """The put events recording instances stored here, built but not committed (the
        SCP's ingest journal makes them durable itself, then :meth:`insert_local_puts`).

        ``items``: (attributes, blob) pairs, the attributes those of
        :class:`syncnode.dicomfile.InstanceInfo`. Every event is validated as a peer will
        validate it, its indexed attributes cleaned (:func:`_indexed`), its timestamp taken
        from this catalog's clock. An instance that already has a version with these exact
        bytes that is not deleted, in the catalog, earlier in ``items`` or ``in_flight``
        (SOP UID -> (blob, event id) of events built but not inserted yet), gets no new
        event: its ``body`` is None. So does one whose version in the catalog differs only
        in its file meta, when ``same_instance(stored blob, new blob)`` says so (the SCP
        writes its own file meta; ``import`` keeps the file's). An invalid item raises
        (:class:`~syncnode.ids.InvalidUID` for a UID, :class:`InvalidLocalPut` otherwise)
        and the whole batch is dropped.

        Look-ups use this catalog's read connection: they never wait for a write of this
        object (a commit and its flush) to finish.
        """
        with self._ro_lock:
            db = self._reader()
            db.execute("BEGIN")
            try:
                return self._build_puts(db, items, in_flight or {}, same_instance,
                                        persist_clock=False)
            finally:
                db.execute("COMMIT")

    def insert_local_puts(self, built: Iterable[LocalPut],
                          blob_present: Callable[[str], bool] | None = None) -> ApplyResult:
        """Insert put events made by :meth:`build_local_puts` (those with a body), without
        decoding or hashing them again. Idempotent. A put whose blob is not present
        (``blob_present``) and that no tombstone names is rejected, as in :meth:`apply`."""
        result = ApplyResult()
        dirty_leaves: set[int] = set()
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        max_hlc = 0
        with self._write() as db:
            for put in built:
                if put.body is None or put.event is None:
                    continue
                raw = bytes.fromhex(put.event_id)
                if (blob_present is not None and not blob_present(put.event.blob)
                        and db.execute("SELECT 1 FROM tombstones WHERE put_id=? LIMIT 1",
                                       (raw,)).fetchone() is None):
                    result.rejected[put.event_id] = f"blob {put.event.blob} not present"
                    continue
                max_hlc = max(max_hlc, put.event.hlc)
                if self._insert(db, raw, put.body, put.event, dirty_leaves, dirty_sops, freed):
                    result.inserted.append(put.event_id)
            self._observe(db, max_hlc)
            result.freed_blobs = self._finish(db, dirty_leaves, dirty_sops, freed)
        return self._inserted(result)

    def add_local_puts(self, items: Iterable[tuple[dict[str, str], BlobInfo]],
                       blob_present: Callable[[str], bool] | None = None,
                       same_instance: SameInstance | None = None,
                       ) -> list[tuple[str, bool]]:
        """Record instances stored here (``syncnode import``): :meth:`build_local_puts`
        and insert in one transaction. ``items``: (attributes, blob) pairs where the
        attributes are those of :class:`syncnode.dicomfile.InstanceInfo`.

        Returns (event id, new) per item; an instance that already has a version with these
        exact bytes (not deleted) gets no new event (re-importing is a no-op).
        """
        results: list[tuple[str, bool]] = []
        dirty_leaves: set[int] = set()
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        items = list(items)
        with self._write() as db:
            if blob_present is not None:
                for attrs, blob in items:
                    if not blob_present(blob.hash):
                        raise BlobNotPresent(f"blob {blob.hash} of "
                                             f"{attrs.get('sop_instance_uid')} vanished "
                                             "before commit")
            for put in self._build_puts(db, items, {}, same_instance, persist_clock=True):
                new = put.event is not None and put.body is not None and self._insert(
                    db, bytes.fromhex(put.event_id), put.body, put.event, dirty_leaves,
                    dirty_sops, freed)
                results.append((put.event_id, new))
            self._finish(db, dirty_leaves, dirty_sops, freed)
        self._inserted(ApplyResult(inserted=[e for e, new in results if new]))
        return results

    def _build_puts(self, db: sqlite3.Connection,
                    items: Iterable[tuple[dict[str, str], BlobInfo]],
                    in_flight: Mapping[str, tuple[str, str]],
                    same_instance: SameInstance | None, *, persist_clock: bool,
                    ) -> list[LocalPut]:
        """The one factory of local put events (see :meth:`build_local_puts`)."""
        out: list[LocalPut] = []
        batch: dict[str, tuple[str, str]] = {}  # SOP UID -> (blob, event id) built here
        for attrs, blob in items:
            try:
                sop = check_uid(attrs["sop_instance_uid"], "SOP Instance UID")
                seen = batch.get(sop) or in_flight.get(sop)
                if seen is not None and seen[0] == blob.hash:
                    out.append(LocalPut(seen[1]))
                    continue
                held = db.execute("SELECT event_id, blob FROM puts WHERE sop_instance_uid=? "
                                  "AND removed=0", (sop,)).fetchall()
                same = next((r for r in held if r[1] == blob.hash), None)
                if same is None and same_instance is not None:
                    same = next((r for r in held if same_instance(r[1], blob.hash)), None)
                if same is not None:
                    out.append(LocalPut(bytes(same[0]).hex()))
                    continue
                fields = dict(origin=self.node_id, blob=blob.hash, size=blob.size,
                              chunks=blob.chunks_root, **indexed_attributes(attrs))
            except KeyError as exc:
                raise InvalidLocalPut(f"instance attributes lack {exc}") from exc
            event = self._sign(ev.PutEvent(hlc=self._tick(db, persist=persist_clock),
                                           **fields))
            body = ev.encode(event)
            try:
                ev.decode(body)  # the same validation a peer will apply
            except ev.InvalidEvent as exc:
                raise InvalidLocalPut(f"instance {sop} cannot be recorded: {exc}") from exc
            eid = ev.event_id(body)
            batch[sop] = (blob.hash, eid)
            out.append(LocalPut(eid, event, body))
        return out

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

    def apply(self, received: Iterable[tuple[str, bytes]],
              blob_present: Callable[[str], bool] | None = None, *,
              local: bool = False) -> ApplyResult:
        """Apply events received from a peer: (hex id, body) pairs. Idempotent.

        Each body must hash to its id and decode, and pass the admission step
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
        with self._write() as db:
            for eid, body in received:
                try:
                    event = ev.decode_checked(eid, body)
                except (ev.InvalidEvent, InvalidHash) as exc:
                    result.rejected[eid] = str(exc)
                    continue
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

    # -- reading events ------------------------------------------------------------------
    def is_tombstoned(self, put_id: str, put_origin: str | None = None) -> bool:
        """Whether a delete with authority over the put removes it. For a put not stored
        yet, pass its origin: a waiting delete counts if it has authority over it;
        without the origin, any waiting delete naming it counts."""
        raw = bytes.fromhex(check_hash(put_id, "event id"))
        with self._read() as db:
            if db.execute("SELECT 1 FROM tombstones WHERE put_id=? LIMIT 1",
                          (raw,)).fetchone() is not None:
                return True
            origins = [r[0] for r in db.execute(
                "SELECT origin FROM unknown_tombstones WHERE put_id=?", (raw,))]
        if put_origin is None:
            return bool(origins)
        return any(self.policy.may_remove(o, put_origin) for o in origins)

    def has_event(self, eid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM events WHERE id=?",
                                    (bytes.fromhex(check_hash(eid, "event id")),)
                                    ).fetchone() is not None

    def missing_events(self, eids: Iterable[str]) -> list[str]:
        with self._lock:
            return [e for e in eids if self._db.execute(
                "SELECT 1 FROM events WHERE id=?", (bytes.fromhex(check_hash(e, "event id")),)
            ).fetchone() is None]

    def get_events(self, eids: Iterable[str]) -> list[tuple[str, bytes]]:
        out = []
        with self._lock:
            for e in eids:
                row = self._db.execute("SELECT body FROM events WHERE id=?",
                                       (bytes.fromhex(check_hash(e, "event id")),)).fetchone()
                if row is not None:
                    out.append((e, bytes(row[0])))
        return out

    def event_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM events").fetchone()[0]

    def all_event_ids(self) -> list[str]:
        with self._lock:
            return [r[0].hex() for r in self._db.execute("SELECT id FROM events ORDER BY id")]

    # -- Merkle index --------------------------------------------------------------------
    def merkle_node(self, prefix: str = "") -> merkle.NodeDigest:
        level, idx = merkle.index_of(prefix)
        with self._lock:
            row = self._db.execute("SELECT digest, count FROM merkle WHERE level=? AND idx=?",
                                   (level, idx)).fetchone()
        return merkle.NodeDigest(bytes(row[0]), row[1]) if row else merkle.EMPTY_NODE

    def merkle_root(self) -> merkle.NodeDigest:
        return self.merkle_node("")

    def merkle_children(self, prefix: str) -> list[merkle.NodeDigest]:
        level, idx = merkle.index_of(prefix)
        if level >= merkle.LEAF_LEVEL:
            raise ValueError(f"prefix {prefix!r} is a leaf: it has no children")
        with self._read() as db:
            return self._children(db, level, idx)

    def ids_under(self, prefix: str, limit: int | None = None) -> list[str]:
        """Event ids (hex, sorted) under a prefix; at most ``limit`` of them."""
        level, idx = merkle.index_of(prefix)
        lo, hi = merkle.id_range(level, idx)
        sql = "SELECT id FROM events WHERE id >= ?" + ("" if hi is None else " AND id < ?")
        sql += " ORDER BY id" + ("" if limit is None else f" LIMIT {int(limit)}")
        with self._lock:
            return [r[0].hex() for r in self._db.execute(sql, (lo,) if hi is None else (lo, hi))]

    def recompute_merkle(self) -> merkle.NodeDigest:
        """The root recomputed from the events alone (for checks); changes nothing."""
        with self._read() as db:
            tree = merkle.MemoryMerkle(r[0] for r in db.execute("SELECT id FROM events"))
        return tree.root()

    # -- the live view -------------------------------------------------------------------
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

    def find(self, q: find_model.FindQuery) -> Iterator[dict[str, Any]]:
        """C-FIND matches (see :mod:`syncnode.catalog.find`), streamed from a read-only
        connection of the query's own."""
        return find_model.find(self.path, q)

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

    def referenced_blobs(self) -> set[str]:
        """Blobs some put that is not removed refers to: the blobs this node must hold."""
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT DISTINCT blob FROM puts WHERE removed=0")}

    def blob_referenced(self, blob_hash: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM puts WHERE blob=? AND removed=0 LIMIT 1",
                                    (blob_hash,)).fetchone() is not None

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

    # -- peers ---------------------------------------------------------------------------
    def add_peer(self, node_id: str, url: str, push: str = "auto") -> None:
        with self._write() as db:
            db.execute("INSERT INTO peers (node_id, url, push) VALUES (?, ?, ?) "
                       "ON CONFLICT (node_id) DO UPDATE SET url=excluded.url, push=excluded.push",
                       (node_id, url, push))

    def remove_peer(self, node_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM peer_state WHERE node_id=?", (node_id,))
            return db.execute("DELETE FROM peers WHERE node_id=?", (node_id,)).rowcount > 0

    def peers(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT node_id, url, push, added FROM peers "
                                    "ORDER BY node_id").fetchall()
        return [{"node_id": r[0], "url": r[1], "push": r[2], "added": r[3]} for r in rows]

    def set_peer_state(self, node_id: str, state: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO peer_state VALUES (?, ?, ?)",
                       (node_id, time.time(), json.dumps(state, sort_keys=True)))

    def peer_states(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT node_id, updated, state FROM peer_state").fetchall()
        return {r[0]: {**json.loads(r[2]), "updated": r[1]} for r in rows}

    def note_discovered(self, node_id: str, url: str) -> None:
        """Remember a node seen on the LAN (not a trust decision)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO discovered VALUES (?, ?, ?)",
                       (node_id, url, time.time()))

    def discovered(self, max_age: float = 600.0) -> list[dict[str, Any]]:
        """Nodes seen on the LAN recently that are not trusted peers."""
        with self._lock:
            rows = self._db.execute(
                "SELECT node_id, url, last_seen FROM discovered WHERE last_seen > ? "
                "AND node_id NOT IN (SELECT node_id FROM peers) ORDER BY node_id",
                (time.time() - max_age,)).fetchall()
        return [{"node_id": r[0], "url": r[1], "last_seen": r[2]} for r in rows]

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

    def check_derived(self) -> list[str]:
        """Compare the derived tables with a recomputation from the events; list mismatches."""
        problems = []
        if self.recompute_merkle() != self.merkle_root():
            problems.append("Merkle index does not match the events")
        return problems


INDEXED_FIELDS = (
    "sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
    "patient_id", "modality", "study_date", "transfer_syntax_uid",
)


def indexed_attributes(attrs: Mapping[str, str]) -> dict[str, str]:
    """The indexed attributes a put event carries for an instance whose inspected
    attributes (:class:`syncnode.dicomfile.InstanceInfo`) are ``attrs``: UIDs checked,
    text cleaned (:func:`_indexed`). The one rule for building puts and for checking a
    peer's puts against their bytes (:func:`put_contradictions`)."""
    return {
        "sop_class_uid": check_uid(attrs["sop_class_uid"], "SOP Class UID"),
        "sop_instance_uid": check_uid(attrs["sop_instance_uid"], "SOP Instance UID"),
        "series_instance_uid": check_uid(attrs["series_instance_uid"], "Series Instance UID"),
        "study_instance_uid": check_uid(attrs["study_instance_uid"], "Study Instance UID"),
        "patient_id": _indexed(attrs.get("patient_id", "")),
        "modality": _indexed(attrs.get("modality", "")),
        "study_date": _indexed(attrs.get("study_date", "")),
        "transfer_syntax_uid": _indexed(attrs.get("transfer_syntax_uid", "")),
    }


def put_contradictions(event: ev.PutEvent, attrs: Mapping[str, str]) -> list[str]:
    """The indexed fields in which a put event differs from what its blob's bytes give
    (``attrs``: the blob inspected); empty when the put tells the truth."""
    derived = indexed_attributes(attrs)
    return [f for f in INDEXED_FIELDS if getattr(event, f) != derived[f]]


@dataclass
class _Clock:
    """The greatest timestamp issued in this process for one catalog file."""

    issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_CLOCKS: dict[Path, _Clock] = {}
_CLOCKS_LOCK = threading.Lock()


def _clock_of(path: Path) -> _Clock:
    with _CLOCKS_LOCK:
        return _CLOCKS.setdefault(path.resolve(), _Clock())


def _indexed(value: str) -> str:
    """An indexed attribute as an event may carry it (see :func:`events.decode`): control
    characters become spaces, at most 64 characters. The stored file is not changed."""
    text = "".join(" " if ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return text.strip()[:ev._ATTR_MAX]


def _instance(row: tuple) -> Instance:
    return Instance(row[0].hex(), *row[1:])
