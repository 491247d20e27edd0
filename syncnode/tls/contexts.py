"""The TLS contexts of peer connections: the server's, the client's, and node-id checks.

Invariants
----------
* TLS 1.3 only, both directions; mutual authentication is mandatory (``CERT_REQUIRED``).  A
  client without a certificate, with an unknown one, or with one from another CA fails the
  handshake: the server never reads or writes a byte of application data for it.  The one
  exception is a handshake for the server name :data:`INTRODUCTION_NAME`, which the listener
  serves with :func:`introduction_ssl_context` (no client certificate asked): the peer
  server answers such a connection only with the outcome of an introduction
  (:mod:`syncnode.introduction`) - a pin of a certificate whose SHA-256 is a node id this node
  trusts - and closes it without a byte on anything else.
* Non-self-signed pins work too (the contexts set ``VERIFY_X509_PARTIAL_CHAIN``);
  certificates are checked with ``VERIFY_X509_STRICT``.
* Trust changes apply to the next handshake without restarting: the server context's
  ``sni_callback`` - which OpenSSL calls for every ClientHello, with or without SNI - swaps in a
  context built from the current trust list, rebuilt only when
  :meth:`~syncnode.tls.truststore.TrustStore.version` changes.  The context returned by
  :func:`server_ssl_context` itself trusts nothing, so if the callback were ever skipped every
  client would be refused (fail closed, never stale).
* The server issues no session tickets (``num_tickets = 0``): no session resumption, so each
  connection re-verifies the client certificate against the current trust list.
* A client that dials a node for an expected node id names that id as the TLS server name
  (:func:`server_name_for`).  A node that renewed its certificate (:mod:`syncnode.renewal`)
  serves its previous certificate, during the grace period, to a client that names the
  previous id, and its current certificate to everyone else.
* Hostnames are not checked: a peer's identity is its node id.  A client that dials a peer for
  an expected node id must check it (:func:`verify_peer`, or ``client_ssl_context(...,
  expected=ID)`` which checks inside the handshake, before any request can be sent).
* :func:`probe_ssl_context` is the one context that verifies nothing: it exists only to learn a
  peer's certificate (:mod:`syncnode.tls.peercert`) and never carries application data.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final

from syncnode.nodeid import NodeId
from syncnode.tls.errors import IdentityError, NoPeerCertificate, UntrustedPeer
from syncnode.tls.identity import Identity
from syncnode.tls.truststore import TrustStore, TrustVersion

__all__ = [
    "INTRODUCTION_NAME",
    "client_ssl_context",
    "handshake_refused",
    "introduction_ssl_context",
    "peer_node_id",
    "probe_ssl_context",
    "server_name_for",
    "server_ssl_context",
    "verify_peer",
]

logger = logging.getLogger(__name__)

# The TLS server name (SNI) a client sends to introduce itself (see syncnode.introduction).
# The listener picks introduction_ssl_context() for it before the handshake starts: whether a
# client certificate is requested is fixed when the TLS connection object is created, so the
# sni_callback (which swaps only the trust store) cannot decide it.
INTRODUCTION_NAME: Final = "introduce.syncnode"

# Who to tell when a server handshake is refused, set by the listener for each connection
# before it starts TLS: asyncio runs the handshake's callbacks in the context they were
# scheduled from, so the refusal is reported with that connection's address.  Unset, the
# refusal is logged without one.
handshake_refused: ContextVar[Callable[[str], None] | None] = ContextVar(
    "handshake_refused", default=None)

_VERIFY_FLAGS: Final = ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
_SERVER_NAME_SUFFIX: Final = ".node.syncnode"


def server_name_for(node_id: NodeId) -> str:
    """The TLS server name a client sends when it dials the node ``node_id``."""
    return node_id.compact.lower() + _SERVER_NAME_SUFFIX


class _NamedPeerContext(ssl.SSLContext):
    """A client context that always sends :attr:`peer_server_name` as the server name."""

    peer_server_name: str | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side,
                                self.peer_server_name or server_hostname, session)

    def wrap_socket(self, sock: Any, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect,
                                   suppress_ragged_eofs,
                                   self.peer_server_name or server_hostname, session)


def _new_context(identity: Identity, *, server: bool) -> ssl.SSLContext:
    ctx = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if server
           else _NamedPeerContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= _VERIFY_FLAGS
    if server:
        ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(
            f"cannot load node key/certificate from {identity.data_dir}: {exc}"
        ) from exc
    return ctx


def probe_ssl_context(identity: Identity) -> ssl.SSLContext:
    """Client context that presents our certificate and verifies nothing: only for learning a
    peer's certificate (then compared to a node id), never for application data."""
    ctx = _new_context(identity, server=False)
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_trust(ctx: ssl.SSLContext, trust: TrustStore) -> None:
    bundle = trust.verify_locations_pem()
    if bundle:
        ctx.load_verify_locations(cadata=bundle)
    else:
        # debug only: whether that refuses anyone is judged when a handshake is refused
        # (the node checks its trust list then), not when a context is built
        logger.debug(
            "no peer certificate is pinned in %s and no cluster CA is configured: a peer is "
            "admitted once its certificate is pinned (peer add, or its introduction with a "
            "node id this node trusts)",
            trust.data_dir,
        )


class _ServerContexts:
    """Builds the per-handshake server context; rebuilt when the trust list changes."""

    def __init__(self, identity: Identity, trust: TrustStore,
                 previous: Callable[[], Identity | None] | None = None) -> None:
        self.identity = identity
        self.trust = trust
        self.previous = previous  # the identity before a renewal, while its grace lasts
        self._lock = threading.Lock()
        self._version: TrustVersion | None = None
        self._ctx: ssl.SSLContext | None = None
        self._previous: tuple[str, ssl.SSLContext] | None = None
        self._previous_checked = -1.0

    def current(self, server_name: str | None = None) -> ssl.SSLContext:
        version = self.trust.version()
        with self._lock:
            if self._ctx is None or version != self._version:
                ctx = _new_context(self.identity, server=True)
                _load_trust(ctx, self.trust)
                self._ctx, self._version = ctx, version
                self._previous_checked = -1.0
                logger.debug("server TLS context rebuilt for trust version %r", version)
            if server_name is None or self.previous is None \
                    or not server_name.endswith(_SERVER_NAME_SUFFIX):
                return self._ctx
            now = time.monotonic()
            if now - self._previous_checked > 1.0:  # its grace period can end any time
                self._previous_checked = now
                old = self.previous()
                self._previous = None
                if old is not None:
                    ctx = _new_context(old, server=True)
                    _load_trust(ctx, self.trust)
                    self._previous = (server_name_for(old.node_id), ctx)
            if self._previous is not None and self._previous[0] == server_name:
                return self._previous[1]
            return self._ctx

    def sni_callback(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any
    ) -> int | None:
        # Called by OpenSSL for every ClientHello, also without SNI (server_name is None).
        try:
            ssl_object.context = self.current(server_name)
        except Exception:  # boundary: must turn into a TLS alert, never into trusting
            logger.exception("cannot build the TLS context from %s; refusing peer", self.trust)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None


class _AlertFlushingSSLObject(ssl.SSLObject):
    """Server-side SSLObject that lets the refused peer receive the TLS alert.

    CPython's asyncio (gh-98078, unfixed in 3.11) force-closes the transport on a handshake
    error without flushing the outgoing BIO, so the fatal alert OpenSSL wrote ("certificate
    required", "unknown ca", "protocol version") never reaches the peer, whose operator then
    sees only "connection closed".  On failure this records the error and reports "want read":
    per the memory-BIO contract the driver then flushes the pending output (the alert) and waits
    for input; the next call re-raises the recorded error.  The client answers the alert by
    closing (or by sending data), which ends the connection; asyncio's handshake timeout bounds
    the rest.  The handshake never succeeds after a failure, so no application data can flow.
    """

    _failed: ssl.SSLError | None = None
    trust: TrustStore | None = None  # set on the peer server's class: deny list and CRL

    def do_handshake(self) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._failed = exc
            _report_refusal(str(getattr(exc, "verify_message", None) or exc.reason or exc))
            raise ssl.SSLWantReadError("TLS handshake failed; flushing the alert") from exc
        # OpenSSL's chain check passed (a pin or the cluster CA); the deny list and the CA's
        # revocation list overrule both. Python cannot hook the verification itself, so the
        # connection is dropped here, before the server reads a byte of application data.
        der = self.getpeercert(binary_form=True) if self.trust is not None else None
        refusal = self.trust.refusal(der) if der and self.trust is not None else None
        if refusal is not None:
            _report_refusal(refusal)
            self._failed = ssl.SSLCertVerificationError(1, f"peer refused: {refusal}")
            raise self._failed


def _report_refusal(reason: str) -> None:
    report = handshake_refused.get()
    if report is not None:
        report(reason)
    else:
        logger.info("refused a TLS peer during the handshake: %s", reason)


def server_ssl_context(identity: Identity, trust: TrustStore,
                       previous: Callable[[], Identity | None] | None = None) -> ssl.SSLContext:
    """Context for the peer-facing HTTPS server: TLS 1.3, client certificate required.

    The returned context trusts nothing by itself; its ``sni_callback`` installs, for every
    handshake, a context built from the trust list as it is now.  Do not replace
    ``sni_callback``: wrap it if needed.  ``previous()``: the identity before a renewal
    while its grace period lasts (else None), served to clients that ask for its id.
    """
    contexts = _ServerContexts(identity, trust, previous)
    contexts.current()  # surface identity/trust problems at startup, not at first peer
    base = _new_context(identity, server=True)
    base.sni_callback = contexts.sni_callback
    base.sslobject_class = type("PeerServerSSLObject", (_AlertFlushingSSLObject,),
                                {"trust": trust})
    return base


def introduction_ssl_context(identity: Identity) -> ssl.SSLContext:
    """Server context for an introduction (server name :data:`INTRODUCTION_NAME`): our
    certificate, TLS 1.3, and no client certificate requested.  A connection made with it
    carries nothing but the introduction (see :mod:`syncnode.introduction`)."""
    ctx = _new_context(identity, server=True)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.sslobject_class = _AlertFlushingSSLObject
    return ctx


class _NodeIdCheckingSSLObject(ssl.SSLObject):
    expected_node_id: NodeId
    trust: TrustStore

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_server(self, self.expected_node_id, self.trust)


class _NodeIdCheckingSSLSocket(ssl.SSLSocket):
    expected_node_id: NodeId
    trust: TrustStore

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_server(self, self.expected_node_id, self.trust)


def _check_server(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: NodeId,
                  trust: TrustStore) -> None:
    actual = verify_peer(ssl_object, expected)
    refusal = trust.refusal(ssl_object.getpeercert(binary_form=True) or b"")
    if refusal is not None:
        raise UntrustedPeer(f"refusing peer {actual}: {refusal}", expected=expected,
                            actual=actual)


def client_ssl_context(
    identity: Identity, trust: TrustStore, expected: NodeId | None = None
) -> ssl.SSLContext:
    """Context for dialling peers: presents our certificate, verifies theirs.

    The server must be pinned or issued by the cluster CA; hostnames are not checked.  The
    context is a snapshot of the trust list: build a new one when ``trust.version()`` changes.

    With ``expected`` the context also checks, as the last step of every handshake, that the
    server's node id is ``expected`` and aborts the connection with :class:`UntrustedPeer`
    otherwise - before the caller can send anything.  Use one such context per peer (e.g.
    ``aiohttp.TCPConnector(ssl=ctx)``).  Without it, call :func:`verify_peer` yourself.
    """
    ctx = _new_context(identity, server=False)
    _load_trust(ctx, trust)
    if expected is not None:
        assert isinstance(ctx, _NamedPeerContext)
        ctx.peer_server_name = server_name_for(expected)
        attrs: dict[str, Any] = {"expected_node_id": expected, "trust": trust}
        ctx.sslobject_class = type("NodeIdCheckingSSLObject", (_NodeIdCheckingSSLObject,), attrs)
        ctx.sslsocket_class = type("NodeIdCheckingSSLSocket", (_NodeIdCheckingSSLSocket,), attrs)
    return ctx


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> NodeId:
    """Node id of the certificate the TLS peer presented."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise NoPeerCertificate(
            "the TLS peer presented no certificate (or the handshake is not complete)"
        )
    return NodeId.from_certificate_der(der)


def verify_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: NodeId) -> NodeId:
    """Check that the TLS peer is the node ``expected``; raise :class:`UntrustedPeer` if not."""
    actual = peer_node_id(ssl_object)
    if actual != expected:
        raise UntrustedPeer(
            f"the peer presented node id {actual}, but this connection was made for {expected}; "
            f"refusing to talk to it. If that peer legitimately changed identity, remove it and "
            f"add its new id",
            expected=expected,
            actual=actual,
        )
    return actual
