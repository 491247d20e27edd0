"""A trusted peer that lies: it holds one site's real key and speaks the real protocol,
serving forged deletes, deletes without authority, a far-future clock and a tampered
signature. The honest nodes lose nothing, adopt no clock, and relay only what is authentic;
events relayed through a third node verify without trusting their origin."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from syncsupport import (
    add_peer,
    blob_set,
    describe_nodes,
    import_files,
    live_view,
    make_dicom,
    root,
    uid,
    url_of,
    wait_for,
)

from syncnode import events as ev
from syncnode.local import LocalNode
from syncnode.node import RunningNode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import FakeOrigin, tamper

StartNode = Callable[..., Awaitable[RunningNode]]


def instances(node: LocalNode, tmp: Path, tag: int, n: int) -> None:
    files = [make_dicom(tmp / f"{tag}-{i}.dcm", sop=uid(40, tag, i), study=uid(40, tag),
                        series=uid(40, tag, 0), pixel_bytes=2000, seed=100 * tag + i)
             for i in range(n)]
    import_files(node, *files)


def both_ways(x: LocalNode, rx: object, y: LocalNode, ry: object) -> None:
    add_peer(x, y, url_of(ry))  # type: ignore[arg-type]
    add_peer(y, x, url_of(rx))  # type: ignore[arg-type]
    rx.peers_changed()  # type: ignore[attr-defined]
    ry.peers_changed()  # type: ignore[attr-defined]


def signer_of(node: LocalNode) -> FakeOrigin:
    """The node's own key as a FakeOrigin (what an attacker holding it can sign)."""
    me = FakeOrigin.__new__(FakeOrigin)
    me.label, me.signer, me.id = "stolen", node.signer, node.node_id.compact
    me.key, me.cert_der = node.signer._key, node.signer.cert_der
    return me


@pytest.mark.timeout(120)
async def test_a_lying_trusted_peer_damages_nothing(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, c, evil = new_node("a"), new_node("c"), new_node("evil")
    instances(a, tmp_path, 1, 12)
    ra, rc = await running(a), await running(c)
    both_ways(a, ra, c, rc)
    await wait_for(lambda: root(a) == root(c) and len(live_view(c)) == 12, 30,
                   "C to receive A's instances", describe=lambda: describe_nodes([a, c]))
    before = {n: (live_view(n), blob_set(n)) for n in (a, c)}
    clock_a = int(a.catalog.get_meta("hlc") or 0)
    a_puts = [(i.sop_instance_uid, i.event_id) for i in a.catalog.instances()]
    me, e = a.node_id.compact, signer_of(evil)
    now = ev.hlc_tick(0)

    # What the liar serves, put straight into its catalog (as local: no admission there).
    forged = [e.forge(ev.DeleteEvent(origin=me, hlc=now + 1, sop_instance_uid=sop,
                                     removes=(eid,)), as_origin=me) for sop, eid in a_puts]
    unsigned = [(ev.event_id(b), b) for b in (ev.encode(ev.DeleteEvent(
        origin=me, hlc=now + 2, sop_instance_uid=sop, removes=(eid,))) for sop, eid in a_puts)]
    no_authority = [e.delete(now + 3, sop, [eid]) for sop, eid in a_puts]
    far = ev.hlc_now() + ((2 * 86_400_000) << 16)
    sop0, _ = a_puts[0]
    put_far = e.put(far, sop0, next(iter(blob_set(a))))
    clock_bomb = e.put(2**63 - 1, uid(40, 9, 9), next(iter(blob_set(a))))
    tampered = tamper(e.delete(now + 4, sop0, [a_puts[0][1]]))
    hostile = forged + unsigned + [put_far, clock_bomb, tampered]
    evil.catalog.add_origin_certificate(a.signer.cert_der)  # sent with the forgeries
    assert len(evil.catalog.apply(hostile + no_authority, blob_present=lambda _: True,
                                  local=True).inserted) == len(hostile) + len(no_authority)

    rev = await running(evil)
    both_ways(a, ra, evil, rev)

    def relayed() -> bool:  # E's authentic deletes reached C through A
        return all(c.catalog.has_event(x) for x, _ in no_authority)

    await wait_for(relayed, 40, "E's authentic events to reach C through A",
                   describe=lambda: describe_nodes([a, c, evil]))
    await wait_for(lambda: (a.catalog.peer_states().get(evil.node_id.compact, {})
                            .get("integrity_errors", 0) > 0), 20,
                   "A to count E's refused events")
    for n in (a, c):
        assert (live_view(n), blob_set(n)) == before[n], "an honest node lost something"
        for x, _ in hostile:
            assert not n.catalog.has_event(x), "a hostile event was stored or relayed"
        assert int(n.catalog.get_meta("hlc") or 0) <= ev.hlc_limit(86_400_000)
    assert int(a.catalog.get_meta("hlc") or 0) < far
    assert clock_a <= int(a.catalog.get_meta("hlc") or 0)
    assert len(live_view(a)) == len(live_view(c)) == 12


@pytest.mark.timeout(90)
async def test_events_relayed_by_a_third_node_verify(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """A - B - C in a line: C trusts only B, yet takes A's signed puts and deletes,
    checked against A's certificate that B sends along."""
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    instances(a, tmp_path, 2, 5)
    a.delete_instances([uid(40, 2, 0)])
    ra, rb, rc = await running(a), await running(b), await running(c)
    both_ways(a, ra, b, rb)
    both_ways(b, rb, c, rc)
    await wait_for(lambda: root(a) == root(b) == root(c) and len(live_view(c)) == 4, 40,
                   "C to receive A's events through B",
                   describe=lambda: describe_nodes([a, b, c]))
    assert c.catalog.peer_states().keys() == {b.node_id.compact}
    origins = {ev.decode(body).origin for _, body in c.catalog.get_events(
        c.catalog.all_event_ids())}
    assert origins == {a.node_id.compact}
    assert c.catalog.certificates_for(c.catalog.all_event_ids()) == [a.signer.cert_der]
    # a relay cannot alter them: B's copy of an event with one bit changed is refused by C
    eid = c.catalog.all_event_ids()[0]
    [(_, body)] = c.catalog.get_events([eid])
    event = ev.decode(body)
    altered = ev.encode(dataclasses.replace(event, hlc=event.hlc + 1))
    res = c.catalog.apply([(ev.event_id(altered), altered)], blob_present=lambda _: True)
    assert "signature does not verify" in res.rejected[ev.event_id(altered)]
