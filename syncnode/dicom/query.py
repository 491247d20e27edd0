"""C-FIND over the catalog: Study Root and Patient Root, PATIENT / STUDY / SERIES / IMAGE.

Matching (PS3.4 C.2.2.2) is done in SQL on the live rows of the ``puts`` table, through
a read-only connection of its own (``mode=ro``); nothing here writes.

Matching keys (the attributes the catalog indexes):

==========================  ==========  =============================================
attribute                   levels      matching
==========================  ==========  =============================================
PatientID                   all         single value, wildcard (``*``, ``?``), universal
StudyInstanceUID            >= STUDY    UID list (``\\``-separated), universal
SeriesInstanceUID           >= SERIES   UID list, universal
SOPInstanceUID, SOPClassUID IMAGE       UID list, universal
Modality                    >= SERIES   single value, wildcard, list (``CT\\MR``)
ModalitiesInStudy           STUDY       any instance of the study has one of the values
StudyDate                   >= STUDY    single date, range ``A-B``, ``-B``, ``A-``;
                                        ``YYYY`` / ``YYYYMM`` bounds are widened to the
                                        whole year / month
==========================  ==========  =============================================

A key with an empty value (or ``*``) matches everything (universal matching). Keys
the catalog does not index (PatientName, AccessionNumber, ...) are not matched on and
are returned empty, as PS3.4 allows for optional keys. Return keys the catalog knows are
filled: the matching keys above plus NumberOfStudyRelatedInstances/Series,
NumberOfSeriesRelatedInstances, NumberOfPatientRelatedStudies/Series/Instances and
SOPClassesInStudy. Counts are of the whole study/series/patient, not of the matching
rows. Responses carry ``SpecificCharacterSet = ISO_IR 192`` (UTF-8), since Patient IDs
are stored decoded. Results stream from an SQLite cursor: memory does not grow with
their number. Patient IDs are never logged.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
LEVELS = {STUDY_ROOT: ("STUDY", "SERIES", "IMAGE"),
          PATIENT_ROOT: ("PATIENT", "STUDY", "SERIES", "IMAGE")}

_DATE_BOUND = re.compile(r"^\d{4}(\d{2}(\d{2})?)?$")


class QueryError(Exception):
    """A C-FIND request that cannot be answered; ``status`` is the DIMSE status."""

    def __init__(self, message: str, status: int = 0xA900) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Where:
    clauses: list[str]
    params: list[Any]

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return " AND ".join(["live=1", *self.clauses])


def _value(identifier: Dataset, keyword: str) -> str | None:
    """The matching value of a key, or None for absent / universal matching."""
    if keyword not in identifier:
        return None
    raw = identifier[keyword].value
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in raw)
    else:
        text = str(raw)
    text = text.strip()
    if text in ("", "*"):
        return None
    return text


def _glob(pattern: str) -> str:
    """DICOM wildcard (``*``, ``?``) -> SQLite GLOB pattern (``[`` escaped)."""
    return "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in pattern)


def _match_text(where: Where, column: str, value: str | None) -> None:
    if value is None:
        return
    values = [v for v in value.split("\\") if v != ""]
    parts = []
    for v in values:
        if "*" in v or "?" in v:
            parts.append(f"{column} GLOB ?")
            where.params.append(_glob(v))
        else:
            parts.append(f"{column} = ?")
            where.params.append(v)
    if parts:
        where.clauses.append("(" + " OR ".join(parts) + ")")


def _match_uids(where: Where, column: str, value: str | None) -> None:
    if value is None:
        return
    uids = [u.strip().rstrip("\0") for u in value.split("\\") if u.strip()]
    if not uids:
        return
    where.add(f"{column} IN ({', '.join('?' * len(uids))})", *uids)


def _date_bounds(value: str) -> tuple[str | None, str | None]:
    """A DA matching value -> inclusive (low, high) as YYYYMMDD strings (None = open)."""
    text = value.replace(".", "").strip()
    lo, hi = (p.strip() for p in text.split("-", 1)) if "-" in text else (text, text)
    for bound in (lo, hi):
        if bound and not _DATE_BOUND.fullmatch(bound):
            raise QueryError(f"invalid Study Date matching value {value[:40]!r}", 0xC000)
    low = lo + {4: "0101", 6: "01", 8: ""}[len(lo)] if lo else None
    high = hi + {4: "1231", 6: "31", 8: ""}[len(hi)] if hi else None
    return low, high


def _match_date(where: Where, value: str | None) -> None:
    if value is None:
        return
    alternatives = []
    for part in value.split("\\"):
        if not part.strip():
            continue
        low, high = _date_bounds(part)
        cond = ["study_date != ''"]
        if low:
            cond.append("study_date >= ?")
            where.params.append(low)
        if high:
            cond.append("study_date <= ?")
            where.params.append(high)
        alternatives.append("(" + " AND ".join(cond) + ")")
    if alternatives:
        where.clauses.append("(" + " OR ".join(alternatives) + ")")


def _connect(catalog_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True, timeout=30.0,
                         check_same_thread=False)
    db.execute("PRAGMA busy_timeout=30000")
    return db


def find(catalog_path: Path, model: str, identifier: Dataset) -> Iterator[Dataset]:
    """Matches of a C-FIND identifier under an information model, as response identifiers."""
    if model not in LEVELS:
        raise QueryError(f"information model {model} is not supported", 0xA900)
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS[model]:
        raise QueryError(f"Query/Retrieve Level {level[:16]!r} is not valid for this model",
                         0xA900)
    where = Where([], [])
    _match_text(where, "patient_id", _value(identifier, "PatientID"))
    if level != "PATIENT":
        _match_uids(where, "study_instance_uid", _value(identifier, "StudyInstanceUID"))
        _match_date(where, _value(identifier, "StudyDate"))
    if level in ("SERIES", "IMAGE"):
        _match_uids(where, "series_instance_uid", _value(identifier, "SeriesInstanceUID"))
        _match_text(where, "modality", _value(identifier, "Modality"))
    if level == "IMAGE":
        _match_uids(where, "sop_instance_uid", _value(identifier, "SOPInstanceUID"))
        _match_uids(where, "sop_class_uid", _value(identifier, "SOPClassUID"))

    db = _connect(catalog_path)
    try:
        if level == "PATIENT":
            yield from _patients(db, where, identifier)
        elif level == "STUDY":
            yield from _studies(db, where, identifier)
        elif level == "SERIES":
            yield from _series(db, where, identifier)
        else:
            yield from _images(db, where, identifier)
    finally:
        db.close()


def _patients(db: sqlite3.Connection, where: Where, ident: Dataset) -> Iterator[Dataset]:
    sql = (f"SELECT patient_id, count(DISTINCT study_instance_uid), "
           f"count(DISTINCT series_instance_uid), count(*) FROM puts WHERE {where.sql()} "
           "GROUP BY patient_id ORDER BY patient_id")
    for pid, studies, series, instances in db.execute(sql, where.params):
        yield _response(ident, "PATIENT", {
            "PatientID": pid, "NumberOfPatientRelatedStudies": studies,
            "NumberOfPatientRelatedSeries": series,
            "NumberOfPatientRelatedInstances": instances})


def _studies(db: sqlite3.Connection, where: Where, ident: Dataset) -> Iterator[Dataset]:
    having, hparams = "", []
    modalities = _value(ident, "ModalitiesInStudy")
    if modalities is not None:
        h = Where([], [])
        _match_text(h, "modality", modalities)
        if h.clauses:
            having = f"HAVING sum({h.clauses[0]}) > 0"
            hparams = h.params
    sql = (f"SELECT study_instance_uid, min(patient_id), max(study_date), "
           "group_concat(DISTINCT modality), group_concat(DISTINCT sop_class_uid), "
           f"count(DISTINCT series_instance_uid), count(*) FROM puts WHERE {where.sql()} "
           f"GROUP BY study_instance_uid {having} ORDER BY study_instance_uid")
    for study, pid, date, mods, classes, series, instances in db.execute(
            sql, [*where.params, *hparams]):
        yield _response(ident, "STUDY", {
            "StudyInstanceUID": study, "PatientID": pid, "StudyDate": date,
            "ModalitiesInStudy": _multi(mods), "SOPClassesInStudy": _multi(classes),
            "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": instances})


def _series(db: sqlite3.Connection, where: Where, ident: Dataset) -> Iterator[Dataset]:
    sql = (f"SELECT series_instance_uid, min(study_instance_uid), min(patient_id), "
           f"max(study_date), min(modality), count(*) FROM puts WHERE {where.sql()} "
           "GROUP BY series_instance_uid ORDER BY min(study_instance_uid), series_instance_uid")
    for series, study, pid, date, modality, instances in db.execute(sql, where.params):
        yield _response(ident, "SERIES", {
            "SeriesInstanceUID": series, "StudyInstanceUID": study, "PatientID": pid,
            "StudyDate": date, "Modality": modality,
            "NumberOfSeriesRelatedInstances": instances})


def _images(db: sqlite3.Connection, where: Where, ident: Dataset) -> Iterator[Dataset]:
    sql = (f"SELECT sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid, "
           f"patient_id, study_date, modality FROM puts WHERE {where.sql()} "
           "ORDER BY study_instance_uid, series_instance_uid, sop_instance_uid")
    for sop, sop_class, series, study, pid, date, modality in db.execute(sql, where.params):
        yield _response(ident, "IMAGE", {
            "SOPInstanceUID": sop, "SOPClassUID": sop_class, "SeriesInstanceUID": series,
            "StudyInstanceUID": study, "PatientID": pid, "StudyDate": date,
            "Modality": modality})


def _multi(text: str | None) -> list[str]:
    return sorted(v for v in (text or "").split(",") if v)


def _response(ident: Dataset, level: str, known: dict[str, Any]) -> Dataset:
    """A response identifier with every requested key: known values filled, others empty."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for elem in ident:
        kw = elem.keyword
        if kw in ("SpecificCharacterSet", "QueryRetrieveLevel") or elem.tag.group == 0x0002:
            continue
        if kw in known and known[kw] not in (None, ""):
            value = known[kw]
            if isinstance(value, list) and not value:
                ds.add(DataElement(elem.tag, elem.VR, None))
            else:
                setattr(ds, kw, value)
        elif elem.VR == "SQ":
            ds.add(DataElement(elem.tag, "SQ", []))
        else:
            ds.add(DataElement(elem.tag, elem.VR, None))
    ds.QueryRetrieveLevel = level
    # The unique key of the level is always returned (PS3.4 C.4.1.1.3.2).
    unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
              "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}[level]
    if unique not in ds and known.get(unique):
        setattr(ds, unique, known[unique])
    return ds
