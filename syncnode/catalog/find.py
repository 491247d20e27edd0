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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import attrs

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# the live puts with their read-model attributes (NULL until a blob is indexed)
_FROM = "puts LEFT JOIN find_attrs f USING (blob)"
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
    # matching values of the keys of the attribute read model (syncnode.catalog.attrs),
    # by DICOM keyword
    attrs: tuple[tuple[str, str], ...] = ()


@dataclass
class Where:
    clauses: list[str]
    params: list[Any]

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return " AND ".join(["puts.live=1", *self.clauses])


def _glob(pattern: str) -> str:
    """DICOM wildcard (``*``, ``?``) -> SQLite GLOB pattern (``[`` escaped)."""
    return "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in pattern)


def _match_text(where: Where, column: str, value: str | None, fold: bool = False,
                norm: Callable[[str], str] | None = None) -> None:
    """Single value, wildcard and list matching; ``fold``: case-insensitive (PN)."""
    if value is None:
        return
    values = [v for v in value.split("\\") if v != ""]
    parts = []
    col = f"casefold(coalesce({column}, ''))" if fold else f"coalesce({column}, '')"
    for raw in values:
        v = raw.casefold() if fold else raw
        if "*" in v or "?" in v:
            parts.append(f"{col} GLOB ?")
            where.params.append(_glob(v))
        else:
            parts.append(f"{col} = ?")
            where.params.append(norm(v) if norm else v)
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
            raise InvalidMatch(f"invalid date matching value {value[:40]!r}")
    low = lo + {4: "0101", 6: "01", 8: ""}[len(lo)] if lo else None
    high = hi + {4: "1231", 6: "31", 8: ""}[len(hi)] if hi else None
    return low, high


def _time_bounds(value: str) -> tuple[str | None, str | None]:
    """A TM matching value -> inclusive (low, high) as HHMMSS.FFFFFF (None = open)."""
    text = value.strip()
    lo, hi = (p.strip() for p in text.split("-", 1)) if "-" in text else (text, text)
    low = attrs.norm_time(lo) if lo else None
    high = attrs.norm_time(hi, high=True) if hi else None
    if low == "" or high == "":
        raise InvalidMatch(f"invalid time matching value {value[:40]!r}")
    return low, high


def _match_date(where: Where, value: str | None, column: str = "study_date",
                bounds: Callable[[str], tuple[str | None, str | None]] | None = None
                ) -> None:
    if value is None:
        return
    alternatives = []
    for part in value.split("\\"):
        if not part.strip():
            continue
        low, high = (bounds or _date_bounds)(part)
        cond = [f"coalesce({column}, '') != ''"]
        if low:
            cond.append(f"{column} >= ?")
            where.params.append(low)
        if high:
            cond.append(f"{column} <= ?")
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
    for keyword, value in q.attrs:
        if LEVELS.index(ATTR_LEVEL[keyword]) > LEVELS.index(q.level):
            raise InvalidMatch(f"{keyword} is not a key of the {q.level} level")
        _match_attr(where, keyword, value)
    db = sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True, timeout=30.0,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=30000")
        db.create_function("casefold", 1, _casefold, deterministic=True)
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


# The keys of the attribute read model: their level and how they are matched.
ATTR_LEVEL = {
    "PatientName": "PATIENT", "PatientBirthDate": "PATIENT", "PatientSex": "PATIENT",
    "StudyTime": "STUDY", "AccessionNumber": "STUDY", "StudyID": "STUDY",
    "StudyDescription": "STUDY", "ReferringPhysicianName": "STUDY",
    "SeriesNumber": "SERIES", "SeriesDescription": "SERIES", "BodyPartExamined": "SERIES",
    "InstanceNumber": "IMAGE",
}
_PN = {"PatientName", "ReferringPhysicianName"}
_IS = {"SeriesNumber", "InstanceNumber"}


def _casefold(text: str | None) -> str | None:
    return None if text is None else text.casefold()


def _match_attr(where: Where, keyword: str, value: str) -> None:
    column = "f." + attrs.COLUMNS[keyword]
    if keyword == "PatientBirthDate":
        _match_date(where, value, column)
    elif keyword == "StudyTime":
        _match_date(where, value, column, _time_bounds)
    else:
        _match_text(where, column, value, fold=keyword in _PN,
                    norm=attrs.norm_int if keyword in _IS else None)


def _cols(level: str) -> list[str]:
    """The read-model keywords returned at a level (its own and the levels above)."""
    upto = LEVELS.index(level)
    return [kw for kw, lv in ATTR_LEVEL.items() if LEVELS.index(lv) <= upto]


def _fill(row: dict[str, Any], keywords: list[str], values: tuple[Any, ...]) -> dict[str, Any]:
    for kw, v in zip(keywords, values, strict=True):
        row[kw] = v or ""
    return row


def _patients(db: sqlite3.Connection, where: Where) -> Iterator[dict[str, Any]]:
    kws = _cols("PATIENT")
    extra = "".join(f", min(f.{attrs.COLUMNS[k]})" for k in kws)
    sql = (f"SELECT patient_id, count(DISTINCT study_instance_uid), "
           f"count(DISTINCT series_instance_uid), count(*){extra} FROM {_FROM} "
           f"WHERE {where.sql()} GROUP BY patient_id ORDER BY patient_id")
    for pid, studies, series, instances, *rest in db.execute(sql, where.params):
        yield _fill({
            "PatientID": pid, "NumberOfPatientRelatedStudies": studies,
            "NumberOfPatientRelatedSeries": series,
            "NumberOfPatientRelatedInstances": instances}, kws, tuple(rest))


def _studies(db: sqlite3.Connection, where: Where, modalities: str | None
             ) -> Iterator[dict[str, Any]]:
    having, hparams = "", []
    if modalities is not None:
        h = Where([], [])
        _match_text(h, "modality", modalities)
        if h.clauses:
            having = f"HAVING sum({h.clauses[0]}) > 0"
            hparams = h.params
    kws = _cols("STUDY")
    extra = "".join(f", min(f.{attrs.COLUMNS[k]})" for k in kws)
    sql = (f"SELECT study_instance_uid, min(patient_id), max(study_date), "
           "group_concat(DISTINCT modality), group_concat(DISTINCT sop_class_uid), "
           f"count(DISTINCT series_instance_uid), count(*){extra} FROM {_FROM} "
           f"WHERE {where.sql()} "
           f"GROUP BY study_instance_uid {having} ORDER BY study_instance_uid")
    for study, pid, date, mods, classes, series, instances, *rest in db.execute(
            sql, [*where.params, *hparams]):
        yield _fill({
            "StudyInstanceUID": study, "PatientID": pid, "StudyDate": date,
            "ModalitiesInStudy": _multi(mods), "SOPClassesInStudy": _multi(classes),
            "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": instances},
            kws, tuple(rest))


def _series(db: sqlite3.Connection, where: Where) -> Iterator[dict[str, Any]]:
    kws = _cols("SERIES")
    extra = "".join(f", min(f.{attrs.COLUMNS[k]})" for k in kws)
    sql = (f"SELECT series_instance_uid, min(study_instance_uid), min(patient_id), "
           f"max(study_date), min(modality), count(*){extra} FROM {_FROM} "
           f"WHERE {where.sql()} GROUP BY series_instance_uid "
           "ORDER BY min(study_instance_uid), series_instance_uid")
    for series, study, pid, date, modality, instances, *rest in db.execute(sql, where.params):
        yield _fill({
            "SeriesInstanceUID": series, "StudyInstanceUID": study, "PatientID": pid,
            "StudyDate": date, "Modality": modality,
            "NumberOfSeriesRelatedInstances": instances}, kws, tuple(rest))


def _images(db: sqlite3.Connection, where: Where) -> Iterator[dict[str, Any]]:
    kws = _cols("IMAGE")
    extra = "".join(f", f.{attrs.COLUMNS[k]}" for k in kws)
    sql = (f"SELECT sop_instance_uid, sop_class_uid, series_instance_uid, study_instance_uid, "
           f"patient_id, study_date, modality{extra} FROM {_FROM} WHERE {where.sql()} "
           "ORDER BY study_instance_uid, series_instance_uid, sop_instance_uid")
    for sop, sop_class, series, study, pid, date, modality, *rest in db.execute(
            sql, where.params):
        yield _fill({
            "SOPInstanceUID": sop, "SOPClassUID": sop_class, "SeriesInstanceUID": series,
            "StudyInstanceUID": study, "PatientID": pid, "StudyDate": date,
            "Modality": modality}, kws, tuple(rest))


def _multi(text: str | None) -> list[str]:
    return sorted(v for v in (text or "").split(",") if v)
