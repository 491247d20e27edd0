"""Origins for tests and benchmarks: a P-256 key, a self-signed certificate and the signed
events of a node that exists only in memory.

``FakeOrigin`` makes the events a real node would make (signed, canonical), or, when asked,
the hostile ones the catalog must refuse (bad signature, someone else's origin id). Named
origins are ordered by id in the order of their labels (see :func:`origins`), so tests of
the live-view rule, which breaks ties by origin, can say which one is "greater".
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import blake3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from syncnode import events as ev
from syncnode.signing import Signer

CT = "1.2.840.10008.5.1.4.1.1.2"


def _certificate(key: ec.EllipticCurvePrivateKey, label: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test origin {label}")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


class FakeOrigin:
    """A node's signing identity, in memory."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert_der = _certificate(self.key, label)
        self.signer = Signer(self.key, self.cert_der)
        self.id = self.signer.origin

    def __repr__(self) -> str:
        return f"FakeOrigin({self.label!r}, {self.id[:7]})"

    def sign(self, event: ev.Event) -> tuple[str, bytes]:
        """(id, body) of the event signed by this origin (its origin field is set)."""
        body = ev.encode(self.signer.sign(dataclasses.replace(event, origin=self.id)))
        return ev.event_id(body), body

    def put(self, hlc: int, sop: str, blob: str | None = None, *, size: int = 1000,
            study: str = "1.2.826.0.1.1", series: str = "1.2.826.0.1.1.1",
            chunks: str | None = None, patient_id: str = "P1") -> tuple[str, bytes]:
        return self.sign(ev.PutEvent(
            origin=self.id, hlc=hlc,
            blob=blob or blake3.blake3(f"blob:{self.label}:{hlc}:{sop}".encode()).hexdigest(),
            size=size, chunks=chunks or blake3.blake3(b"chunks").hexdigest(),
            sop_class_uid=CT, sop_instance_uid=sop, series_instance_uid=series,
            study_instance_uid=study, patient_id=patient_id, modality="CT"))

    def delete(self, hlc: int, sop: str, removes: list[str]) -> tuple[str, bytes]:
        return self.sign(ev.DeleteEvent(origin=self.id, hlc=hlc, sop_instance_uid=sop,
                                        removes=tuple(removes)))

    def forge(self, event: ev.Event, as_origin: str) -> tuple[str, bytes]:
        """What a holder of this key can make in another node's name: the event claims
        ``as_origin`` but is signed with this key (it must not verify)."""
        forged = dataclasses.replace(event, origin=as_origin)
        der = self.key.sign(ev.signing_payload(forged), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        body = ev.encode(dataclasses.replace(forged, sig=ev.join_sig(r, s)))
        return ev.event_id(body), body


def tamper(pair: tuple[str, bytes]) -> tuple[str, bytes]:
    """The event with one bit of its signature flipped, re-identified (a relay's edit)."""
    event = ev.decode(pair[1])
    sig = event.sig
    flipped = f"{int(sig[:64], 16) ^ 1:064x}" + sig[64:]
    body = ev.encode(dataclasses.replace(event, sig=flipped))
    return ev.event_id(body), body


def origins(*labels: str) -> dict[str, FakeOrigin]:
    """Origins named by ``labels``, whose ids sort in the order of the labels."""
    made = sorted((FakeOrigin() for _ in labels), key=lambda o: o.id)
    out = {}
    for label, origin in zip(sorted(labels), made, strict=True):
        origin.label = label
        out[label] = origin
    return out
