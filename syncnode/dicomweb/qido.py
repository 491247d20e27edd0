"""QIDO-RS (PS3.18 10.6): search parameters -> the shared matching engine -> DICOM JSON.

The matching is C-FIND's (:func:`syncnode.dicom.query.match`): same keys, same wildcard,
list, range and case rules, same refusal of a key this node cannot match (a 400 naming the
key, never its value, instead of an answer wider than asked). Parameters are attribute
keywords or tags (``PatientName``, ``00100010``); ``limit``, ``offset``, ``includefield``
(keywords, tags or ``all``) and ``fuzzymatching`` (accepted; Person Names already match
case-insensitively) are the others. UID lists may be comma or backslash separated.

Answers carry what viewers list (study: Study Instance UID, date, time, Patient's Name and
ID, Accession Number, Modalities in Study, description, counts; series: Modality, number,
description, count; instance: SOP Class and Instance UID, Instance Number, Rows, Columns,
Number of Frames ...) plus the RetrieveURL of each result. Pure: no I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..ids import is_uid
from .json import keyword_of, row_json, tag_of

MAX_RESULTS = 10_000  # per answer; past it a Warning header says the list was cut
_UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
_RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
# Read from the stored instance (not the catalog) when an instance-level answer has them.
INSTANCE_HEADER = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated",
                   "PhotometricInterpretation", "SamplesPerPixel")


class QidoError(ValueError):
    """A search the node refuses (400): the message names the parameter, not its value."""


@dataclass
class Search:
    level: str  # STUDY, SERIES, IMAGE
    keys: dict[str, str] = field(default_factory=dict)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int = MAX_RESULTS
    offset: int = 0


def _int(value: str, name: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise QidoError(f"{name} must be an integer") from None
    if not low <= n <= high:
        raise QidoError(f"{name} must be {low}..{high}")
    return n


def parse(level: str, params: Mapping[str, str] | Any, path_keys: dict[str, str]) -> Search:
    """A search from the query string (a multidict) and the UIDs of the path."""
    s = Search(level)
    for name, given in params.items():
        low = name.lower()
        value = given.strip()
        if low == "limit":
            s.limit = _int(value, "limit", 1, MAX_RESULTS)
        elif low == "offset":
            s.offset = _int(value, "offset", 0, 10**12)
        elif low == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QidoError("fuzzymatching is true or false")
        elif low == "includefield":
            for raw in value.split(","):
                item = raw.strip()
                if item.lower() == "all":
                    s.include_all = True
                elif tag_of(item) is None:
                    raise QidoError(f"includefield: {item[:64]!r} is not an attribute "
                                    "keyword or tag")
                else:
                    s.include.add(item)
        else:
            tag = tag_of(name) if name else None
            if tag is None or "." in name:
                raise QidoError(f"{name[:64]!r} is not an attribute keyword or tag "
                                "(sequence matching is not supported)")
            keyword = keyword_of(tag)
            if keyword in _UID_KEYS:
                uids = [u.strip() for u in value.replace(",", "\\").split("\\") if u.strip()]
                if not all(is_uid(u) for u in uids):
                    raise QidoError(f"{keyword} holds a value that is not a UID")
                value = "\\".join(uids)
            elif keyword in ("Modality", "ModalitiesInStudy"):
                value = value.replace(",", "\\")
            if len(value) > 1024:
                raise QidoError(f"{keyword}: matching value too long")
            if value in ("", "*"):
                continue  # universal matching: a return key
            if keyword in s.keys:
                raise QidoError(f"{keyword} is given twice")
            s.keys[keyword] = value
    for keyword, uid in path_keys.items():
        if keyword in s.keys and s.keys[keyword] != uid:
            raise QidoError(f"{keyword} in the query contradicts the path")
        s.keys[keyword] = uid
    return s


def render(row: dict[str, Any], level: str, base: str,
           header: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result as DICOM JSON: the catalog's row, availability and RetrieveURL, then the
    attributes read from the stored instance (``header``, DICOM JSON, instance level) that
    the row does not have."""
    study = row.get("StudyInstanceUID", "")
    url = f"{base}/studies/{study}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{row.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{row.get('SOPInstanceUID', '')}"
    out = row_json(row, [("RetrieveURL", url), ("InstanceAvailability", "ONLINE")])
    for tag, elem in (header or {}).items():
        out.setdefault(tag, elem)
    return dict(sorted(out.items()))


def header_keywords(s: Search) -> tuple[str, ...] | None:
    """Instance-level attributes to read from the stored instance: the default ones and
    those asked by includefield; None for every attribute (``includefield=all``)."""
    if s.include_all:
        return None
    asked = {keyword_of(t) for t in (tag_of(i) for i in s.include) if t is not None}
    return tuple(dict.fromkeys([*INSTANCE_HEADER, *sorted(asked)]))
