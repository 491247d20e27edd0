"""The Merkle index over event ids (table ``merkle``): its maintenance inside the
insert transactions and the queries the peer protocol answers from it (node digests,
children, ids under a prefix). The tree itself is :mod:`syncnode.merkle` (pure).

Invariants:

- The ``merkle`` rows are a function of the event set alone, updated in the same
  transaction as the inserts that change it (:meth:`MerkleIndex._update_merkle`).
- The in-memory node cache is valid only while ``PRAGMA data_version`` says no other
  connection committed; it is dropped when a write fails, at COMMIT included (see
  :meth:`Catalog._write <syncnode.catalog.core.Catalog._write>`).
- :meth:`MerkleIndex.check_derived` recomputes the root from the events and compares.
"""

from __future__ import annotations

import sqlite3

from .. import merkle
from .part import Part


class MerkleIndex(Part):
    """The Merkle index: maintenance and queries.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

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

    def check_derived(self) -> list[str]:
        """Compare the derived tables with a recomputation from the events; list mismatches."""
        problems = []
        if self.recompute_merkle() != self.merkle_root():
            problems.append("Merkle index does not match the events")
        return problems

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
