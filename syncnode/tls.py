"""Node identity, peer trust and the mutual-TLS contexts every peer connection uses.

Vocabulary
----------
identity
    This node's ECDSA P-256 key and certificate, ``<data_dir>/node.key`` (mode 0600) and
    ``<data_dir>/node.crt``.  The certificate is self-signed, or issued by a cluster CA.  The
    node id (:class:`~syncnode.nodeid.NodeId`) is the SHA-256 of the certificate's DER, so
    replacing the certificate makes the node a different node.
cluster CA
    Optional.  ``create_ca(ca_dir)`` writes ``ca.key``/``ca.crt``; nodes created with it keep a
    copy of ``ca.crt`` in their data dir and then trust every peer whose certificate the CA
    issued directly (the CA has ``pathlen:0``: no intermediates).
pin / trust list
    ``<data_dir>/trust/<node-id-compact>.pem`` holds a trusted peer's exact certificate.  A peer
    is trusted iff its certificate is pinned, or was issued by the node's cluster CA.  The trust
    store knows only certificates; peer URLs and other metadata belong to the catalog.

Invariants
----------
* TLS 1.3 only, both directions; mutual authentication is mandatory (``CERT_REQUIRED``).  A
  client without a certificate, with an unknown one, or with one from another CA fails the
  handshake: the server never reads or writes a byte of application data for it.
* A file ``trust/<ID>.pem`` counts only if the SHA-256 of the certificate it holds is ``ID``,
  and only end-entity certificates (BasicConstraints CA:FALSE) are pinned, so a pinned peer
  cannot mint further trusted certificates.  Non-self-signed pins work too (the contexts set
  ``VERIFY_X509_PARTIAL_CHAIN``); certificates are checked with ``VERIFY_X509_STRICT``.
* Trust changes apply to the next handshake without restarting: the server context's
  ``sni_callback`` - which OpenSSL calls for every ClientHello, with or without SNI - swaps in a
  context built from the current trust list, rebuilt only when :meth:`TrustStore.version`
  changes.  The context returned by :func:`server_ssl_context` itself trusts nothing, so if the
  callback were ever skipped every client would be refused (fail closed, never stale).
* The server issues no session tickets (``num_tickets = 0``): no session resumption, so each
  connection re-verifies the client certificate against the current trust list.
* Hostnames are not checked: a peer's identity is its node id.  A client that dials a peer for
  an expected node id must check it (:func:`verify_peer`, or ``client_ssl_context(...,
  expected=ID)`` which checks inside the handshake, before any request can be sent).
* Files are written atomically (temp file, fsync, rename, fsync of the directory).

Connections made by :func:`fetch_peer_certificate` are the one exception to chain verification:
they exist to learn a peer's certificate before it is pinned, compare it to the node id an
operator typed, and send no application data.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import logging
import os
import re
import ssl
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncnode.durable import atomic_write, fsync_dir
from syncnode.nodeid import InvalidNodeId, NodeId

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "TRUST_DIR",
    "CertificateAuthority",
    "CertificateRejected",
    "Identity",
    "IdentityError",
    "IdentityExists",
    "IdentityNotFound",
    "InvalidPeerAddress",
    "NoPeerCertificate",
    "NodeTLSError",
    "PeerUnreachable",
    "TrustStore",
    "UntrustedPeer",
    "client_ssl_context",
    "create_ca",
    "create_identity",
    "fetch_peer_certificate",
    "load_ca",
    "load_identity",
    "peer_node_id",
    "server_ssl_context",
    "verify_peer",
]

logger = logging.getLogger(__name__)

KEY_FILE: Final = "node.key"
CERT_FILE: Final = "node.crt"
CA_KEY_FILE: Final = "ca.key"
CA_CERT_FILE: Final = "ca.crt"
TRUST_DIR: Final = "trust"

NODE_CN: Final = "syncnode"
NODE_SAN: Final = "syncnode"
DEFAULT_CA_NAME: Final = "syncnode cluster CA"
NODE_VALIDITY: Final = timedelta(days=3650)
CA_VALIDITY: Final = timedelta(days=7300)
_BACKDATE: Final = timedelta(hours=1)  # tolerate small clock skew between peers

_PEM_CERT_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL
)
_VERIFY_FLAGS: Final = ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT


# ------------------------------------------------------------------------------------------------
# Errors


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


# ------------------------------------------------------------------------------------------------
# Small helpers




def _pem_to_ders(data: bytes) -> list[bytes]:
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


def _der_to_pem(der: bytes) -> bytes:
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def _parse_der(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertificateRejected(f"{what} is not a valid X.509 certificate: {exc}") from exc


def _coerce_der(cert: bytes | str) -> bytes:
    """Accept one certificate as DER bytes or PEM (str or bytes); return its exact DER."""
    raw = cert.encode("ascii") if isinstance(cert, str) else bytes(cert)
    if b"-----BEGIN" in raw[:200]:
        ders = _pem_to_ders(raw)
        if len(ders) != 1:
            raise CertificateRejected(f"expected exactly one PEM certificate, found {len(ders)}")
        return ders[0]
    return raw


def _read_single_cert(path: Path, what: str) -> bytes:
    ders = _pem_to_ders(path.read_bytes())
    if not ders:
        raise CertificateRejected(f"{what} {path} contains no PEM certificate")
    return ders[0]


def _is_ca(cert: x509.Certificate) -> bool | None:
    """True/False from BasicConstraints; None when the extension is absent."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return None


def _time_valid(cert: x509.Certificate, now: datetime | None = None) -> bool:
    now = now or datetime.now(UTC)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _build_certificate(
    *,
    subject_key: ec.EllipticCurvePrivateKey,
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
    public_key = subject_key.public_key()
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
    if is_ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NODE_SAN)]), critical=False)
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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
        return _der_to_pem(self.cert_der)


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
    cert = _build_certificate(
        subject_key=key,
        subject=_name(name),
        issuer_key=key,
        issuer_cert=None,
        is_ca=True,
        validity=CA_VALIDITY,
    )
    atomic_write(key_path, _key_pem(key), 0o600)
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
        der = _read_single_cert(cert_path, "CA certificate")
        is_ca = _is_ca(_parse_der(der, f"CA certificate {cert_path}"))
    except (OSError, CertificateRejected) as exc:
        raise IdentityError(f"cannot use the cluster CA in {directory}: {exc}") from exc
    if not is_ca:
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
        return _der_to_pem(self.cert_der)


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
        cert = _build_certificate(
            subject_key=key,
            subject=_name(NODE_CN),
            issuer_key=key,
            issuer_cert=None,
            is_ca=False,
            validity=NODE_VALIDITY,
        )
    else:
        ca_cert = _parse_der(ca.cert_der, f"CA certificate {ca.cert_path}")
        try:
            ca_key = _load_private_key(ca.key_path, "CA key")
        except OSError as exc:
            raise IdentityError(
                f"cannot read the CA key {ca.key_path} ({exc.strerror or exc}); issuing node "
                f"certificates needs the CA key on this machine"
            ) from exc
        if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
            raise IdentityError(f"CA key {ca.key_path} does not belong to {ca.cert_path}")
        cert = _build_certificate(
            subject_key=key,
            subject=_name(NODE_CN),
            issuer_key=ca_key,
            issuer_cert=ca_cert,
            is_ca=False,
            validity=NODE_VALIDITY,
        )
        atomic_write(directory / CA_CERT_FILE, ca.cert_pem, 0o644)
    atomic_write(key_path, _key_pem(key), 0o600)
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
        der = _read_single_cert(cert_path, "node certificate")
        cert = _parse_der(der, f"node certificate {cert_path}")
        key = _load_private_key(key_path, "node key")
    except (OSError, CertificateRejected) as exc:
        raise IdentityError(f"cannot load the node identity in {directory}: {exc}") from exc
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise IdentityError(
            f"{key_path} does not belong to {cert_path} (public keys differ); restore the "
            f"matching pair from backup"
        )
    _warn_if_key_exposed(key_path)
    if not _time_valid(cert):
        logger.error(
            "node certificate %s is outside its validity period (%s .. %s); peers will refuse "
            "this node",
            cert_path,
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )
    return Identity(directory, key_path, cert_path, der, NodeId.from_certificate_der(der))


# ------------------------------------------------------------------------------------------------
# Trust store

TrustVersion = tuple[tuple[str, ...], tuple[int, int, int] | None]


class TrustStore:
    """The certificates this node trusts: pinned peer certificates plus the optional CA.

    Layout: ``<data_dir>/trust/<node-id-compact>.pem`` per pinned peer and ``<data_dir>/ca.crt``.
    Safe to use from several processes (CLI and daemon): every change is an atomic rename.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.trust_dir = self.data_dir / TRUST_DIR
        self.ca_path = self.data_dir / CA_CERT_FILE

    def __repr__(self) -> str:
        return f"TrustStore({str(self.data_dir)!r})"

    def _path(self, node_id: NodeId) -> Path:
        return self.trust_dir / f"{node_id.compact}.pem"

    # -- changes ------------------------------------------------------------------------------

    def pin(self, cert: bytes | str, expected: NodeId) -> NodeId:
        """Trust ``cert`` (DER or PEM) if its node id is ``expected``; return the id.

        Raises :class:`UntrustedPeer` when the certificate's id differs from ``expected`` and
        :class:`CertificateRejected` for CA certificates, expired or unparsable ones.
        Pinning an already pinned certificate is a no-op.
        """
        der = _coerce_der(cert)
        actual = NodeId.from_certificate_der(der)
        if actual != expected:
            raise UntrustedPeer(
                f"refusing to pin: the certificate has node id {actual}, but {expected} was "
                f"expected; check the id with the peer's operator",
                expected=expected,
                actual=actual,
            )
        parsed = _parse_der(der, f"certificate of {actual}")
        if _is_ca(parsed) is not False:
            raise CertificateRejected(
                f"refusing to pin {actual}: it is not an end-entity certificate (BasicConstraints "
                f"CA:FALSE required); a pinned CA could vouch for other nodes. To trust a "
                f"cluster CA, install it as {CA_CERT_FILE} instead"
            )
        if parsed.not_valid_after_utc < datetime.now(UTC):
            raise CertificateRejected(
                f"refusing to pin {actual}: its certificate expired on "
                f"{parsed.not_valid_after_utc:%Y-%m-%d}; the peer must create a new identity"
            )
        path = self._path(actual)
        if path.exists() and self._read_pin(path, actual) == der:
            return actual
        self.trust_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, _der_to_pem(der), 0o644)
        logger.info("pinned peer certificate %s", actual)
        return actual

    def remove(self, node_id: NodeId) -> bool:
        """Stop trusting the pinned certificate of ``node_id``; False if it was not pinned."""
        try:
            self._path(node_id).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.trust_dir)
        logger.info("removed pinned peer certificate %s", node_id)
        return True

    # -- queries ------------------------------------------------------------------------------

    def _names(self) -> builtins.list[str]:
        try:
            entries = os.listdir(self.trust_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in entries if n.endswith(".pem") and not n.startswith("."))

    def version(self) -> TrustVersion:
        """Cheap, exact change detection: compare two results with ``==``.

        One ``listdir`` and one ``stat``.  The names alone define the pins because a pin file's
        content is fixed by its name (the SHA-256 of the certificate), so this does not depend
        on the file system's mtime granularity.
        """
        try:
            st = os.stat(self.ca_path)
            ca: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            ca = None
        return (tuple(self._names()), ca)

    def _read_pin(self, path: Path, node_id: NodeId) -> bytes | None:
        """DER of a pin file if it is consistent with its name, else None (logged)."""
        try:
            ders = _pem_to_ders(path.read_bytes())
        except FileNotFoundError:
            return None
        except CertificateRejected as exc:
            logger.error("ignoring pinned certificate %s: %s", path, exc)
            return None
        if len(ders) != 1 or NodeId.from_certificate_der(ders[0]) != node_id:
            logger.error(
                "ignoring %s: it does not hold exactly the certificate of %s; remove the file "
                "and pin the peer again",
                path,
                node_id,
            )
            return None
        return ders[0]

    def list(self) -> builtins.list[NodeId]:
        """Node ids of the pinned certificates, sorted."""
        ids: builtins.list[NodeId] = []
        for name in self._names():
            try:
                ids.append(NodeId.parse(name[: -len(".pem")]))
            except InvalidNodeId:
                logger.warning("ignoring %s: file name is not a node id", self.trust_dir / name)
        return sorted(ids)

    def certificate(self, node_id: NodeId) -> bytes | None:
        """DER of the pinned certificate of ``node_id``, or None."""
        return self._read_pin(self._path(node_id), node_id)

    def ca_certificate(self) -> bytes | None:
        """DER of the cluster CA certificate this node trusts, or None (logged if unusable)."""
        try:
            der = _read_single_cert(self.ca_path, "CA certificate")
            if _is_ca(_parse_der(der, f"CA certificate {self.ca_path}")):
                return der
            logger.error("ignoring %s: not a CA certificate (BasicConstraints)", self.ca_path)
        except FileNotFoundError:
            return None
        except CertificateRejected as exc:
            logger.error("ignoring CA certificate: %s", exc)
        return None

    def is_trusted(self, cert_der: bytes) -> bool:
        """Whether a peer presenting ``cert_der`` is trusted right now.

        Pinned (exact certificate), or an end-entity certificate issued directly by the
        cluster CA; in both cases within its validity period.  This is the rule the TLS
        contexts enforce (they also check key usage and that the peer holds the key), usable
        as a second check in application code or for certificates obtained out of band.
        """
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            logger.info("untrusted: peer certificate is not valid X.509")
            return False
        if not _time_valid(cert):
            return False
        node_id = NodeId.from_certificate_der(cert_der)
        if self.certificate(node_id) == cert_der:
            return True
        ca_der = self.ca_certificate()
        if ca_der is None or _is_ca(cert) is not False:
            return False
        ca = x509.load_der_x509_certificate(ca_der)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            logger.debug("%s not issued by the cluster CA: %s", node_id, exc)
            return False
        return _time_valid(ca)

    def verify_locations_pem(self) -> str:
        """PEM bundle of every valid pinned certificate plus the CA (may be empty)."""
        parts = []
        for node_id in self.list():
            der = self.certificate(node_id)
            if der is None:
                continue
            try:
                if _is_ca(_parse_der(der, f"pinned certificate {node_id}")) is not False:
                    logger.error("ignoring pinned certificate %s: it is a CA certificate", node_id)
                    continue
            except CertificateRejected as exc:
                logger.error("ignoring pinned certificate: %s", exc)
                continue
            parts.append(_der_to_pem(der).decode("ascii"))
        ca_der = self.ca_certificate()
        if ca_der is not None:
            parts.append(_der_to_pem(ca_der).decode("ascii"))
        return "".join(parts)


# ------------------------------------------------------------------------------------------------
# SSL contexts


def _new_context(identity: Identity, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
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


def _load_trust(ctx: ssl.SSLContext, trust: TrustStore) -> None:
    bundle = trust.verify_locations_pem()
    if bundle:
        ctx.load_verify_locations(cadata=bundle)
    else:
        logger.warning(
            "trust list in %s is empty and no cluster CA is configured: every peer is refused",
            trust.data_dir,
        )


class _ServerContexts:
    """Builds the per-handshake server context; rebuilt when the trust list changes."""

    def __init__(self, identity: Identity, trust: TrustStore) -> None:
        self.identity = identity
        self.trust = trust
        self._lock = threading.Lock()
        self._version: TrustVersion | None = None
        self._ctx: ssl.SSLContext | None = None

    def current(self) -> ssl.SSLContext:
        version = self.trust.version()
        with self._lock:
            if self._ctx is None or version != self._version:
                ctx = _new_context(self.identity, server=True)
                _load_trust(ctx, self.trust)
                self._ctx, self._version = ctx, version
                logger.debug("server TLS context rebuilt for trust version %r", version)
            return self._ctx

    def sni_callback(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any
    ) -> int | None:
        # Called by OpenSSL for every ClientHello, also without SNI (server_name is None).
        try:
            ssl_object.context = self.current()
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

    def do_handshake(self) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._failed = exc
            reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            logger.info("refused a TLS peer during the handshake: %s", reason)
            raise ssl.SSLWantReadError("TLS handshake failed; flushing the alert") from exc


def server_ssl_context(identity: Identity, trust: TrustStore) -> ssl.SSLContext:
    """Context for the peer-facing HTTPS server: TLS 1.3, client certificate required.

    The returned context trusts nothing by itself; its ``sni_callback`` installs, for every
    handshake, a context built from the trust list as it is now.  Do not replace
    ``sni_callback``: wrap it if needed.
    """
    contexts = _ServerContexts(identity, trust)
    contexts.current()  # surface identity/trust problems at startup, not at first peer
    base = _new_context(identity, server=True)
    base.sni_callback = contexts.sni_callback
    base.sslobject_class = _AlertFlushingSSLObject
    return base


class _NodeIdCheckingSSLObject(ssl.SSLObject):
    expected_node_id: NodeId

    def do_handshake(self) -> None:
        super().do_handshake()
        verify_peer(self, self.expected_node_id)


class _NodeIdCheckingSSLSocket(ssl.SSLSocket):
    expected_node_id: NodeId

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        verify_peer(self, self.expected_node_id)


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
        attrs: dict[str, Any] = {"expected_node_id": expected}
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


# ------------------------------------------------------------------------------------------------
# Obtaining a peer's certificate before pinning it


def _host_port(target: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(target, tuple):
        host, port = target
        return host, int(port)
    text = target.strip()
    parts = urlsplit(text if "://" in text else f"//{text}")
    if parts.scheme not in ("", "https"):
        raise InvalidPeerAddress(f"{target!r}: peer URLs must use https://")
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidPeerAddress(f"{target!r}: invalid port ({exc})") from exc
    if not parts.hostname:
        raise InvalidPeerAddress(f"{target!r}: no host name; expected https://HOST:PORT")
    if port is None:
        if parts.scheme != "https":
            raise InvalidPeerAddress(f"{target!r}: no port; expected HOST:PORT")
        port = 443
    return parts.hostname, port


async def fetch_peer_certificate(
    url_or_host_port: str | tuple[str, int],
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

    host, port = _host_port(url_or_host_port)
    ctx = _new_context(identity, server=False)
    ctx.verify_mode = ssl.CERT_NONE
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
