"""Introduction: how a peer trusted by its node id alone gets its certificate pinned.

An operator trusts a peer by its node id (``syncnode peer add ID URL``).  When this node can
dial the peer, it fetches and pins the peer's certificate itself
(:func:`syncnode.tls.peercert.fetch_peer_certificate`).  When it cannot (the peer is behind NAT,
its URL points nowhere), the peer's first mutual-TLS connection would be refused: its
certificate is not pinned.  So the dialling peer, when refused, *introduces* itself:

1. It opens a TLS 1.3 connection with the server name :data:`INTRODUCTION_NAME`.  The peer
   port's listener reads the ClientHello before starting TLS (:mod:`syncnode.listeners`) and,
   for that name only, uses a context that asks for no client certificate; every other
   handshake still requires one.  (Python's ``ssl`` cannot let an unknown certificate through
   a handshake that requests one - a failed verification always aborts it - and whether one
   is requested is fixed before any ``sni_callback`` runs.)  The client checks that the
   server's certificate has the node id it dialled before it sends anything.
2. It sends ``POST /peer/v1/introduce`` with its own certificate (PEM), nothing else.
3. The server computes the SHA-256 of that certificate.  If it is a node id this node trusts
   (one the operator added: a peer of the catalog) and has not pinned yet, the server pins
   the certificate (exactly what ``peer add --cert`` does) and answers ``204``; if it is
   already pinned, also ``204``.  Anything else - an id nobody trusted, another path, a body
   that is not one certificate - is answered by closing the connection without a byte.  Pins
   and refusals are logged with the node id and address and written to the audit trail.
4. The client dials again with mutual TLS.  The handshake now verifies its certificate, and
   TLS 1.3's CertificateVerify proves it holds the certificate's key before any application
   data flows.

A node that renewed its certificate (:mod:`syncnode.renewal`) introduces its new
certificate followed by its successor statement (a ``SYNCNODE SUCCESSOR`` PEM block): the
server adopts it if the statement's old id is one it trusts and the old key signed it
(``on_successor``, which pins the new certificate and moves the peer's entry to it).

Why this is safe: the node id is the SHA-256 of the certificate, so the id an operator typed
commits to exactly one certificate; who carried the certificate to us does not matter.
Pinning it grants nothing by itself - the peer still has to prove possession of the key in
the next handshake.  An introduction connection carries only the introduction: the peer
server's guard sends every other request on a connection without a client certificate the
same silent close.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Collection
from typing import Final

from aiohttp import web

from . import protocol
from .audit import AuditLog, peer_actor
from .nodeid import NodeId
from .tls.certificates import coerce_der
from .tls.contexts import INTRODUCTION_NAME, probe_ssl_context, verify_peer
from .tls.errors import CertificateRejected, NodeTLSError, PeerUnreachable, UntrustedPeer
from .tls.identity import Identity
from .tls.peercert import host_port
from .tls.successor import Successor
from .tls.truststore import TrustStore

__all__ = [
    "INTRODUCTION_NAME",
    "INTRODUCTION_PATH",
    "IntroductionRefused",
    "introduce",
    "refused_our_certificate",
    "serve_introduction",
]

log = logging.getLogger("syncnode.introduction")

INTRODUCTION_PATH: Final = f"{protocol.PREFIX}/introduce"
MAX_CERTIFICATE_BYTES: Final = 16 * 1024  # a node certificate is < 1 KiB as PEM
BODY_TIMEOUT: Final = 10.0

# What a TLS client reads when the server refused its certificate during the handshake.
_REFUSAL_REASONS: Final = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
})


class IntroductionRefused(NodeTLSError):
    """The peer closed our introduction without answering: it does not trust our node id."""


# -- client side -------------------------------------------------------------------------


def refused_our_certificate(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is the TLS alert a server sends when it
    does not know our certificate: the sign that an introduction may help."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "reason", None)  # an SSLError made by hand may lack it
        if isinstance(current, ssl.SSLError) and reason in _REFUSAL_REASONS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _refused(expected: NodeId, identity: Identity, where: str) -> IntroductionRefused:
    return IntroductionRefused(
        f"peer {expected} at {where} does not trust this node: it refused our certificate and "
        f"closed our introduction. Its operator must trust our node id: syncnode peer add "
        f"{identity.node_id} URL-OF-THIS-NODE (any URL will do if it cannot reach us)")


async def introduce(url: str, identity: Identity, expected: NodeId,
                    timeout: float = 10.0, successor: Successor | None = None) -> None:
    """Present our certificate to the peer ``expected`` at ``url`` so that it can pin it.

    Returns when the peer answered that it knows our certificate now.  Raises
    :class:`IntroductionRefused` when it closed the connection instead (it does not trust our
    id), :class:`~syncnode.tls.errors.UntrustedPeer` when the server at ``url`` is not
    ``expected`` (nothing is sent to it then), :class:`~syncnode.tls.errors.PeerUnreachable`
    when no TLS connection can be made or no answer comes within ``timeout`` seconds.
    ``successor``: this node's successor statement, sent after its certificate.
    """
    host, port = host_port(url)
    where = f"{host}:{port}"
    body = identity.cert_pem + (successor.to_pem() if successor is not None else b"")
    head = (f"POST {INTRODUCTION_PATH} HTTP/1.1\r\nHost: {INTRODUCTION_NAME}\r\n"
            f"Content-Type: application/pem-certificate-chain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=probe_ssl_context(identity), server_hostname=INTRODUCTION_NAME,
                ssl_handshake_timeout=timeout)
    except TimeoutError as exc:
        raise PeerUnreachable(f"no TLS 1.3 handshake with {where} within {timeout:g}s") from exc
    except ssl.SSLError as exc:
        raise PeerUnreachable(f"TLS 1.3 handshake with {where} failed ({exc.reason or exc})") \
            from exc
    except OSError as exc:
        raise PeerUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    try:
        verify_peer(writer.get_extra_info("ssl_object"), expected)  # before sending anything
    except UntrustedPeer:
        writer.transport.abort()
        raise
    try:
        writer.write(head + body)
        async with asyncio.timeout(timeout):
            await writer.drain()
            status_line = await reader.readline()
    except TimeoutError as exc:
        raise PeerUnreachable(f"introduction to {where}: no answer within {timeout:g}s") from exc
    except (ssl.SSLError, OSError) as exc:  # closed or reset instead of an answer
        raise _refused(expected, identity, where) from exc
    finally:
        writer.transport.abort()
    parts = status_line.split()
    if not parts:
        raise _refused(expected, identity, where)
    if len(parts) < 2 or parts[1] != b"204":
        raise PeerUnreachable(f"introduction to {where}: unexpected answer "
                              f"{status_line[:80]!r}; is it a syncnode peer port?")
    log.info("introduced this node to peer %s at %s", expected.short, where)


# -- server side -------------------------------------------------------------------------


def _address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def _refuse(request: web.Request, audit: AuditLog | None, node_id: NodeId | None,
            why: str, reason: str) -> web.StreamResponse:
    """Close the connection without sending a byte; log and audit who was refused, from
    where, and why (``reason``: the short form for the audit trail)."""
    address = _address(request)
    who = f"node {node_id}" if node_id else "a client without a certificate"
    log.warning("refused %s from %s: %s", who, address, why)
    if audit is not None:
        audit.record("connection-refused", peer_actor(node_id.compact if node_id else "?"),
                     "failure", remote=address, reason=f"introduction: {reason}")
    request.protocol.force_close()  # the response below is never written
    return web.Response(status=403)


def _admit(trust: TrustStore, trusted_ids: Callable[[], Collection[str]], der: bytes,
           node_id: NodeId, successor: Successor | None = None,
           on_successor: Callable[[Successor], object] | None = None) -> str | None:
    """Pin ``der`` if ``node_id`` is trusted and not pinned yet: "pinned", "known" (already
    pinned), "renewed" (its successor statement from a trusted id was adopted) or None (not
    trusted).  Blocking (file system, catalog): run off the loop."""
    if trust.certificate(node_id) == der:
        return "known"
    trusted = trusted_ids()
    if node_id.compact in trusted:
        trust.pin(der, node_id)
        return "pinned"
    if successor is not None and on_successor is not None and successor.new == node_id \
            and successor.cert_der == der and successor.old.compact in trusted:
        on_successor(successor)  # raises SuccessorRejected if its old key did not sign it
        return "renewed"
    return None


async def serve_introduction(request: web.Request, trust: TrustStore,
                             trusted_ids: Callable[[], Collection[str]],
                             audit: AuditLog | None = None,
                             on_successor: Callable[[Successor], object] | None = None
                             ) -> web.StreamResponse:
    """Answer a request that arrived on a connection without a client certificate.

    ``trusted_ids()`` gives the compact node ids the operator trusts (blocking; it is called
    in a worker thread).  Only an introduction whose certificate hashes to one of them is
    answered (``204``, after pinning); everything else is a silent close (see the module doc).
    Pins and refusals are logged and, with ``audit``, written to the audit trail.
    """
    if request.method != "POST" or request.path != INTRODUCTION_PATH:
        return _refuse(request, audit, None, f"{request.method} {request.path[:80]} needs "
                       "mutual TLS with a trusted certificate", "not an introduction")
    length = request.content_length
    if length is None or not 0 < length <= MAX_CERTIFICATE_BYTES:
        return _refuse(request, audit, None, f"an introduction must carry one certificate of "
                       f"at most {MAX_CERTIFICATE_BYTES} bytes", "no certificate-sized body")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await request.content.readexactly(length)
        der = coerce_der(body)
        successor = Successor.from_pem(body)
    except (TimeoutError, asyncio.IncompleteReadError):
        return _refuse(request, audit, None, "its introduction did not arrive in time",
                       "body not received in time")
    except CertificateRejected as exc:
        return _refuse(request, audit, None, f"its introduction is not a certificate: {exc}",
                       "not a certificate")
    node_id = NodeId.from_certificate_der(der)
    try:
        outcome = await asyncio.get_running_loop().run_in_executor(
            None, _admit, trust, trusted_ids, der, node_id, successor, on_successor)
    except NodeTLSError as exc:  # e.g. a CA or an expired certificate for a trusted id
        return _refuse(request, audit, node_id, f"its certificate cannot be pinned: {exc}",
                       "certificate cannot be pinned")
    if outcome is None:
        return _refuse(request, audit, node_id, f"its node id is not trusted here. To trust "
                       f"it: syncnode peer add {node_id} URL", "node id not trusted")
    if outcome == "renewed" and successor is not None:
        address = _address(request)
        log.info("peer %s renewed its certificate: now %s (introduced from %s)",
                 successor.old, node_id, address)
        if audit is not None:
            audit.record("trust-add", "node", subject=node_id.compact, remote=address,
                         reason=f"renewal: successor of {successor.old.compact}, signed by "
                                f"its key")
    if outcome == "pinned":
        address = _address(request)
        log.info("pinned the certificate of peer %s, introduced from %s", node_id, address)
        if audit is not None:
            audit.record("trust-add", "node", subject=node_id.compact, remote=address,
                         reason="introduction: its certificate hashes to a trusted node id")
    return web.Response(status=204, headers={"Connection": "close"})
