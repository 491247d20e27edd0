"""The catalog's in-memory Merkle cache never goes stale when another connection writes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from syncnode import events as ev
from syncnode.authority import Policy
from syncnode.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import FakeOrigin

LOCAL, PEER = FakeOrigin("local"), FakeOrigin("peer")


def catalog(path: Path, policy: Policy | None = None) -> Catalog:
    c = Catalog(path, node_id=LOCAL.id, signer=lambda: LOCAL.signer, policy=policy)
    c.offer_certificates([PEER.cert_der])
    return c


def put(i: int, origin: FakeOrigin = PEER) -> tuple[str, bytes]:
    return origin.sign(ev.PutEvent(
        origin=origin.id, hlc=i + 1, blob=os.urandom(32).hex(), size=10,
        chunks=os.urandom(32).hex(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.{i}", series_instance_uid="1.2.3", study_instance_uid="1.2"))


def test_interleaved_writers_keep_the_incremental_root_exact(tmp_path: Path) -> None:
    one = catalog(tmp_path / "c.db")
    two = catalog(tmp_path / "c.db")
    n = 0
    for round_ in range(30):
        writer = one if round_ % 3 else two
        batch = [put(n + k) for k in range(round_ % 7 + 1)]
        n += len(batch)
        writer.apply(batch)
        assert one.merkle_root() == two.merkle_root() == one.recompute_merkle()
    # a failed transaction must not leave a poisoned cache behind
    bad = [put(n), ("0" * 64, b"{}")]
    result = one.apply(bad)
    assert result.rejected and one.merkle_root() == one.recompute_merkle()
    two.apply([put(n + 1)])
    one.apply([put(n + 2)])
    assert one.merkle_root() == two.merkle_root() == one.recompute_merkle()
    assert one.merkle_root().count == n + 3


def test_a_far_future_peer_clock_does_not_exhaust_ours(tmp_path: Path) -> None:
    """With clocks unbounded (max_clock_skew None; the default refuses such an event, see
    test_authority.py), our clock still stops at MAX_OBSERVED_HLC."""
    cat = catalog(tmp_path / "c.db", Policy(local_node=LOCAL.id, max_clock_skew_ms=None))
    e = ev.PutEvent(origin=PEER.id, hlc=2**63 - 1, blob="ab" * 32, size=1, chunks="cd" * 32,
                    sop_class_uid="1.2", sop_instance_uid="1.2.3",
                    series_instance_uid="1.2.4", study_instance_uid="1.2.5")
    assert cat.apply([PEER.sign(e)]).inserted  # the event itself is kept
    assert int(cat.get_meta("hlc") or 0) == ev.MAX_OBSERVED_HLC
    # local events remain possible, valid for peers, and far from exhaustion
    [del_id] = cat.delete_instances(["1.2.3"]).inserted
    [(_, dbody)] = cat.get_events([del_id])
    assert ev.MAX_OBSERVED_HLC < ev.decode_checked(del_id, dbody).hlc < 2**63 - 1
    assert cat.instance("1.2.3") is None


def test_deleting_many_versions_splits_tombstones(tmp_path: Path) -> None:
    cat = catalog(tmp_path / "c.db")
    versions = []
    for i in range(1200):
        e = ev.PutEvent(origin=PEER.id, hlc=i + 1, blob=os.urandom(32).hex(), size=1,
                        chunks=os.urandom(32).hex(), sop_class_uid="1.2",
                        sop_instance_uid="1.2.3", series_instance_uid="1.2.4",
                        study_instance_uid="1.2.5")
        versions.append(PEER.sign(e))
    assert len(cat.apply(versions).inserted) == 1200
    result = cat.delete_instances(["1.2.3"])
    assert len(result.inserted) == 3  # 500 + 500 + 200 versions
    for eid, body in cat.get_events(result.inserted):
        assert len(body) < ev.MAX_EVENT_BYTES
        ev.decode_checked(eid, body)
    assert cat.instance("1.2.3") is None


def test_snapshot_gives_merkle_reads_from_one_instant(tmp_path: Path) -> None:
    from syncnode import merkle

    reader = catalog(tmp_path / "c.db")
    writer = catalog(tmp_path / "c.db")
    writer.apply([put(i) for i in range(50)])
    with reader.snapshot():
        before = reader.merkle_node("")
        children = reader.merkle_children("")
        writer.apply([put(i) for i in range(50, 80)])  # another connection commits meanwhile
        ids = reader.ids_under("")
        assert before.count == len(ids) == 50
        assert merkle.inner_digest(children) == before
    assert reader.merkle_node("").count == 80
