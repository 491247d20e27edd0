"""The trust store: the peer certificates this node has pinned, and its cluster CA certificate.

Invariants
----------
* A file ``trust/<ID>.pem`` counts only if the SHA-256 of the certificate it holds is ``ID``,
  and only end-entity certificates (BasicConstraints CA:FALSE) are pinned, so a pinned peer
  cannot mint further trusted certificates.
* :meth:`TrustStore.version` changes whenever the set of pins or the CA file changes, so users
  (the TLS contexts, the peer server's cache) can rebuild exactly when needed.
* Safe to use from several processes (CLI and daemon): every change is an atomic rename.
"""

from __future__ import annotations

import builtins
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from syncnode.durable import atomic_write, fsync_dir
from syncnode.nodeid import InvalidNodeId, NodeId
from syncnode.tls.certificates import (
    coerce_der,
    der_to_pem,
    is_ca,
    parse_der,
    pem_to_ders,
    read_single_cert,
    time_valid,
)
from syncnode.tls.errors import CertificateRejected, UntrustedPeer
from syncnode.tls.identity import CA_CERT_FILE

__all__ = ["TRUST_DIR", "TrustStore", "TrustVersion"]

logger = logging.getLogger(__name__)

TRUST_DIR: Final = "trust"

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
        der = coerce_der(cert)
        actual = NodeId.from_certificate_der(der)
        if actual != expected:
            raise UntrustedPeer(
                f"refusing to pin: the certificate has node id {actual}, but {expected} was "
                f"expected; check the id with the peer's operator",
                expected=expected,
                actual=actual,
            )
        parsed = parse_der(der, f"certificate of {actual}")
        if is_ca(parsed) is not False:
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
        atomic_write(path, der_to_pem(der), 0o644)
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
            ders = pem_to_ders(path.read_bytes())
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
            der = read_single_cert(self.ca_path, "CA certificate")
            if is_ca(parse_der(der, f"CA certificate {self.ca_path}")):
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
        if not time_valid(cert):
            return False
        node_id = NodeId.from_certificate_der(cert_der)
        if self.certificate(node_id) == cert_der:
            return True
        ca_der = self.ca_certificate()
        if ca_der is None or is_ca(cert) is not False:
            return False
        ca = x509.load_der_x509_certificate(ca_der)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            logger.debug("%s not issued by the cluster CA: %s", node_id, exc)
            return False
        return time_valid(ca)

    def verify_locations_pem(self) -> str:
        """PEM bundle of every valid pinned certificate plus the CA (may be empty)."""
        parts = []
        for node_id in self.list():
            der = self.certificate(node_id)
            if der is None:
                continue
            try:
                if is_ca(parse_der(der, f"pinned certificate {node_id}")) is not False:
                    logger.error("ignoring pinned certificate %s: it is a CA certificate", node_id)
                    continue
            except CertificateRejected as exc:
                logger.error("ignoring pinned certificate: %s", exc)
                continue
            parts.append(der_to_pem(der).decode("ascii"))
        ca_der = self.ca_certificate()
        if ca_der is not None:
            parts.append(der_to_pem(ca_der).decode("ascii"))
        return "".join(parts)

