"""The admin HTTP API, the dashboard and the metrics of a running node.

Bound to 127.0.0.1 by default; off loopback only over HTTPS (see :func:`check_binding`).
Every route that reads or changes patient data needs a credential: an API key in
``X-API-Key`` (role ``read`` or ``admin``, see :mod:`syncnode.apikeys`) or a dashboard
session opened with one; changes need the admin role. ``/healthz``, ``/metrics`` (no
patient data in either), the OpenAPI document and the dashboard's own files are open. The
rules (Host check, roles read from the OpenAPI document, security headers, sessions) are
in :mod:`syncnode.admin.auth`. The OpenAPI 3 document served at ``/api/v1/openapi.json``
describes exactly these routes; a test checks the running server against it, every route
with every kind of credential.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..apikeys import KeyStore
from ..audit import AuditLog
from ..config import Settings
from ..dicomweb.routes import ROOT as DICOMWEB_ROOT
from ..dicomweb.routes import DicomWeb
from ..ids import check_uid
from ..service import Conflict, NodeService, NotFound, ServiceError, UsageError
from ..viewer import folder_of
from . import auth
from .feed import EventFeed
from .openapi import OPENAPI
from .viewer import VIEWER_CSP, ViewerSite

log = logging.getLogger("syncnode.admin")
ACTOR = web.RequestKey("actor", str)  # who: role, key or session, key fingerprint
ROLE = web.RequestKey("role", str)
SESSION = web.RequestKey("session", auth.Session)
_SELF = web.AppKey("admin_api", object)

MAX_PAGE = 1000
MAX_OFFSET = 10**12
LONG_POLL_MAX = 60.0
MAX_BODY = 1 << 20  # bytes in a request body (JSON objects of a few fields)
BODY_READ_TIMEOUT = 10.0  # seconds to receive a whole request body
_STATUS = {UsageError: 400, NotFound: 404, Conflict: 409}


class UnsafeBinding(Exception):
    """The admin API would serve patient data to the network unprotected."""


def check_binding(host: str, *, tls: bool, has_keys: bool) -> None:
    """Refuse to serve the admin API off loopback over plain HTTP or with no key."""
    if auth.is_loopback(host):
        return
    if not tls:
        raise UnsafeBinding(
            f"refusing to serve the admin API on {host} over plain HTTP: patient data and keys "
            "would cross the network in clear. Set api_tls = \"auto\" in config.toml (HTTPS "
            "with the node's own certificate; or give api_tls_cert and api_tls_key), or keep "
            "the API on 127.0.0.1 (--api-host 127.0.0.1)")
    if not has_keys:
        raise UnsafeBinding(
            f"refusing to serve the admin API on {host}: this node has no API key. Create "
            "them with `syncnode apikey rotate admin` and `syncnode apikey rotate read`")


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def _text(value: str | None, what: str) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > 64 or any(ord(c) < 0x20 for c in value):
        raise UsageError(f"invalid {what}")
    return value


def _int(query: Any, name: str, default: int) -> int:
    try:
        return int(query.get(name, str(default)))
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


class AdminAPI:
    """The HTTP front end of :class:`NodeService` (plus the event feed and metrics). It
    decides nothing the service decides: it parses, calls and renders."""

    body_timeout = BODY_READ_TIMEOUT  # tests shorten it on an instance

    def __init__(self, service: NodeService, feed: EventFeed,
                 audit: AuditLog | None = None) -> None:
        if service.runtime is None:
            raise TypeError("the admin API serves a running node: give the service a runtime")
        self.service = service
        self.runtime = service.runtime
        self.feed = feed
        self.audit = audit
        self.keys = KeyStore(service.node.data)
        self.sessions = auth.Sessions()
        self.wrong_keys = auth.WrongKeyLimiter()
        self.roles = auth.route_roles(OPENAPI)
        self.extra_names: set[str] = set()  # e.g. the certificate's name when serving HTTPS
        self._names: tuple[float, set[str]] = (0.0, set())
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Metrics(service))
        self.registry.register(_WrongKeyMetrics(self.wrong_keys))
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        self.app[_SELF] = self
        self.app.on_response_prepare.append(self._security_headers)
        self.viewer = ViewerSite(
            lambda: folder_of(service.node.data, self.runtime.settings.viewer_dir),
            f"syncnode {service.node_id}", self._signed_in)
        v = "/api/v1"
        self.app.add_routes(self.viewer.routes())
        self.app.add_routes([
            web.get("/", self.dashboard),
            web.get("/dashboard.js", self.asset),
            web.get("/dashboard.css", self.asset),
            web.post(f"{v}/session", self.open_session),
            web.get(f"{v}/session", self.whoami),
            web.delete(f"{v}/session", self.close_session),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get(f"{v}/", self.index),
            web.get(v, self.index),
            web.get(f"{v}/openapi.json", self.openapi),
            web.get(f"{v}/status", self.status),
            web.get(f"{v}/nodes", self.nodes),
            web.post(f"{v}/nodes", self.add_node),
            web.delete(f"{v}/nodes/{{node_id}}", self.remove_node),
            web.get(f"{v}/discovered", self.discovered),
            web.post(f"{v}/discovered/{{node_id}}/accept", self.accept_node),
            web.get(f"{v}/instances", self.instances),
            web.delete(f"{v}/instances/{{sop_uid}}", self.delete_instance),
            web.get(f"{v}/instances/{{sop_uid}}/file", self.instance_file),
            web.get(f"{v}/studies", self.studies),
            web.get(f"{v}/config", self.get_config),
            web.patch(f"{v}/config", self.patch_config),
            web.get(f"{v}/limits", self.limits),
            web.put(f"{v}/limits/{{scope}}", self.set_limit),
            web.delete(f"{v}/limits/{{scope}}", self.clear_limit),
            web.get(f"{v}/events", self.events),
        ])
        self.dicomweb = DicomWeb(service.node, self._audit, lambda r: r[ACTOR],
                                 self.runtime.local_change, lambda: self.runtime.settings)
        self.app.add_routes(self.dicomweb.routes())

    # -- plumbing ------------------------------------------------------------------------
    @staticmethod
    async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in auth.SECURITY_HEADERS.items():
            response.headers[name] = value
        if request.get(VIEWER_CSP):  # the viewer's own policy (syncnode.admin.viewer)
            response.headers["Content-Security-Policy"] = request[VIEWER_CSP]
            # Cross-origin isolation (with the COOP above): shared memory for the
            # viewer's volume rendering; everything it loads is same-origin anyway.
            response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        for name in [h for h in response.headers if h.lower().startswith("access-control-")]:
            del response.headers[name]
        origin = AdminAPI._cors_origin(request)
        if origin is not None:  # an origin the operator listed may read DICOMweb answers
            response.headers.update({
                "Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "Content-Type, Content-Length, Warning",
                "Cross-Origin-Resource-Policy": "cross-origin"})
            if request.method == "OPTIONS":
                response.headers.update({
                    "Access-Control-Allow-Methods": "GET, HEAD, POST",
                    "Access-Control-Allow-Headers": "X-API-Key, Accept, Content-Type",
                    "Access-Control-Max-Age": "600"})

    @staticmethod
    def _cors_origin(request: web.Request) -> str | None:
        """The request's Origin when it may read this DICOMweb answer (listed in
        ``dicomweb_cors_origins``), else None: no CORS header at all."""
        origin = request.headers.get("Origin")
        if not origin or not request.path.startswith(DICOMWEB_ROOT + "/"):
            return None
        api = request.app.get(_SELF)
        allowed = api.runtime.settings.dicomweb_cors_origins if api is not None else []
        return origin if origin.lower() in allowed else None

    @staticmethod
    def _preflight(request: web.Request) -> web.Response:
        """A CORS pre-flight for DICOMweb: granted to listed origins only."""
        origin = AdminAPI._cors_origin(request)
        if origin is None:
            return _error(403, "this origin may not call DICOMweb here; the operator lists "
                               "allowed origins in dicomweb_cors_origins")
        return web.Response(status=204)  # its headers: _security_headers

    def _served_names(self) -> set[str]:
        """Host names this listener answers to; interface addresses re-read every minute."""
        at, names = self._names
        if time.monotonic() - at > 60:
            settings = self.runtime.settings
            names = auth.served_names(settings.api_host, settings.api_names,
                                      interface_addresses=True) | self.extra_names
            self._names = (time.monotonic(), names)
        return names | {n.lower() for n in self.runtime.settings.api_names}

    def _host_ok(self, request: web.Request) -> bool:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        port = sock[1] if sock else 0
        return auth.host_allowed(request.headers.get("Host"), self._served_names(), port)

    def _key_role(self, key: str) -> str | None:
        role = self.keys.role_of(key)
        legacy = self.runtime.settings.api_key  # an admin key given in clear (environment)
        if role is None and legacy and hmac.compare_digest(key.encode(), legacy.encode()):
            role = "admin"
        return role

    def _session(self, request: web.Request) -> auth.Session | None:
        session = self.sessions.get(request.cookies.get(auth.SESSION_COOKIE))
        if session is None:
            return None
        current = {k.role: k.fingerprint for k in self.keys.info()}
        if current.get(session.role) != session.fingerprint and session.fingerprint != "env":
            self.sessions.close(request.cookies.get(auth.SESSION_COOKIE))
            return None  # its key was rotated: the session ends with it
        return session

    def _signed_in(self, request: web.Request) -> bool:
        """A read or admin credential: a live session, or a key in the header."""
        given = request.headers.get(auth.KEY_HEADER, "")
        return self._session(request) is not None or bool(given and self._key_role(given))

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        if not self._host_ok(request):
            return _error(421, "this node does not serve that host name; use the address "
                               "it listens on (or add the name to api_names)")
        if request.method == "OPTIONS" and request.path.startswith(DICOMWEB_ROOT + "/"):
            return self._preflight(request)
        if auth.KEY_PARAMS & {k.lower() for k in request.query}:
            return _error(400, "never put a key in a URL: send it in the X-API-Key header")
        route = request.match_info.route
        template = route.resource.canonical if route.resource is not None else None
        if template is None:  # no such route: the router's own 404 / 405
            return await handler(request)
        needed = self.roles.get((request.method, template))
        if needed is None:
            return _error(403, f"{request.method} {template} is not in the API description: "
                               "refused")
        if needed != "public":
            given = request.headers.get(auth.KEY_HEADER, "")
            if given:
                role = self._checked_key_role(request, given, f"{request.method} {template}")
                if isinstance(role, web.Response):
                    return role
                request[ACTOR] = f"{role}-key:{self.keys.fingerprint(given)}"
            else:
                session = self._session(request)
                if session is None:
                    return _error(401, "this needs an API key in the X-API-Key header (or a "
                                       "dashboard session opened with one)")
                if request.method not in ("GET", "HEAD") and not hmac.compare_digest(
                        request.headers.get(auth.CSRF_HEADER, "").encode(),
                        session.csrf.encode()):
                    return _error(403, "a change made with a session needs its token in "
                                       "X-CSRF-Token")
                role = session.role
                request[ACTOR] = f"{role}-session:{session.fingerprint}"
                request[SESSION] = session
            request[ROLE] = role
            if auth.ROLES_ORDER[role] < auth.ROLES_ORDER[needed]:
                return _error(403, f"this needs the {needed} key; the {role} key may only read")
        try:
            return await handler(request)
        except ServiceError as exc:
            return _error(_STATUS.get(type(exc), 400), str(exc))

    def _checked_key_role(self, request: web.Request, given: str, subject: str
                          ) -> str | web.Response:
        """The role of the key ``given``, or the answer to a wrong one: 403 (audited), or
        429 without checking once its address sent too many wrong keys (not audited one
        by one: the count is in /metrics)."""
        client = request.remote or "unknown"
        wait = self.wrong_keys.wait_for(client)
        if wait > 0:
            resp = _error(429, f"too many wrong API keys from this address: try again in "
                               f"{wait:.0f} s")
            resp.headers["Retry-After"] = str(max(1, round(wait)))
            return resp
        role = self._key_role(given)
        if role is None:
            self.wrong_keys.failed(client)
            self._audit("login", f"unknown-key:{self.keys.fingerprint(given)}", "failure",
                        reason="wrong key", subject=subject)
            return _error(403, "wrong API key")
        return role

    def _audit(self, action: str, actor: str, outcome: str, **details: Any) -> None:
        """The one place where the admin API reports what was done by whom: an entry of
        the node's audit trail (queued, never blocks), actor ``api:<role>-<key or
        session>:<key fingerprint>``. UIDs, ids and hashes only: never patient data."""
        if self.audit is not None:
            self.audit.record(action, f"api:{actor}", outcome, **details)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await request.json()
        except TimeoutError as exc:
            late = web.HTTPRequestTimeout(
                text=json.dumps({"error": "request body not received in time"}),
                content_type="application/json")
            late.force_close()  # the rest of the body is not waited for
            raise late from exc
        except json.JSONDecodeError as exc:
            raise UsageError(f"body is not JSON: {exc.msg}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"body is not UTF-8 text: {exc.reason}") from exc
        if not isinstance(body, dict):
            raise UsageError("body must be a JSON object")
        return body

    # -- pages ---------------------------------------------------------------------------
    async def dashboard(self, request: web.Request) -> web.Response:
        html = resources.files("syncnode.admin").joinpath("static/index.html").read_text()
        return web.Response(text=html, content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        text = resources.files("syncnode.admin").joinpath(f"static/{name}").read_text()
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(text=text, content_type=kind, headers={"Cache-Control": "no-store"})

    async def open_session(self, request: web.Request) -> web.Response:
        given = request.headers.get(auth.KEY_HEADER, "")
        if not given:
            self._audit("login", "anonymous", "failure", reason="no key")
            return _error(401, "send the API key in the X-API-Key header to open a session")
        role = self._checked_key_role(request, given, "open a session")
        if isinstance(role, web.Response):
            return role
        actor = f"{role}-key:{self.keys.fingerprint(given)}"
        fingerprint = (self.keys.fingerprint(given) if self.keys.role_of(given) else "env")
        token, session = self.sessions.open(role, fingerprint)
        self._audit("login", actor, "success")
        resp = web.json_response({"role": role, "csrf": session.csrf}, status=201)
        resp.set_cookie(auth.SESSION_COOKIE, token, httponly=True, samesite="Strict",
                        secure=request.secure, path="/", max_age=int(auth.SESSION_TTL))
        return resp

    async def whoami(self, request: web.Request) -> web.Response:
        session = request.get(SESSION)
        body: dict[str, Any] = {"role": request[ROLE], "actor": request[ACTOR]}
        if session is not None:
            body["csrf"] = session.csrf
        return web.json_response(body)

    async def close_session(self, request: web.Request) -> web.Response:
        self.sessions.close(request.cookies.get(auth.SESSION_COOKIE))
        resp = web.json_response({"closed": request.get(SESSION) is not None})
        resp.del_cookie(auth.SESSION_COOKIE, path="/")
        return resp

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node_id": str(self.service.node_id)})

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._run(generate_latest, self.registry)
        return web.Response(body=body, headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def index(self, request: web.Request) -> web.Response:
        """What ``/api/v1/`` offers (read from the OpenAPI document: never out of date)."""
        routes = [{"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                   "role": op.get("x-role")}
                  for path, ops in OPENAPI["paths"].items() for method, op in ops.items()]
        return web.json_response({
            "api": "syncnode admin API v1", "openapi": "/api/v1/openapi.json",
            "auth": f"send a key in {auth.KEY_HEADER} (read-only or admin role), or open a "
                    "dashboard session: POST /api/v1/session",
            "routes": routes})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    # -- resources -----------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.service.status))

    async def nodes(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.service.peers))

    async def add_node(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            added = await self.service.add_peer(body.get("node_id", ""), body.get("url", ""),
                                                body.get("push", "auto"))
        except ServiceError as exc:
            self._audit("trust-add", request[ACTOR], "failure", reason=type(exc).__name__)
            raise
        self._audit("trust-add", request[ACTOR], "success", subject=added.node_id.compact)
        return web.json_response(added.to_dict(), status=201)

    async def remove_node(self, request: web.Request) -> web.Response:
        try:
            peer = await self._run(self.service.remove_peer, request.match_info["node_id"])
        except ServiceError as exc:
            self._audit("trust-remove", request[ACTOR], "failure", reason=type(exc).__name__)
            raise
        self._audit("trust-remove", request[ACTOR], "success", subject=peer.compact)
        return web.json_response({"removed": str(peer)})

    async def discovered(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.service.discovered))

    async def accept_node(self, request: web.Request) -> web.Response:
        try:
            added = await self.service.accept_peer(request.match_info["node_id"])
        except ServiceError as exc:
            self._audit("trust-accept", request[ACTOR], "failure", reason=type(exc).__name__)
            raise
        self._audit("trust-accept", request[ACTOR], "success", subject=added.node_id.compact)
        return web.json_response(added.to_dict(), status=201)

    async def instances(self, request: web.Request) -> web.Response:
        q = request.query
        known = {"study", "series", "patient_id", "modality", "date_from", "date_to",
                 "limit", "offset"}
        unknown = set(q) - known
        if unknown:
            return _error(400, f"unknown filter(s) {sorted(unknown)}; known: {sorted(known)}")
        limit = _int(q, "limit", 100)
        offset = _int(q, "offset", 0)
        if not 0 < limit <= MAX_PAGE or not 0 <= offset <= MAX_OFFSET:
            return _error(400, f"limit is 1..{MAX_PAGE}, offset 0..{MAX_OFFSET}")
        for d in ("date_from", "date_to"):
            if q.get(d) and not (len(q[d]) == 8 and q[d].isdigit()):
                return _error(400, f"{d} must be YYYYMMDD")
        try:
            filters = {
                "study": check_uid(q["study"], "study") if q.get("study") else None,
                "series": check_uid(q["series"], "series") if q.get("series") else None,
            }
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        filters.update({
            "patient_id": _text(q.get("patient_id"), "patient_id"),
            "modality": _text(q.get("modality"), "modality"),
            "date_from": q.get("date_from") or None, "date_to": q.get("date_to") or None,
        })
        rows = await self._run(lambda: self.service.instances(
            **filters, limit=limit + 1, offset=offset))
        return web.json_response({"instances": [r.to_dict() for r in rows[:limit]],
                                  "offset": offset, "limit": limit,
                                  "more": len(rows) > limit})

    async def delete_instance(self, request: web.Request) -> web.Response:
        try:
            result = await self._run(functools.partial(
                self.service.delete, [request.match_info["sop_uid"]],
                reason=request.query.get("reason")))
        except ServiceError as exc:
            self._audit("deleted", request[ACTOR], "failure", reason=type(exc).__name__)
            raise
        self._audit("deleted", request[ACTOR], "success", instances=len(result.inserted),
                    sops=[request.match_info["sop_uid"]])
        return web.json_response({"tombstones": result.inserted,
                                  "freed_blobs": sorted(result.freed_blobs)})

    async def instance_file(self, request: web.Request) -> web.StreamResponse:
        inst = await self._run(self.service.instance, request.match_info["sop_uid"])
        sop = inst.sop_instance_uid
        self._audit("downloaded", request[ACTOR], "success", sops=[sop], blobs=[inst.blob],
                    bytes=inst.size)
        resp = web.StreamResponse(headers={
            "Content-Type": "application/dicom", "Content-Length": str(inst.size),
            "Content-Disposition": f'attachment; filename="{sop}.dcm"', "ETag": inst.blob})
        pieces = self.service.read_file(inst)
        loop = asyncio.get_running_loop()
        await resp.prepare(request)
        while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def studies(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.service.studies))

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.config())

    async def patch_config(self, request: web.Request) -> web.Response:
        changes = await self._body(request)
        # Only names of real settings reach the trail (a refused request may name anything).
        known = sorted(k for k in changes if k in Settings.model_fields)
        named = {"subject": ",".join(known)[:300]} if known else {}
        try:
            result = await self._run(self.service.patch_config, changes)
        except ServiceError:
            self._audit("config-changed", request[ACTOR], "failure", count=len(changes),
                        **named)
            raise
        self._audit("config-changed", request[ACTOR], "success", count=len(changes), **named)
        return web.json_response(result)

    async def limits(self, request: web.Request) -> web.Response:
        return web.json_response(await self._run(self.service.limits))

    async def set_limit(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return await self._change_limit(request, self.service.set_limit,
                                        request.match_info["scope"], body.get("schedule", ""))

    async def clear_limit(self, request: web.Request) -> web.Response:
        return await self._change_limit(request, self.service.clear_limit,
                                        request.match_info["scope"])

    async def _change_limit(self, request: web.Request, fn: Callable[..., Any],
                            *args: Any) -> web.Response:
        """A bandwidth cap changed: a settings change, audited as such."""
        try:
            result = await self._run(fn, *args)
        except ServiceError:
            self._audit("config-changed", request[ACTOR], "failure", count=1,
                        subject="bandwidth_caps")
            raise
        self._audit("config-changed", request[ACTOR], "success", count=1,
                    subject="bandwidth_caps")
        return web.json_response(result)

    async def events(self, request: web.Request) -> web.Response:
        since = _int(request.query, "since", 0)
        try:
            timeout = float(request.query.get("timeout", "0"))
        except ValueError as exc:
            raise UsageError(f"timeout: {exc}") from None
        if since < 0 or not 0 <= timeout <= LONG_POLL_MAX:
            return _error(400, f"since >= 0, timeout 0..{LONG_POLL_MAX:g}")
        items, reset = await self.feed.wait(since, timeout)
        return web.json_response({"events": items, "last_id": self.feed.last_id,
                                  "reset": reset})


class _WrongKeyMetrics:
    """Prometheus collector: requests refused for too many wrong API keys."""

    def __init__(self, limiter: auth.WrongKeyLimiter) -> None:
        self.limiter = limiter

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        c = CounterMetricFamily("syncnode_api_wrong_key_refusals", "requests answered 429 "
                                "because their address sent too many wrong API keys")
        c.add_metric([], self.limiter.refused)
        yield c


class _Metrics:
    """Prometheus collector reading the node's state at scrape time."""

    def __init__(self, service: NodeService) -> None:
        self.service = service

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        counts = self.service.node.catalog.counts()
        for key, help_text in (("instances", "live instances"), ("studies", "live studies"),
                               ("events", "catalog events"), ("blobs", "stored blobs"),
                               ("blob_bytes", "bytes of stored blobs")):
            g = GaugeMetricFamily(f"syncnode_{key}", help_text)
            g.add_metric([], counts[key])
            yield g
        peers = self.service.peers()
        runtime = self.service.runtime
        labels = ["peer"]
        b_in = CounterMetricFamily("syncnode_peer_bytes_received", "blob bytes pulled or "
                                   "received from a peer", labels=labels)
        b_out = CounterMetricFamily("syncnode_peer_bytes_sent", "blob bytes sent to a peer",
                                    labels=labels)
        errs = CounterMetricFamily("syncnode_peer_integrity_errors",
                                   "chunks or events from a peer that failed verification",
                                   labels=labels)
        in_sync = GaugeMetricFamily("syncnode_peer_in_sync", "1 if the Merkle roots matched "
                                    "at the last round", labels=labels)
        lag_b = GaugeMetricFamily("syncnode_peer_bytes_needed", "bytes still to pull from a "
                                  "peer", labels=labels)
        lag_s = GaugeMetricFamily("syncnode_peer_seconds_since_sync", "seconds since the "
                                  "last round that ended in sync", labels=labels)
        now = time.time()
        for p in peers:
            lab = [p["node_id"]]
            # the recorded totals (pulls, pushes and what the peer server moved): the
            # numbers `syncnode status` shows
            b_in.add_metric(lab, p.get("bytes_received", 0))
            b_out.add_metric(lab, p.get("bytes_sent", 0))
            errs.add_metric(lab, p.get("integrity_errors", 0))
            in_sync.add_metric(lab, 1 if p.get("in_sync") else 0)
            lag_b.add_metric(lab, p.get("bytes_needed", 0))
            last = p.get("last_success") or 0
            lag_s.add_metric(lab, now - last if last else float("inf"))
        yield from (b_in, b_out, errs, in_sync, lag_b, lag_s)
        extra = runtime.extra_status() if runtime is not None else {}
        yield from _dicom_metrics(extra.get("dicom"))
        yield from _verify_metrics(self.service.status_verify())
        for name, value in (runtime.extra_metrics() if runtime is not None else {}).items():
            g = GaugeMetricFamily(f"syncnode_{name}", name.replace("_", " "))
            g.add_metric([], value)
            yield g


def _dicom_metrics(dicom: dict[str, Any] | None) -> Any:
    """The DICOM bridge's series: SCP associations and instances by outcome, the export
    outbox by destination and state, import-from polls, instances and errors by source."""
    if not dicom:
        return
    assocs = CounterMetricFamily("syncnode_dicom_associations", "DICOM associations "
                                 "requested of the SCP, by outcome", labels=["outcome"])
    assocs.add_metric(["accepted"], dicom.get("associations", 0)
                      - dicom.get("rejected_associations", 0))
    assocs.add_metric(["rejected"], dicom.get("rejected_associations", 0))
    yield assocs
    received = CounterMetricFamily("syncnode_dicom_instances_received", "C-STORE requests "
                                   "answered by the SCP, by status", labels=["status"])
    for label, key in (("stored", "stored"), ("duplicate", "duplicates"),
                       ("failed", "failed")):
        received.add_metric([label], dicom.get(key, 0))
    yield received
    outbox = GaugeMetricFamily("syncnode_export_outbox", "instances in the export outbox, "
                               "by destination and state (sent = delivered)",
                               labels=["destination", "state"])
    for dest, st in (dicom.get("export") or {}).items():
        for label, key in (("pending", "pending"), ("failed", "failed"), ("sent", "done"),
                           ("skipped", "skipped")):
            outbox.add_metric([dest, label], st.get(key, 0))
    yield outbox
    notes = GaugeMetricFamily("syncnode_export_rejection_notes", "rejection notes telling "
                              "the export PACS about deletes, by destination and state "
                              "(sent = delivered)", labels=["destination", "state"])
    for dest, st in (dicom.get("export") or {}).items():
        rn = st.get("rejection_notes") or {}
        for label, key in (("pending", "pending"), ("failed", "failed"), ("sent", "done"),
                           ("skipped", "skipped"), ("committed", "committed")):
            notes.add_metric([dest, label], rn.get(key, 0))
    yield notes
    runs = CounterMetricFamily("syncnode_import_runs", "import-from polls of a PACS",
                               labels=["source"])
    errors = CounterMetricFamily("syncnode_import_errors", "import-from polls that failed",
                                 labels=["source"])
    got = CounterMetricFamily("syncnode_import_instances", "instances retrieved by "
                              "import-from", labels=["source"])
    for source, st in (dicom.get("import_from") or {}).items():
        runs.add_metric([source], st.get("runs", 0))
        errors.add_metric([source], st.get("errors", 0))
        got.add_metric([source], st.get("instances_retrieved", 0))
    yield from (runs, errors, got)


def _verify_metrics(last: dict[str, Any] | None) -> Any:
    """The last verify (background or CLI): when it finished and what it found."""
    if not last:
        return
    for name, key, help_text in (
            ("verify_last_finished_seconds", "finished", "unix time the last verify ended"),
            ("verify_blobs_checked", "blobs_checked", "blobs the last verify checked"),
            ("verify_problems", "problems", "damaged or missing blobs the last verify found")):
        g = GaugeMetricFamily(f"syncnode_{name}", help_text)
        g.add_metric([], float(last.get(key) or 0))
        yield g
