"""What a node reports about itself: counts, Merkle root, peers. Read through
:class:`syncnode.service.NodeService` by the CLI (`syncnode status`), the admin API and the
dashboard, so they always agree. Core: knows nothing of the DICOM bridge (the export
outbox is a read model of the catalog).

Much of it came from the network (a peer's error body, a URL, a PACS's error comment):
every string leaves here through :func:`syncnode.safetext.clean_tree`, so no front end
shows a raw control character."""

from __future__ import annotations

from typing import Any

from .local import LocalNode
from .nodeid import NodeId
from .safetext import clean_tree


def peer_rows(node: LocalNode) -> list[dict[str, Any]]:
    """Every trusted peer with its last recorded sync state (written by `syncnode run`)."""
    states = node.catalog.peer_states()
    rows = []
    for p in node.catalog.peers():
        peer = NodeId.parse(p["node_id"])
        st = states.get(p["node_id"], {})
        rows.append({**st, "node_id": str(peer), "url": p["url"], "push": p["push"],
                     "pinned": node.trust.certificate(peer) is not None})
    return clean_tree(rows)


def discovered_nodes(node: LocalNode) -> list[dict[str, Any]]:
    """Nodes `syncnode run --discovery` saw on the LAN recently, not trusted yet."""
    return clean_tree([{**d, "node_id": str(NodeId.parse(d["node_id"]))}
                       for d in node.catalog.discovered()])


def node_status(node: LocalNode) -> dict[str, Any]:
    root = node.catalog.merkle_root()
    return {"node_id": str(node.node_id), "data": str(node.data),
            "merkle_root": root.digest.hex(), **node.catalog.counts(),
            "peers": peer_rows(node), "discovered": discovered_nodes(node),
            "export": clean_tree(node.catalog.outbox.status())}
