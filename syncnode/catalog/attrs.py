"""The C-FIND attribute read model: values of the stored instances, indexed locally.

Signed events carry only the identity of an instance (UIDs, Patient ID, Modality, Study
Date). The other attributes C-FIND matches on and answers with (PS3.4 C.6.1/C.6.2:
Patient's Name, Accession Number, Study Description, Series Number, ...) are read from the
stored bytes of each blob into ``find_attrs`` (one row per blob, keyed by its hash). The
table is a local cache, never sent to peers: it can be dropped and rebuilt from the blobs.

Filling: :class:`Backfill`, a background thread of ``syncnode run``, reads the blobs of
new put events as they are committed, whichever way they came (C-STORE, ``import`` by
another process, sync from a peer, retrieve): it follows ``puts.seq`` (one cheap
``max(seq)`` per second, or at once when woken), in batches of 200 blobs, each batch one
short write transaction; at start it indexes whatever has no row yet (e.g. blobs stored
before this table existed). The C-FIND SCP still calls :func:`index_missing` before each
query, so whatever the backfill has not reached yet is indexed before it is matched (the
first query after a large arrival then waits only for the part not yet indexed). A blob
that cannot be read gets a row of empty values: it then matches only universal keys on
these attributes (narrowing, never widening).

Values are decoded with the instance's Specific Character Set (pydicom's charset handling:
ISO_IR 100, ISO_IR 192, ISO 2022 ...) and stored as Unicode text, stripped of padding.
Dates are ``YYYYMMDD`` (``YYYY.MM.DD`` normalised), times ``HHMMSS.FFFFFF`` zero-padded;
malformed dates or times are stored as ``""``.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# keyword -> column
COLUMNS: dict[str, str] = {
    "SpecificCharacterSet": "charset",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDescription": "study_description",
    "ReferringPhysicianName": "referring_physician_name",
    "SeriesNumber": "series_number",
    "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part_examined",
    "InstanceNumber": "instance_number",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS find_attrs (
    blob                     TEXT PRIMARY KEY,
    charset                  TEXT NOT NULL DEFAULT '',
    patient_name             TEXT NOT NULL DEFAULT '',
    patient_birth_date       TEXT NOT NULL DEFAULT '',
    patient_sex              TEXT NOT NULL DEFAULT '',
    study_time               TEXT NOT NULL DEFAULT '',
    accession_number         TEXT NOT NULL DEFAULT '',
    study_id                 TEXT NOT NULL DEFAULT '',
    study_description        TEXT NOT NULL DEFAULT '',
    referring_physician_name TEXT NOT NULL DEFAULT '',
    series_number            TEXT NOT NULL DEFAULT '',
    series_description       TEXT NOT NULL DEFAULT '',
    body_part_examined       TEXT NOT NULL DEFAULT '',
    instance_number          TEXT NOT NULL DEFAULT '',
    readable                 INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
"""

_TAGS = [0x00080005, 0x00100010, 0x00100030, 0x00100040, 0x00080030, 0x00080050,
         0x00200010, 0x00081030, 0x00080090, 0x00200011, 0x0008103E, 0x00180015,
         0x00200013]
_TAG_COLUMNS = ["charset", "patient_name", "patient_birth_date", "patient_sex", "study_time",
                "accession_number", "study_id", "study_description",
                "referring_physician_name", "series_number", "series_description",
                "body_part_examined", "instance_number"]  # of each of _TAGS, in order
_LAST_TAG = max(_TAGS)


def _past_last_tag(tag: int, _vr: str | None, _length: int) -> bool:
    return tag > _LAST_TAG


_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")


def norm_date(text: str) -> str:
    text = text.strip().replace(".", "") if re.fullmatch(r"\s*\d{4}\.\d{2}\.\d{2}\s*", text) \
        else text.strip()
    return text if _DATE.fullmatch(text) else ""


def norm_time(text: str, high: bool = False) -> str:
    """``HHMMSS.FFFFFF``; missing parts are zero (or, for an upper bound, their maximum)."""
    m = _TIME.fullmatch(text.strip().replace(":", ""))
    if not m:
        return ""
    hh, mm, ss, frac = m.groups()
    fill = ("59", "59", "999999") if high else ("00", "00", "000000")
    frac_digits = fill[2] if frac is None else frac[1:].ljust(6, "9" if high else "0")
    return f"{hh}{mm or fill[0]}{ss or fill[1]}.{frac_digits}"


def norm_int(text: str) -> str:
    try:
        return str(int(text.strip()))
    except ValueError:
        return text.strip()


# VR of each indexed attribute (the plain-ASCII fast path checks the file wrote the same)
_VRS = {0x00080005: b"CS", 0x00100010: b"PN", 0x00100030: b"DA", 0x00100040: b"CS",
        0x00080030: b"TM", 0x00080050: b"SH", 0x00200010: b"SH", 0x00081030: b"LO",
        0x00080090: b"PN", 0x00200011: b"IS", 0x0008103E: b"LO", 0x00180015: b"CS",
        0x00200013: b"IS"}


def read_attributes(path: Path) -> dict[str, str]:
    """The indexed attributes of the instance in ``path``, decoded to Unicode.

    Most instances hold only plain ASCII values: those are read by syncnode's own walk
    (:func:`syncnode.dicomfile.read_plain_text`, the same values pydicom gives, about 5x
    less CPU; every instance a node receives is read here). Anything else (another
    character set in use, several values, an unexpected VR) is read by pydicom."""
    from ..dicomfile import InvalidDicom, read_plain_text

    try:
        plain = read_plain_text(path, _VRS)
    except InvalidDicom:
        plain = None  # pydicom decides (and is the one that says it is unreadable)
    if plain is not None:
        out = {col: plain[tag] for tag, col in zip(_TAGS, _TAG_COLUMNS, strict=True)}
        return _normalised(out)
    return _read_with_pydicom(path)


def _read_with_pydicom(path: Path) -> dict[str, str]:
    from pydicom.filereader import read_partial

    # Top-level elements come in ascending tag order: nothing wanted follows the last tag
    # wanted, so parsing stops there instead of at Pixel Data (2.5x less CPU per instance:
    # every instance a node receives is read here).
    with open(path, "rb") as f:
        ds = read_partial(f, stop_when=_past_last_tag, specific_tags=_TAGS)
    ds.decode()
    out: dict[str, str] = {}
    for kw, col in COLUMNS.items():
        value = ds[kw].value if kw in ds else None
        if value is None:
            text = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        out[col] = text.strip("\x00 ")
    return _normalised(out)


def _normalised(out: dict[str, str]) -> dict[str, str]:
    out["patient_birth_date"] = norm_date(out["patient_birth_date"])
    out["study_time"] = norm_time(out["study_time"])
    out["series_number"] = norm_int(out["series_number"])
    out["instance_number"] = norm_int(out["instance_number"])
    return out


def index_missing(catalog_path: Path | str, blob_path: Callable[[str], Path],
                  limit: int | None = None) -> int:
    """Index the live blobs without a ``find_attrs`` row; return how many were read.

    Uses a connection of its own (the blobs are read outside any catalog lock); each
    batch of rows is one short write transaction. Concurrent callers are harmless (a row
    already written is kept).
    """
    db = _connect(catalog_path)
    try:
        return _index(db, blob_path, limit)
    finally:
        db.close()


def _connect(catalog_path: Path | str) -> sqlite3.Connection:
    db = sqlite3.connect(catalog_path, timeout=60.0, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA busy_timeout=60000")
    return db


def _index(db: sqlite3.Connection, blob_path: Callable[[str], Path], limit: int | None,
           since: int = 0, stop: threading.Event | None = None) -> int:
    """Index live blobs without a row, among the puts after ``since`` (a ``puts.seq``)."""
    done = 0
    while limit is None or done < limit:
        if stop is not None and stop.is_set():
            break
        with _INDEXING:
            n = _index_batch(db, blob_path, since)
        if not n:
            break
        done += n
    return done


# One batch at a time in this process: a query arriving while the backfill works takes
# the next batch instead of reading the same blobs again.
_INDEXING = threading.Lock()


def index_blobs(catalog_path: Path | str, blob_path: Callable[[str], Path],
                blobs: list[str]) -> int:
    """Index these blobs, of those live and without a ``find_attrs`` row; return how many
    were read. For a caller that has just stored them and still has them in the page
    cache (the sync installer): the backfill would read them moments later, from disk."""
    db = _connect(catalog_path)
    done = 0
    try:
        for i in range(0, len(blobs), 200):
            with _INDEXING:
                wanted = blobs[i : i + 200]
                batch = [r[0] for r in db.execute(
                    f"SELECT DISTINCT p.blob FROM puts p WHERE p.live = 1 AND p.blob IN "
                    f"({', '.join('?' * len(wanted))}) AND NOT EXISTS (SELECT 1 FROM "
                    f"find_attrs f WHERE f.blob = p.blob)", wanted)]
                done += _index_these(db, blob_path, batch)
    finally:
        db.close()
    return done


def _index_batch(db: sqlite3.Connection, blob_path: Callable[[str], Path], since: int
                 ) -> int:
    batch = [r[0] for r in db.execute(
        "SELECT DISTINCT p.blob FROM puts p WHERE p.seq > ? AND p.live = 1 AND NOT "
        "EXISTS (SELECT 1 FROM find_attrs f WHERE f.blob = p.blob) LIMIT 200", (since,))]
    return _index_these(db, blob_path, batch)


def _index_these(db: sqlite3.Connection, blob_path: Callable[[str], Path], batch: list[str]
                 ) -> int:
    """Read and write the rows of ``batch`` (blobs without one); one write transaction."""
    if not batch:
        return 0
    rows: list[dict[str, Any]] = []
    for blob in batch:
        try:
            attrs: dict[str, Any] = read_attributes(blob_path(blob))
            attrs["readable"] = 1
        except Exception as exc:  # any unreadable blob: indexed empty, logged
            log.warning("C-FIND index: blob %s cannot be read (%s): its attributes "
                        "match only universal keys", blob, type(exc).__name__)
            attrs = {"readable": 0}
        attrs["blob"] = blob
        rows.append(attrs)
    db.execute("BEGIN IMMEDIATE")
    try:
        for attrs in rows:
            cols = list(attrs)
            db.execute(f"INSERT OR IGNORE INTO find_attrs ({', '.join(cols)}) "
                       f"VALUES ({', '.join('?' * len(cols))})", [attrs[c] for c in cols])
        db.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back itself (a full disk, at COMMIT too): a ROLLBACK then
        # would fail and hide the first error (the rule of schema.write_transaction)
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return len(batch)



class Backfill:
    """Keeps ``find_attrs`` filled in the background (see the module docstring). Bounded:
    one blob header read at a time, batches of 200 rows, its own connection; ``stop()``
    ends it within one batch."""

    def __init__(self, catalog_path: Path | str, blob_path: Callable[[str], Path],
                 interval: float = 1.0) -> None:
        self.catalog_path = catalog_path
        self.blob_path = blob_path
        self.interval = interval
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.indexed = 0
        self.thread = threading.Thread(target=self._run, name="find-attrs-backfill",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self.wakeup.set()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        self.wakeup.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.catalog_path, timeout=60.0, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            log.error("C-FIND index backfill cannot open the catalog: %s", exc)
            return
        try:
            db.execute("PRAGMA busy_timeout=60000")
            cursor = 0
            while not self.stopping.is_set():
                try:
                    top = int(db.execute("SELECT coalesce(max(seq), 0) FROM puts")
                              .fetchone()[0])
                    if top > cursor:
                        self.indexed += _index(db, self.blob_path, None, since=cursor,
                                               stop=self.stopping)
                        if not self.stopping.is_set():
                            cursor = top
                except sqlite3.Error as exc:  # busy or locked beyond the timeout: retry
                    log.warning("C-FIND index backfill: %s (retrying)", exc)
                self.wakeup.wait(self.interval)
                self.wakeup.clear()
        finally:
            db.close()
