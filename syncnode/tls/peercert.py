"""Learning a peer's certificate from the network, to pin it for the node id an operator typed.

These connections are the one exception to chain verification: they exist to learn a peer's
certificate before it is pinned, compare it to the expected node id, and send no application
data.  TLS 1.3 still proves the peer holds the certificate's key.
"""

from __future__ import annotations

import ssl

from syncnode.nodeid import NodeId
from syncnode.protocol import InvalidPeerURL, parse_peer_url
from syncnode.tls.contexts import probe_ssl_context
from syncnode.tls.errors import (
    InvalidPeerAddress,
    NoPeerCertificate,
    PeerUnreachable,
    UntrustedPeer,
)
from syncnode.tls.identity import Identity

__all__ = ["fetch_peer_certificate", "host_port"]


def host_port(target: str | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` of a peer URL (``https://HOST:PORT``), ``HOST:PORT`` or pair."""
    if isinstance(target, tuple):
        host, port = target
        return host, int(port)
    try:
        address = parse_peer_url(target, allow_path=True)
    except InvalidPeerURL as exc:
        raise InvalidPeerAddress(str(exc)) from exc
    return address.host, address.port


async def fetch_peer_certificate(
    url_orhost_port: str | tuple[str, int],
    identity: Identity,
    expected: NodeId,
    timeout: float = 10.0,
) -> bytes:
    """Connect to a peer, return its certificate (DER) if its node id is ``expected``.

    The handshake presents our certificate and does not verify the server's chain (the point
    is to learn it); TLS 1.3 still proves the server holds the certificate's key.  The peer
    need not trust us yet: a TLS 1.3 server sends its certificate before judging ours.  No
    application data is sent; the connection is aborted right after the handshake.

    Raises :class:`UntrustedPeer` (with both ids) on mismatch, :class:`PeerUnreachable` when no
    TLS 1.3 handshake completes within ``timeout`` seconds, :class:`InvalidPeerAddress` for a
    malformed address.
    """
    import asyncio  # here: asyncio costs ~17 ms of every command's start-up

    host, port = host_port(url_orhost_port)
    ctx = probe_ssl_context(identity)
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                host, port, ssl=ctx, ssl_handshake_timeout=timeout
            )
    except TimeoutError as exc:
        raise PeerUnreachable(f"no TLS 1.3 handshake with {where} within {timeout:g}s") from exc
    except ssl.SSLError as exc:
        raise PeerUnreachable(
            f"TLS 1.3 handshake with {where} failed ({exc.reason or exc}); is it a syncnode "
            f"peer port?"
        ) from exc
    except OSError as exc:
        raise PeerUnreachable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.transport.abort()
    if not der:
        raise NoPeerCertificate(f"{where} completed a TLS handshake without a certificate")
    actual = NodeId.from_certificate_der(der)
    if actual != expected:
        raise UntrustedPeer(
            f"{where} presented node id {actual}, but {expected} was expected; not trusting "
            f"it. Check the id and the URL with the peer's operator",
            expected=expected,
            actual=actual,
        )
    return der
