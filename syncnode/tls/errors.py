"""The errors of node identity, trust and TLS: one base class, :class:`NodeTLSError`.

Each names what an administrator can do about it; callers catch the base class to report
"the peer or the identity is the problem", and the subclasses that are also ``ValueError`` /
``ConnectionError`` / ``ssl.SSLCertVerificationError`` to fit the generic handlers that expect
those.  Pure: no I/O.
"""

from __future__ import annotations

import ssl

from syncnode.nodeid import NodeId

__all__ = [
    "CertificateRejected",
    "IdentityError",
    "IdentityExists",
    "IdentityNotFound",
    "InvalidPeerAddress",
    "NoPeerCertificate",
    "NodeTLSError",
    "PeerUnreachable",
    "UntrustedPeer",
]


class NodeTLSError(Exception):
    """Base class of the errors raised by :mod:`syncnode.tls`."""


class IdentityError(NodeTLSError):
    """The node's own key/certificate is missing, unreadable or inconsistent."""


class IdentityNotFound(IdentityError):
    """No identity exists in the data dir yet."""


class IdentityExists(IdentityError):
    """Refusing to create an identity over an existing one (it would change the node id)."""


class CertificateRejected(NodeTLSError, ValueError):
    """A certificate cannot be used (unparsable, a CA certificate where a node's is needed...)."""


class InvalidPeerAddress(NodeTLSError, ValueError):
    """A peer URL / host:port cannot be used."""


class NoPeerCertificate(NodeTLSError):
    """The TLS peer presented no certificate (or the handshake has not completed)."""


class PeerUnreachable(NodeTLSError, ConnectionError):
    """No TLS 1.3 handshake could be completed with a peer (refused, timeout, protocol)."""


class UntrustedPeer(NodeTLSError, ssl.SSLCertVerificationError):
    """A peer's certificate does not have the node id that was expected.

    It subclasses :class:`ssl.SSLCertVerificationError` so that raising it inside a handshake
    (see ``client_ssl_context(expected=...)``) aborts the connection the same way a failed
    chain verification does; aiohttp reports it as ``ClientConnectorCertificateError`` whose
    ``certificate_error`` is this exception.
    """

    def __init__(
        self, message: str, *, expected: NodeId | None = None, actual: NodeId | None = None
    ) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "untrusted peer"

