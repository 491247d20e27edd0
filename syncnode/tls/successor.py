"""Successor statements: a node's old key naming the certificate that replaces it (pure).

A node id is the SHA-256 of the node's certificate, so a new certificate is a new node id.
When a node renews (``syncnode cert renew``), its *old* key signs a statement::

    {"format": "syncnode-successor/1", "old": OLD-ID, "new": NEW-ID,
     "cert": base64(DER of the new certificate), "issued": UNIX-SECONDS,
     "grace_until": UNIX-SECONDS, "sig": base64(ECDSA P-256 / SHA-256 signature)}

signed over the canonical JSON of every field but ``sig`` (sorted keys, no spaces).  A peer
that trusts OLD-ID holds OLD-ID's certificate (pinned, or recorded when the cluster CA
admitted it), so it can check the statement with nothing but what it already trusts:

* the SHA-256 of the certificate it holds for OLD-ID is OLD-ID;
* the signature verifies with that certificate's public key;
* the SHA-256 of the carried certificate is NEW-ID, an end-entity certificate, valid now.

A statement signed by any other key is refused (:class:`SuccessorRejected`), so nobody but
the holder of the old key can move a node's trust to a certificate of their choosing.  The
statement travels in the node's ``hello`` answer and, appended as a ``SYNCNODE SUCCESSOR``
PEM block, in its introduction (:mod:`syncnode.introduction`).

No I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from syncnode.nodeid import InvalidNodeId, NodeId
from syncnode.tls.certificates import is_ca, time_valid
from syncnode.tls.errors import CertificateRejected

__all__ = ["FORMAT", "Successor", "SuccessorRejected", "make_successor", "verify_successor"]

FORMAT: Final = "syncnode-successor/1"
MAX_STATEMENT: Final = 8 * 1024  # bytes of JSON: one certificate and a few fields
_PEM_RE: Final = re.compile(
    rb"-----BEGIN SYNCNODE SUCCESSOR-----\s*(.*?)\s*-----END SYNCNODE SUCCESSOR-----",
    re.DOTALL)
_ECDSA: Final = ec.ECDSA(hashes.SHA256())


class SuccessorRejected(CertificateRejected):
    """A successor statement is malformed, or not signed by the old certificate's key."""


@dataclass(frozen=True, slots=True)
class Successor:
    old: NodeId
    new: NodeId
    cert_der: bytes
    issued: int
    grace_until: int
    sig: bytes

    def payload(self) -> bytes:
        return _payload(self.old, self.new, self.cert_der, self.issued, self.grace_until)

    def in_grace(self, now: float | None = None) -> bool:
        """Whether the old certificate is still accepted beside the new one."""
        return (time.time() if now is None else now) < self.grace_until

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "old": self.old.compact, "new": self.new.compact,
                "cert": base64.b64encode(self.cert_der).decode("ascii"),
                "issued": self.issued, "grace_until": self.grace_until,
                "sig": base64.b64encode(self.sig).decode("ascii")}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    def to_pem(self) -> bytes:
        body = base64.encodebytes(self.to_json()).decode("ascii")
        return (f"-----BEGIN SYNCNODE SUCCESSOR-----\n{body}"
                f"-----END SYNCNODE SUCCESSOR-----\n").encode("ascii")

    @classmethod
    def from_dict(cls, obj: object) -> Successor:
        """Parse (not verify) a statement; :class:`SuccessorRejected` if malformed."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SuccessorRejected(f"not a successor statement ({FORMAT})")
        try:
            issued, grace_until = obj["issued"], obj["grace_until"]
            if not isinstance(issued, int) or not isinstance(grace_until, int):
                raise SuccessorRejected("successor statement times are not integers")
            return cls(NodeId.parse(str(obj["old"])), NodeId.parse(str(obj["new"])),
                       base64.b64decode(str(obj["cert"]), validate=True), issued,
                       grace_until, base64.b64decode(str(obj["sig"]), validate=True))
        except (KeyError, InvalidNodeId, binascii.Error) as exc:
            raise SuccessorRejected(f"malformed successor statement: {exc}") from exc

    @classmethod
    def from_json(cls, raw: bytes) -> Successor:
        if len(raw) > MAX_STATEMENT:
            raise SuccessorRejected(f"successor statement over {MAX_STATEMENT} bytes")
        try:
            return cls.from_dict(json.loads(raw))
        except ValueError as exc:
            if isinstance(exc, SuccessorRejected):
                raise
            raise SuccessorRejected(f"successor statement is not JSON: {exc}") from exc

    @classmethod
    def from_pem(cls, data: bytes) -> Successor | None:
        """The statement in a ``SYNCNODE SUCCESSOR`` PEM block of ``data``, or None."""
        match = _PEM_RE.search(data)
        if match is None:
            return None
        try:
            raw = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error as exc:
            raise SuccessorRejected(f"successor block is not base64: {exc}") from exc
        return cls.from_json(raw)


def _payload(old: NodeId, new: NodeId, cert_der: bytes, issued: int, grace_until: int
             ) -> bytes:
    return json.dumps({"format": FORMAT, "old": old.compact, "new": new.compact,
                       "cert": base64.b64encode(cert_der).decode("ascii"), "issued": issued,
                       "grace_until": grace_until}, sort_keys=True,
                      separators=(",", ":")).encode()


def make_successor(old_key: ec.EllipticCurvePrivateKey, old_cert_der: bytes,
                   new_cert_der: bytes, grace_seconds: float, now: float | None = None
                   ) -> Successor:
    """The statement, signed by ``old_key``, that ``new_cert_der`` succeeds ``old_cert_der``."""
    issued = int(time.time() if now is None else now)
    old, new = NodeId.from_certificate_der(old_cert_der), NodeId.from_certificate_der(
        new_cert_der)
    if old == new:
        raise SuccessorRejected("the new certificate is the old one")
    grace_until = issued + max(0, int(grace_seconds))
    sig = old_key.sign(_payload(old, new, new_cert_der, issued, grace_until), _ECDSA)
    return Successor(old, new, new_cert_der, issued, grace_until, sig)


def verify_successor(statement: Successor, old_cert_der: bytes) -> None:
    """Check ``statement`` with the certificate we hold for its old id (see the module doc);
    raise :class:`SuccessorRejected` saying what is wrong."""
    if NodeId.from_certificate_der(old_cert_der) != statement.old:
        raise SuccessorRejected(f"the certificate held for {statement.old} is not its own")
    if NodeId.from_certificate_der(statement.cert_der) != statement.new:
        raise SuccessorRejected(f"the carried certificate is not the one of {statement.new}")
    if statement.new == statement.old:
        raise SuccessorRejected("a node cannot succeed itself")
    try:
        old_key = x509.load_der_x509_certificate(old_cert_der).public_key()
        new_cert = x509.load_der_x509_certificate(statement.cert_der)
    except ValueError as exc:
        raise SuccessorRejected(f"certificate does not parse: {exc}") from exc
    if not isinstance(old_key, ec.EllipticCurvePublicKey):
        raise SuccessorRejected(f"{statement.old} has no ECDSA key")
    try:
        old_key.verify(statement.sig, statement.payload(), _ECDSA)
    except InvalidSignature:
        raise SuccessorRejected(
            f"the successor statement for {statement.old} is not signed by its key: forged, "
            f"or altered on the way; not trusting {statement.new}") from None
    if is_ca(new_cert) is not False:
        raise SuccessorRejected(f"{statement.new} is not an end-entity certificate")
    if not time_valid(new_cert):
        raise SuccessorRejected(f"the certificate of {statement.new} is not valid now")
