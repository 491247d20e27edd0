"""The catalog's schema version and forward migrations.

``tests/data/catalog-75aa76d.db`` was written by the catalog code of the release before
schema versioning (``tools/make_old_catalog.py``): opening it migrates it to the current
version and keeps its events, its Merkle root and its live view; a catalog from a newer
syncnode is refused; a fresh catalog starts at the current version.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from syncnode import events as ev
from syncnode.catalog import SCHEMA_VERSION, Catalog, NoSigner, SchemaTooNew
from syncnode.catalog.schema import MIGRATIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import FakeOrigin

OLD = Path(__file__).parent / "data" / "catalog-75aa76d.db"


def raw(path: Path) -> tuple[int, list[bytes], bytes, list[tuple]]:
    """(user_version, event ids, Merkle root digest, live puts) read with plain SQL."""
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        ids = [r[0] for r in db.execute("SELECT id FROM events ORDER BY id")]
        root = db.execute("SELECT digest FROM merkle WHERE level=0 AND idx=0").fetchone()[0]
        live = db.execute("SELECT event_id, sop_instance_uid, blob FROM puts WHERE live=1 "
                          "ORDER BY sop_instance_uid").fetchall()
    finally:
        db.close()
    return version, ids, root, live


def test_previous_release_catalog_migrates(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    shutil.copy(OLD, path)
    version, ids, root, live = raw(path)
    assert version == 0 and len(ids) == 12 and len(live) == 8  # what the fixture holds
    cat = Catalog(path, node_id="OLDNODE")
    try:
        assert sorted(cat.all_event_ids()) == sorted(i.hex() for i in ids)
        assert cat.merkle_root().digest == root
        assert cat.recompute_merkle() == cat.merkle_root()
        assert cat.check_derived() == []
        assert [(bytes.fromhex(i.event_id), i.sop_instance_uid, i.blob)
                for i in cat.instances()] == live
        assert [p["node_id"] for p in cat.peers()] == ["PEERNODE"]
        # and it goes on working: a tombstone of a put never received still waits for it
        # (in the bounded table since signing), its unsigned events stay (grandfathered)
        before = cat.event_count()
        assert cat.is_tombstoned(
            __import__("blake3").blake3(b"a put never received").hexdigest())
        assert cat.unknown_tombstone_count() == 1
        assert not any(ev.is_signed(ev.decode(b)) for _, b in cat.get_events(
            cat.all_event_ids()))
        # new events of its own need the node's key (LocalNode gives it: test_authority.py)
        with pytest.raises(NoSigner):
            cat.delete_instances([live[0][1]])
        # a peer's signed events are taken under the new rules
        peer = FakeOrigin("peer")
        cat.offer_certificates([peer.cert_der])
        res = cat.apply([peer.put(ev.hlc_tick(0), "1.2.826.0.1.99")],
                        blob_present=lambda _: True)
        assert res.rejected == {} and cat.event_count() == before + 1
    finally:
        cat.close()
    assert raw(path)[0] == SCHEMA_VERSION
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert {"outbox", "outbox_cursor", "retrieved", "origins", "unknown_tombstones"} <= tables


def test_fresh_catalog_is_current(tmp_path: Path) -> None:
    Catalog(tmp_path / "c.db", node_id="N").close()
    assert raw_version(tmp_path / "c.db") == SCHEMA_VERSION == len(MIGRATIONS)


def raw_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def test_newer_catalog_is_refused(tmp_path: Path) -> None:
    Catalog(tmp_path / "c.db", node_id="N").close()
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(SchemaTooNew, match="newer syncnode"):
        Catalog(tmp_path / "c.db", node_id="N")
    assert raw_version(tmp_path / "c.db") == SCHEMA_VERSION + 1  # untouched


def test_version_5_catalog_gains_rejection_notes(tmp_path: Path) -> None:
    """Migrations 6 and 7 on a catalog of schema 5: the outbox's items stay and are puts,
    the rejection-note tables appear (a delete's reason and causing note), the status
    reads both kinds."""
    from syncnode.catalog.outbox import outbox_status

    path = tmp_path / "c.db"
    db = sqlite3.connect(path, isolation_level=None)
    for step in MIGRATIONS[:5]:
        step(db)
    db.execute("PRAGMA user_version=5")
    db.execute("INSERT INTO outbox_cursor (dest) VALUES ('PACS@h:104')")
    db.execute("INSERT INTO outbox (dest, seq, event_id, sop_instance_uid, state, enqueued, "
               "updated) VALUES ('PACS@h:104', 1, x'01', '1.2.3', 'done', 0, 0)")
    db.close()
    assert outbox_status(path)["PACS@h:104"]["done"] == 1  # read unmigrated, as `status`
    Catalog(path, node_id="N").close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 6
        assert db.execute("SELECT kind, state FROM outbox").fetchall() == [("put", "done")]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert {"outbox_notes", "outbox_note_refs", "delete_reasons"} <= tables
        assert "note" in {r[1] for r in db.execute("PRAGMA table_info(delete_reasons)")}
    finally:
        db.close()
    st = outbox_status(path)["PACS@h:104"]
    assert st["done"] == 1 and st["rejection_notes"]["done"] == 0
