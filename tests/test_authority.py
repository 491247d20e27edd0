"""What a node takes from its peers: authentic events, delete authority, bounded clocks,
bounded tombstones of unknown puts, and catalogs made before signing (the catalog's
admission step, syncnode.authority)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import blake3
import pytest

from syncnode import events as ev
from syncnode.authority import PERMISSIVE, Policy
from syncnode.local import LocalNode
from syncnode.nodeid import NodeId

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import FakeOrigin, tamper

A, B, EVIL = FakeOrigin("a"), FakeOrigin("b"), FakeOrigin("evil")
NOW = ev.hlc_tick(0)


def h(tag: str) -> str:
    return blake3.blake3(tag.encode()).hexdigest()


@pytest.fixture
def node(tmp_path: Path) -> LocalNode:
    """A node with its default (safe) rules, which knows the certificates of A, B, EVIL."""
    n = LocalNode.init(tmp_path / "node")
    n.catalog.offer_certificates([A.cert_der, B.cert_der, EVIL.cert_der])
    yield n
    n.close()


def local_instances(node: LocalNode, count: int) -> list[str]:
    sops = [f"1.2.77.{i}" for i in range(count)]
    for sop in sops:
        info = node.store.put_bytes(f"bytes of {sop}".encode())
        node.catalog.add_local_puts([({"sop_instance_uid": sop, "sop_class_uid": "1.2.3",
                                       "study_instance_uid": "1.2.77",
                                       "series_instance_uid": "1.2.77.0"}, info)],
                                    blob_present=node.store.has)
    return sops


def unsigned(event: ev.Event) -> tuple[str, bytes]:
    body = ev.encode(dataclasses.replace(event, sig=""))
    return ev.event_id(body), body


def live(node: LocalNode) -> set[str]:
    return {i.sop_instance_uid for i in node.catalog.instances()}


# -- authentic events -------------------------------------------------------------------


def test_signed_events_from_any_origin_with_its_certificate_are_taken(node: LocalNode) -> None:
    res = node.catalog.apply([A.put(NOW, "1.2.1"), B.put(NOW, "1.2.2")])
    assert res.rejected == {} and len(res.inserted) == 2
    # the certificates are remembered, to be sent along when these events are relayed
    served = node.catalog.certificates_for(res.inserted)
    assert sorted(served) == sorted([A.cert_der, B.cert_der])


def test_without_the_origin_certificate_an_event_is_refused(tmp_path: Path) -> None:
    n = LocalNode.init(tmp_path / "n")
    stranger = FakeOrigin("stranger")
    pair = stranger.put(NOW, "1.2.3")
    res = n.catalog.apply([pair])
    assert res.inserted == [] and "no certificate" in res.rejected[pair[0]]
    n.catalog.offer_certificates([B.cert_der])  # some other certificate does not help
    assert n.catalog.apply([pair]).inserted == []
    n.catalog.offer_certificates([stranger.cert_der])
    assert n.catalog.apply([pair]).inserted == [pair[0]]
    n.close()


def test_tampered_signature_is_refused(node: LocalNode) -> None:
    bad = tamper(A.put(NOW, "1.2.4"))
    res = node.catalog.apply([bad])
    assert res.inserted == [] and "signature does not verify" in res.rejected[bad[0]]
    assert node.catalog.event_count() == 0


def test_forged_deletes_in_the_receivers_name_or_another_nodes_lose_nothing(
        node: LocalNode) -> None:
    """A peer holding one site's key (EVIL) makes tombstones claiming to be the receiving
    node, or node A: refused; the live view and the blobs stay as they were."""
    sops = local_instances(node, 20)
    theirs = A.put(NOW, "1.2.5.1", h("a-blob"))
    node.catalog.apply([theirs], blob_present=lambda _: True)
    mine = [i.event_id for i in node.catalog.instances()]
    before, blobs = live(node), set(node.store.iter_hashes())
    me = node.node_id.compact
    forged = [EVIL.forge(ev.DeleteEvent(origin=me, hlc=NOW + 1, sop_instance_uid=sop,
                                        removes=(eid,)), as_origin=me)
              for sop, eid in zip(sops, mine, strict=False)]
    forged.append(EVIL.forge(ev.DeleteEvent(origin=A.id, hlc=NOW + 1,
                                            sop_instance_uid="1.2.5.1",
                                            removes=(theirs[0],)), as_origin=A.id))
    # and the same deletes without a signature (the legacy form) claiming the receiver
    forged += [unsigned(ev.DeleteEvent(origin=me, hlc=NOW + 2, sop_instance_uid=sop,
                                       removes=(eid,)))
               for sop, eid in zip(sops, mine, strict=False)]
    res = node.collect(node.catalog.apply(forged))
    assert res.inserted == [] and len(res.rejected) == len(forged)
    reasons = [res.rejected[eid] for eid, _ in forged]
    assert all("signature does not verify" in r for r in reasons[:21])
    assert all("forged" in r for r in reasons[21:])
    assert live(node) == before and len(before) == 21
    assert set(node.store.iter_hashes()) == blobs


def test_unsigned_events_only_during_an_upgrade(node: LocalNode) -> None:
    old = unsigned(ev.decode(A.put(NOW, "1.2.6")[1]))
    res = node.catalog.apply([old])
    assert res.inserted == [] and "accept_unsigned_events" in res.rejected[old[0]]
    node.catalog.policy = dataclasses.replace(node.catalog.policy, accept_unsigned=True)
    assert node.catalog.apply([old]).inserted == [old[0]]
    # even then, never one that claims this node: this node signs everything it makes
    me = node.node_id.compact
    claim = unsigned(ev.PutEvent(**{**dataclasses.asdict(ev.decode(old[1])), "origin": me}))
    res = node.catalog.apply([claim])
    assert res.inserted == [] and "forged" in res.rejected[claim[0]]


def test_settings_give_the_policy(tmp_path: Path) -> None:
    n = LocalNode.init(tmp_path / "n")
    n.configure(n.settings(may_delete=[str(LocalNode.init(tmp_path / "m").node_id)],
                           accept_unsigned_events=True, max_clock_skew=60))
    p = n.catalog.policy
    assert p.local_node == n.node_id.compact and p.accept_unsigned
    assert p.max_clock_skew_ms == 60_000 and len(p.may_delete) == 1
    assert LocalNode(tmp_path / "m").node_id.compact in p.may_delete
    n.close()


# -- bounded clocks ---------------------------------------------------------------------


def test_far_future_clock_is_refused_and_ours_does_not_move(node: LocalNode) -> None:
    clock = int(node.catalog.get_meta("hlc") or 0)
    day_ms = 86_400_000
    ahead = ev.hlc_now() + ((day_ms + 60_000) << 16)  # a day and a minute ahead
    for hlc in (ahead, 2**63 - 1):
        pair = A.put(hlc, "1.2.8")
        res = node.catalog.apply([pair], blob_present=lambda _: True)
        assert res.inserted == [] and "ahead" in res.rejected[pair[0]]
        assert not node.catalog.has_event(pair[0])  # not stored: never relayed
    assert int(node.catalog.get_meta("hlc") or 0) == clock
    # within the bound it is taken, and our clock follows it (never past now + skew)
    near = ev.hlc_now() + ((day_ms - 60_000) << 16)
    assert node.catalog.apply([A.put(near, "1.2.9")], blob_present=lambda _: True).inserted
    assert near <= int(node.catalog.get_meta("hlc") or 0) <= ev.hlc_limit(day_ms)


def test_refused_for_now_is_taken_once_the_clock_catches_up(node: LocalNode) -> None:
    node.catalog.policy = dataclasses.replace(node.catalog.policy, max_clock_skew_ms=1000)
    pair = A.put(ev.hlc_now() + (1500 << 16), "1.2.10")
    assert node.catalog.apply([pair], blob_present=lambda _: True).inserted == []
    deadline = time.monotonic() + 5
    while not node.catalog.apply([pair], blob_present=lambda _: True).inserted:
        assert time.monotonic() < deadline, "the event was never taken"
        time.sleep(0.1)


# -- delete authority ---------------------------------------------------------------------


def test_a_delete_removes_only_puts_its_origin_may_remove(node: LocalNode) -> None:
    puts = [A.put(NOW, "1.2.20"), A.put(NOW, "1.2.21"), B.put(NOW, "1.2.22")]
    node.catalog.apply(puts, blob_present=lambda _: True)
    # B deletes A's instance: stored (authentic, relayed) but without effect here
    b_del = B.delete(NOW + 1, "1.2.20", [puts[0][0]])
    res = node.catalog.apply([b_del])
    assert res.inserted == [b_del[0]] and live(node) == {"1.2.20", "1.2.21", "1.2.22"}
    # A deletes its own, B its own: both take effect
    node.catalog.apply([A.delete(NOW + 2, "1.2.21", [puts[1][0]]),
                        B.delete(NOW + 2, "1.2.22", [puts[2][0]])])
    assert live(node) == {"1.2.20"}


def test_may_delete_and_any(tmp_path: Path) -> None:
    for policy_of in (lambda me: Policy(local_node=me, may_delete=frozenset({B.id})),
                      lambda me: Policy(local_node=me, delete_authority="any")):
        n = LocalNode.init(tmp_path / str(len(list(tmp_path.iterdir()))))
        n.catalog.policy = policy_of(n.node_id.compact)
        n.catalog.offer_certificates([A.cert_der, B.cert_der])
        put = A.put(NOW, "1.2.30")
        # the delete arrives before the put it names, then after: removed either way
        n.catalog.apply([B.delete(NOW + 1, "1.2.30", [put[0]])])
        assert n.catalog.is_tombstoned(put[0], A.id)
        assert n.catalog.apply([put]).inserted  # needs no blob: born removed
        assert live(n) == set()
        n.close()


def test_a_waiting_delete_without_authority_does_not_remove_the_put(node: LocalNode) -> None:
    put = A.put(NOW, "1.2.31")
    node.catalog.apply([B.delete(NOW + 1, "1.2.31", [put[0]])])
    assert not node.catalog.is_tombstoned(put[0], A.id)
    assert node.catalog.apply([put], blob_present=lambda _: False).rejected  # blob needed
    assert node.catalog.apply([put], blob_present=lambda _: True).inserted
    assert live(node) == {"1.2.31"} and node.catalog.unknown_tombstone_count() == 0


def test_a_change_of_may_delete_applies_to_deletes_already_held(node: LocalNode) -> None:
    """The tombstones follow the rules in force: B's delete of A's instance, held without
    effect, removes it once B is in may_delete (and frees its blob); taking B out again
    cannot bring back an instance whose blob is gone."""
    blob = node.store.put_bytes(b"bytes of A's instance 1.2.32").hash
    put = A.put(NOW, "1.2.32", blob)
    assert node.catalog.apply([put], blob_present=node.store.has).inserted
    assert node.catalog.apply([B.delete(NOW + 1, "1.2.32", [put[0]])]).inserted
    assert live(node) == {"1.2.32"}
    node.configure(node.settings(may_delete=[str(NodeId.parse(B.id))]))
    assert live(node) == set() and not node.store.has(blob)
    assert node.catalog.is_tombstoned(put[0])
    again = node.catalog.reconcile_authority(node.store.has)  # same rules: nothing to do
    assert (again.removed, again.restored, again.kept_removed) == (0, 0, 0)
    node.configure(node.settings(may_delete=[]))
    assert live(node) == set()  # stays removed: nothing could serve it any more
    assert node.catalog.is_tombstoned(put[0])


def test_an_instance_whose_deletes_lost_their_authority_is_live_again(node: LocalNode) -> None:
    put = A.put(NOW, "1.2.33")
    assert node.catalog.apply([put], blob_present=lambda _: True).inserted
    node.catalog.apply([B.delete(NOW + 1, "1.2.33", [put[0]])])
    node.catalog.policy = Policy(local_node=node.node_id.compact, delete_authority="any")
    gained = node.catalog.reconcile_authority(lambda _: True)
    assert gained.removed == 1 and live(node) == set()
    assert gained.freed_blobs == {ev.decode(put[1]).blob}  # for the caller to collect
    node.catalog.policy = Policy(local_node=node.node_id.compact)
    lost = node.catalog.reconcile_authority(lambda _: True)  # the blob is still here
    assert (lost.removed, lost.restored, lost.kept_removed) == (0, 1, 0)
    assert live(node) == {"1.2.33"} and not node.catalog.is_tombstoned(put[0])


def test_local_deletes_always_take_effect_here(node: LocalNode) -> None:
    put = A.put(NOW, "1.2.32")
    node.catalog.apply([put], blob_present=lambda _: True)
    assert node.delete_instances(["1.2.32"]).inserted and live(node) == set()


# -- bounded tombstones of unknown puts ----------------------------------------------------


def test_tombstones_of_unknown_puts_are_bounded(node: LocalNode) -> None:
    """200 deletes naming 900 ids nobody made (the 1.8 M rows of the report, scaled):
    at most max_unknown_per_origin names wait; the rest is refused, not stored."""
    node.catalog.policy = dataclasses.replace(node.catalog.policy,
                                              max_unknown_per_origin=2000)
    deletes = [EVIL.delete(NOW + i, "1.2.40", [h(f"nothing {i} {k}") for k in range(900)])
               for i in range(200)]
    res = node.catalog.apply(deletes)
    assert len(res.inserted) == 2 and len(res.rejected) == 198
    assert node.catalog.unknown_tombstone_count() == 1800
    assert "limit 2000" in next(iter(res.rejected.values()))
    # another origin has its own allowance, up to the total bound
    node.catalog.policy = dataclasses.replace(node.catalog.policy, max_unknown_total=2500)
    more = [B.delete(NOW + i, "1.2.41", [h(f"b {i} {k}") for k in range(300)])
            for i in range(3)]
    res = node.catalog.apply(more)
    assert len(res.inserted) == 2 and node.catalog.unknown_tombstone_count() == 2400
    # an honest delete of known puts is never limited
    put = EVIL.put(NOW, "1.2.42")
    node.catalog.apply([put], blob_present=lambda _: True)
    assert node.catalog.apply([EVIL.delete(NOW + 1, "1.2.42", [put[0]])]).inserted


def test_unknown_tombstones_expire(node: LocalNode) -> None:
    node.catalog.policy = dataclasses.replace(node.catalog.policy,
                                              max_unknown_per_origin=100, unknown_ttl_s=1)
    first = EVIL.delete(NOW, "1.2.43", [h(f"x{k}") for k in range(100)])
    assert node.catalog.apply([first]).inserted
    second = EVIL.delete(NOW + 1, "1.2.43", [h(f"y{k}") for k in range(100)])
    assert node.catalog.apply([second]).rejected
    node.catalog._db.execute("UPDATE unknown_tombstones SET received = received - 5")
    assert node.catalog.apply([second]).inserted
    assert node.catalog.unknown_tombstone_count() == 100


# -- catalogs made before signing ------------------------------------------------------------


def test_a_catalog_made_before_signing_keeps_its_events(tmp_path: Path) -> None:
    """Unsigned events already in a catalog stay and keep their effect; the tombstones of
    puts never received move to the bounded table."""
    n = LocalNode.init(tmp_path / "old")
    me = n.node_id.compact
    n.catalog.policy = PERMISSIVE  # what any catalog took before
    put = unsigned(ev.decode(A.put(NOW, "1.2.50")[1]))
    other = unsigned(ev.decode(A.put(NOW, "1.2.51")[1]))
    gone = unsigned(ev.DeleteEvent(origin="SOMEOLDNODE", hlc=NOW + 1,
                                   sop_instance_uid="1.2.51", removes=(other[0],)))
    ghost = unsigned(ev.DeleteEvent(origin="SOMEOLDNODE", hlc=NOW + 1,
                                    sop_instance_uid="1.2.52", removes=(h("never"),)))
    n.catalog.apply([put, other, gone, ghost], blob_present=lambda _: True)
    db = n.catalog._db
    # as the version before signing stored it: every name in tombstones, schema version 2
    db.execute("INSERT INTO tombstones SELECT put_id, delete_id FROM unknown_tombstones")
    db.execute("DELETE FROM unknown_tombstones")
    db.execute("DELETE FROM meta WHERE key='signing_since'")
    db.execute("PRAGMA user_version=2")
    root = n.catalog.merkle_root()
    n.close()

    n = LocalNode(tmp_path / "old")
    assert n.catalog.policy.local_node == me and not n.catalog.policy.accept_unsigned
    assert n.catalog.merkle_root() == root and n.catalog.event_count() == 4
    assert live(n) == {"1.2.50"}
    assert n.catalog.unknown_tombstone_count() == 1
    assert n.catalog.get_meta("signing_since") == "4"
    assert n.catalog._db.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 1
    # and it signs from now on
    (eid,) = n.delete_instances(["1.2.50"]).inserted
    [(_, body)] = n.catalog.get_events([eid])
    assert ev.is_signed(ev.decode(body)) and live(n) == set()
    n.close()
