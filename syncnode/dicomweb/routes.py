"""The aiohttp adapter of DICOMweb: routes under ``/dicom-web/`` on the admin API's app.

It parses, calls the pure or blocking parts (:mod:`.qido`, :mod:`.wado`, :mod:`.stow`,
blocking ones through :func:`syncnode.local.offload`) and writes answers; it decides
nothing they decide. Who may call what (a read key for QIDO/WADO, the admin key for
STOW), the Host check and TLS off loopback are the admin API's guard, read from the
OpenAPI paths declared here (:data:`OPENAPI_PATHS`). CORS is granted only to the origins
in ``dicomweb_cors_origins``. Each request leaves one audit entry (``query``,
``retrieved`` or ``received``) naming UIDs and counts, never patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from itertools import islice
from typing import Any, Protocol

from aiohttp import web

from ..catalog import Instance
from ..dicom.query import QueryError, match
from ..ids import is_uid
from ..knowngood import fingerprint
from ..local import LocalNode, offload
from . import qido, stow, wado
from .json import dataset_json
from .multipart import PART_END, closing, content_type, new_boundary, part_head

log = logging.getLogger("syncnode.dicomweb")
ROOT = "/dicom-web"
DICOM_JSON = "application/dicom+json"
READ_AHEAD = 3  # groups of small instances read and verified ahead of the one being sent
_S = "{study}"
_SE = "{series}"
_I = "{instance}"


class Auditor(Protocol):
    def __call__(self, action: str, actor: str, outcome: str, **details: Any) -> None: ...


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _uid(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not is_uid(value):
        raise web.HTTPBadRequest(text=f'{{"error": "{name} is not a valid UID"}}',
                                 content_type="application/json")
    return value


class DicomWeb:
    """The DICOMweb routes of one node. ``actor_of(request)`` names the caller for the
    audit trail; ``local_change()`` tells the running node that STOW added instances."""

    def __init__(self, node: LocalNode, audit: Auditor,
                 actor_of: Callable[[web.Request], str],
                 local_change: Callable[[], None],
                 settings: Callable[[], Any]) -> None:
        self.node = node
        self.audit = audit
        self.actor_of = actor_of
        self.local_change = local_change
        self.settings = settings

    def routes(self) -> list[web.RouteDef]:
        r = ROOT
        inst = f"{r}/studies/{_S}/series/{_SE}/instances/{_I}"
        return [
            web.get(f"{r}/studies", self.search(qido_level="STUDY")),
            web.post(f"{r}/studies", self.store),
            web.get(f"{r}/series", self.search(qido_level="SERIES")),
            web.get(f"{r}/instances", self.search(qido_level="IMAGE")),
            web.get(f"{r}/studies/{_S}", self.retrieve),
            web.post(f"{r}/studies/{_S}", self.store),
            web.get(f"{r}/studies/{_S}/metadata", self.metadata),
            web.get(f"{r}/studies/{_S}/series", self.search(qido_level="SERIES")),
            web.get(f"{r}/studies/{_S}/instances", self.search(qido_level="IMAGE")),
            web.get(f"{r}/studies/{_S}/thumbnail", self.thumbnail),
            web.get(f"{r}/studies/{_S}/series/{_SE}", self.retrieve),
            web.get(f"{r}/studies/{_S}/series/{_SE}/thumbnail", self.thumbnail),
            web.get(f"{r}/studies/{_S}/series/{_SE}/metadata", self.metadata),
            web.get(f"{r}/studies/{_S}/series/{_SE}/instances",
                    self.search(qido_level="IMAGE")),
            web.get(inst, self.retrieve),
            web.get(f"{inst}/metadata", self.metadata),
            web.get(f"{inst}/rendered", self.rendered),
            web.get(f"{inst}/thumbnail", self.rendered),
            web.get(f"{inst}/frames/{{frames}}", self.frames),
            web.get(f"{inst}/frames/{{frames}}/rendered", self.rendered),
            web.get(f"{inst}/bulk/{{tag}}", self.bulk),
        ]

    @staticmethod
    def base(request: web.Request) -> str:
        """The DICOMweb root as the client reached it, for the URLs in answers
        (RetrieveURL, BulkDataURI). A Host without a port (``dicomweb-client`` sends
        none) gets the listener's port, unless that is the scheme's default: the URLs
        must lead back here."""
        host = request.host
        if ":" not in host.rpartition("]")[2]:
            sock = request.transport.get_extra_info("sockname") if request.transport else None
            port = sock[1] if sock else 0
            if port and port != (443 if request.secure else 80):
                host = f"{host}:{port}"
        return f"{request.scheme}://{host}{ROOT}"

    # -- QIDO-RS -------------------------------------------------------------------------
    def search(self, qido_level: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            return await self._search(request, qido_level)
        return handler

    async def _search(self, request: web.Request, level: str) -> web.Response:
        path_keys = {}
        if "study" in request.match_info:
            path_keys["StudyInstanceUID"] = _uid(request, "study")
        if "series" in request.match_info:
            path_keys["SeriesInstanceUID"] = _uid(request, "series")
        actor = self.actor_of(request)
        try:
            s = qido.parse(level, request.query, path_keys)
        except qido.QidoError as exc:
            self.audit("query", actor, "failure", level=level, reason="bad search")
            return _error(400, str(exc))
        base = self.base(request)
        try:
            results, more = await offload(self._find, s, base)
        except QueryError as exc:
            self.audit("query", actor, "failure", level=level, keys=_keywords(s.keys),
                       reason="unmatchable key")
            return _error(400, str(exc))
        self.audit("query", actor, "success", level=level, keys=_keywords(s.keys),
                   count=len(results))
        headers = {}
        if more:
            headers["Warning"] = ('299 syncnode "There are more results than the limit: '
                                  'ask again with offset"')
        headers["Content-Type"] = DICOM_JSON  # as is, no charset: UTF-8 by definition
        return web.Response(body=json.dumps(results).encode(), headers=headers)

    def _find(self, s: qido.Search, base: str) -> tuple[list[dict[str, Any]], bool]:
        """Blocking: the matches of a search as DICOM JSON, and whether more exist."""
        store = self.node.store
        rows = match(self.node.catalog, s.level, s.keys, blob_path=store.path)
        page = list(islice(rows, s.offset, s.offset + s.limit + 1))
        more = len(page) > s.limit
        page = page[:s.limit]
        out = []
        wanted = qido.header_keywords(s) if s.level == "IMAGE" else ()
        for row in page:
            header = None
            if s.level == "IMAGE":
                header = self._header(row.get("SOPInstanceUID", ""), wanted, base)
            out.append(qido.render(row, s.level, base, header))
        return out, more

    def _header(self, sop: str, keywords: tuple[str, ...] | None, base: str
                ) -> dict[str, Any] | None:
        """Attributes of an instance read from its stored header (never its pixel data)."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        inst = self.node.catalog.instance(sop)
        if inst is None:
            return None
        try:
            ds = dcmread(self.node.store.path(inst.blob), stop_before_pixels=True,
                         specific_tags=list(keywords) if keywords is not None else None,
                         force=True)
        except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
            # the answer then has the catalog's attributes only (never the search refused)
            log.warning("QIDO: header of blob %s unreadable (%s)", inst.blob,
                        type(exc).__name__)
            return None
        return dataset_json(ds, lambda tag: f"{wado.instance_url(base, inst)}/bulk/{tag}")

    # -- WADO-RS -------------------------------------------------------------------------
    async def _instances(self, request: web.Request) -> list[Instance]:
        study = _uid(request, "study")
        series = _uid(request, "series") if "series" in request.match_info else None
        sop = _uid(request, "instance") if "instance" in request.match_info else None
        found = await offload(self.node.catalog.instances, study=study, series=series, sop=sop)
        if not found:
            what = "instance" if sop else "series" if series else "study"
            raise web.HTTPNotFound(text=f'{{"error": "no such {what} on this node"}}',
                                   content_type="application/json")
        return found

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        instances = await self._instances(request)
        actor = self.actor_of(request)
        try:
            wado.check_instance_accept(request.headers.get("Accept"),
                                       sorted({i.transfer_syntax_uid for i in instances}))
        except wado.WadoError as exc:
            return _error(exc.status, str(exc))
        boundary = new_boundary()
        heads = [part_head(boundary, f"application/dicom; transfer-syntax="
                                     f"{i.transfer_syntax_uid}", i.size) for i in instances]
        end = closing(boundary)
        resp = web.StreamResponse(headers={
            "Content-Type": content_type("application/dicom", boundary)})
        # every size is known: a Content-Length, no chunked framing around each write
        resp.content_length = sum(len(h) + i.size + len(PART_END)
                                  for h, i in zip(heads, instances, strict=True)) + len(end)
        sent = 0
        outcome = "failure"
        store = self.node.store
        loop = asyncio.get_running_loop()
        transport = request.transport
        # plain HTTP (loopback): known-good blobs go from the page cache to the socket
        # (sendfile), never through this process; over TLS every byte is read and written
        files = (transport is not None and transport.get_extra_info("sslcontext") is None
                 and transport.get_extra_info("socket") is not None)
        groups = wado.read_groups(instances)
        window: deque[asyncio.Future[list[wado.Ready]] | None] = deque()
        ahead = iter(groups)

        def refill() -> None:
            """Keep up to READ_AHEAD groups of small instances being prepared (read, or
            checked and prefetched) in worker threads while earlier ones are written (one
            thread hop per group, not per instance; a large instance is prepared when its
            turn comes)."""
            while len(window) < READ_AHEAD:
                group = next(ahead, None)
                if group is None:
                    return
                window.append(None if group[0].size > wado.IN_MEMORY else
                              loop.run_in_executor(None, wado.prepare_group, store, group,
                                                   files))

        try:
            refill()
            if window[0] is not None:
                await asyncio.shield(window[0])  # a damaged first instance: a clean 500
            await resp.prepare(request)
            numbered = iter(heads)
            before = b""  # the previous part's end, sent with the next part's head
            for group in groups:
                current = window.popleft()
                refill()
                ready = (await current if current is not None else
                         await loop.run_in_executor(None, wado.prepare_group, store, group,
                                                    files))
                for part in ready:
                    head = before + next(numbered)
                    if part.data is None:  # from its file
                        await resp.write(head)
                        await self._send_file(resp, request, part)
                        before = PART_END
                    elif len(part.data) < wado.SENDFILE_MIN:  # one write: head, bytes, end
                        await resp.write(b"".join((head, part.data, PART_END)))
                        before = b""
                    else:  # (not copied again to join them)
                        await resp.write(head)
                        await resp.write(part.data)
                        before = PART_END
                    sent += part.inst.size
            await resp.write(before + end)
            await resp.write_eof()
            outcome = "success"
        except wado.WadoError as exc:
            if not resp.prepared:
                return _error(exc.status, str(exc))
            raise
        finally:
            for job in window:  # a dropped connection: the reads ahead are not awaited
                if job is not None:
                    job.cancel()
            self.audit("retrieved", actor, outcome,
                       studies=sorted({i.study_instance_uid for i in instances}),
                       sops=[i.sop_instance_uid for i in instances],
                       instances=len(instances), bytes=sent)
        return resp

    async def _send_file(self, resp: web.StreamResponse, request: web.Request,
                         part: wado.Ready) -> None:
        """One instance's stored bytes from its file: by ``sendfile`` when it is still the
        known-good file the worker checked (and prefetched), else read a piece at a time
        (verified unless known good) in worker threads."""
        loop = asyncio.get_running_loop()
        store = self.node.store
        if part.stat is not None and request.transport is not None:
            # (on the loop: the worker has just opened this file and prefetched its bytes,
            # so the open finds a cached entry and sendfile reads the page cache, as
            # aiohttp's own FileResponse does; nothing here waits for a disk)
            try:
                f = open(store.path(part.inst.blob), "rb")  # noqa: SIM115, ASYNC230
            except FileNotFoundError:
                f = None
            if f is not None:
                with f:
                    if fingerprint(os.fstat(f.fileno())) == part.stat:
                        await _sendfile(request.transport, f, part.inst.size)
                        return
        pieces: Iterator[bytes] = wado.instance_pieces(store, part.inst)
        while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
            await resp.write(piece)

    async def metadata(self, request: web.Request) -> web.StreamResponse:
        instances = await self._instances(request)
        base = self.base(request)
        resp = web.StreamResponse(headers={"Content-Type": DICOM_JSON})
        store = self.node.store
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(None, wado.metadata, store, inst, base)
                for inst in instances[:2]]
        try:
            first = await jobs[0]
        except wado.WadoError as exc:
            for j in jobs[1:]:
                with contextlib.suppress(Exception):
                    await j
            return _error(exc.status, str(exc))
        await resp.prepare(request)
        await resp.write(b"[" + json.dumps(first).encode())
        for i in range(1, len(instances)):
            if i + 1 < len(instances):
                jobs.append(loop.run_in_executor(None, wado.metadata, store, instances[i + 1],
                                                 base))
            await resp.write(b"," + json.dumps(await jobs[i]).encode())
        await resp.write(b"]")
        await resp.write_eof()
        self.audit("retrieved", self.actor_of(request), "success", level="metadata",
                   studies=sorted({i.study_instance_uid for i in instances}),
                   instances=len(instances))
        return resp

    async def frames(self, request: web.Request) -> web.Response:
        (inst,) = await self._instances(request)
        try:
            numbers = [int(n) for n in request.match_info["frames"].split(",")]
        except ValueError:
            return _error(400, "frames is a comma-separated list of frame numbers (from 1)")
        if not numbers or len(numbers) > 10_000:
            return _error(400, "give 1 to 10000 frame numbers")
        try:
            got = await offload(wado.frames, self.node.store, inst, numbers,
                                request.headers.get("Accept"))
        except wado.WadoError as exc:
            return _error(exc.status, str(exc))
        boundary = new_boundary()
        ctype = f"{got.media}; transfer-syntax={got.transfer_syntax}"
        url = wado.instance_url(self.base(request), inst)
        body = b"".join(part_head(boundary, ctype, len(p), f"{url}/frames/{n}") + p + PART_END
                        for n, p in zip(numbers, got.parts, strict=True)) + closing(boundary)
        self.audit("retrieved", self.actor_of(request), "success", level="frames",
                   sops=[inst.sop_instance_uid], instances=1, bytes=len(body))
        return web.Response(body=body, headers={
            "Content-Type": content_type(got.media, boundary,
                                         transfer_syntax=got.transfer_syntax)})

    async def rendered(self, request: web.Request) -> web.Response:
        (inst,) = await self._instances(request)
        frame = 1
        if "frames" in request.match_info:
            text = request.match_info["frames"]
            if not text.isdigit():
                return _error(400, "rendered frames: give one frame number")
            frame = int(text)
        try:
            viewport = wado.parse_viewport(request.query.get("viewport"))
            media, data = await offload(wado.rendered, self.node.store, inst, frame,
                                        request.headers.get("Accept"),
                                        request.path.endswith("/thumbnail"), viewport)
        except wado.WadoError as exc:
            return _error(exc.status, str(exc))
        self.audit("retrieved", self.actor_of(request), "success", level="rendered",
                   sops=[inst.sop_instance_uid], instances=1)
        return web.Response(body=data, content_type=media)

    async def thumbnail(self, request: web.Request) -> web.Response:
        """The thumbnail of a study or a series (PS3.18 10.7): that of its middle instance
        (a study: of its first series), or of the next candidate when one has nothing to
        render; 404 when none can be."""
        study = _uid(request, "study")
        series = _uid(request, "series") if "series" in request.match_info else None
        try:
            viewport = wado.parse_viewport(request.query.get("viewport"))
            media = wado.rendered_media(request.headers.get("Accept"))
            inst, data = await offload(self._thumbnail, study, series, media, viewport)
        except wado.WadoError as exc:
            return _error(exc.status, str(exc))
        self.audit("retrieved", self.actor_of(request), "success", level="thumbnail",
                   studies=[study], sops=[inst.sop_instance_uid], instances=1)
        return web.Response(body=data, content_type=media)

    def _thumbnail(self, study: str, series: str | None, media: str,
                   viewport: tuple[int, int] | None) -> tuple[Instance, bytes]:
        """Blocking: the instance whose thumbnail stands for the study or series, and it."""
        keys = {"StudyInstanceUID": study}
        if series is not None:
            keys["SeriesInstanceUID"] = series
        rows = list(match(self.node.catalog, "IMAGE", keys, blob_path=self.node.store.path))
        what = "series" if series else "study"
        if not rows:
            raise wado.WadoError(f"no such {what} on this node", 404)
        for sop in wado.thumbnail_order(rows, series):
            inst = self.node.catalog.instance(sop)
            if inst is None:
                continue  # deleted meanwhile
            try:
                _, data = wado.rendered(self.node.store, inst, 1, media, True, viewport)
            except wado.WadoError as exc:
                if exc.status in (404, 406):  # no pixel data, or none decodable here
                    continue
                raise
            return inst, data
        raise wado.WadoError(f"no instance of this {what} can be rendered as an image here",
                             404)

    async def bulk(self, request: web.Request) -> web.Response:
        (inst,) = await self._instances(request)
        text = request.match_info["tag"]
        try:
            tag = int(text, 16)
        except ValueError:
            return _error(400, "tag is 8 hexadecimal digits")
        if len(text) != 8:
            return _error(400, "tag is 8 hexadecimal digits")
        try:
            data = await offload(wado.bulk, self.node.store, inst, tag)
        except wado.WadoError as exc:
            return _error(exc.status, str(exc))
        self.audit("retrieved", self.actor_of(request), "success", level="bulk",
                   sops=[inst.sop_instance_uid], instances=1, bytes=len(data))
        if wado.wants_single_part(request.headers.get("Accept")):  # e.g. OHIF "singlepart"
            return web.Response(body=data, headers={"Content-Type": wado.OCTET})
        boundary = new_boundary()
        body = (part_head(boundary, wado.OCTET, len(data)) + data + PART_END
                + closing(boundary))
        return web.Response(body=body, headers={
            "Content-Type": content_type(wado.OCTET, boundary)})

    # -- STOW-RS -------------------------------------------------------------------------
    async def store(self, request: web.Request) -> web.Response:
        study = _uid(request, "study") if "study" in request.match_info else None
        settings = self.settings()
        return await stow.handle(request, self.node, study, base=self.base(request),
                                 max_bytes=settings.dicomweb_max_request_bytes,
                                 max_part=settings.max_blob_size,
                                 read_timeout=settings.dicomweb_read_timeout,
                                 audit=lambda outcome, **d: self.audit(
                                     "received", self.actor_of(request), outcome, **d),
                                 local_change=self.local_change)


async def _sendfile(transport: asyncio.Transport, f: Any, size: int) -> None:
    """``size`` bytes of ``f`` to a plain socket transport. First straight to the socket
    when nothing is queued before them (usually all of an instance fits the socket's
    buffer: no wait, no selector change), then, for what did not fit, the event loop's
    own ``sendfile``, which waits for the socket to drain."""
    sent = 0
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing() \
            and transport.get_write_buffer_size() == 0:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while sent < size:  # (nothing awaited in between: the transport is ours)
                n = os.sendfile(sock.fileno(), f.fileno(), sent, size - sent)
                if n == 0:
                    raise ConnectionResetError("the blob file ended early while sending")
                sent += n
    if sent < size:
        await asyncio.get_running_loop().sendfile(transport, f, sent, size - sent,
                                                  fallback=False)


def _keywords(keys: dict[str, str]) -> list[str]:
    """The matching keys' names for the audit trail (tags given as numbers left out)."""
    return sorted(k for k in keys if k[:1].isalpha() and k.isalnum())


# -- the OpenAPI description of these routes (merged into the admin API's document) ---------
def _uid_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "pattern": r"^[0-9.]{1,64}$"}}


_ERR = {"description": "error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_DJSON = {"description": "DICOM JSON", "content": {DICOM_JSON: {"schema": {
    "type": "array", "items": {"type": "object"}}}}}
_MULTI = {"description": "multipart/related parts", "content": {"multipart/related": {
    "schema": {"type": "string", "format": "binary"}}}}
_IMAGE = {"description": "image", "content": {
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}
_QIDO_PARAMS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                "maximum": qido.MAX_RESULTS}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    {"name": "includefield", "in": "query", "schema": {"type": "string"}},
    {"name": "fuzzymatching", "in": "query", "schema": {"type": "string",
                                                        "enum": ["true", "false"]}},
]


def _qido(summary: str, *path: str) -> dict[str, Any]:
    return {"get": {"summary": f"QIDO-RS: {summary} (any attribute keyword or tag as a "
                               "matching key, C-FIND's matching)",
                    "parameters": [*(_uid_param(p) for p in path), *_QIDO_PARAMS],
                    "responses": {"200": _DJSON, "400": _ERR, "404": _ERR}}}


def _get(summary: str, ok: dict[str, Any], *path: str, extra: tuple[dict[str, Any], ...] = ()
         ) -> dict[str, Any]:
    return {"summary": summary, "parameters": [*(_uid_param(p) for p in path), *extra],
            "responses": {"200": ok, "400": _ERR, "404": _ERR, "406": _ERR, "500": _ERR}}


def _stow(*path: str) -> dict[str, Any]:
    return {"summary": "STOW-RS: store DICOM instances (multipart/related; "
                       "type=\"application/dicom\", or type=\"application/dicom+json\" "
                       "with bulk data parts by Content-Location), durable before the answer",
            "parameters": [_uid_param(p) for p in path],
            "requestBody": {"required": True, "content": {"multipart/related": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": _DJSON | {"description": "all stored"},
                          "202": {**_DJSON, "description": "some stored (FailedSOPSequence)"},
                          "409": {**_DJSON, "description": "none stored"},
                          "400": _ERR, "408": _ERR, "413": _ERR, "415": _ERR, "507": _ERR}}


_INST = f"{ROOT}/studies/{_S}/series/{_SE}/instances/{_I}"
_IDS = ("study", "series", "instance")
_FRAMES = {"name": "frames", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": r"^[0-9]{1,9}(,[0-9]{1,9}){0,99}$"}}
_TAG = {"name": "tag", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": r"^[0-9A-Fa-f]{8}$"}}
_VIEWPORT = {"name": "viewport", "in": "query", "required": False,
             "description": "width,height: the image is scaled to fit, keeping its aspect "
                            "(a thumbnail without it fits 128 x 128)",
             "schema": {"type": "string", "pattern": r"^[0-9]{1,4},[0-9]{1,4}$"}}
_DJSON_ONE = {"description": "DICOM JSON", "content": {DICOM_JSON: {"schema": {
    "type": "array", "items": {"type": "object"}}}}}

OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    f"{ROOT}/studies": {**_qido("studies"), "post": _stow()},
    f"{ROOT}/series": _qido("series"),
    f"{ROOT}/instances": _qido("instances"),
    f"{ROOT}/studies/{_S}": {
        "get": _get("WADO-RS: the study's instances, stored bytes unchanged", _MULTI,
                    "study"),
        "post": _stow("study")},
    f"{ROOT}/studies/{_S}/metadata": {"get": _get("WADO-RS: the study's metadata",
                                                  _DJSON_ONE, "study")},
    f"{ROOT}/studies/{_S}/series": _qido("series of a study", "study"),
    f"{ROOT}/studies/{_S}/instances": _qido("instances of a study", "study"),
    f"{ROOT}/studies/{_S}/series/{_SE}": {"get": _get(
        "WADO-RS: the series' instances, stored bytes unchanged", _MULTI, "study", "series")},
    f"{ROOT}/studies/{_S}/thumbnail": {"get": _get(
        "WADO-RS: a small PNG or JPEG standing for the study (the middle instance of its "
        "first series; 404 when nothing renders)", _IMAGE, "study", extra=(_VIEWPORT,))},
    f"{ROOT}/studies/{_S}/series/{_SE}/thumbnail": {"get": _get(
        "WADO-RS: a small PNG or JPEG standing for the series (its middle instance; 404 "
        "when nothing renders)", _IMAGE, "study", "series", extra=(_VIEWPORT,))},
    f"{ROOT}/studies/{_S}/series/{_SE}/metadata": {"get": _get(
        "WADO-RS: the series' metadata", _DJSON_ONE, "study", "series")},
    f"{ROOT}/studies/{_S}/series/{_SE}/instances": _qido("instances of a series", "study",
                                                         "series"),
    _INST: {"get": _get("WADO-RS: the instance, stored bytes unchanged", _MULTI, *_IDS)},
    f"{_INST}/metadata": {"get": _get("WADO-RS: the instance's metadata", _DJSON_ONE,
                                      *_IDS)},
    f"{_INST}/rendered": {"get": _get("WADO-RS: the first frame as PNG or JPEG", _IMAGE,
                                      *_IDS, extra=(_VIEWPORT,))},
    f"{_INST}/thumbnail": {"get": _get("WADO-RS: a small PNG or JPEG of the first frame",
                                       _IMAGE, *_IDS, extra=(_VIEWPORT,))},
    f"{_INST}/frames/{{frames}}": {"get": _get(
        "WADO-RS: frames (native: uncompressed; encapsulated: stored syntax, or "
        "uncompressed when lossless)", _MULTI, *_IDS, extra=(_FRAMES,))},
    f"{_INST}/frames/{{frames}}/rendered": {"get": _get(
        "WADO-RS: one frame as PNG or JPEG", _IMAGE, *_IDS, extra=(_FRAMES, _VIEWPORT))},
    f"{_INST}/bulk/{{tag}}": {"get": _get(
        "WADO-RS: a bulk data value of the instance (multipart/related; the bare value "
        "for Accept: application/octet-stream)",
        {"description": "the value", "content": {**_MULTI["content"], "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}, *_IDS, extra=(_TAG,))},
}
STOW_PATHS = {f"{ROOT}/studies", f"{ROOT}/studies/{_S}"}
