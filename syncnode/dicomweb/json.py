"""DICOM JSON (PS3.18 F.2): catalog rows and data sets as ``application/dicom+json``.

Pure: rows in, dicts out. Bulk data (binary values longer than a threshold) is never put
inline: the element gets a ``BulkDataURI`` built by the caller, so a metadata answer stays
small whatever the size of the pixel data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_THRESHOLD = 1024  # bytes: a binary value longer than this is sent by URI
_NUMBER_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def tag_of(keyword: str) -> int | None:
    """The tag of a keyword or of an 8-hex-digit tag (``0020000D``), else None."""
    tag = tag_for_keyword(keyword)
    if tag is not None:
        return int(tag)
    if len(keyword) == 8:
        try:
            return int(keyword, 16)
        except ValueError:
            return None
    return None


def keyword_of(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def _vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def element(keyword: str, value: Any) -> tuple[str, dict[str, Any]] | None:
    """One attribute of a catalog row as a DICOM JSON (tag, element) pair."""
    tag = tag_of(keyword)
    if tag is None:
        return None
    vr = _vr(tag)
    out: dict[str, Any] = {"vr": vr}
    values = value if isinstance(value, list) else [value]
    values = [v for v in values if v not in (None, "")]
    if not values:
        return f"{tag:08X}", out
    if vr == "PN":
        out["Value"] = [{"Alphabetic": str(v)} for v in values]
    elif vr in _NUMBER_VRS:
        nums: list[Any] = []
        for v in values:
            try:
                nums.append(int(v) if vr not in ("DS", "FL", "FD") else float(v))
            except (TypeError, ValueError):
                continue
        if nums:
            out["Value"] = nums
    else:
        out["Value"] = [str(v) for v in values]
    return f"{tag:08X}", out


def row_json(row: dict[str, Any], extra: Iterable[tuple[str, Any]] = ()) -> dict[str, Any]:
    """A catalog row (DICOM keyword -> value) and extra attributes as one DICOM JSON
    object, attributes in tag order."""
    out: dict[str, Any] = {}
    for keyword, value in [*row.items(), *extra]:
        pair = element(keyword, value)
        if pair is not None:
            out[pair[0]] = pair[1]
    return dict(sorted(out.items()))


def dataset_json(ds: Dataset, bulk_uri: Callable[[str], str],
                 threshold: int = BULK_THRESHOLD) -> dict[str, Any]:
    """A data set as DICOM JSON; every binary value over ``threshold`` bytes, and the
    pixel data always, as a ``BulkDataURI`` (``bulk_uri(tag_hex)``, top-level tags only;
    nested ones are left out)."""
    def handler(elem: DataElement) -> str:
        return bulk_uri(f"{int(elem.tag):08X}")

    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        key = f"{tag:08X}"
        if elem.tag.group == 0x0002:
            continue
        if tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or (
                elem.VR in _BINARY_VRS and _length(elem) > threshold):
            out[key] = {"vr": elem.VR if elem.VR in _BINARY_VRS else "OB",
                        "BulkDataURI": bulk_uri(key)}
            continue
        try:
            out[key] = elem.to_json_dict(handler, threshold)
        except (ValueError, TypeError, AttributeError, KeyError):
            out[key] = {"vr": elem.VR}  # a value pydicom cannot render: left empty
        if elem.VR == "SQ":  # nested bulk data has no URI of its own here: left out
            _drop_nested_bulk(out[key])
    return out


def _length(elem: DataElement) -> int:
    value = elem.value
    return len(value) if isinstance(value, (bytes, bytearray)) else 0


def _drop_nested_bulk(node: dict[str, Any]) -> None:
    for item in node.get("Value", []) or []:
        if not isinstance(item, dict):
            continue
        for key in list(item):
            sub = item[key]
            if "BulkDataURI" in sub:
                item[key] = {"vr": sub.get("vr", "OB")}
            elif sub.get("vr") == "SQ":
                _drop_nested_bulk(sub)
