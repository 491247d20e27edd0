"""What a node reports about itself: counts, Merkle root, peers. Read through
:class:`syncnode.service.NodeService` by the CLI (`syncnode status`), the admin API and the
dashboard, so they always agree. Core: knows nothing of the DICOM bridge (the export
outbox is a read model of the catalog).

Derived here, purely from the recorded peer states, so every front end shows the same:
per peer the progress of the current round (``progress``: instances and bytes still
needed of what the round set out to pull, never an average of percentages) and its ETA
at the recent receive rate; per recent study when it arrived here and when each peer was
last seen holding it (its Merkle root equal to ours after the arrival: "confirmed no later
than"). ``/metrics`` reads the same peer rows, so its byte counters equal the status.

Much of it came from the network (a peer's error body, a URL, a PACS's error comment):
every string leaves here through :func:`syncnode.safetext.clean_tree`, so no front end
shows a raw control character."""

from __future__ import annotations

from typing import Any

from .local import LocalNode
from .nodeid import NodeId
from .safetext import clean_tree
from .scrub import last_result

ETA_SAMPLES = 10  # the recent throughput samples the ETA is computed from
ARRIVALS_SHOWN = 20


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
        row["progress"] = progress(row)
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


def progress(row: dict[str, Any]) -> dict[str, Any] | None:
    """The current round's pull: totals, what is still needed, ETA (None: nothing to pull).
    ``eta_seconds`` is None until bytes have been received in the recent samples."""
    total_blobs, total_bytes = row.get("round_blobs", 0), row.get("round_bytes", 0)
    need_blobs, need_bytes = row.get("blobs_needed", 0), row.get("bytes_needed", 0)
    if not (need_blobs or need_bytes) or row.get("in_sync"):
        return None
    total_blobs, total_bytes = max(total_blobs, need_blobs), max(total_bytes, need_bytes)
    recent = (row.get("throughput") or {}).get("in", [])[-ETA_SAMPLES:]
    rate = sum(recent) / len(recent) if recent else 0.0
    return {"instances_total": total_blobs, "instances_needed": need_blobs,
            "bytes_total": total_bytes, "bytes_needed": need_bytes,
            "fraction_done": (total_bytes - need_bytes) / total_bytes if total_bytes else 0.0,
            "rate": round(rate), "eta_seconds": round(need_bytes / rate) if rate > 0 else None}


def study_arrivals(node: LocalNode, peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The studies that arrived here most recently: when (first and last instance; while
    ``instances_needed`` > 0 it is still arriving), and per peer when it was confirmed to
    hold them (see the module doc), if it was."""
    rows = node.catalog.study_arrivals(ARRIVALS_SHOWN)
    for r in rows:
        # still being pulled: not complete here yet (instances still needed, all peers)
        r["instances_needed"] = sum((p.get("studies_needed") or {}).get(
            r["study_instance_uid"], [0, 0])[0] for p in peers)
        at = {}
        for p in peers:
            equal = p.get("equal_since") or 0.0
            if equal and p.get("remote_root") == p.get("local_root") \
                    and p.get("last_success", 0.0) >= r["arrived"]:
                at[p["node_id"]] = max(equal, r["arrived"])
        r["at_peers"] = at
    return rows


def discovered_nodes(node: LocalNode) -> list[dict[str, Any]]:
    """Nodes `syncnode run --discovery` saw on the LAN recently, not trusted yet."""
    return clean_tree([{**d, "node_id": str(NodeId.parse(d["node_id"]))}
                       for d in node.catalog.discovered()])


def node_status(node: LocalNode) -> dict[str, Any]:
    root = node.catalog.merkle_root()
    peers = peer_rows(node)
    return {"node_id": str(node.node_id), "data": str(node.data),
            "merkle_root": root.digest.hex(), **node.catalog.counts(),
            "peers": peers, "discovered": discovered_nodes(node),
            "export": clean_tree(node.catalog.outbox.status()),
            "arrivals": clean_tree(study_arrivals(node, peers)),
            "verify": clean_tree(last_result(node.data))}
