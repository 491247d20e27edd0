"""X.509 certificates as bytes: PEM/DER conversion, parsing, and building node and CA certificates.

Invariants
----------
* A certificate's identity is its exact DER encoding (what the TLS handshake sends); PEM is
  only ever decoded to, and encoded from, those bytes.
* Generated certificates carry the extensions strict verifiers expect (SKI/AKI, critical
  BasicConstraints and KeyUsage, serverAuth+clientAuth for node certificates); a CA has
  ``pathlen:0`` so it can issue only end-entity certificates.

No I/O except :func:`read_single_cert`, which reads one file.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncnode.tls.errors import CertificateRejected

__all__ = [
    "CA_VALIDITY",
    "DEFAULT_CA_NAME",
    "NODE_CN",
    "NODE_SAN",
    "NODE_VALIDITY",
    "build_certificate",
    "coerce_der",
    "der_to_pem",
    "is_ca",
    "key_pem",
    "parse_der",
    "pem_to_ders",
    "read_single_cert",
    "subject_name",
    "time_valid",
]

NODE_CN: Final = "syncnode"
NODE_SAN: Final = "syncnode"
DEFAULT_CA_NAME: Final = "syncnode cluster CA"
NODE_VALIDITY: Final = timedelta(days=3650)
CA_VALIDITY: Final = timedelta(days=7300)
_BACKDATE: Final = timedelta(hours=1)  # tolerate small clock skew between peers

_PEM_CERT_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL
)


def pem_to_ders(data: bytes) -> list[bytes]:
    """The exact DER bytes of each PEM certificate block in ``data``."""
    ders = []
    for match in _PEM_CERT_RE.finditer(data):
        try:
            ders.append(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except binascii.Error as exc:
            raise CertificateRejected(
                f"a PEM certificate block is not valid base64: {exc}"
            ) from exc
    return ders


def der_to_pem(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def parse_der(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateRejected(f"{what} is not a valid X.509 certificate: {exc}") from exc


def coerce_der(cert: bytes | str) -> bytes:
    """Accept one certificate as DER bytes or PEM (str or bytes); return its exact DER."""
    raw = cert.encode("ascii") if isinstance(cert, str) else bytes(cert)
    if b"-----BEGIN" in raw[:200]:
        ders = pem_to_ders(raw)
        if len(ders) != 1:
            raise CertificateRejected(f"expected exactly one PEM certificate, found {len(ders)}")
        return ders[0]
    return raw


def read_single_cert(path: Path, what: str) -> bytes:
    ders = pem_to_ders(path.read_bytes())
    if not ders:
        raise CertificateRejected(f"{what} {path} contains no PEM certificate")
    return ders[0]


def is_ca(cert: x509.Certificate) -> bool | None:
    """True/False from BasicConstraints; None when the extension is absent."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None


def time_valid(cert: x509.Certificate, now: datetime | None = None) -> bool:
    now = now or datetime.now(UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def subject_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def build_certificate(
    *,
    subject_key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
    subject: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    is_ca: bool,
    validity: timedelta,
) -> x509.Certificate:
    now = datetime.now(UTC)
    not_after = now + validity
    if issuer_cert is not None:
        not_after = min(not_after, issuer_cert.not_valid_after_utc)
        issuer_name = issuer_cert.subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    else:
        issuer_name = subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    public_key = (subject_key if isinstance(subject_key, ec.EllipticCurvePublicKey)
                  else subject_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    # a CA signs certificates and revocation lists; a node signs (TLS, events) only
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=is_ca,
        encipher_only=False, decipher_only=False)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
    ).add_extension(usage, critical=True)
    if not is_ca:
        both_ends = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        san = x509.SubjectAlternativeName([x509.DNSName(NODE_SAN)])
        builder = builder.add_extension(x509.ExtendedKeyUsage(both_ends), critical=False)
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

