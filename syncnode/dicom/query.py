"""C-FIND over the catalog: Study Root and Patient Root, PATIENT / STUDY / SERIES / IMAGE.

Matching (PS3.4 C.2.2.2) is done by the catalog's C-FIND read model
(:mod:`syncnode.catalog.find`, SQL on the live rows); this module turns identifiers into
its queries and its rows into response identifiers.

Matching keys. Identity keys come from the catalog's puts; the others from the local
attribute read model (:mod:`syncnode.catalog.attrs`, read from the stored blobs):

==========================  ==========  =============================================
attribute                   level       matching
==========================  ==========  =============================================
PatientID                   PATIENT     single value, wildcard (``*``, ``?``), list
PatientName                 PATIENT     same, **case-insensitive** (Unicode case fold)
PatientBirthDate            PATIENT     date, range ``A-B``, ``-B``, ``A-``
PatientSex                  PATIENT     single value, wildcard, list
StudyInstanceUID            STUDY       UID list (``\\``-separated)
StudyDate                   STUDY       date, range; ``YYYY`` / ``YYYYMM`` bounds are
                                        widened to the whole year / month
StudyTime                   STUDY       time, range (``0800-1200``, ``14-``)
AccessionNumber, StudyID,   STUDY       single value, wildcard, list (case-sensitive)
StudyDescription
ReferringPhysicianName      STUDY       as PatientName (case-insensitive)
ModalitiesInStudy           STUDY       any instance of the study has one of the values
SeriesInstanceUID           SERIES      UID list
Modality, SeriesDescription SERIES      single value, wildcard, list
BodyPartExamined            SERIES      single value, wildcard, list
SeriesNumber                SERIES      integer value (list)
SOPInstanceUID, SOPClassUID IMAGE       UID list
InstanceNumber              IMAGE       integer value (list)
==========================  ==========  =============================================

A key of the query level or a level above it is matched (relational for the levels
above). A key with an empty value (or ``*``) matches everything (universal matching). A
key with a matching value that this node cannot match (not in the table, or below the
query level) is never ignored, since ignoring it would widen the match: the query is
refused with status 0xC000 (Unable to process) and an Error Comment naming the key
(never its value). Return keys are filled from the same sources, plus
NumberOfStudyRelatedInstances/Series, NumberOfSeriesRelatedInstances,
NumberOfPatientRelatedStudies/Series/Instances and SOPClassesInStudy (counts of the whole
study/series/patient). The identifier is decoded with its Specific Character Set; stored
values are decoded with theirs when indexed. Responses are in the query's Specific
Character Set when it is a single-byte set holding every value of the response (e.g.
ISO_IR 100), otherwise in ISO_IR 192 (UTF-8), which holds any stored value. Results
stream from an SQLite cursor: memory does not grow with their number. Patient data is
never logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from ..catalog import Catalog
from ..catalog.find import ATTR_LEVEL, FindQuery, InvalidMatch

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
LEVELS = {STUDY_ROOT: ("STUDY", "SERIES", "IMAGE"),
          PATIENT_ROOT: ("PATIENT", "STUDY", "SERIES", "IMAGE")}


class QueryError(Exception):
    """A C-FIND request that cannot be answered; ``status`` is the DIMSE status."""

    def __init__(self, message: str, status: int = 0xA900) -> None:
        super().__init__(message)
        self.status = status


def _value(identifier: Dataset, keyword: str | BaseTag) -> str | None:
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


def find(catalog: Catalog, model: str, identifier: Dataset,
         blob_path: Callable[[str], Path] | None = None) -> Iterator[Dataset]:
    """Matches of a C-FIND identifier under an information model, as response identifiers.

    With ``blob_path`` (blob hash -> file), the blobs not yet in the attribute read model
    are indexed first, so every stored instance is matched on its stored values."""
    if model not in LEVELS:
        raise QueryError(f"information model {model} is not supported", 0xA900)
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS[model]:
        raise QueryError(f"Query/Retrieve Level {level[:16]!r} is not valid for this model",
                         0xA900)
    try:
        identifier.decode()  # text values to Unicode per the query's Specific Character Set
    except (LookupError, UnicodeError, ValueError) as exc:
        raise QueryError(f"the identifier's text cannot be decoded ({type(exc).__name__})",
                         0xC000) from exc
    keys: dict[str, str] = {}
    for elem in identifier:
        kw = elem.keyword
        if kw in ("SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC") \
                or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            if any(len(item) for item in (elem.value or [])):
                raise QueryError(f"matching on sequence {kw or elem.tag} is not supported",
                                 0xC000)
            continue
        value = _value(identifier, elem.tag)
        if value is not None:
            keys[kw or str(elem.tag)] = value
    for row in match(catalog, level, keys, blob_path):
        yield _response(identifier, level, row)


def match(catalog: Catalog, level: str, keys: dict[str, str],
          blob_path: Callable[[str], Path] | None = None) -> Iterator[dict[str, Any]]:
    """The one matching engine of C-FIND and QIDO-RS: the patients, studies, series or
    instances (``level``: PATIENT, STUDY, SERIES, IMAGE) whose attributes match ``keys``
    (DICOM keyword -> matching value, universal keys left out), as dicts keyed by DICOM
    keyword (the catalog's rows, see :mod:`syncnode.catalog.find`).

    A key this node cannot match at that level is refused (0xC000), never ignored. With
    ``blob_path`` (blob hash -> file), blobs not yet in the attribute read model are
    indexed first, so every stored instance is matched on its stored values."""
    _refuse_unmatchable(keys, level)
    attr_keys = tuple((kw, keys[kw]) for kw in ATTR_LEVEL if kw in keys)
    if blob_path is not None:
        catalog.index_find_attributes(blob_path)
    q = FindQuery(
        attrs=attr_keys,
        level=level, patient_id=keys.get("PatientID"),
        study_uids=keys.get("StudyInstanceUID"),
        study_date=keys.get("StudyDate"),
        series_uids=keys.get("SeriesInstanceUID"),
        modality=keys.get("Modality"),
        modalities_in_study=keys.get("ModalitiesInStudy"),
        sop_uids=keys.get("SOPInstanceUID"),
        sop_class_uids=keys.get("SOPClassUID"))
    try:
        yield from catalog.find(q)
    except InvalidMatch as exc:
        raise QueryError(str(exc), 0xC000) from exc


# The keys this node matches on, per query level (a key of a level above the query's is
# matched too: the Study Root model puts patient keys at STUDY level).
_OWN = {
    "PATIENT": {"PatientID"},
    "STUDY": {"StudyInstanceUID", "StudyDate", "ModalitiesInStudy"},
    "SERIES": {"SeriesInstanceUID", "Modality"},
    "IMAGE": {"SOPInstanceUID", "SOPClassUID"},
}
for _kw, _lv in ATTR_LEVEL.items():
    _OWN[_lv].add(_kw)
_MATCHABLE = {lv: set().union(*(_OWN[x] for x in LEVELS[PATIENT_ROOT]
                                [:i + 1]))
              for i, lv in enumerate(LEVELS[PATIENT_ROOT])}


def _refuse_unmatchable(keys: dict[str, str], level: str) -> None:
    """Refuse (0xC000) a query with a matching value on a key this node cannot match.

    Ignoring such a key would widen the match (``PatientName=NOSUCHNAME*`` answering
    every study): the requester is told instead, with the key's name (never its value)
    in the Error Comment. Keys without a value (or ``*``) are return keys and are not
    given here.
    """
    if level not in _MATCHABLE:
        raise QueryError(f"Query/Retrieve Level {level[:16]!r} is not valid", 0xA900)
    allowed = _MATCHABLE[level]
    for kw in keys:
        if kw not in allowed:
            raise QueryError(f"matching on {kw} at {level} level is not supported "
                             "by this node", 0xC000)


def _answer_charset(ident: Dataset, answer: Dataset) -> str:
    """The query's Specific Character Set when it is a single-byte one that holds every
    text value of the answer (a requester that asked in Latin-1 gets Latin-1), otherwise
    ISO_IR 192 (UTF-8), which holds any stored value."""
    asked = ident.get("SpecificCharacterSet")
    if not isinstance(asked, str) or asked.strip() in ("", "ISO_IR 192"):
        return "ISO_IR 192"
    asked = asked.strip()
    try:
        (encoding,) = convert_encodings([asked])
    except (LookupError, ValueError):
        return "ISO_IR 192"
    if asked.startswith("ISO 2022"):
        return "ISO_IR 192"
    for elem in answer:
        if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC") and elem.value:
            try:
                str(elem.value).encode(encoding)
            except UnicodeError:
                return "ISO_IR 192"
    return asked


def _response(ident: Dataset, level: str, known: dict[str, Any]) -> Dataset:
    """A response identifier with every requested key: known values filled, others empty."""
    ds = Dataset()
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
    ds.SpecificCharacterSet = _answer_charset(ident, ds)
    # The unique key of the level is always returned (PS3.4 C.4.1.1.3.2).
    unique = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
              "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}[level]
    if unique not in ds and known.get(unique):
        setattr(ds, unique, known[unique])
    return ds
