"""The trust store: the peer certificates this node has pinned, and its cluster CA certificate.

Invariants
----------
* A file ``trust/<ID>.pem`` counts only if the SHA-256 of the certificate it holds is ``ID``,
  and only end-entity certificates (BasicConstraints CA:FALSE) are pinned, so a pinned peer
  cannot mint further trusted certificates.
* :meth:`TrustStore.version` changes whenever the set of pins or the CA file changes, so users
  (the TLS contexts, the peer server's cache) can rebuild exactly when needed.
* A denied node id (``trust/denied/<ID>``, written by ``peer remove``) or a certificate the
  cluster CA revoked (its CRL, ``<data_dir>/crl.pem`` or a configured file) is never trusted,
  pinned or CA-issued: the deny list and the CRL take precedence over both ways of trusting.
* ``trust/seen/<ID>.pem`` records peers the CA admitted (they were never pinned) so that an
  operator can list and remove them; it is a record, not a reason to trust.
* ``trust/successors/<OLD-ID>.json`` holds the successor statement of a peer that renewed its
  certificate (:mod:`syncnode.tls.successor`): the new certificate is pinned, the old pin is
  kept until the statement's grace period ends, and the link stays for ``peer list``.
* Safe to use from several processes (CLI and daemon): every change is an atomic rename.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
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
from syncnode.tls.successor import Successor, SuccessorRejected, verify_successor

__all__ = ["CRL_FILE", "TRUST_DIR", "TrustStore", "TrustVersion"]

logger = logging.getLogger(__name__)

TRUST_DIR: Final = "trust"
DENY_DIR: Final = "denied"
SEEN_DIR: Final = "seen"
SUCCESSOR_DIR: Final = "successors"
CRL_FILE: Final = "crl.pem"

_Stat = tuple[int, int, int] | None
TrustVersion = tuple[tuple[str, ...], _Stat, tuple[str, ...], _Stat]


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class TrustStore:
    """The certificates this node trusts: pinned peer certificates plus the optional CA.

    Layout: ``<data_dir>/trust/<node-id-compact>.pem`` per pinned peer and ``<data_dir>/ca.crt``.
    Safe to use from several processes (CLI and daemon): every change is an atomic rename.
    """

    def __init__(self, data_dir: str | os.PathLike[str],
                 crl_path: str | os.PathLike[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.trust_dir = self.data_dir / TRUST_DIR
        self.ca_path = self.data_dir / CA_CERT_FILE
        self.deny_dir = self.trust_dir / DENY_DIR
        self.seen_dir = self.trust_dir / SEEN_DIR
        self.successor_dir = self.trust_dir / SUCCESSOR_DIR
        self.crl_path = Path(crl_path) if crl_path else self.data_dir / CRL_FILE
        self._crl: tuple[tuple[_Stat, _Stat], frozenset[int]] | None = None

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
        return (tuple(self._names()), _stat(self.ca_path), tuple(self.denied_names()),
                _stat(self.crl_path))

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
        if self.refusal(cert_der) is not None:
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
        denied = set(self.denied_names())
        for node_id in self.list():
            der = self.certificate(node_id)
            if der is None or node_id.compact in denied:
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


    # -- the deny list and the CA's revocation list ----------------------------------------

    def denied_names(self) -> builtins.list[str]:
        try:
            return sorted(n for n in os.listdir(self.deny_dir) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def deny(self, node_id: NodeId, reason: str = "removed by the operator") -> None:
        """Refuse ``node_id`` from the next handshake on, even if the cluster CA issued its
        certificate (its pin, if any, is removed too)."""
        self.deny_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.deny_dir / node_id.compact,
                     json.dumps({"reason": reason, "since": time.time()}).encode(), 0o644)
        self.remove(node_id)
        logger.info("denied peer %s: %s", node_id, reason)

    def undeny(self, node_id: NodeId) -> bool:
        """Take ``node_id`` off the deny list (``peer add`` does, to trust it again)."""
        try:
            (self.deny_dir / node_id.compact).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.deny_dir)
        return True

    def is_denied(self, node_id: NodeId) -> bool:
        return (self.deny_dir / node_id.compact).exists()

    def _revoked_serials(self) -> frozenset[int]:
        """Serial numbers the cluster CA revoked, from a CRL the CA signed (parsed again only
        when the CRL or the CA file changes). An unusable CRL is logged and revokes nothing."""
        stamp = (_stat(self.crl_path), _stat(self.ca_path))
        if self._crl is not None and self._crl[0] == stamp:
            return self._crl[1]
        serials: frozenset[int] = frozenset()
        if stamp[0] is not None:
            ca_der = self.ca_certificate()
            if ca_der is None:
                logger.error("ignoring the revocation list %s: this node has no cluster CA "
                             "certificate (%s) to check it with", self.crl_path, CA_CERT_FILE)
            else:
                try:
                    crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
                    ca = x509.load_der_x509_certificate(ca_der)
                    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                        raise ValueError("it is not signed by this node's cluster CA")
                    serials = frozenset(r.serial_number for r in crl)
                except (OSError, ValueError, TypeError) as exc:
                    logger.error("ignoring the revocation list %s: %s; copy the CA's current "
                                 "crl.pem there", self.crl_path, exc)
        self._crl = (stamp, serials)
        return serials

    def refusal(self, cert_der: bytes) -> str | None:
        """Why a peer presenting ``cert_der`` is refused whatever else trusts it (deny list,
        the CA's revocation list), or None."""
        node_id = NodeId.from_certificate_der(cert_der)
        if self.is_denied(node_id):
            return f"node {node_id} is on the deny list (syncnode peer remove)"
        if not self.crl_path.exists():
            return None
        try:
            serial = x509.load_der_x509_certificate(cert_der).serial_number
        except ValueError:
            return "certificate is not valid X.509"
        if serial in self._revoked_serials() and self.issued_by_ca(cert_der):
            return f"the certificate of node {node_id} was revoked by the cluster CA"
        return None

    # -- peers the CA admitted ----------------------------------------------------------

    def note_seen(self, cert_der: bytes) -> bool:
        """Remember a peer admitted without a pin (the CA issued its certificate), so that
        ``peer list`` shows it and ``peer remove`` can deny it. True if it was new."""
        node_id = NodeId.from_certificate_der(cert_der)
        path = self.seen_dir / f"{node_id.compact}.pem"
        if path.exists():
            return False
        self.seen_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, der_to_pem(cert_der), 0o644)
        logger.info("peer %s admitted by the cluster CA (first connection)", node_id)
        return True

    def seen(self) -> builtins.list[tuple[NodeId, bytes, float]]:
        """(node id, certificate, first seen) of the peers :meth:`note_seen` recorded."""
        rows = []
        try:
            names = sorted(os.listdir(self.seen_dir))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".pem") or name.startswith("."):
                continue
            try:
                node_id = NodeId.parse(name[:-4])
                path = self.seen_dir / name
                der = self._read_pin(path, node_id)
                if der is not None:
                    rows.append((node_id, der, path.stat().st_mtime))
            except (InvalidNodeId, OSError):
                continue
        return rows

    def issued_by_ca(self, cert_der: bytes) -> bool:
        """Whether the cluster CA issued ``cert_der`` (signature only; no dates, no CRL)."""
        ca_der = self.ca_certificate()
        if ca_der is None:
            return False
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            cert.verify_directly_issued_by(x509.load_der_x509_certificate(ca_der))
        except (ValueError, TypeError, InvalidSignature):
            return False
        return is_ca(cert) is False

    # -- renewed peers --------------------------------------------------------------------

    def known_certificate(self, node_id: NodeId) -> bytes | None:
        """The certificate this node holds for ``node_id``: pinned, or recorded when the
        cluster CA admitted it."""
        der = self.certificate(node_id)
        if der is None:
            der = self._read_pin(self.seen_dir / f"{node_id.compact}.pem", node_id)
        return der

    def adopt_successor(self, statement: Successor) -> bool:
        """Pin the successor of a peer we trust, if its old key signed the statement.

        True if it was new here.  The old certificate stays trusted until the statement's
        grace period ends (:meth:`retire_expired`).  Raises :class:`SuccessorRejected`
        (forged, malformed, for an id we hold no certificate of, or denied)."""
        old_der = self.known_certificate(statement.old)
        if old_der is None:
            raise SuccessorRejected(f"no certificate of {statement.old} is held here, so its "
                                    f"successor statement cannot be checked")
        if self.refusal(old_der) is not None:
            raise SuccessorRejected(f"{statement.old} is refused here; its successor too")
        verify_successor(statement, old_der)
        path = self.successor_dir / f"{statement.old.compact}.json"
        known = self.certificate(statement.new) == statement.cert_der and path.exists()
        self.pin(statement.cert_der, statement.new)
        if not known:
            self.successor_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(path, statement.to_json(), 0o644)
            logger.info("peer %s renewed its certificate: now %s (old one accepted until %s)",
                        statement.old, statement.new,
                        datetime.fromtimestamp(statement.grace_until, UTC).isoformat())
        return not known

    def successors(self) -> builtins.list[Successor]:
        """The successor statements adopted here (each verified when adopted)."""
        out = []
        try:
            names = sorted(os.listdir(self.successor_dir))
        except FileNotFoundError:
            return []
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                try:
                    out.append(Successor.from_json((self.successor_dir / name).read_bytes()))
                except (OSError, SuccessorRejected) as exc:
                    logger.error("ignoring %s: %s", self.successor_dir / name, exc)
        return out

    def predecessors(self) -> dict[str, str]:
        """New compact id -> the compact id it renewed from."""
        return {s.new.compact: s.old.compact for s in self.successors()}

    def retire_expired(self, now: float | None = None) -> builtins.list[NodeId]:
        """Stop trusting old certificates whose grace period ended (the link stays)."""
        retired = []
        for statement in self.successors():
            if not statement.in_grace(now) and self.certificate(statement.old) is not None:
                self.remove(statement.old)
                retired.append(statement.old)
                logger.info("retired the old certificate %s of renewed peer %s",
                            statement.old, statement.new)
        return retired
