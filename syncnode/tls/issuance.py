"""Certificates issued through a signing request: the node's side and the cluster CA's side.

The CA key never has to leave the machine that holds it:

1. On the node's machine, :func:`make_request` creates the node's next key
   (``<data_dir>/pending.key``, mode 0600) and a certificate signing request (CSR) for it.
2. On the CA's machine, :func:`sign_request` checks the CSR (its signature proves the
   requester holds the key; only P-256 keys) and issues an end-entity node certificate with
   the same extensions as every node certificate; the CA ignores the requested subject and
   extensions.  A copy is kept in ``<ca_dir>/issued/<node-id>.pem`` so that the CA can later
   revoke it by node id.
3. Back on the node, :func:`install_certificate` accepts the certificate only if it belongs to
   ``pending.key``, and makes key and certificate the node's identity (a renewal when the
   node had one: see :mod:`syncnode.renewal`).

Revocation: :func:`revoke` adds a certificate (by file or by node id) to
``<ca_dir>/revoked.json`` and writes ``<ca_dir>/crl.pem``, a CRL signed by the CA; nodes that
have the CRL (:class:`~syncnode.tls.truststore.TrustStore`) refuse the revoked certificates.

Invariants: files are written atomically; key files are mode 0600; a CSR with a bad
signature or another key type is refused (:class:`~syncnode.tls.errors.CertificateRejected`).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from syncnode.durable import atomic_write
from syncnode.nodeid import InvalidNodeId, NodeId
from syncnode.tls.certificates import (
    NODE_CN,
    NODE_VALIDITY,
    build_certificate,
    coerce_der,
    der_to_pem,
    key_pem,
    parse_der,
    subject_name,
)
from syncnode.tls.errors import CertificateRejected, IdentityError
from syncnode.tls.identity import CertificateAuthority, _load_private_key

__all__ = [
    "CRL_VALIDITY",
    "PENDING_KEY_FILE",
    "make_request",
    "matching_key",
    "revoke",
    "sign_request",
]

PENDING_KEY_FILE: Final = "pending.key"
ISSUED_DIR: Final = "issued"
REVOKED_FILE: Final = "revoked.json"
CRL_FILE: Final = "crl.pem"
CRL_VALIDITY: Final = timedelta(days=3650)  # nodes read the list they have; no expiry drama


def make_request(data_dir: str | os.PathLike[str]) -> bytes:
    """A new key in ``<data_dir>/pending.key`` and the PEM CSR for it.

    An existing pending key is reused (asking twice gives two CSRs for one key, so either
    signed certificate can be installed)."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / PENDING_KEY_FILE
    if path.exists():
        key = _load_private_key(path, "pending key")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(path, key_pem(key), 0o600)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(subject_name(NODE_CN))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_request(ca: CertificateAuthority, csr_pem: bytes,
                 validity: timedelta = NODE_VALIDITY) -> bytes:
    """Issue a node certificate (DER) for the key of ``csr_pem``; keeps a copy by node id."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        try:
            csr = x509.load_der_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateRejected(f"not a certificate signing request (PEM or DER): "
                                      f"{exc}") from exc
    if not csr.is_signature_valid:
        raise CertificateRejected("the signing request's signature does not verify: it was "
                                  "altered, or not made with the key it names")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve,
                                                                          ec.SECP256R1):
        raise CertificateRejected("the signing request is not for an ECDSA P-256 key (node "
                                  "keys are P-256: make it with `syncnode cert csr`)")
    ca_cert = parse_der(ca.cert_der, f"CA certificate {ca.cert_path}")
    try:
        ca_key = _load_private_key(ca.key_path, "CA key")
    except OSError as exc:
        raise IdentityError(f"cannot read the CA key {ca.key_path} "
                            f"({exc.strerror or exc}); sign on the machine holding it") from exc
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise IdentityError(f"CA key {ca.key_path} does not belong to {ca.cert_path}")
    cert = build_certificate(subject_key=public, subject=subject_name(NODE_CN),
                             issuer_key=ca_key, issuer_cert=ca_cert, is_ca=False,
                             validity=validity)
    der = cert.public_bytes(serialization.Encoding.DER)
    issued = ca.ca_dir / ISSUED_DIR
    issued.mkdir(exist_ok=True, mode=0o700)
    atomic_write(issued / f"{NodeId.from_certificate_der(der).compact}.pem", der_to_pem(der),
                 0o644)
    return der


def matching_key(data_dir: Path, cert_der: bytes) -> Path | None:
    """The key file in ``data_dir`` (``pending.key``) whose public key is the certificate's."""
    public = parse_der(cert_der, "certificate").public_key()
    path = data_dir / PENDING_KEY_FILE
    if path.exists():
        key = _load_private_key(path, "pending key")
        if key.public_key().public_numbers() == public.public_numbers():  # type: ignore[union-attr]
            return path
    return None


def revoke(ca: CertificateAuthority, what: str) -> tuple[NodeId, Path]:
    """Revoke a certificate the CA issued, named by its file or its node id; rewrite the CRL.

    Returns the node id and the CRL's path. The node id form needs the copy
    :func:`sign_request` kept (certificates issued by ``init --ca`` are found through their
    file)."""
    path = Path(what)
    der: bytes | None = None
    if path.is_file():
        der = coerce_der(path.read_bytes())
    else:
        try:
            node_id = NodeId.parse(what)
        except InvalidNodeId as exc:
            raise CertificateRejected(f"{what!r} is neither a certificate file nor a node "
                                      f"id") from exc
        kept = ca.ca_dir / ISSUED_DIR / f"{node_id.compact}.pem"
        if not kept.exists():
            raise CertificateRejected(
                f"this CA has no record of issuing {node_id} ({kept} missing); give the "
                f"node's certificate file (its node.crt) instead")
        der = coerce_der(kept.read_bytes())
    cert = parse_der(der, "certificate to revoke")
    ca_cert = parse_der(ca.cert_der, f"CA certificate {ca.cert_path}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateRejected("this CA did not issue that certificate; nothing to revoke "
                                  "here") from exc
    node_id = NodeId.from_certificate_der(der)
    record = ca.ca_dir / REVOKED_FILE
    revoked: dict[str, dict[str, object]] = (
        json.loads(record.read_text()) if record.exists() else {})
    revoked.setdefault(str(cert.serial_number), {"node_id": node_id.compact,
                                                 "revoked": datetime.now(UTC).isoformat()})
    atomic_write(record, json.dumps(revoked, indent=1, sort_keys=True).encode(), 0o644)
    ca_key = _load_private_key(ca.key_path, "CA key")
    now = datetime.now(UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - timedelta(minutes=5))
               .next_update(now + CRL_VALIDITY))
    for serial, entry in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial))
            .revocation_date(datetime.fromisoformat(str(entry["revoked"]))).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    crl_path = ca.ca_dir / CRL_FILE
    atomic_write(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return node_id, crl_path
