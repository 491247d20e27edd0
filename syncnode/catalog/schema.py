"""The catalog's schema and its forward migrations.

The schema version is SQLite's ``PRAGMA user_version``: the number of migrations applied.
:data:`MIGRATIONS` is append-only: migration *n* (1-based) takes a catalog from version
*n - 1* to *n*; released migrations are never edited, a change of schema is a new one.
:func:`open_database` applies the missing ones in one ``BEGIN IMMEDIATE`` transaction
(DDL is transactional in SQLite), so a crash mid-migration leaves the old version, and
two processes opening an old catalog at once migrate it once.

A catalog made before versioning has ``user_version`` 0 and the tables of version 1;
version 1's statements are ``IF NOT EXISTS`` and adopt it unchanged. A catalog whose
version is newer than this program knows is refused (:class:`SchemaTooNew`): an older
syncnode must not write to tables it does not understand.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..blobstore import StoreFull
from . import attrs

log = logging.getLogger("syncnode.catalog")


class CatalogError(Exception):
    """A catalog operation that cannot be carried out; the message says why."""


class CatalogFull(CatalogError, StoreFull):
    """The disk holding the catalog is full: the change was not recorded, nothing of it
    shows, and the same change can be made again once space is freed."""


class SchemaTooNew(CatalogError):
    """The catalog was written by a newer syncnode."""


# Version 1: the events, the derived tables, peers (the schema of the first release).
V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY,
    id       BLOB NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('put', 'delete')),
    hlc      INTEGER NOT NULL,
    origin   TEXT NOT NULL,
    body     BLOB NOT NULL,
    received INTEGER NOT NULL DEFAULT (unixepoch())
);
-- Rows are appended in arrival order (seq); the id index is small and dense, which keeps
-- random-hash inserts and Merkle leaf scans in cache at millions of events.
CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (id);
CREATE TABLE IF NOT EXISTS puts (
    seq                 INTEGER PRIMARY KEY,  -- = events.seq: no index on random ids
    event_id            BLOB NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    patient_id          TEXT NOT NULL,
    modality            TEXT NOT NULL,
    study_date          TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    blob                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    chunks              TEXT NOT NULL,
    hlc                 INTEGER NOT NULL,
    origin              TEXT NOT NULL,
    removed             INTEGER NOT NULL DEFAULT 0,
    live                INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS puts_by_sop ON puts (sop_instance_uid, removed);
CREATE INDEX IF NOT EXISTS puts_by_blob ON puts (blob, removed);
CREATE INDEX IF NOT EXISTS puts_live_by_study ON puts (study_instance_uid, series_instance_uid)
    WHERE live = 1;
CREATE TABLE IF NOT EXISTS tombstones (
    put_id    BLOB NOT NULL,
    delete_id BLOB NOT NULL,
    PRIMARY KEY (put_id, delete_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    node_id TEXT PRIMARY KEY,
    url     TEXT NOT NULL,
    push    TEXT NOT NULL DEFAULT 'auto' CHECK (push IN ('auto', 'always', 'never')),
    added   INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS peer_state (
    node_id TEXT PRIMARY KEY,
    updated REAL NOT NULL,
    state   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS discovered (
    node_id   TEXT PRIMARY KEY,
    url       TEXT NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS merkle (
    level  INTEGER NOT NULL,
    idx    INTEGER NOT NULL,
    digest BLOB NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
"""

# Version 2: the DICOM exporter's outbox and the retriever's record of retrieved studies,
# created until now by those modules themselves (IF NOT EXISTS: a catalog they already
# wrote keeps its rows).
V2 = """
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY,
    dest             TEXT NOT NULL,
    seq              INTEGER NOT NULL,  -- the event's (and its puts row's) seq
    event_id         BLOB NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'done', 'failed', 'skipped')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt     REAL NOT NULL DEFAULT 0,
    last_error       TEXT NOT NULL DEFAULT '',
    enqueued         REAL NOT NULL,
    updated          REAL NOT NULL,
    UNIQUE (dest, event_id)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (dest, state, next_attempt);
CREATE TABLE IF NOT EXISTS outbox_cursor (
    dest          TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT NOT NULL DEFAULT '',
    last_contact  REAL NOT NULL DEFAULT 0,
    failures      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS retrieved (
    source             TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    instances          INTEGER NOT NULL,
    retrieved          REAL NOT NULL,
    PRIMARY KEY (source, study_instance_uid)
) WITHOUT ROWID;
"""


# Version 3: signed events (syncnode.signing, syncnode.authority). The certificates of
# the origins whose events this node took, and the tombstones of puts not received yet,
# bounded and aging. Events already in the catalog stay as they are (grandfathered: taken
# under the old rules, they keep their effect); their names of puts never received move
# from ``tombstones`` (now only effective tombstones of known puts) to the bounded table,
# where they age out from the migration on. ``meta.signing_since``: the last event seq
# before signing (every event after it that a peer sent was admitted by the new rules).
V3 = """
CREATE TABLE IF NOT EXISTS origins (
    node_id TEXT PRIMARY KEY,
    cert    BLOB NOT NULL,
    added   INTEGER NOT NULL DEFAULT (unixepoch())
);
CREATE TABLE IF NOT EXISTS unknown_tombstones (
    put_id    BLOB NOT NULL,
    delete_id BLOB NOT NULL,
    origin    TEXT NOT NULL,
    received  INTEGER NOT NULL,
    PRIMARY KEY (put_id, delete_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS unknown_tombstones_by_origin ON unknown_tombstones (origin);
CREATE INDEX IF NOT EXISTS unknown_tombstones_by_age ON unknown_tombstones (received);
INSERT OR IGNORE INTO unknown_tombstones (put_id, delete_id, origin, received)
    SELECT t.put_id, t.delete_id, e.origin, unixepoch() FROM tombstones t
    JOIN events e ON e.id = t.delete_id
    WHERE NOT EXISTS (SELECT 1 FROM events p WHERE p.id = t.put_id);
DELETE FROM tombstones
    WHERE NOT EXISTS (SELECT 1 FROM events p WHERE p.id = tombstones.put_id);
INSERT OR REPLACE INTO meta (key, value)
    SELECT 'signing_since', CAST(coalesce(max(seq), 0) AS TEXT) FROM events;
"""


# Version 4: the C-FIND attribute read model (syncnode.catalog.attrs): values read from the
# stored blobs, local only (never in events). Filled lazily from the blobs before a C-FIND,
# so the migration itself reads nothing.
V4 = attrs.SCHEMA


# Version 5: storage commitment of exported instances (syncnode.dicom.exporter): the
# Transaction UID an item was asked under, and the PACS's answer (0 not asked or waiting,
# 1 committed, -1 the PACS reported it does not hold it); the instances rejected by IOCM
# rejection notes (syncnode.catalog.rejections), local to this node.
V5_COLUMNS = {"commit_uid": "TEXT NOT NULL DEFAULT ''",
              "committed": "INTEGER NOT NULL DEFAULT 0"}
V5 = """
CREATE INDEX IF NOT EXISTS outbox_commit ON outbox (commit_uid) WHERE commit_uid != '';
CREATE TABLE IF NOT EXISTS rejected (
    sop_instance_uid TEXT PRIMARY KEY,
    code             TEXT NOT NULL,
    note             TEXT NOT NULL,
    at               REAL NOT NULL
) WITHOUT ROWID;
"""


# Version 6: deletes forwarded to the export PACS as rejection notes
# (syncnode.dicom.exporter). ``outbox.kind``: 'put' (an instance to send, as before) or
# 'reject' (a rejection note made here: its ``event_id`` is the note's key, derived from
# the delete events it reports, its ``sop_instance_uid`` the note's UID). Per note: the
# reason code, the study and when the deletes were made (``outbox_notes``), and the
# deleted puts it rejects (``outbox_note_refs``, by ``puts.seq``). ``delete_reasons``: the
# reason given to a delete made here (``rm --reason``, or the code of the rejection note
# that caused it), local to this node.
V6_COLUMNS = {"kind": "TEXT NOT NULL DEFAULT 'put' CHECK (kind IN ('put', 'reject'))"}
V6 = """
CREATE TABLE IF NOT EXISTS outbox_notes (
    item               INTEGER PRIMARY KEY,  -- outbox.id of a 'reject' item
    code               TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    made               REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_note_refs (
    item    INTEGER NOT NULL,
    put_seq INTEGER NOT NULL,
    PRIMARY KEY (item, put_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delete_reasons (
    delete_id BLOB PRIMARY KEY,
    code      TEXT NOT NULL
) WITHOUT ROWID;
"""


# Version 7: ``delete_reasons.note``: the SOP Instance UID of the rejection note received
# here that caused the delete ('' for any other delete), so that the export PACS is sent
# that same note rather than one made here.
def _v7(db: sqlite3.Connection) -> None:
    if "note" not in {r[1] for r in db.execute("PRAGMA table_info(delete_reasons)")}:
        db.execute("ALTER TABLE delete_reasons ADD COLUMN note TEXT NOT NULL DEFAULT ''")


def _statements(script: str) -> list[str]:
    """The statements of a schema script, split where SQLite says one is complete (a ';'
    in a comment does not end one)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(x.strip().startswith("--") or not x.strip()
                               for x in buf.splitlines()):
        raise ValueError(f"incomplete statement in schema: {buf.strip()[:60]!r}")
    return out


def _run(script: str) -> Callable[[sqlite3.Connection], None]:
    def migrate(db: sqlite3.Connection) -> None:
        for statement in _statements(script):
            db.execute(statement)
    return migrate


def _v5(db: sqlite3.Connection) -> None:
    # (columns added only if missing: a catalog set back to an older version by hand
    # already has them, and ALTER TABLE ADD COLUMN cannot say IF NOT EXISTS)
    have = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
    for column, decl in V5_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")
    _run(V5)(db)


def _v6(db: sqlite3.Connection) -> None:
    have = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
    for column, decl in V6_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {decl}")
    _run(V6)(db)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _run(V1),
    _run(V2),
    _run(V3),
    _run(V4),
    _v5,
    _v6,
    _v7,
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def is_full(exc: BaseException) -> bool:
    """Whether an SQLite error says the disk (or the database's size limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL


@contextmanager
def write_transaction(db: sqlite3.Connection, path: Path | str = "") -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, the one way a catalog transaction is written.

    On any failure, in the body or at ``COMMIT``, the connection is left with no open
    transaction and the original error is raised: SQLite rolls back by itself after some
    errors (SQLITE_FULL, IOERR, NOMEM, BUSY: in WAL mode a full disk is often found only
    at ``COMMIT``, when the log grows), so ``ROLLBACK`` is sent only if a transaction is
    still open, and its own failure never hides the first. A full disk is raised as
    :class:`CatalogFull`."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as again:  # the connection is unusable: say so
                    log.error("catalog %s: rollback after %s failed too: %s", path,
                              type(exc).__name__, again)
                    exc.add_note(f"and the rollback failed: {again}")
            raise
    except sqlite3.Error as exc:
        if is_full(exc):
            raise CatalogFull(f"no space left on the disk holding the catalog {path} "
                              f"(nothing of this change was recorded): free space on that "
                              f"disk ({exc})") from exc
        raise


def migrate(db: sqlite3.Connection, path: Path | str = "") -> int:
    """Bring the catalog to :data:`SCHEMA_VERSION`; return the version it had."""
    with write_transaction(db, path):
        found = schema_version(db)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the catalog has schema version {found}, this syncnode knows up to "
                f"{SCHEMA_VERSION}: run the newer syncnode that wrote it")
        for step in MIGRATIONS[found:]:
            step(db)
        if found != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return found


def open_database(path: Path | str) -> sqlite3.Connection:
    """A connection to the catalog file as every writer of it needs one: WAL, durable
    commits (``synchronous=FULL``), a minute's patience with other writers, explicit
    transactions; the schema migrated to the current version."""
    db = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=60000")
        migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db
