"""Who may call the admin API, from where, and what every answer carries.

- **Credentials.** A request that reads or changes patient data carries an API key in the
  ``X-API-Key`` header, or the cookie of a dashboard session opened with one
  (``POST /api/v1/session``). Never a key in a URL: a query string ends up in logs and
  browser history, so one that looks like a key is refused. Loopback gets no exemption.
- **Roles** come from the OpenAPI document (``x-role`` of each operation: ``public``,
  ``read`` or ``admin``), so the document and the check cannot drift, and a route missing
  from it is refused, not served.
- **Host.** A request whose ``Host`` is not a name or address this node serves is refused
  (421): a page from another origin that re-points its own name at this address (DNS
  rebinding) reaches nothing. A port, when given, must be the listener's; a Host without
  one is judged by its name alone (see :func:`host_allowed`).
- **Headers.** Every answer, errors included, carries a strict Content-Security-Policy,
  ``X-Frame-Options: DENY``, ``nosniff``, ``Referrer-Policy: no-referrer`` and no CORS
  header: browsers let no other origin read an answer.
- **Sessions** live in memory only (a restart logs everybody out), expire, and a change made
  with a session cookie must also echo the session's CSRF token in ``X-CSRF-Token`` (a
  custom header no other origin can send without a CORS pre-flight, which is never
  granted).
"""

from __future__ import annotations

import ipaddress
import secrets
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SESSION_COOKIE = "syncnode_session"
SESSION_TTL = 12 * 3600.0  # seconds a dashboard session lasts at most
SESSION_IDLE = 3600.0  # ... and without any request
MAX_SESSIONS = 1000
WRONG_KEYS_PER_MINUTE = 10  # wrong keys one client address may try before it must wait
MAX_CLIENTS_TRACKED = 4096
KEY_HEADER = "X-API-Key"
CSRF_HEADER = "X-CSRF-Token"
# Query parameters that look like a credential: refused, never read.
KEY_PARAMS = frozenset({"api_key", "apikey", "key", "token", "x-api-key", "session"})
ROLES_ORDER = {"public": 0, "read": 1, "admin": 2}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'; object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def route_roles(openapi: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(METHOD, path template) -> role, read from the OpenAPI document."""
    roles = {}
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            role = op.get("x-role")
            if role not in ROLES_ORDER:
                raise ValueError(f"{method.upper()} {path}: x-role must be one of "
                                 f"{sorted(ROLES_ORDER)}")
            roles[(method.upper(), path)] = role
            if method == "get":
                roles[("HEAD", path)] = role
    return roles


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _bare(host: str) -> str:
    return host.strip().lower().strip("[]")


def served_names(bind_host: str, extra: list[str], *, interface_addresses: bool) -> set[str]:
    """Names and addresses a Host header may carry for an API bound to ``bind_host``."""
    names = {"localhost", "127.0.0.1", "::1", *(_bare(n) for n in extra)}
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(_bare(bind_host))
    elif interface_addresses:
        import ifaddr

        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
                names.add(_bare(str(addr)))
    return names


def host_allowed(header: str | None, names: set[str], port: int) -> bool:
    """Is ``Host: header`` one of ``names``, with this listener's port or none?

    The check that stops DNS rebinding is the *name*: a page from another origin that
    re-points its own name at this address still sends its own name, which is refused,
    whatever port it gives. The port adds nothing to that, so a Host without one is
    accepted when the name is served: some clients leave it out on any port
    (``dicomweb-client`` sends only the host name of its URL). A port that is given
    must be this listener's, as before.
    """
    if not header or len(header) > 300:
        return False
    text = header.strip().lower()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            return False
        port_text = rest[1:]
        if rest and not port_text:
            return False  # "[::1]:" names no port
    else:
        host, sep, port_text = text.rpartition(":") if ":" in text else (text, "", "")
        if sep and ":" in host:  # an IPv6 address without brackets is not a valid Host
            return False
        if sep and not port_text:
            return False
    if port_text and (not port_text.isdigit() or int(port_text) != port):
        return False
    return host.rstrip(".") in names


@dataclass(slots=True)
class Session:
    role: str
    fingerprint: str  # of the key that opened it (the actor in the audit trail)
    csrf: str
    created: float
    seen: float


class Sessions:
    """Dashboard sessions: an opaque random token in an HttpOnly cookie, held in memory."""

    def __init__(self, ttl: float = SESSION_TTL, idle: float = SESSION_IDLE) -> None:
        self.ttl, self.idle = ttl, idle
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def open(self, role: str, fingerprint: str) -> tuple[str, Session]:
        now = time.monotonic()
        token = secrets.token_urlsafe(32)
        session = Session(role, fingerprint, secrets.token_urlsafe(24), now, now)
        self._by_token[token] = session
        while len(self._by_token) > MAX_SESSIONS:
            self._by_token.popitem(last=False)
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.created > self.ttl or now - session.seen > self.idle:
            del self._by_token[token]
            return None
        session.seen = now
        return session

    def close(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)


class WrongKeyLimiter:
    """Wrong API keys per client address: at most :data:`WRONG_KEYS_PER_MINUTE` a minute
    (a token bucket refilled continuously), then the client is told to wait instead of
    each try being checked and written to the audit trail. Keys are 256-bit random, so
    this is not what keeps them secret: it keeps a guessing client from filling the audit
    trail and the disk. Bounded memory: the least recently seen addresses are forgotten.
    ``clock`` is injectable for tests."""

    def __init__(self, per_minute: int = WRONG_KEYS_PER_MINUTE,
                 clock: Any = time.monotonic) -> None:
        self.rate, self.burst, self.clock = per_minute / 60.0, float(per_minute), clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.refused = 0  # tries refused without checking, since start

    def _tokens(self, client: str) -> float:
        tokens, at = self._buckets.get(client, (self.burst, self.clock()))
        return min(self.burst, tokens + (self.clock() - at) * self.rate)

    def wait_for(self, client: str) -> float:
        """Seconds ``client`` must wait before its next key is checked (0: check it)."""
        tokens = self._tokens(client)
        if tokens >= 1.0:
            return 0.0
        self.refused += 1
        return (1.0 - tokens) / self.rate

    def failed(self, client: str) -> None:
        """``client`` sent a wrong key."""
        self._buckets[client] = (max(0.0, self._tokens(client) - 1.0), self.clock())
        self._buckets.move_to_end(client)
        while len(self._buckets) > MAX_CLIENTS_TRACKED:
            self._buckets.popitem(last=False)


class TLSSetupError(Exception):
    """The admin API's certificate or key cannot be loaded."""


def https_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Server context of the admin API over HTTPS: TLS 1.2+, no client certificate (the
    credential is the API key). Browsers and curl reach it with the node's certificate as
    the trust anchor (``curl --cacert node.crt``), or with the operator's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load the admin API certificate {cert} / key {key}: "
                            f"{exc}; fix api_tls_cert / api_tls_key in config.toml") from exc
    return ctx
