"""Trusted peers (``peers``), their last sync state (``peer_state``) and the nodes seen on
the LAN (``discovered``).

Invariants: seeing a node on the LAN is not a trust decision (``discovered`` never adds
a peer); removing a peer removes its state.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .part import Part


class Peers(Part):
    """Trusted peers, their sync state and discovered nodes.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

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

    def origin_certificates(self) -> list[tuple[str, bytes]]:
        """(node id, certificate) of every origin whose events this catalog holds."""
        with self._lock:
            rows = self._db.execute("SELECT node_id, cert FROM origins "
                                    "ORDER BY node_id").fetchall()
        return [(r[0], bytes(r[1])) for r in rows]

    def move_peer(self, old: str, new: str) -> bool:
        """A trusted peer renewed its certificate: its entry (URL, push mode, sync state)
        now belongs to its new id. False if ``old`` was not a peer here."""
        with self._write() as db:
            row = db.execute("SELECT url, push FROM peers WHERE node_id=?", (old,)).fetchone()
            if row is None:
                return False
            db.execute("INSERT INTO peers (node_id, url, push) VALUES (?, ?, ?) "
                       "ON CONFLICT (node_id) DO NOTHING", (new, row[0], row[1]))
            db.execute("UPDATE OR IGNORE peer_state SET node_id=? WHERE node_id=?", (new, old))
            db.execute("DELETE FROM peer_state WHERE node_id=?", (old,))
            db.execute("DELETE FROM peers WHERE node_id=?", (old,))
        return True

    def rename_node(self, new_id: str) -> None:
        """This node renewed its certificate: the catalog now belongs to ``new_id``; the old
        ids are kept (``previous_node_ids``) for the events they signed."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='node_id'").fetchone()
            if row is not None and row[0] != new_id:
                prev = db.execute(
                    "SELECT value FROM meta WHERE key='previous_node_ids'").fetchone()
                ids = json.loads(prev[0]) if prev else []
                if row[0] not in ids:
                    ids.append(row[0])
                db.execute("INSERT OR REPLACE INTO meta VALUES ('previous_node_ids', ?)",
                           (json.dumps(ids),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('node_id', ?)", (new_id,))
        self.node_id = new_id

    def previous_node_ids(self) -> list[str]:
        """The ids this node had before it renewed its certificate, oldest first."""
        raw = self.get_meta("previous_node_ids")
        return list(json.loads(raw)) if raw else []
