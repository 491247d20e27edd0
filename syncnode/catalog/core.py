"""The catalog's core: the event set and everything derived from it (SQLite, WAL).

This module holds the connection, the transactions, the one clock and the insert path;
the other parts of :class:`Catalog` are mixins, one module each (see the package).

Tables (their SQL is in this package, one module per part; the schema and its migrations are in
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
- A transaction that fails, in its body or at ``COMMIT`` (a full disk is often found only
  there, when the write-ahead log grows), leaves nothing behind: no open transaction, and
  no in-memory state derived from it (the Merkle node cache, parsed origin keys). A full
  disk raises :class:`~syncnode.catalog.schema.CatalogFull` (a ``StoreFull``); the same
  change can be made again once space is freed.
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

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import events as ev
from .. import merkle
from ..authority import Policy
from ..ids import check_hash
from ..perpath import PerPath
from .admission import Admission
from .deletes import Deletes
from .live_view import LiveView
from .local_puts import LocalPuts
from .merkle_index import MerkleIndex
from .model import _SEQ_OF, PUT_COLUMNS, ApplyResult
from .outbox import Outbox
from .peers import Peers
from .rejections import Rejections
from .retrieved import Retrieved
from .schema import CatalogError, open_database, write_transaction

if TYPE_CHECKING:  # cryptography costs ~80 ms to import: only commands that sign load it
    from ..signing import OriginKeys, Signer


class Catalog(Admission, LocalPuts, Deletes, MerkleIndex, LiveView, Peers):
    """One node's catalog. Thread-safe (one connection behind a lock); many processes may
    open the same file at once.

    This class owns the connection, the transactions, the clock, the insert path and the
    reads of raw events; each mixin owns one part (see the package docstring)."""

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
        # and give the disk back after a checkpoint: the log file shrinks to 8 MiB
        self._db.execute("PRAGMA journal_size_limit=8388608")
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
        self.rejections = Rejections(self)  # instances rejected by IOCM notes
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
        """One write transaction (see :func:`~syncnode.catalog.schema.write_transaction`).
        If it fails anywhere, COMMIT included, nothing of it stays: not in SQLite, and not
        in what this object derived from it in memory (the Merkle node cache, the parsed
        origin keys that stand for ``origins`` rows); a full disk raises CatalogFull."""
        with self._lock:
            try:
                with write_transaction(self._db, self.path):
                    version = self._db.execute("PRAGMA data_version").fetchone()[0]
                    if version != self._merkle_version:  # another connection committed
                        self._merkle_cache, self._merkle_version = None, version
                    yield self._db
            except BaseException:
                self._merkle_cache = self._merkle_version = None
                self._keys = None
                raise

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




@dataclass
class _Clock:
    """The greatest timestamp issued in this process for one catalog file."""

    issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_clock_of = PerPath(_Clock, resolve=True)
