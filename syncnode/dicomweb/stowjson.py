"""STOW-RS of DICOM JSON metadata with bulk data (PS3.18 10.5.1.2): each data set of the
metadata part(s) becomes a Part-10 file, its bulk data values taken from the parts its
``BulkDataURI``\\ s name (by their ``Content-Location``), and that file then goes through
exactly the inspection and commit of an ``application/dicom`` part: the bytes built here
are the bytes stored, hashed and synced.

Rules, and why:

- Metadata parts are ``application/dicom+json`` (an array of data sets, or one), each at
  most :data:`MAX_METADATA_BYTES` (parsed in memory). Every other part is bulk data,
  found by its ``Content-Location``; a URI no part carries refuses that instance (0xC000),
  never a value made up.
- Bulk data in ``application/octet-stream`` is the value as is (native pixel data). Pixel
  data in an image media type (``image/jpeg``, ``image/jp2``, ``image/jls``,
  ``image/dicom-rle`` ...) is one compressed frame in the ``transfer-syntax`` its part
  names, encapsulated here (one fragment, with a basic offset table); multi-frame
  compressed pixel data this way is refused (send ``application/dicom``).
- The transfer syntax is the metadata's (0002,0010) if given, else the compressed pixel
  data's, else Explicit VR Little Endian; a contradiction refuses the instance. The file
  meta information is rebuilt from the data set (SOP Class/Instance UID) and this node's
  implementation UID: group 0002 in the metadata is not copied.
- Memory holds one instance at a time (its bulk values included), never the request.

Blocking (file reads, encoding): the adapter runs :func:`build_files` in a worker thread.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..blobstore import BlobStore
from ..ids import is_uid

log = logging.getLogger("syncnode.dicomweb")

MAX_METADATA_BYTES = 64 << 20
OCTET = "application/octet-stream"
DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_NATIVE = {"1.2.840.10008.1.2", EXPLICIT_LE, "1.2.840.10008.1.2.2"}
CANNOT_UNDERSTAND = 0xC000


@dataclass(slots=True)
class Part:
    """One spooled part of a request: its temp file, size and headers."""

    path: Path
    size: int
    media: str
    params: dict[str, str] = field(default_factory=dict)
    location: str | None = None


class MetadataError(Exception):
    """The request's metadata cannot be read at all (400: nothing stored)."""


class InstanceRefused(Exception):
    """One data set of the metadata cannot be made into a file (0xC000 for it)."""


def _first(obj: dict[str, Any], tag: str) -> str | None:
    value = obj.get(tag, {}).get("Value") if isinstance(obj.get(tag), dict) else None
    return str(value[0]) if isinstance(value, list) and value else None


def metadata_sets(parts: list[Part]) -> list[dict[str, Any]]:
    """The data sets of every metadata part, in order. MetadataError when none, or one
    is not DICOM JSON."""
    out: list[dict[str, Any]] = []
    for part in parts:
        if part.media != DICOM_JSON:
            continue
        if part.size > MAX_METADATA_BYTES:
            raise MetadataError(f"a metadata part is larger than {MAX_METADATA_BYTES} bytes")
        try:
            value = json.loads(part.path.read_bytes())
        except RecursionError as exc:  # nested deeper than the parser goes: hostile
            raise MetadataError("a metadata part is nested too deeply to be DICOM JSON"
                                ) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise MetadataError(f"a metadata part is not JSON ({exc})") from exc
        sets = value if isinstance(value, list) else [value]
        if not all(isinstance(s, dict) for s in sets):
            raise MetadataError("a metadata part is not an array of DICOM JSON objects")
        out.extend(sets)
    if not out:
        raise MetadataError("no application/dicom+json part: nothing to store")
    return out


def build(obj: dict[str, Any], bulk: dict[str, Part], implementation_uid: str) -> bytes:
    """The Part-10 bytes of one DICOM JSON data set; InstanceRefused when impossible."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate

    compressed: list[str] = []

    def value_of(tag: str, vr: str, uri: str) -> bytes:
        part = bulk.get(uri)
        if part is None:
            raise InstanceRefused(f"no part carries the bulk data of {tag} (by its "
                                  "Content-Location)")
        data = part.path.read_bytes()
        if part.media == OCTET:
            return data
        if tag.upper() != "7FE00010":
            raise InstanceRefused(f"bulk data of {tag} must be application/octet-stream")
        ts = part.params.get("transfer-syntax")
        if not ts or ts in _NATIVE:
            raise InstanceRefused(f"compressed pixel data ({part.media}) needs its "
                                  "transfer-syntax")
        compressed.append(ts)
        return encapsulate([data])

    # group 0002 is this node's to write: never taken from the request
    body = {k: v for k, v in obj.items() if not k.startswith("0002")}
    try:
        ds = Dataset.from_json(body, bulk_data_uri_handler=value_of)
    except InstanceRefused:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
            RecursionError) as exc:  # (sequences nested without end)
        raise InstanceRefused(f"the metadata is not a valid DICOM JSON data set "
                              f"({type(exc).__name__})") from exc
    sop_class, sop = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    if not sop_class or not sop:
        raise InstanceRefused("the data set has no SOP Class or SOP Instance UID")
    asked = _first(obj, "00020010")
    if compressed:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InstanceRefused("multi-frame compressed pixel data: send the instance "
                                  "as application/dicom")
        if asked and asked != compressed[0]:
            raise InstanceRefused("the metadata's transfer syntax is not the pixel data's")
        ts = compressed[0]
    else:
        ts = asked or EXPLICIT_LE
        if ts not in _NATIVE and "PixelData" in ds:
            raise InstanceRefused("a compressed transfer syntax with native pixel data")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = implementation_uid
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=True)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
            OverflowError) as exc:
        raise InstanceRefused(f"the data set cannot be encoded ({type(exc).__name__})"
                              ) from exc
    return out.getvalue()


def build_files(store: BlobStore, parts: list[Part], implementation_uid: str
                ) -> tuple[list[tuple[Path, int]], list[tuple[str | None, str | None, int]]]:
    """Blocking: a temp file (as :meth:`BlobStore.new_tmp` makes them) per data set of
    the metadata, and the (class, instance, reason) of those refused. MetadataError when
    the metadata cannot be read at all."""
    bulk = {p.location: p for p in parts if p.location and p.media != DICOM_JSON}
    files: list[tuple[Path, int]] = []
    failed: list[tuple[str | None, str | None, int]] = []
    try:
        for obj in metadata_sets(parts):
            try:
                data = build(obj, bulk, implementation_uid)
            except InstanceRefused as exc:
                sop_class, sop = _first(obj, "00080016"), _first(obj, "00080018")
                sop_class = sop_class if sop_class and is_uid(sop_class) else None
                sop = sop if sop and is_uid(sop) else None
                log.info("STOW-RS metadata of %s not stored: %s", sop or "an instance", exc)
                failed.append((sop_class, sop, CANNOT_UNDERSTAND))
                continue
            tmp, fd = store.new_tmp()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            files.append((tmp, len(data)))
    except BaseException:
        for tmp, _ in files:
            tmp.unlink(missing_ok=True)
        raise
    return files, failed
