"""This node's identity (key and certificate) and the optional cluster CA, on disk.

Invariants
----------
* The node id is the SHA-256 of ``node.crt``'s DER: an existing identity is never replaced
  (:class:`~syncnode.tls.errors.IdentityExists`), and loading checks that the key belongs to
  the certificate.
* ``node.key`` and ``ca.key`` are written with mode 0600; a readable key is warned about.
* Files are written atomically (temp file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from syncnode.durable import atomic_write
from syncnode.nodeid import NodeId
from syncnode.tls.certificates import (
    CA_VALIDITY,
    DEFAULT_CA_NAME,
    NODE_CN,
    NODE_VALIDITY,
    build_certificate,
    der_to_pem,
    is_ca,
    key_pem,
    parse_der,
    read_single_cert,
    subject_name,
    time_valid,
)
from syncnode.tls.errors import CertificateRejected, IdentityError, IdentityExists, IdentityNotFound

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "CertificateAuthority",
    "Identity",
    "create_ca",
    "create_identity",
    "load_ca",
    "load_identity",
]

logger = logging.getLogger(__name__)

KEY_FILE: Final = "node.key"
CERT_FILE: Final = "node.crt"
CA_KEY_FILE: Final = "ca.key"
CA_CERT_FILE: Final = "ca.crt"


def _load_private_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{what} {path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{what} {path} is not an ECDSA key ({type(key).__name__})")
    return key


def _warn_if_key_exposed(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "private key %s is accessible to group/others (mode %o); run: chmod 600 %s",
            path,
            mode,
            path,
        )


# ------------------------------------------------------------------------------------------------
# Cluster CA


@dataclass(frozen=True)
class CertificateAuthority:
    """A cluster CA on disk (``ca.key`` + ``ca.crt`` in ``ca_dir``)."""

    ca_dir: Path
    key_path: Path
    cert_path: Path
    cert_der: bytes

    @property
    def cert_pem(self) -> bytes:
        return der_to_pem(self.cert_der)


def create_ca(ca_dir: str | os.PathLike[str], name: str = DEFAULT_CA_NAME) -> CertificateAuthority:
    """Create a cluster CA (ECDSA P-256, 20 years, pathlen 0) in ``ca_dir``.

    Refuses to overwrite an existing CA: every node certificate it issued depends on it.
    """
    directory = Path(ca_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    if key_path.exists() or cert_path.exists():
        raise IdentityExists(
            f"{directory} already contains a CA ({CA_KEY_FILE}/{CA_CERT_FILE}); refusing to "
            f"replace it because the node certificates it issued would stop being trusted"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_certificate(
        subject_key=key,
        subject=subject_name(name),
        issuer_key=key,
        issuer_cert=None,
        is_ca=True,
        validity=CA_VALIDITY,
    )
    atomic_write(key_path, key_pem(key), 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return load_ca(directory)


def load_ca(ca_dir: str | os.PathLike[str]) -> CertificateAuthority:
    """Load a CA written by :func:`create_ca` (the key is read only when issuing)."""
    directory = Path(ca_dir)
    key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
    missing = [p.name for p in (key_path, cert_path) if not p.exists()]
    if missing:
        raise IdentityNotFound(f"no cluster CA in {directory}: missing {', '.join(missing)}")
    try:
        der = read_single_cert(cert_path, "CA certificate")
        ca_flag = is_ca(parse_der(der, f"CA certificate {cert_path}"))
    except (OSError, CertificateRejected) as exc:
        raise IdentityError(f"cannot use the cluster CA in {directory}: {exc}") from exc
    if not ca_flag:
        raise IdentityError(f"{cert_path} is not a CA certificate (BasicConstraints CA:TRUE)")
    return CertificateAuthority(directory, key_path, cert_path, der)


# ------------------------------------------------------------------------------------------------
# Node identity


@dataclass(frozen=True)
class Identity:
    """This node's key and certificate on disk, and the node id they define."""

    data_dir: Path
    key_path: Path
    cert_path: Path
    cert_der: bytes
    node_id: NodeId

    @property
    def cert_pem(self) -> bytes:
        return der_to_pem(self.cert_der)


def create_identity(
    data_dir: str | os.PathLike[str], ca: CertificateAuthority | None = None
) -> Identity:
    """Create this node's key and certificate in ``data_dir`` and return the identity.

    Without ``ca`` the certificate is self-signed; with it, the CA issues it and ``ca.crt`` is
    copied into ``data_dir`` so that the node trusts the other nodes of its cluster.
    Refuses (:class:`IdentityExists`) if ``node.key`` or ``node.crt`` already exist.
    """
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if key_path.exists() or cert_path.exists():
        raise IdentityExists(
            f"{directory} already has a node identity ({KEY_FILE}/{CERT_FILE}); refusing to "
            f"replace it because peers know this node by the id of that certificate. Delete "
            f"both files first if you really want this node to become a new node."
        )
    key = ec.generate_private_key(ec.SECP256R1())
    if ca is None:
        cert = build_certificate(
            subject_key=key,
            subject=subject_name(NODE_CN),
            issuer_key=key,
            issuer_cert=None,
            is_ca=False,
            validity=NODE_VALIDITY,
        )
    else:
        ca_cert = parse_der(ca.cert_der, f"CA certificate {ca.cert_path}")
        try:
            ca_key = _load_private_key(ca.key_path, "CA key")
        except OSError as exc:
            raise IdentityError(
                f"cannot read the CA key {ca.key_path} ({exc.strerror or exc}); issuing node "
                f"certificates needs the CA key on this machine"
            ) from exc
        if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
            raise IdentityError(f"CA key {ca.key_path} does not belong to {ca.cert_path}")
        cert = build_certificate(
            subject_key=key,
            subject=subject_name(NODE_CN),
            issuer_key=ca_key,
            issuer_cert=ca_cert,
            is_ca=False,
            validity=NODE_VALIDITY,
        )
        atomic_write(directory / CA_CERT_FILE, ca.cert_pem, 0o644)
        # the CA keeps what it issued, so that `ca revoke NODE_ID` can find it
        der = cert.public_bytes(serialization.Encoding.DER)
        (ca.ca_dir / "issued").mkdir(exist_ok=True, mode=0o700)
        atomic_write(ca.ca_dir / "issued" / f"{NodeId.from_certificate_der(der).compact}.pem",
                     der_to_pem(der), 0o644)
    atomic_write(key_path, key_pem(key), 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    identity = load_identity(directory)
    logger.info("created node identity %s in %s", identity.node_id, directory)
    return identity


def load_identity(data_dir: str | os.PathLike[str]) -> Identity:
    """Load and check the identity in ``data_dir`` (key matches certificate)."""
    directory = Path(data_dir)
    key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
    if not key_path.exists() and not cert_path.exists():
        raise IdentityNotFound(
            f"no node identity in {directory} ({KEY_FILE}/{CERT_FILE} missing); "
            f"initialise the node first"
        )
    for path, other in ((key_path, cert_path), (cert_path, key_path)):
        if not path.exists():
            raise IdentityError(
                f"{path} is missing but {other.name} exists; restore {path.name} from backup. "
                f"Creating a new identity changes the node id, and every peer must re-add it"
            )
    try:
        der = read_single_cert(cert_path, "node certificate")
        cert = parse_der(der, f"node certificate {cert_path}")
        key = _load_private_key(key_path, "node key")
    except (OSError, CertificateRejected) as exc:
        raise IdentityError(f"cannot load the node identity in {directory}: {exc}") from exc
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise IdentityError(
            f"{key_path} does not belong to {cert_path} (public keys differ); restore the "
            f"matching pair from backup"
        )
    _warn_if_key_exposed(key_path)
    if not time_valid(cert):
        logger.error(
            "node certificate %s is outside its validity period (%s .. %s); peers will refuse "
            "this node",
            cert_path,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
    return Identity(directory, key_path, cert_path, der, NodeId.from_certificate_der(der))

