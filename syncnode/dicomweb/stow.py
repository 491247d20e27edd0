"""STOW-RS (PS3.18 10.5): a multipart/related body of DICOM files, stored as ``import``
stores files.

Order of work, and why:

1. The request is checked before its body is read: ``multipart/related`` with
   ``type="application/dicom"`` (the files) or ``type="application/dicom+json"``
   (metadata and bulk data: :mod:`.stowjson` makes each data set a file, then all goes
   on as below) and a boundary (else 415), a Content-Length not above
   ``dicomweb_max_request_bytes`` (else 413).
2. The body streams through :class:`~.multipart.MultipartParser`; each part goes to a temp
   file of the blob store as it arrives (memory does not grow with a part), and is cut off
   past ``max_blob_size`` (413) or the whole body past the request limit (413). Each read
   must arrive within ``dicomweb_read_timeout`` seconds (else 408). A body that ends
   before its closing boundary is 400 (truncated). In all these cases every temp file is
   removed and nothing is stored.
3. Only then is each part inspected with ``import``'s rules
   (:func:`syncnode.importer.inspect_tmp`: the same acceptance and reasons as C-STORE and
   ``import``) and the accepted ones recorded by the same commit
   (:func:`syncnode.importer.commit_staged`): durable before the answer is sent.
4. The answer (DICOM JSON) lists each stored instance in ``ReferencedSOPSequence`` with its
   RetrieveURL, each refused one in ``FailedSOPSequence`` with a FailureReason: 0xA900
   (identity missing or contradicting itself, or another study than the one in the URL),
   0xC000 (not an acceptable DICOM file), 0xA700 (the node's disk is full), 0x0110 (the
   spooled part could not be read back). 200 when all were stored, 202 when some, 409 when
   none; 507 when the disk filled while the body was being received (nothing stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..blobstore import LocalStoreError, StagedBlob, StoreFull
from ..dicom.scp import IMPLEMENTATION_CLASS_UID
from ..dicomfile import InvalidDicom, InvalidIdentity
from ..ids import is_uid
from ..importer import commit_staged, inspect_tmp
from ..local import LocalNode, offload
from . import stowjson
from .json import row_json
from .multipart import (
    BodyEnd,
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_media,
)

log = logging.getLogger("syncnode.dicomweb")
DICOM_JSON = "application/dicom+json"
WRITE_BUFFER = 1 << 20  # bytes gathered before a write to the part's temp file
PROCESSING_FAILURE, OUT_OF_RESOURCES = 0x0110, 0xA700
DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA900, 0xC000


class StowRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, reason: str) -> web.Response:
    resp = web.json_response({"error": reason}, status=status)
    if status in (408, 413):
        resp.force_close()  # the rest of the body is not read
    return resp


class _Spool:
    """The temp files of a request's parts (removed unless handed to the commit)."""

    def __init__(self, node: LocalNode) -> None:
        self.store = node.store
        self.files: list[tuple[Path, int]] = []  # (temp file, size) of complete parts
        self.parts: list[stowjson.Part] = []  # the same, with their headers
        self._fd: int | None = None
        self._tmp: Path | None = None
        self._size = 0
        self._buf = bytearray()
        self._headers: dict[str, str] = {}

    def start(self, headers: dict[str, str] | None = None) -> None:
        self._tmp, self._fd = self.store.new_tmp()
        self._size = 0
        self._headers = headers or {}

    def _flush(self) -> None:
        if self._fd is not None and self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]

    async def write(self, data: bytes, limit: int) -> None:
        self._size += len(data)
        if self._size > limit:
            raise StowRefused(413, f"a part is larger than max_blob_size ({limit} bytes)")
        self._buf += data
        if len(self._buf) >= WRITE_BUFFER:
            await offload(self._flush)

    async def end(self) -> None:
        await offload(self._flush)
        if self._fd is not None and self._tmp is not None:
            os.close(self._fd)
            self.files.append((self._tmp, self._size))
            media, params = parse_media(self._headers.get("content-type", "application/dicom"))
            self.parts.append(stowjson.Part(self._tmp, self._size, media, params,
                                            self._headers.get("content-location")))
        self._fd, self._tmp = None, None

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in ([self._tmp] if self._tmp else []) + [p for p, _ in self.files]:
            path.unlink(missing_ok=True)
        self.files.clear()
        self._tmp = None


def check_request(content_type: str, length: int | None, max_bytes: int) -> tuple[str, str]:
    """The multipart boundary and ``type`` (``application/dicom`` or
    ``application/dicom+json``) of an acceptable STOW request, else :class:`StowRefused`."""
    media, params = parse_media(content_type or "")
    if media != "multipart/related":
        raise StowRefused(415, 'STOW-RS takes multipart/related; type="application/dicom" '
                               '(or type="application/dicom+json" with bulk data parts)')
    kind = params.get("type", "application/dicom").lower()
    if kind not in ("application/dicom", DICOM_JSON):
        raise StowRefused(415, "this node stores application/dicom parts, or "
                               "application/dicom+json metadata with bulk data parts (not "
                               "DICOM XML)")
    boundary = params.get("boundary", "")
    if not boundary:
        raise StowRefused(400, "the multipart Content-Type has no boundary")
    if length is not None and length > max_bytes:
        raise StowRefused(413, f"the request is larger than dicomweb_max_request_bytes "
                               f"({max_bytes} bytes)")
    return boundary, kind


async def receive(request: web.Request, spool: _Spool, boundary: str, *, max_bytes: int,
                  max_part: int, read_timeout: float, kind: str = "application/dicom"
                  ) -> None:
    """Spool every part of the body; StowRefused / MultipartError on any problem."""
    parser = MultipartParser(boundary)
    total = 0
    in_part = False
    while True:
        try:
            async with asyncio.timeout(read_timeout):
                data = await request.content.readany()
        except TimeoutError:
            raise StowRefused(408, f"no data for {read_timeout:g} s: request body not "
                                   "received in time") from None
        if not data:
            break
        total += len(data)
        if total > max_bytes:
            raise StowRefused(413, f"the request is larger than dicomweb_max_request_bytes "
                                   f"({max_bytes} bytes)")
        for event in parser.feed(data):
            if isinstance(event, PartStart):
                media, _ = parse_media(event.headers.get("content-type", "application/dicom"))
                if media != "application/dicom" and kind == "application/dicom":
                    raise StowRefused(415, "every part must be application/dicom")
                spool.start(event.headers)
                in_part = True
            elif isinstance(event, PartData) and in_part:
                await spool.write(event.data, max_part)
            elif isinstance(event, PartEnd):
                await spool.end()
                in_part = False
            elif isinstance(event, BodyEnd):
                pass
    parser.finish()
    if not spool.files:
        raise StowRefused(400, "the multipart body holds no part")


def _identity_of(path: Path) -> tuple[str | None, str | None]:
    """SOP Class and Instance UID of a refused file, when they can be read at all."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(path, specific_tags=["SOPClassUID", "SOPInstanceUID"], force=True)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop = str(ds.get("SOPInstanceUID", "") or "")
    except (OSError, ValueError, EOFError, KeyError, AttributeError, InvalidDicomError):
        return None, None  # not readable as DICOM at all: the failure stays unnamed
    return (sop_class if is_uid(sop_class) else None, sop if is_uid(sop) else None)


def ingest(node: LocalNode, files: list[tuple[Path, int]], study: str | None
           ) -> tuple[list[dict[str, str]], list[tuple[str | None, str | None, int]]]:
    """Blocking: inspect every spooled part, commit the accepted ones. Returns the stored
    instances' attributes and the refused (class, instance, reason) triples."""
    store = node.store
    accepted: list[tuple[dict[str, str], StagedBlob]] = []
    failed: list[tuple[str | None, str | None, int]] = []
    for path, size in files:
        try:
            attrs, staged = inspect_tmp(store, path, size)
        except InvalidDicom as exc:
            code = DOES_NOT_MATCH if isinstance(exc, InvalidIdentity) else CANNOT_UNDERSTAND
            failed.append((*_identity_of(path), code))
            log.info("STOW part refused: %s", exc.reason)
            continue
        except StoreFull:
            failed.append((*_identity_of(path), OUT_OF_RESOURCES))
            continue
        except OSError as exc:  # the spooled part cannot be read back: this part fails
            failed.append((*_identity_of(path), PROCESSING_FAILURE))
            log.warning("STOW part not stored: %s", type(exc).__name__)
            continue
        refusal = node.refused_as_rejected(attrs["sop_instance_uid"])
        if refusal is not None:
            log.info("STOW part refused: %s", refusal)
        if (study is not None and attrs["study_instance_uid"] != study) or refusal:
            failed.append((attrs["sop_class_uid"], attrs["sop_instance_uid"],
                           CANNOT_UNDERSTAND if refusal else DOES_NOT_MATCH))
            staged.tmp.unlink(missing_ok=True)
            if staged.chunks_tmp is not None:
                staged.chunks_tmp.unlink(missing_ok=True)
            continue
        accepted.append((attrs, staged))
    if not accepted:
        return [], failed
    try:
        commit_staged(node, accepted)
    except StoreFull:
        for attrs, staged in accepted:
            staged.tmp.unlink(missing_ok=True)
            failed.append((attrs["sop_class_uid"], attrs["sop_instance_uid"], OUT_OF_RESOURCES))
        return [], failed
    return [attrs for attrs, _ in accepted], failed


async def handle(request: web.Request, node: LocalNode, study: str | None, *, base: str,
                 max_bytes: int, max_part: int, read_timeout: float,
                 audit: Callable[..., None], local_change: Callable[[], None]
                 ) -> web.Response:
    spool = _Spool(node)
    try:
        boundary, kind = check_request(request.headers.get("Content-Type", ""),
                                       request.content_length, max_bytes)
        await receive(request, spool, boundary, max_bytes=max_bytes, max_part=max_part,
                      read_timeout=read_timeout, kind=kind)
    except StowRefused as exc:
        spool.discard()
        audit("failure", reason=f"refused ({exc.status})")
        return _error(exc.status, str(exc))
    except MultipartError as exc:
        spool.discard()
        audit("failure", reason="malformed multipart")
        return _error(400, f"nothing stored: {exc}")
    except (StoreFull, LocalStoreError) as exc:
        spool.discard()
        audit("failure", reason="store full" if isinstance(exc, StoreFull) else "store error")
        return _error(507, f"nothing stored: {exc}; free space on the node's data disk")
    except BaseException:
        spool.discard()
        raise
    files = list(spool.files)
    built: list[tuple[str | None, str | None, int]] = []
    try:
        if kind == DICOM_JSON:  # the spooled parts are metadata and bulk data: make files
            try:
                files, built = await offload(stowjson.build_files, node.store, spool.parts,
                                             IMPLEMENTATION_CLASS_UID)
            except stowjson.MetadataError as exc:
                audit("failure", reason="bad metadata")
                return _error(400, f"nothing stored: {exc}")
            finally:
                for path, _ in spool.files:
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
        stored, failed = await offload(ingest, node, files, study)
        failed = [(c if c and is_uid(c) else None, i if i and is_uid(i) else None, code)
                  for c, i, code in built] + failed
    finally:
        for path, _ in files:  # whatever the commit did not take
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    if stored:
        local_change()
    body = _answer(stored, failed, base, study)
    audit("success" if stored else "failure",
          studies=sorted({a["study_instance_uid"] for a in stored}) or None,
          sops=[a["sop_instance_uid"] for a in stored] or None,
          instances=len(stored), failed=len(failed))
    status = 200 if not failed else 202 if stored else 409
    # exactly application/dicom+json (UTF-8 by definition): clients compare the type as is
    return web.Response(body=json.dumps(body).encode(), status=status,
                        headers={"Content-Type": DICOM_JSON})


def _answer(stored: list[dict[str, str]], failed: list[tuple[str | None, str | None, int]],
            base: str, study: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    studies = {a["study_instance_uid"] for a in stored}
    if study or len(studies) == 1:
        out.update(row_json({"RetrieveURL": f"{base}/studies/{study or studies.pop()}"}))
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": [
            row_json({"ReferencedSOPClassUID": c or "", "ReferencedSOPInstanceUID": i or "",
                      "FailureReason": code}) for c, i, code in failed]}
    if stored:
        out["00081199"] = {"vr": "SQ", "Value": [
            row_json({"ReferencedSOPClassUID": a["sop_class_uid"],
                      "ReferencedSOPInstanceUID": a["sop_instance_uid"],
                      "RetrieveURL": f"{base}/studies/{a['study_instance_uid']}/series/"
                                     f"{a['series_instance_uid']}/instances/"
                                     f"{a['sop_instance_uid']}"}) for a in stored]}
    return dict(sorted(out.items()))
