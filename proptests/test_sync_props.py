"""Three nodes, any history of puts, deletes, re-puts and pairwise syncs: they converge.

The nodes are real data folders (catalog, blob store) without a network. A sync of one
node from another is the sync engine's decision logic in memory: :func:`syncnode.sync.
walk_diff` against the other catalog's Merkle answers (built as the peer server builds
them and parsed as the client parses them), the missing events fetched from the other
catalog, their blobs copied from the other store, then :meth:`Catalog.apply`. A put whose
blob the other node no longer holds (it deleted the instance) waits for its tombstone,
later in the same walk, as the engine does.

After syncing every ordered pair twice around, all nodes must show the same Merkle root,
the same events (every event ever made, none lost), the same live view, and exactly the
blobs their catalog references. The Merkle index must match the events on every node at
every step. ``INLINE_IDS`` is drawn small as well, so that walks descend to the leaves and
puts and tombstones travel in different batches (as in catalogs of thousands of events).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from syncnode import events as ev
from syncnode import protocol
from syncnode.authority import Policy
from syncnode.catalog import Catalog
from syncnode.local import LocalNode
from syncnode.protocol import RemoteNode
from syncnode.sync import walk_diff

NODES = 3
SOPS = [f"1.2.826.0.1.3680043.10.1999.77.{i}" for i in range(4)]
VARIANTS = 3  # different bytes for one SOP Instance UID
CT = "1.2.840.10008.5.1.4.1.1.2"
node_index = st.integers(0, NODES - 1)


def merkle_answer(catalog: Catalog, prefix: str) -> RemoteNode:
    """``GET /peer/v1/merkle?prefix=P`` from ``catalog``, through the wire format."""
    answer = protocol.read_merkle(catalog, prefix)  # what the server answers
    return protocol.parse_merkle(protocol.merkle_response(prefix, answer), prefix)


async def pull(dst: LocalNode, src: LocalNode) -> int:
    """Bring into ``dst`` every event of ``src`` (and the blobs it needs); return how many
    events were new."""

    async def fetch(prefix: str) -> RemoteNode:
        return merkle_answer(src.catalog, prefix)

    def apply(pairs: list[tuple[str, bytes]]) -> None:
        result = dst.collect(dst.catalog.apply(pairs, blob_present=dst.store.has))
        assert not result.rejected, result.rejected

    new = 0
    skipped: list[tuple[str, bytes]] = []
    async for theirs, _ours in walk_diff(dst, fetch):
        received = src.catalog.get_events(theirs)
        assert [e for e, _ in received] == theirs
        # the origins' certificates travel with the events, as in POST /peer/v1/events
        dst.catalog.offer_certificates(src.catalog.certificates_for(theirs))
        decoded = [(e, b, ev.decode_checked(e, b)) for e, b in received]
        apply([(e, b) for e, b, x in decoded
               if not isinstance(x, ev.PutEvent) or dst.store.has(x.blob)])
        for e, b, x in decoded:
            if not isinstance(x, ev.PutEvent) or dst.catalog.has_event(e):
                continue
            if not dst.catalog.is_tombstoned(e, x.origin) and not dst.store.has(x.blob):
                if not src.store.has(x.blob):
                    skipped.append((e, b))  # src deleted it; the tombstone comes later
                    continue
                info = dst.store.put_bytes(src.store.path(x.blob).read_bytes())
                assert info.hash == x.blob and info.chunks_root == x.chunks
            apply([(e, b)])
        new += len(theirs)
    for e, b in skipped:
        assert dst.catalog.is_tombstoned(e, ev.decode(b).origin), \
            f"src lacks the blob of its live put {e}"
        apply([(e, b)])
    return new


class ThreeNodes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsyncs are free there
        self.tmp = Path(tempfile.mkdtemp(prefix="syncprops-", dir=base))
        self.nodes = [LocalNode.init(self.tmp / f"n{i}") for i in range(NODES)]
        ids = {n.node_id.compact for n in self.nodes}
        for n in self.nodes:  # each site lets the others delete what it made
            me = n.node_id.compact
            n.catalog.policy = Policy(local_node=me, may_delete=frozenset(ids - {me}))
        self.loop = asyncio.new_event_loop()
        self.created: set[str] = set()  # every event any node ever made
        self.inline_ids = protocol.INLINE_IDS

    @initialize(inline_ids=st.sampled_from([1, 3, protocol.INLINE_IDS]))
    def choose_batch_size(self, inline_ids: int) -> None:
        protocol.INLINE_IDS = inline_ids

    def teardown(self) -> None:
        try:
            if self.nodes:
                self.converge()
        finally:
            protocol.INLINE_IDS = self.inline_ids
            self.loop.close()
            for n in self.nodes:
                n.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- what operators and peers do ---------------------------------------------------
    @rule(i=node_index, sop=st.sampled_from(SOPS), variant=st.integers(0, VARIANTS - 1))
    def put(self, i: int, sop: str, variant: int) -> None:
        """Import an instance; the same UID with other bytes on other nodes (or here), and
        the same bytes again after a delete (a re-put), are both in reach."""
        node = self.nodes[i]
        info = node.store.put_bytes(f"{sop} version {variant}".encode())
        attrs = {"sop_instance_uid": sop, "sop_class_uid": CT,
                 "study_instance_uid": SOPS[0] + ".0", "series_instance_uid": SOPS[0] + ".1"}
        for eid, new in node.catalog.add_local_puts([(attrs, info)],
                                                    blob_present=node.store.has):
            if new:
                self.created.add(eid)
        assert node.catalog.instance(sop) is not None

    @rule(i=node_index, pick=st.integers(0, len(SOPS) - 1))
    def delete(self, i: int, pick: int) -> None:
        """Delete one of the instances live on node i (its blob is freed unless another
        version still refers to the same bytes)."""
        node = self.nodes[i]
        live = [x.sop_instance_uid for x in node.catalog.instances()]
        if not live:
            return
        sop = live[pick % len(live)]
        result = node.delete_instances([sop])
        assert len(result.inserted) == 1
        self.created.update(result.inserted)
        assert node.catalog.instance(sop) is None

    def _pull(self, dst: int, src: int) -> None:
        """One sync; afterwards ``dst`` holds every event ``src`` holds."""
        self.loop.run_until_complete(pull(self.nodes[dst], self.nodes[src]))
        assert set(self.nodes[dst].catalog.all_event_ids()) >= set(
            self.nodes[src].catalog.all_event_ids())

    @rule(dst=node_index, src=node_index)
    def sync_pair(self, dst: int, src: int) -> None:
        if dst != src:
            self._pull(dst, src)

    @rule()
    def converge(self) -> None:
        """Every ordered pair, twice around; then everything must be equal."""
        for _ in range(2):
            for dst in range(NODES):
                for src in range(NODES):
                    if dst != src:
                        self._pull(dst, src)
        roots = {n.catalog.merkle_root() for n in self.nodes}
        assert len(roots) == 1, roots
        events = [set(n.catalog.all_event_ids()) for n in self.nodes]
        assert events[0] == self.created, "an event was lost (or appeared from nowhere)"
        assert all(e == events[0] for e in events)
        views = [[i.to_dict() for i in n.catalog.instances()] for n in self.nodes]
        assert all(v == views[0] for v in views)
        assert len({v["sop_instance_uid"] for v in views[0]}) == len(views[0])
        blobs = [set(n.store.iter_hashes()) for n in self.nodes]
        assert all(b == blobs[0] for b in blobs)
        assert blobs[0] == self.nodes[0].catalog.referenced_blobs()

    # -- what holds at every step ------------------------------------------------------
    @invariant()
    def each_node_is_consistent(self) -> None:
        for n in self.nodes:
            assert n.catalog.check_derived() == []
            assert set(n.store.iter_hashes()) == n.catalog.referenced_blobs()
            live = {i.blob for i in n.catalog.instances()}
            assert live <= n.catalog.referenced_blobs()


ThreeNodes.TestCase.settings = settings(
    max_examples=30, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_three_nodes_converge = ThreeNodes.TestCase
