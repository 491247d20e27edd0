"""``syncnode verify --repair``: mend damaged or missing blobs from trusted peers.

A damaged blob (its bytes or its chunk list do not hash right) is moved aside, then pulled
again from each trusted peer in turn through the same verified, resumable transfer as
sync. The catalog is not touched: the put event already names the exact bytes wanted, so a
blob is repaired only with bytes that hash to its name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp

from .local import LocalNode
from .nodeid import NodeId
from .protocol import ProtocolError
from .sync import PeerClient
from .tls.errors import NodeTLSError
from .tls.peercert import fetch_peer_certificate
from .transfer import TransferError

log = logging.getLogger("syncnode.repair")


def quarantine(node: LocalNode, blob: str) -> Path | None:
    """Move a damaged blob out of the store (kept for inspection), or None if absent."""
    path = node.store.path(blob)
    if not path.exists():
        node.store.chunks_path(blob).unlink(missing_ok=True)
        return None
    folder = node.data / "damaged"
    folder.mkdir(exist_ok=True)
    target = folder / blob
    path.replace(target)
    node.store.chunks_path(blob).unlink(missing_ok=True)
    return target


async def repair_blobs(node: LocalNode, blobs: list[str]) -> dict[str, str]:
    """Try every trusted peer for every blob; return blob -> outcome ("repaired from X",
    or the reasons it could not be)."""
    outcome: dict[str, str] = {}
    peers = node.catalog.peers()
    clients = [PeerClient(node, NodeId.parse(p["node_id"]), p["url"]) for p in peers]
    try:
        for blob in blobs:
            put = node.catalog.put_for_blob(blob)
            if put is None:
                outcome[blob] = "no live event refers to it (run `syncnode gc`)"
                continue
            quarantine(node, blob)
            reasons = []
            for client in clients:
                try:
                    if node.trust.certificate(client.peer_id) is None and \
                            node.trust.ca_certificate() is None:
                        der = await fetch_peer_certificate(
                            client.base.rsplit("/peer/", 1)[0], node.identity, client.peer_id)
                        node.trust.pin(der, client.peer_id)
                    await client.fetch_blob(node.store, blob, put.size, put.chunks)
                    outcome[blob] = f"repaired from {client.peer_id.short}"
                    log.info("blob %s repaired from %s", blob, client.peer_id.short)
                    break
                except (ProtocolError, TransferError, NodeTLSError, aiohttp.ClientError,
                        OSError) as exc:
                    reasons.append(f"{client.peer_id.short}: {type(exc).__name__}: {exc}")
            else:
                outcome[blob] = ("not repaired: " + "; ".join(reasons)) if reasons else \
                    "not repaired: no trusted peers"
    finally:
        for c in clients:
            await c.close()
    return outcome
