"""The C-FIND read model: matching on the live rows of ``puts`` (PS3.4 C.2.2.2).

The DICOM side (:mod:`syncnode.dicom.query`) turns an identifier into a
:class:`FindQuery` (the matching values of the keys the catalog indexes, ``None`` for
universal matching) and the rows back into response identifiers; the SQL is here.
Single values and ``\\``-separated lists; ``*``/``?`` wildcards on text keys (SQLite
GLOB, ``[`` escaped); UID lists; date ranges (``YYYY``/``YYYYMM`` bounds widened to the
whole year/month). Counts are of the whole patient/study/series, not of the matching
rows. Rows stream from a cursor on a read-only connection of the query's own: a long
answer neither holds the catalog's locks nor grows memory with its size.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_DATE_BOUND = re.compile(r"^\d{4}(\d{2}(\d{2})?)?$")


class InvalidMatch(ValueError):
    """A matching value the catalog cannot interpret (e.g. a malformed date range)."""


@dataclass(frozen=True)
class FindQuery:
    """Matching values (``None``: universal) of the keys the catalog indexes."""

    level: str
    patient_id: str | None = None
    study_uids: str | None = None
    study_date: str | None = None
    series_uids: str | None = None
    modality: str | None = None
    modalities_in_study: str | None = None
    sop_uids: str | None = None
    sop_class_uids: str | None = None


@dataclass
class Where:
    clauses: list[str]
    params: list[Any]

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return " AND ".join(["live=1", *self.clauses])


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
            raise InvalidMatch(f"invalid Study Date matching value {value[:40]!r}")
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


def find(catalog_path: Path | str, q: FindQuery) -> Iterator[dict[str, Any]]:
    """The matches of ``q``, one dict per patient/study/series/instance, keyed by DICOM
    keyword."""
    if q.level not in LEVELS:
        raise InvalidMatch(f"Query/Retrieve Level {q.level[:16]!r} is not valid")
    where = Where([], [])
    _match_text(where, "patient_id", q.patient_id)
    if q.level != "PATIENT":
        _match_uids(where, "study_instance_uid", q.study_uids)
        _match_date(where, q.study_date)
    if q.level in ("SERIES", "IMAGE"):
        _match_uids(where, "series_instance_uid", q.series_uids)
        _match_text(where, "modality", q.modality)
    if q.level == "IMAGE":
        _match_uids(where, "sop_instance_uid", q.sop_uids)
        _match_uids(where, "sop_class_uid", q.sop_class_uids)
    db = sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True, timeout=30.0,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=30000")
        if q.level == "PATIENT":
            yield from _patients(db, where)
        elif q.level == "STUDY":
            yield from _studies(db, where, q.modalities_in_study)
        elif q.level == "SERIES":
            yield from _series(db, where)
        else:
            yield from _images(db, where)
    finally:
        db.close()


def _patients(db: sqlite3.Connection, where: Where) -> Iterator[dict[str, Any]]:
    sql = (f"SELECT patient_id, count(DISTINCT study_instance_uid), "
           f"count(DISTINCT series_instance_uid), count(*) FROM puts WHERE {where.sql()} "
           "GROUP BY patient_id ORDER BY patient_id")
    for pid, studies, series, instances in db.execute(sql, where.params):
        yield {
            "PatientID": pid, "NumberOfPatientRelatedStudies": studies,
            "NumberOfPatientRelatedSeries": series,
            "NumberOfPatientRelatedInstances": instances}


def _studies(db: sqlite3.Connection, where: Where, modalities: str | None
             ) -> Iterator[dict[str, Any]]:
    having, hparams = "", []
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
        yield {
            "StudyInstanceUID": study, "PatientID": pid, "StudyDate": date,
            "ModalitiesInStudy": _multi(mods), "SOPClassesInStudy": _multi(classes),
            "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": instances}


def _series(db: sqlite3.Connection, where: Where) -> Iterator[dict[str, Any]]:
    sql = (f"SELECT series_instance_uid, min(study_instance_uid), min(patient_id), "
           f"max(study_date), min(modality), count(*) FROM puts WHERE {where.sql()} "
           "GROUP BY series_instance_uid ORDER BY min(study_instance_uid), series_instance_uid")
    for series, study, pid, date, modality, instances in db.execute(sql, where.params):
        yield {
            "SeriesInstanceUID": series, "StudyInstanceUID": study, "PatientID": pid,
            "StudyDate": date, "Modality": modality,
            "NumberOfSeriesRelatedInstances": instances}


def _images(db: sqlite3.Connection, where: Where) -> Iterator[dict[str, Any]]:
    sql = (f"SELECT sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid, "
           f"patient_id, study_date, modality FROM puts WHERE {where.sql()} "
           "ORDER BY study_instance_uid, series_instance_uid, sop_instance_uid")
    for sop, sop_class, series, study, pid, date, modality in db.execute(sql, where.params):
        yield {
            "SOPInstanceUID": sop, "SOPClassUID": sop_class, "SeriesInstanceUID": series,
            "StudyInstanceUID": study, "PatientID": pid, "StudyDate": date,
            "Modality": modality}


def _multi(text: str | None) -> list[str]:
    return sorted(v for v in (text or "").split(",") if v)
