"""Catalog files as files: a consistent copy of a live catalog, the blobs a catalog file
references, and folding its write-ahead log in. Used by backup and restore, which work on
data folders that may belong to a running node (the SQLite backup API takes one read
snapshot; the running node keeps writing meanwhile)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def snapshot_file(source: Path, target: Path) -> None:
    """One read transaction of the live catalog, written to ``target`` (not WAL)."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60.0)
    try:
        src.execute("PRAGMA busy_timeout=60000")
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # pages=-1: the whole database in one step, one snapshot
            dst.execute("PRAGMA journal_mode=DELETE")
            dst.commit()
        finally:
            dst.close()
    finally:
        src.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def live_blobs_in(catalog_file: Path) -> set[str]:
    """The blobs of the put events of ``catalog_file`` that are not removed."""
    db = sqlite3.connect(f"file:{catalog_file}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT DISTINCT blob FROM puts WHERE removed=0")}
    finally:
        db.close()


def make_self_contained(catalog_file: Path) -> None:
    """Fold any write-ahead log into the file and leave rollback-journal mode, so the
    backup's catalog is the one file ``catalog.db``."""
    db = sqlite3.connect(catalog_file)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()
