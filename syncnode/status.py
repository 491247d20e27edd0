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
    """Every peer this node trusts or knows of, with its last recorded sync state (written by
    `syncnode run`). ``trusted_by`` says why it is admitted: ``pin`` (its certificate is
    pinned), ``id`` (trusted by id, pinned on first contact), ``ca`` (the cluster CA issued
    its certificate: it dialled us, or its events reached us), ``denied`` (removed: on the
    deny list, or revoked by the CA). ``renewed_from``: the id it had before it renewed its
    certificate."""
    trust = node.trust
    states = node.catalog.peer_states()
    links = trust.predecessors()
    has_ca = trust.ca_certificate() is not None
    rows: list[dict[str, Any]] = []
    listed: set[str] = {node.node_id.compact}
    for p in node.catalog.peers():
        peer = NodeId.parse(p["node_id"])
        st = states.get(p["node_id"], {})
        pinned = trust.certificate(peer) is not None
        row = {**st, "node_id": str(peer), "url": p["url"], "push": p["push"],
               "pinned": pinned, "trusted_by": "pin" if pinned else ("ca" if has_ca else "id")}
        if peer.compact in links:
            row["renewed_from"] = str(NodeId.parse(links[peer.compact]))
        rows.append(row)
        listed.add(peer.compact)
    # Peers nobody added: admitted by the cluster CA (seen dialling us), or the CA-issued
    # origins of events we hold. Listed so that an operator can see and remove them.
    candidates = [(nid.compact, der, "dialled this node") for nid, der, _ in trust.seen()]
    if has_ca:
        candidates += [(origin, der, "its events reached this node")
                       for origin, der in node.catalog.origin_certificates()]
    for compact, der, how in candidates:
        if compact in listed or compact in links.values() or not trust.issued_by_ca(der):
            continue
        listed.add(compact)
        peer = NodeId.parse(compact)
        refusal = trust.refusal(der)
        rows.append({**states.get(compact, {}), "node_id": str(peer), "url": "",
                     "push": "never", "pinned": False,
                     "trusted_by": "denied" if refusal else "ca",
                     "state": refusal or f"admitted by the cluster CA ({how})"})
    for compact in trust.denied_names():
        if compact not in listed:
            try:
                rows.append({"node_id": str(NodeId.parse(compact)), "url": "",
                             "push": "never", "pinned": False, "trusted_by": "denied",
                             "state": "on the deny list (syncnode peer remove)"})
            except ValueError:
                continue
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
