"""The catalog: live-view rule, tombstones, apply, freed blobs, Merkle maintenance, counts,
several processes writing one catalog."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import blake3
import pytest

from syncnode import events as ev
from syncnode import merkle
from syncnode.authority import Policy
from syncnode.blobstore import BlobInfo
from syncnode.catalog import BlobNotPresent, Catalog
from syncnode.ids import InvalidUID
from syncnode.local import LocalNode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import origins

# Signed origins, ids ordered as their names; LOCALNODE is the catalog's own node.
ORIGINS = origins("LOCALNODE", "NODE0", "NODE1", "NODE2", "NODEA", "NODEB", "NODEC", "NODEZ")
LOCAL = ORIGINS["LOCALNODE"].id

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.1"
SERIES = "1.2.826.0.1.1.1"


def h(tag: str) -> str:
    return blake3.blake3(tag.encode()).hexdigest()


def fake_blob(tag: str, size: int = 1000) -> BlobInfo:
    """A BlobInfo for catalog-only tests (no bytes needed: the catalog never reads them)."""
    return BlobInfo(h("blob:" + tag), size, (h("chunk:" + tag),), created=True)


def attrs(sop: str, study: str = STUDY, series: str = SERIES, **extra: str) -> dict[str, str]:
    return {"sop_instance_uid": sop, "sop_class_uid": CT, "study_instance_uid": study,
            "series_instance_uid": series, "patient_id": extra.get("patient_id", "P1"),
            "modality": extra.get("modality", "CT"), "study_date": "20240101",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1"}


def foreign_put(origin: str, hlc: int, sop: str, blob: str | None = None, *,
                study: str = STUDY, series: str = SERIES, size: int = 1000
                ) -> tuple[str, bytes]:
    """A put signed by the named origin."""
    return ORIGINS[origin].put(hlc, sop, blob or h(f"blob:{origin}:{hlc}:{sop}"), size=size,
                         study=study, series=series, chunks=h("chunks"))


def foreign_delete(origin: str, hlc: int, sop: str, removes: list[str]) -> tuple[str, bytes]:
    return ORIGINS[origin].delete(hlc, sop, removes)


# The live-view rule alone: any authentic delete counts (delete authority is tested in
# test_authority.py), clocks unbounded (test_authority.py too).
LIVE_RULE = Policy(local_node=LOCAL, delete_authority="any", max_clock_skew_ms=None)


def new_catalog(path: Path) -> Catalog:
    c = Catalog(path, node_id=LOCAL, signer=lambda: ORIGINS["LOCALNODE"].signer, policy=LIVE_RULE)
    c.offer_certificates(o.cert_der for o in ORIGINS.values())
    return c


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    c = new_catalog(tmp_path / "catalog.db")
    yield c
    c.close()


def live_event(c: Catalog, sop: str) -> str | None:
    inst = c.instance(sop)
    return inst.event_id if inst else None


def puts_row(c: Catalog, eid: str) -> tuple[int, int]:
    """(removed, live) of a put row, read straight from the table."""
    row = c._db.execute("SELECT removed, live FROM puts WHERE event_id=?",
                        (bytes.fromhex(eid),)).fetchone()
    assert row is not None, eid
    return row[0], row[1]


# -- the live-view rule --------------------------------------------------------------------


def test_two_origins_greatest_hlc_origin_id_is_live(tmp_path: Path) -> None:
    sop = "1.2.3.100"
    a = foreign_put("NODEA", 5000, sop)
    b = foreign_put("NODEB", 5000, sop)  # same hlc: the greater origin wins
    c_ = foreign_put("NODEA", 4000, sop)  # older
    for order in ([a, b, c_], [c_, b, a], [b, a, c_]):
        cat = new_catalog(tmp_path / f"{order[0][0][:8]}.db")
        cat.apply(order)
        assert live_event(cat, sop) == b[0]
        assert [i.sop_instance_uid for i in cat.instances()] == [sop]
        assert puts_row(cat, a[0]) == (0, 0) and puts_row(cat, c_[0]) == (0, 0)
        cat.close()
    # higher hlc beats greater origin
    cat = new_catalog(tmp_path / "hlc.db")
    d = foreign_put("NODEA", 6000, sop)
    cat.apply([a, b, d])
    assert live_event(cat, sop) == d[0]
    cat.close()


def test_same_hlc_and_origin_greatest_id_wins(cat: Catalog) -> None:
    sop = "1.2.3.101"
    x = foreign_put("NODEA", 7000, sop, h("x"))
    y = foreign_put("NODEA", 7000, sop, h("y"))
    cat.apply([x, y])
    assert live_event(cat, sop) == max(x[0], y[0])


def test_delete_tombstones_the_puts_it_names(cat: Catalog) -> None:
    sop = "1.2.3.102"
    old = foreign_put("NODEA", 1000, sop)
    new = foreign_put("NODEB", 2000, sop)
    cat.apply([old, new])
    assert live_event(cat, sop) == new[0]
    # a delete naming only the newer version: the older one (not removed) becomes live
    res = cat.apply([foreign_delete("NODEB", 3000, sop, [new[0]])])
    assert res.rejected == {}
    assert puts_row(cat, new[0]) == (1, 0)
    assert live_event(cat, sop) == old[0]
    # a delete naming the remaining version: nothing is live
    cat.apply([foreign_delete("NODEA", 3001, sop, [old[0]])])
    assert live_event(cat, sop) is None
    assert cat.instances() == []
    assert cat.counts()["instances"] == 0


def test_put_arriving_after_its_tombstone_is_born_removed(cat: Catalog) -> None:
    sop = "1.2.3.103"
    put = foreign_put("NODEA", 1000, sop)
    cat.apply([foreign_delete("NODEB", 2000, sop, [put[0]])])
    res = cat.apply([put])
    assert res.inserted == [put[0]]
    assert puts_row(cat, put[0]) == (1, 0)
    assert live_event(cat, sop) is None
    # and it does not hold its blob alive
    assert put[1] and json.loads(put[1])["blob"] not in cat.referenced_blobs()


def test_reput_after_delete_is_live(cat: Catalog) -> None:
    sop = "1.2.3.104"
    blob = fake_blob("v1")
    [(first, new)] = cat.add_local_puts([(attrs(sop), blob)])
    assert new
    res = cat.delete_instances([sop])
    assert len(res.inserted) == 1 and res.freed_blobs == {blob.hash}
    assert live_event(cat, sop) is None
    [(second, new)] = cat.add_local_puts([(attrs(sop), blob)])  # the same bytes again
    assert new and second != first
    assert live_event(cat, sop) == second
    assert puts_row(cat, first) == (1, 0)
    assert cat.referenced_blobs() == {blob.hash}


def test_concurrent_reput_survives_a_foreign_delete(cat: Catalog) -> None:
    """A delete names only the puts its node had seen: a put it did not see survives it."""
    sop = "1.2.3.105"
    seen = foreign_put("NODEA", 1000, sop)
    unseen = foreign_put("NODEC", 1500, sop)
    cat.apply([seen, unseen, foreign_delete("NODEB", 2000, sop, [seen[0]])])
    assert live_event(cat, sop) == unseen[0]


def test_reimport_is_a_noop(cat: Catalog) -> None:
    sop = "1.2.3.106"
    [(eid, new)] = cat.add_local_puts([(attrs(sop), fake_blob("a"))])
    assert new
    n = cat.event_count()
    root = cat.merkle_root()
    assert cat.add_local_puts([(attrs(sop), fake_blob("a"))]) == [(eid, False)]
    # within one batch too
    res = cat.add_local_puts([(attrs("1.2.3.107"), fake_blob("b")),
                              (attrs("1.2.3.107"), fake_blob("b"))])
    assert res[0][1] is True and res[1] == (res[0][0], False)
    assert cat.event_count() == n + 1
    assert cat.merkle_root() != root
    # different bytes for the same instance: a new version, which is live
    [(eid2, new2)] = cat.add_local_puts([(attrs(sop), fake_blob("a2"))])
    assert new2 and live_event(cat, sop) == eid2
    # importing a folder holding both versions again adds nothing, in either order
    n = cat.event_count()
    for items in ([fake_blob("a"), fake_blob("a2")], [fake_blob("a2"), fake_blob("a")]):
        res = cat.add_local_puts([(attrs(sop), b) for b in items])
        assert sorted(res) == sorted([(eid, False), (eid2, False)])
    assert cat.event_count() == n and live_event(cat, sop) == eid2
    # a third version imported between copies of the first two, in one batch
    res = cat.add_local_puts([(attrs(sop), fake_blob(t)) for t in ("a", "a3", "a2", "a3")])
    assert [new for _, new in res] == [False, True, False, False]
    assert live_event(cat, sop) == res[1][0]


def test_local_hlc_moves_past_observed_remote_clock(cat: Catalog) -> None:
    sop = "1.2.3.108"
    far = (ev.hlc_tick(0) >> 16) + 10 * 365 * 86_400_000  # ten years ahead, in ms
    remote = foreign_put("NODEZ", far << 16, sop)
    cat.apply([remote])
    assert live_event(cat, sop) == remote[0]
    # a new local version made after seeing it must be ordered after it
    [(eid, _)] = cat.add_local_puts([(attrs(sop), fake_blob("newer"))])
    assert live_event(cat, sop) == eid
    assert cat.put_event(eid).hlc > far << 16
    # local deletes too
    res = cat.delete_instances([sop])
    (del_id,) = res.inserted
    [(_, body)] = cat.get_events([del_id])
    assert ev.decode(body).hlc > cat.put_event(eid).hlc


# -- apply: idempotence and rejection ------------------------------------------------------


def test_apply_is_idempotent(cat: Catalog) -> None:
    sop = "1.2.3.110"
    batch = [foreign_put("NODEA", 1000 + i, f"{sop}.{i}") for i in range(20)]
    batch.append(foreign_delete("NODEA", 5000, f"{sop}.3", [batch[3][0]]))
    first = cat.apply(batch)
    assert sorted(first.inserted) == sorted(e for e, _ in batch)
    state = (cat.event_count(), cat.merkle_root(), cat.instances(), cat.counts())
    again = cat.apply(batch + batch[:5])
    assert again.inserted == [] and again.rejected == {} and again.freed_blobs == set()
    assert (cat.event_count(), cat.merkle_root(), cat.instances(), cat.counts()) == state


def test_apply_rejects_body_not_matching_id(cat: Catalog) -> None:
    good = foreign_put("NODEA", 1000, "1.2.3.120")
    other = foreign_put("NODEA", 1001, "1.2.3.121")
    tampered = good[1].replace(b'"size":1000', b'"size":1001')
    assert tampered != good[1]
    res = cat.apply([(good[0], tampered), (h("elsewhere"), good[1]), other])
    assert set(res.rejected) == {good[0], h("elsewhere")}
    assert all("hashes to" in reason for reason in res.rejected.values())
    assert res.inserted == [other[0]]
    assert not cat.has_event(good[0])
    # a non-canonical body under its own hash is rejected too
    loose = json.dumps(json.loads(good[1]), sort_keys=True).encode()
    res = cat.apply([(ev.event_id(loose), loose)])
    assert list(res.rejected) == [ev.event_id(loose)]
    assert cat.event_count() == 1


def test_apply_rejects_malformed_ids_without_aborting_the_batch(cat: Catalog) -> None:
    good = foreign_put("NODEA", 1000, "1.2.3.125")
    res = cat.apply([("../../etc/passwd", good[1]), (good[0].upper(), good[1]), good])
    assert set(res.rejected) == {"../../etc/passwd", good[0].upper()}
    assert res.inserted == [good[0]]


def test_apply_requires_the_blob_unless_already_tombstoned(cat: Catalog) -> None:
    present = {h("blob:here")}
    have = foreign_put("NODEA", 1000, "1.2.3.130", h("blob:here"))
    lack = foreign_put("NODEA", 1001, "1.2.3.131", h("blob:elsewhere"))
    doomed = foreign_put("NODEA", 1002, "1.2.3.132", h("blob:gone"))
    res = cat.apply([have, lack], blob_present=present.__contains__)
    assert res.inserted == [have[0]]
    assert set(res.rejected) == {lack[0]} and "not present" in res.rejected[lack[0]]
    assert not cat.has_event(lack[0])
    # a put whose tombstone is already here needs no blob: it is born removed
    cat.apply([foreign_delete("NODEB", 2000, "1.2.3.132", [doomed[0]])])
    res = cat.apply([doomed], blob_present=present.__contains__)
    assert res.inserted == [doomed[0]] and res.rejected == {}
    assert puts_row(cat, doomed[0]) == (1, 0)
    # without blob_present the caller vouches for the blob
    assert cat.apply([lack]).inserted == [lack[0]]


def test_apply_rejects_poison_strings(cat: Catalog) -> None:
    """A canonical-looking body with a lone surrogate must be rejected, not crash the batch."""
    good = foreign_put("NODEA", 1000, "1.2.3.135")
    obj = json.loads(good[1])
    obj["patient_id"] = "\ud800"
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    res = cat.apply([(ev.event_id(body), body), good])
    assert list(res.rejected) == [ev.event_id(body)]
    assert res.inserted == [good[0]]


def test_add_local_puts_refuses_a_vanished_blob(cat: Catalog) -> None:
    with pytest.raises(BlobNotPresent):
        cat.add_local_puts([(attrs("1.2.3.140"), fake_blob("x")),
                            (attrs("1.2.3.141"), fake_blob("y"))],
                           blob_present=lambda b: b == fake_blob("x").hash)
    assert cat.event_count() == 0  # all or nothing


def test_add_local_puts_rejects_bad_uids(cat: Catalog) -> None:
    with pytest.raises(InvalidUID):
        cat.add_local_puts([(attrs("1.2.3.142"), fake_blob("ok")),
                            (attrs("1.2.abc"), fake_blob("bad"))])
    assert cat.event_count() == 0
    with pytest.raises(InvalidUID):
        cat.delete_instances(["1.2.3.4", "'; DROP TABLE events; --"])
    with pytest.raises(InvalidUID):
        cat.delete_study("../1")
    with pytest.raises(InvalidUID):
        cat.instances(study="1.2.x")


def test_oversized_indexed_attributes_do_not_break_a_batch(cat: Catalog) -> None:
    """Attributes the inspector accepts (a Patient ID longer than 64 characters, control
    characters) must not make the event invalid and abort the import of a whole batch."""
    long_pid = attrs("1.2.3.150", patient_id="X" * 200)
    ctrl = attrs("1.2.3.151", patient_id="A\tB\x1bC", modality="CT\x00")
    res = cat.add_local_puts([(attrs("1.2.3.149"), fake_blob("ok")),
                              (long_pid, fake_blob("long")), (ctrl, fake_blob("ctrl"))])
    assert [new for _, new in res] == [True, True, True]
    for eid, _ in res:
        [(_, body)] = cat.get_events([eid])
        ev.decode_checked(eid, body)  # what a peer will check
    assert {i.sop_instance_uid for i in cat.instances()} == {"1.2.3.149", "1.2.3.150",
                                                             "1.2.3.151"}
    for sop, original in (("1.2.3.150", long_pid), ("1.2.3.151", ctrl)):
        inst = cat.instance(sop)
        for key in ("patient_id", "modality"):
            value = getattr(inst, key)
            assert len(value) <= 64 and value.isprintable()
        assert original["patient_id"].startswith(inst.patient_id) or sop == "1.2.3.151"
    assert cat.instance("1.2.3.151").modality == "CT"
    assert cat.instance("1.2.3.149").patient_id == "P1"  # ordinary values are unchanged


# -- freed blobs and the store -------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> LocalNode:
    n = LocalNode.init(tmp_path / "node")
    n.catalog.policy = Policy(local_node=n.node_id.compact, delete_authority="any")
    n.catalog.offer_certificates(o.cert_der for o in ORIGINS.values())
    yield n
    n.close()


def store_instance(node: LocalNode, sop: str, data: bytes, **kw: str) -> tuple[str, str]:
    info = node.store.put_bytes(data)
    [(eid, _)] = node.catalog.add_local_puts([(attrs(sop, **kw), info)],
                                             blob_present=node.store.has)
    return eid, info.hash


def test_delete_frees_blobs_not_referenced_elsewhere(node: LocalNode) -> None:
    _, shared = store_instance(node, "1.2.5.1", b"shared bytes")
    store_instance(node, "1.2.5.2", b"shared bytes")  # another instance, same bytes
    _, own = store_instance(node, "1.2.5.3", b"own bytes")
    res = node.delete_instances(["1.2.5.1"])
    assert len(res.inserted) == 1 and res.freed_blobs == set()
    assert node.store.has(shared)
    res = node.delete_instances(["1.2.5.2", "1.2.5.3"])
    assert len(res.inserted) == 2 and res.freed_blobs == {shared, own}
    assert not node.store.has(shared) and not node.store.has(own)
    assert not node.store.chunks_path(own).exists()
    assert node.catalog.instances() == []
    # deleting again: nothing matches
    assert node.delete_instances(["1.2.5.2"]).inserted == []


def test_delete_of_one_version_keeps_the_other_versions_blob(node: LocalNode) -> None:
    eid1, b1 = store_instance(node, "1.2.5.10", b"version one")
    eid2, b2 = store_instance(node, "1.2.5.10", b"version two")
    assert live_event(node.catalog, "1.2.5.10") == eid2
    # a peer deletes only the version it had seen
    res = node.collect(node.catalog.apply([foreign_delete("NODEB", ev.hlc_tick(0) + 10**9,
                                                          "1.2.5.10", [eid2])]))
    assert res.freed_blobs == {b2}
    assert not node.store.has(b2) and node.store.has(b1)
    assert live_event(node.catalog, "1.2.5.10") == eid1


def test_delete_study(node: LocalNode) -> None:
    other = "1.2.826.0.1.2"
    blobs = [store_instance(node, f"1.2.6.{i}", f"study one {i}".encode())[1] for i in range(4)]
    _, kept = store_instance(node, "1.2.6.99", b"study two", study=other)
    res = node.delete_study(STUDY)
    assert len(res.inserted) == 4 and res.freed_blobs == set(blobs)
    assert not any(node.store.has(b) for b in blobs) and node.store.has(kept)
    assert [i.sop_instance_uid for i in node.catalog.instances()] == ["1.2.6.99"]
    assert node.catalog.instances(study=STUDY) == []
    assert node.delete_study(STUDY).inserted == []


def test_gc_and_verify(node: LocalNode) -> None:
    _, kept = store_instance(node, "1.2.7.1", b"catalogued")
    stray = node.store.put_bytes(b"never catalogued").hash
    report = node.verify()
    assert report.ok and report.blobs_checked == 2
    assert node.gc() == 1
    assert node.store.has(kept) and not node.store.has(stray)
    node.store.path(kept).unlink()
    report = node.verify()
    assert not report.ok and report.missing == [kept]


# -- Merkle maintenance --------------------------------------------------------------------


def check_merkle(c: Catalog) -> None:
    """Incremental root == recomputed root == independent tree over the ids; every stored
    inner node recombines from its children; counts and ids_under agree."""
    ids = c.all_event_ids()
    assert ids == sorted(ids) and len(ids) == c.event_count()
    reference = merkle.MemoryMerkle(bytes.fromhex(e) for e in ids).root()
    assert c.merkle_root() == c.recompute_merkle() == reference
    assert c.ids_under("") == ids
    assert c.check_derived() == []
    todo = [""]
    visited = 0
    while todo:
        prefix = todo.pop()
        visited += 1
        node = c.merkle_node(prefix)
        under = c.ids_under(prefix)
        assert node.count == len(under), prefix
        assert all(e.startswith(prefix) for e in under)
        if len(prefix) == merkle.LEAF_LEVEL:
            assert node == merkle.leaf_digest(bytes.fromhex(e) for e in under)
            with pytest.raises(ValueError):
                c.merkle_children(prefix)
            continue
        children = c.merkle_children(prefix)
        assert merkle.inner_digest(children) == node, prefix
        for i, child in enumerate(children):
            child_prefix = prefix + "0123456789abcdef"[i]
            assert c.merkle_node(child_prefix) == child
            if child.count:
                todo.append(child_prefix)
            else:
                assert child == merkle.EMPTY_NODE and c.ids_under(child_prefix) == []
    assert visited > 1 or not ids


def test_merkle_after_mixed_operations(cat: Catalog) -> None:
    check_merkle(cat)
    assert cat.merkle_root() == merkle.EMPTY_NODE
    cat.add_local_puts([(attrs(f"1.2.8.{i}"), fake_blob(f"m{i}")) for i in range(120)])
    check_merkle(cat)
    cat.delete_instances([f"1.2.8.{i}" for i in range(0, 120, 7)])
    check_merkle(cat)
    foreign = [foreign_put(f"NODE{i % 3}", 10_000 + i, f"1.2.8.{i}") for i in range(60, 200)]
    cat.apply(foreign[::2])
    check_merkle(cat)
    cat.apply(foreign)  # half new, half duplicates
    check_merkle(cat)
    cat.delete_study(STUDY)
    check_merkle(cat)
    assert cat.instances() == []
    cat.add_local_puts([(attrs(f"1.2.8.{i}"), fake_blob(f"m{i}")) for i in range(5)])
    check_merkle(cat)
    limited = cat.ids_under("", limit=10)
    assert limited == cat.all_event_ids()[:10]


def test_merkle_root_changes_with_every_event(cat: Catalog) -> None:
    roots = {cat.merkle_root().digest}
    for i in range(30):
        cat.add_local_puts([(attrs(f"1.2.9.{i}"), fake_blob(f"r{i}"))])
        roots.add(cat.merkle_root().digest)
    assert len(roots) == 31
    assert cat.merkle_root().count == 30


# -- counts --------------------------------------------------------------------------------


def test_counts(cat: Catalog) -> None:
    assert cat.counts() == {"events": 0, "put_events": 0, "delete_events": 0, "instances": 0,
                            "studies": 0, "series": 0, "instance_bytes": 0, "blobs": 0,
                            "blob_bytes": 0}
    study2, series2, series3 = "1.2.826.0.1.2", "1.2.826.0.1.1.2", "1.2.826.0.1.2.1"
    items = [(attrs(f"1.2.10.{i}"), fake_blob(f"c{i}", 100 + i)) for i in range(3)]
    items += [(attrs(f"1.2.10.{i}", series=series2), fake_blob(f"c{i}", 100 + i))
              for i in range(3, 5)]
    items += [(attrs("1.2.10.9", study=study2, series=series3), fake_blob("c9", 1000))]
    cat.add_local_puts(items)
    # a second version of 1.2.10.0 from a peer, newer: replaces it in the live view
    newer = foreign_put("NODEB", ev.hlc_tick(0) + 10**9, "1.2.10.0", h("c0-v2"), size=7)
    cat.apply([newer])
    # an instance sharing the bytes of 1.2.10.1
    cat.add_local_puts([(attrs("1.2.10.5", series=series2), fake_blob("c1", 101))])
    cat.delete_instances(["1.2.10.2"])
    got = cat.counts()
    assert got == {
        "events": 6 + 1 + 1 + 1, "put_events": 8, "delete_events": 1,
        "instances": 6,  # 0 (v2), 1, 3, 4, 5, 9
        "studies": 2, "series": 3,
        "instance_bytes": 7 + 101 + 103 + 104 + 101 + 1000,
        # blobs some non-removed put refers to: c0 (old version kept), c0-v2, c1, c3, c4, c9
        "blobs": 6, "blob_bytes": 100 + 7 + 101 + 103 + 104 + 1000,
    }
    assert got["events"] == cat.event_count() == len(cat.all_event_ids())
    studies = {s["study_instance_uid"]: s for s in cat.studies()}
    assert studies[STUDY]["instances"] == 5 and studies[STUDY]["series"] == 2
    assert studies[study2]["instances"] == 1 and studies[study2]["bytes"] == 1000


# -- several processes ---------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, sys
    import blake3
    from syncnode import events as ev
    from syncnode.authority import PERMISSIVE
    from syncnode.blobstore import BlobInfo
    from syncnode.local import LocalNode

    path, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    h = lambda s: blake3.blake3(s.encode()).hexdigest()
    cat = LocalNode(path).catalog
    cat.policy = PERMISSIVE  # (unsigned foreign events: this test is about concurrency)
    made, sops, deleted = [], [], []
    for i in range(n):
        sop = f"1.2.99.{wid}.{i}"
        attrs = {"sop_instance_uid": sop, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                 "study_instance_uid": f"1.2.99.{wid}", "series_instance_uid": f"1.2.99.{wid}.0",
                 "patient_id": "P", "modality": "CT", "study_date": "", "transfer_syntax_uid": ""}
        blob = BlobInfo(h(f"{wid}:{i}"), 10, (h("c"),), True)
        made += [eid for eid, new in cat.add_local_puts([(attrs, blob)]) if new]
        sops.append(sop)
        if i % 10 == 5:
            body = ev.encode(ev.PutEvent(origin=f"PEER{wid}", hlc=1000 + i, blob=h(f"f{wid}{i}"),
                size=1, chunks=h("c"), sop_class_uid="1.2.3", sop_instance_uid=f"1.3.{wid}.{i}",
                series_instance_uid="1.3", study_instance_uid="1.3"))
            made += cat.apply([(ev.event_id(body), body)]).inserted
            sops.append(f"1.3.{wid}.{i}")
        if i % 25 == 24:
            made += cat.delete_instances([sops[-3]]).inserted
            deleted.append(sops[-3])
    print(json.dumps({"made": made, "live": sorted(set(sops) - set(deleted))}))
""")


@pytest.mark.timeout(120)
def test_two_processes_writing_one_catalog_lose_nothing(tmp_path: Path) -> None:
    data = tmp_path / "node"
    LocalNode.init(data).close()
    db = data / "catalog.db"
    local_id = LocalNode(data).node_id.compact
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(data), str(w), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(3)]
    outputs = []
    try:
        for p in procs:
            out, errs = p.communicate(timeout=100)
            assert p.returncode == 0, errs
            outputs.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    made = [e for o in outputs for e in o["made"]]
    expected_live = {s for o in outputs for s in o["live"]}
    assert len(made) == len(set(made)) == 3 * (n + n // 10 + n // 25)
    cat = Catalog(db, node_id=local_id)
    try:
        assert set(cat.all_event_ids()) == set(made)
        assert {i.sop_instance_uid for i in cat.instances()} == expected_live
        check_merkle(cat)
        # the clock was shared through the catalog: no two local events have the same hlc
        local = cat._db.execute("SELECT hlc FROM events WHERE origin=?",
                                (local_id,)).fetchall()
        assert len(local) == len({r[0] for r in local}) == 3 * (n + n // 25)
    finally:
        cat.close()


def test_catalog_belongs_to_one_node(tmp_path: Path) -> None:
    Catalog(tmp_path / "c.db", node_id="NODE1").close()
    with pytest.raises(Exception, match="belongs to node NODE1"):
        Catalog(tmp_path / "c.db", node_id="NODE2")
    c = Catalog(tmp_path / "c.db")
    assert c.node_id == "NODE1"
    c.close()


def test_instance_dict_roundtrip(cat: Catalog) -> None:
    [(eid, _)] = cat.add_local_puts([(attrs("1.2.11.1"), fake_blob("d", 55))])
    d: dict[str, Any] = cat.instance("1.2.11.1").to_dict()
    assert d["event_id"] == eid and d["blob"] == fake_blob("d").hash and d["size"] == 55
    assert d["origin"] == LOCAL and d["study_instance_uid"] == STUDY
    assert cat.put_event(eid).to_dict() == d
