"""Event signatures: signing this node's events, verifying anyone's (crypto, no I/O).

An event's ``origin`` is the node id of the certificate whose key signed it: the SHA-256
of that certificate's DER (:mod:`syncnode.nodeid`). So a certificate proves itself: given
an origin id and any certificate whose digest is that id, the certificate's public key is
the only key that can have signed the origin's events. No prior trust in the origin is
needed, and a relay that forwards a third node's events (with that node's certificate)
cannot author events in its name.

Invariants:

- :class:`Signer` only signs events whose ``origin`` is its own node id, and always emits
  the canonical low-``s`` form (:func:`syncnode.events.join_sig`).
- :func:`key_for_certificate` returns a key only for a certificate whose SHA-256 is the
  claimed origin; :class:`OriginKeys` caches parsed keys (one parse per origin), bounded.
- Verification is exact: the event's canonical signing payload, SHA-256, ECDSA P-256.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from . import events as ev
from .nodeid import InvalidNodeId, NodeId

_ECDSA = ec.ECDSA(hashes.SHA256())


class OriginCertificateError(ValueError):
    """A certificate offered for an origin does not belong to it or cannot be used."""


class Signer:
    """Signs the events this node creates with the node's private key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert_der: bytes) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise OriginCertificateError(
                f"node key is on curve {key.curve.name}; events are signed with P-256 keys")
        self._key = key
        self.cert_der = cert_der  # sent with the events, so receivers can verify them
        self.origin = certificate_origin(cert_der)

    def sign(self, event: ev.AnyEvent) -> ev.AnyEvent:
        """The event with its ``sig`` set. Refuses events of another origin."""
        if event.origin != self.origin:
            raise ValueError(f"this node ({self.origin}) cannot sign an event of "
                             f"{event.origin}")
        der = self._key.sign(ev.signing_payload(event), _ECDSA)
        r, s = decode_dss_signature(der)
        return dataclasses.replace(event, sig=ev.join_sig(r, s))


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """The node's ECDSA key from its PEM file (checked against the certificate by
    whoever loaded the identity)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise OriginCertificateError(f"{path} is not an ECDSA key; events need a P-256 key")
    return key


def origin_digest(origin: str) -> bytes:
    """The certificate digest an origin id names; OriginCertificateError if it is not a
    node id in its canonical (compact) form."""
    try:
        node = NodeId.parse(origin)
    except (InvalidNodeId, TypeError) as exc:
        raise OriginCertificateError(f"origin {origin[:80]!r} is not a node id") from exc
    if node.compact != origin:
        raise OriginCertificateError(f"origin {origin[:80]!r} is not in compact form")
    return node.digest


def certificate_origin(der: bytes) -> str:
    """The origin id (compact node id) of a certificate."""
    return NodeId.from_certificate_der(der).compact


def key_for_certificate(origin: str, der: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of ``der`` if it is the certificate of ``origin``."""
    if NodeId.from_certificate_der(der).digest != origin_digest(origin):
        raise OriginCertificateError(f"certificate does not belong to origin {origin}")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as exc:
        raise OriginCertificateError(f"certificate of {origin} does not parse: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                         ec.SECP256R1):
        raise OriginCertificateError(f"certificate of {origin} has no P-256 key")
    return key


def verify(event: ev.Event, key: ec.EllipticCurvePublicKey) -> bool:
    """Whether ``event.sig`` is the signature of ``key`` over the event."""
    try:
        r, s = ev.split_sig(event.sig)
        key.verify(encode_dss_signature(r, s), ev.signing_payload(event), _ECDSA)
    except (InvalidSignature, ev.InvalidEvent):
        return False
    return True


class OriginKeys:
    """Parsed public keys by origin id, least recently used dropped beyond ``capacity``.
    Only keys that :func:`key_for_certificate` accepted are ever stored."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, ec.EllipticCurvePublicKey] = OrderedDict()

    def get(self, origin: str) -> ec.EllipticCurvePublicKey | None:
        key = self._keys.get(origin)
        if key is not None:
            self._keys.move_to_end(origin)
        return key

    def add(self, origin: str, der: bytes) -> ec.EllipticCurvePublicKey:
        key = key_for_certificate(origin, der)
        self._keys[origin] = key
        self._keys.move_to_end(origin)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return key

    def clear(self) -> None:
        self._keys.clear()
