"""Certificate renewal: a node replaces its key and certificate without being lost.

Node id stability - the decision
--------------------------------
The node id *is* the SHA-256 of the certificate, so a renewed node has a new id; nothing
pretends otherwise (a stable id that no longer names a certificate would make every pin and
every event signature a matter of bookkeeping instead of arithmetic).  Continuity comes from
the *successor statement* (:mod:`syncnode.tls.successor`): the old key signs "my next
certificate is this one".  Everything keyed by node id keeps working because:

* **Peers** that trust the old id check the statement with the certificate they already hold,
  pin the new certificate, and move the peer's entry (URL, push mode, sync state) to the new
  id; ``peer list`` shows "renewed from OLD".  The old certificate stays accepted for the
  grace period (``cert_grace_days``, default 30), then its pin is retired.
* **Events** keep their origin: those signed by the old key name the old id and verify with
  the old certificate (kept in every catalog's ``origins`` table and served with them); new
  events name the new id and carry the new certificate.  Nothing is re-signed.
* **Delete authority** follows the link: the old and the new id are one *lineage*
  (:class:`syncnode.authority.Policy`), so the renewed node may delete what it put before,
  and a ``may_delete`` entry naming either id covers both.
* **This node** keeps the old key and certificate in ``previous/`` during the grace period:
  a peer that has not learned of the renewal yet and dials the old id (TLS server name, see
  :func:`syncnode.tls.contexts.server_name_for`) is served the old certificate and, in
  ``hello``, the statement.  When this node dials a peer that does not know the new
  certificate yet, the peer refuses it, and the introduction that follows carries the
  statement.  After the grace period the old key file is deleted.

Renewing needs the node stopped (``run`` holds ``run.lock``); the switch is crash-safe: the
new key and certificate are written to ``previous/next.*`` first and moved into place by
:func:`finish_renewal`, which opening the folder repeats if a crash interrupted it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .durable import atomic_write, fsync_dir
from .nodeid import NodeId

if TYPE_CHECKING:
    from .local import LocalNode
    from .tls.successor import Successor

log = logging.getLogger("syncnode.renewal")

PREVIOUS_DIR: Final = "previous"
STATEMENT_FILE: Final = "successor.json"
NEXT_KEY, NEXT_CERT = "next.key", "next.crt"
DEFAULT_GRACE_DAYS: Final = 30.0


class RenewalError(Exception):
    """The certificate cannot be renewed as asked; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Renewed:
    old: NodeId
    new: NodeId
    grace_until: int

    def to_dict(self) -> dict[str, object]:
        return {"old_node_id": str(self.old), "node_id": str(self.new),
                "grace_until": self.grace_until}


def renew(node: LocalNode, grace_days: float = DEFAULT_GRACE_DAYS,
          cert_der: bytes | None = None, key_path: Path | None = None) -> Renewed:
    """Give ``node`` a new key and certificate, and the statement linking them to the old.

    Without ``cert_der`` a new key and a self-signed certificate are made; with it (a
    certificate the cluster CA issued for ``key_path``, see :mod:`syncnode.tls.issuance`)
    that pair is installed.  The node must not be running."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from .tls.certificates import NODE_CN, NODE_VALIDITY, build_certificate, key_pem, subject_name
    from .tls.identity import _load_private_key
    from .tls.successor import make_successor

    if node.running():
        raise RenewalError(f"`syncnode run` is using {node.data}: stop it, renew, and start "
                           f"it again (the node serves its certificate from memory)")
    if grace_days < 0:
        raise RenewalError("the grace period cannot be negative")
    old = node.identity
    old_key = _load_private_key(old.key_path, "node key")
    if cert_der is None:
        new_key = ec.generate_private_key(ec.SECP256R1())
        cert_der = build_certificate(
            subject_key=new_key, subject=subject_name(NODE_CN), issuer_key=new_key,
            issuer_cert=None, is_ca=False, validity=NODE_VALIDITY,
        ).public_bytes(serialization.Encoding.DER)
        new_key_pem = key_pem(new_key)
    else:
        if key_path is None:
            raise RenewalError("a certificate to install needs its key")
        new_key_pem = key_path.read_bytes()
    statement = make_successor(old_key, old.cert_der, cert_der, grace_days * 86_400)
    previous = node.data / PREVIOUS_DIR
    previous.mkdir(exist_ok=True, mode=0o700)
    from .tls.certificates import der_to_pem

    atomic_write(previous / NEXT_KEY, new_key_pem, 0o600)
    atomic_write(previous / "node.key", old.key_path.read_bytes(), 0o600)
    atomic_write(previous / "node.crt", der_to_pem(old.cert_der), 0o644)
    atomic_write(previous / STATEMENT_FILE, statement.to_json(), 0o644)
    atomic_write(previous / NEXT_CERT, der_to_pem(cert_der), 0o644)  # last: marks "ready"
    if key_path is not None:
        key_path.unlink(missing_ok=True)
    finish_renewal(node.data, catalog=node.catalog)
    log.info("renewed the node certificate: %s -> %s", old.node_id, statement.new)
    return Renewed(old.node_id, statement.new, statement.grace_until)


def finish_renewal(data: Path, catalog: object | None = None) -> None:
    """Move ``previous/next.*`` into place as ``node.key``/``node.crt`` and record the new id
    in the catalog. Idempotent; run again on open after a crash."""
    from .catalog import Catalog

    previous = data / PREVIOUS_DIR
    next_cert = previous / NEXT_CERT
    if not next_cert.exists():
        return
    new_id = NodeId.from_certificate_pem(next_cert.read_bytes())
    if new_id is None:
        raise RenewalError(f"{next_cert} holds no certificate; restore {data} from backup")
    own = catalog if isinstance(catalog, Catalog) else Catalog(data / "catalog.db")
    try:
        own.rename_node(new_id.compact)
    finally:
        if own is not catalog:
            own.close()
    if (previous / NEXT_KEY).exists():
        os.replace(previous / NEXT_KEY, data / "node.key")
    os.replace(next_cert, data / "node.crt")
    fsync_dir(data)
    fsync_dir(previous)


def statement(data: Path) -> Successor | None:
    """This node's own successor statement while its grace period lasts, else None."""
    from .tls.successor import Successor, SuccessorRejected

    try:
        s = Successor.from_json((data / PREVIOUS_DIR / STATEMENT_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except SuccessorRejected as exc:
        log.error("ignoring %s: %s", data / PREVIOUS_DIR / STATEMENT_FILE, exc)
        return None
    return s if s.in_grace() else None


def retire(data: Path, now: float | None = None) -> bool:
    """After the grace period, delete the old key (the certificate and the statement stay as
    the record). True if a key was deleted."""
    from .tls.successor import Successor, SuccessorRejected

    previous = data / PREVIOUS_DIR
    key = previous / "node.key"
    if not key.exists():
        return False
    try:
        s = Successor.from_json((previous / STATEMENT_FILE).read_bytes())
    except (FileNotFoundError, SuccessorRejected):
        return False
    if s.in_grace(now):
        return False
    key.unlink()
    fsync_dir(previous)
    log.info("grace period of the renewal ended: deleted the old key of %s", s.old)
    return True


def learn_successor(node: LocalNode, s: Successor) -> bool:
    """A peer we trust announced its successor: check it with what we hold for the old id,
    pin the new certificate, move the peer's entry, extend delete authority. True if new.
    Raises :class:`~syncnode.tls.successor.SuccessorRejected` for a forged statement."""
    new = node.trust.adopt_successor(s)
    moved = node.catalog.move_peer(s.old.compact, s.new.compact)
    node.refresh_policy()
    if new or moved:
        log.info("peer %s renewed its certificate; trusting it as %s (old one until %s)",
                 s.old.short, s.new, time.strftime("%Y-%m-%d", time.gmtime(s.grace_until)))
    return new or moved


def lineage(node: LocalNode) -> dict[str, str]:
    """Every id in a renewal chain -> the chain's first id (this node's and its peers')."""
    parent = node.trust.predecessors()  # new -> old
    own = [*node.catalog.previous_node_ids(), node.node_id.compact]
    for older, newer in itertools.pairwise(own):
        parent.setdefault(newer, older)
    roots: dict[str, str] = {}
    for start in list(parent):
        seen, cur = {start}, start
        while cur in parent and parent[cur] not in seen:
            cur = parent[cur]
            seen.add(cur)
        for nid in seen:
            roots[nid] = cur
    return roots

