"""Hostile events change nothing: for any interleaving of honest events and hostile ones,
the honest nodes' live views are exactly what the honest events alone give.

Honest origins H1 and H2 make puts and deletes (a delete by H1 names H1's own versions; H2
is in every receiver's ``may_delete`` and deletes any version). A site whose key was stolen
(EVIL, trusted by the receivers) adds, anywhere in the stream and any number of times:
deletes and puts claiming H1 or H2 (forged origin), authentic puts with a clock two days
ahead (future clock), deletes naming ids nobody made (unknown-id tombstones, with bounds
small enough to be reached), honest events with a bit of their signature flipped (bad
signature), and authentic deletes of H1's and H2's versions, before or after them
(no authority).

Node R1 receives everything, shuffled, duplicated, in random batches, then one more round
of everything (as sync fetches again what was refused for now); node R2 receives only
what R1 holds, the same way. The reference R0 receives only the honest events.
R0, R1 and R2 must show the same live view, and R1 and R2 must hold no hostile event other
than EVIL's authentic deletes and tombstones (stored and relayed, without effect).
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode import events as ev
from syncnode.authority import Policy
from syncnode.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import FakeOrigin, tamper

SETTINGS = settings(max_examples=40, deadline=None)
H1, H2, EVIL, RECEIVER = (FakeOrigin(n) for n in ("h1", "h2", "evil", "receiver"))
HONEST = [H1, H2]
SOPS = [f"1.2.826.0.1.3680043.10.2024.{i}" for i in range(3)]
VARIANTS = 3
NOW = ev.hlc_now()
FUTURE = NOW + ((2 * 86_400_000) << ev.HLC_COUNTER_BITS)
POLICY = Policy(local_node=RECEIVER.id, may_delete=frozenset({H2.id}),
                max_unknown_per_origin=20, max_unknown_total=40)

Pair = tuple[str, bytes]


def h(tag: str) -> str:
    return blake3.blake3(tag.encode()).hexdigest()


@contextmanager
def catalogs(n: int) -> Iterator[list[Catalog]]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsyncs are free there
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        cats = [Catalog(Path(tmp) / f"r{i}.db", node_id=RECEIVER.id, policy=POLICY)
                for i in range(n)]
        for c in cats:
            c.offer_certificates(o.cert_der for o in (H1, H2, EVIL))
        try:
            yield cats
        finally:
            for c in cats:
                c.close()


# -- the honest history ----------------------------------------------------------------------

honest_op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 1), st.integers(0, len(SOPS) - 1),
              st.integers(0, VARIANTS - 1)),
    st.tuples(st.just("delete"), st.integers(0, 1), st.integers(0, len(SOPS) - 1)),
)


def honest_events(ops: list[tuple]) -> tuple[list[Pair], list[tuple[str, int, str]]]:
    """The events honest nodes make, and their puts as (id, origin index, SOP UID)."""
    events: list[Pair] = []
    puts: list[tuple[str, int, str]] = []
    hlc = NOW
    for op in ops:
        hlc += 1
        if op[0] == "put":
            _, who, s, variant = op
            pair = HONEST[who].put(hlc, SOPS[s], h(f"{SOPS[s]} v{variant}"))
            puts.append((pair[0], who, SOPS[s]))
        else:
            _, who, s = op
            # H1 deletes its own versions; H2 (in may_delete) any version
            removes = [eid for eid, o, sop in puts if sop == SOPS[s] and (who == 1 or o == who)]
            if not removes:
                continue
            pair = HONEST[who].delete(hlc, SOPS[s], removes)
        events.append(pair)
    return events, puts


# -- what the stolen key adds ---------------------------------------------------------------

hostile_op = st.one_of(
    st.tuples(st.just("forged_delete"), st.integers(0, 1), st.integers(0, 10_000)),
    st.tuples(st.just("forged_put"), st.integers(0, 1), st.integers(0, len(SOPS) - 1)),
    st.tuples(st.just("future_put"), st.integers(0, len(SOPS) - 1)),
    st.tuples(st.just("unknown_tombstones"), st.integers(1, 30), st.integers(0, 10_000)),
    st.tuples(st.just("bad_signature"), st.integers(0, 10_000)),
    st.tuples(st.just("no_authority"), st.integers(0, 10_000)),
)


def hostile_events(ops: list[tuple], honest: list[Pair],
                   puts: list[tuple[str, int, str]]) -> tuple[list[Pair], list[Pair]]:
    """(events the receivers must refuse, authentic events that must have no effect)."""
    refused: list[Pair] = []
    inert: list[Pair] = []
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "forged_delete" and puts:
            eid, _, sop = puts[op[2] % len(puts)]
            claimed = HONEST[op[1]].id
            refused.append(EVIL.forge(ev.DeleteEvent(origin=claimed, hlc=NOW + 10_000 + n,
                                                     sop_instance_uid=sop, removes=(eid,)),
                                      as_origin=claimed))
        elif kind == "forged_put":
            claimed = HONEST[op[1]].id
            refused.append(EVIL.forge(ev.PutEvent(
                origin=claimed, hlc=NOW + 10_000 + n, blob=h(f"evil {n}"), size=1,
                chunks=h("c"), sop_class_uid="1.2.3", sop_instance_uid=SOPS[op[2]],
                series_instance_uid="1.2.4", study_instance_uid="1.2.5"), as_origin=claimed))
        elif kind == "future_put":
            refused.append(EVIL.put(FUTURE + n, SOPS[op[1]], h(f"future {n}")))
        elif kind == "unknown_tombstones":
            # authentic; stored while within the bounds, refused beyond them: never harmful
            inert.append(EVIL.delete(NOW + n, SOPS[0],
                                     [h(f"nothing {op[2]} {k}") for k in range(op[1])]))
        elif kind == "bad_signature" and honest:
            refused.append(tamper(honest[op[1] % len(honest)]))
        elif kind == "no_authority" and puts:
            eid, _, sop = puts[op[1] % len(puts)]
            inert.append(EVIL.delete(NOW + 20_000 + n, sop, [eid]))
    return refused, inert


def deliver(target: Catalog, events: list[Pair], rng: random.Random) -> None:
    """Shuffled, with duplicates, in random batches; then everything once more (a later
    sync round fetches again what was refused for now)."""
    stream = events + rng.sample(events, k=len(events) // 3)
    rng.shuffle(stream)
    while stream:
        n = rng.randint(1, 6)
        target.apply(stream[:n], blob_present=lambda _: True)
        stream = stream[n:]
    target.apply(events, blob_present=lambda _: True)


def live(c: Catalog) -> dict[str, str]:
    return {i.sop_instance_uid: i.event_id for i in c.instances()}


@SETTINGS
@given(st.lists(honest_op, min_size=1, max_size=14), st.lists(hostile_op, max_size=14),
       st.randoms(use_true_random=False))
def test_hostile_events_do_not_change_honest_live_views(
        honest_ops: list[tuple], hostile_ops: list[tuple], rng: random.Random) -> None:
    honest, puts = honest_events(honest_ops)
    refused, inert = hostile_events(hostile_ops, honest, puts)
    with catalogs(3) as (r0, r1, r2):
        deliver(r0, honest, rng)
        deliver(r1, honest + refused + inert, rng)
        held = r1.get_events(r1.all_event_ids())
        r2.offer_certificates(r1.certificates_for(r1.all_event_ids()))
        deliver(r2, held, rng)
        assert live(r1) == live(r0), "hostile events changed the live view"
        assert live(r2) == live(r0), "what the first honest node relayed changed it"
        for c in (r1, r2):
            assert not any(c.has_event(e) for e, _ in refused), "a hostile event was kept"
            assert all(c.has_event(e) for e, _ in honest), "an honest event was lost"
            assert int(c.get_meta("hlc") or 0) < FUTURE
            assert c.unknown_tombstone_count() <= POLICY.max_unknown_total
        # the reference is the honest events' own live view, as any node computes it
        assert set(live(r0).values()) <= {eid for eid, _, _ in puts}


def test_the_hostile_kinds_are_really_refused() -> None:
    """Control: each kind of hostile event, alone, is refused or inert (so the property
    above is not vacuous), and honest events are taken."""
    honest, puts = honest_events([("put", 0, 0, 0), ("put", 1, 1, 0)])
    refused, inert = hostile_events(
        [("forged_delete", 0, 0), ("forged_put", 1, 2), ("future_put", 0),
         ("bad_signature", 0), ("unknown_tombstones", 5, 1), ("no_authority", 0)],
        honest, puts)
    assert len(refused) == 4 and len(inert) == 2
    with catalogs(1) as (r,):
        assert len(r.apply(honest, blob_present=lambda _: True).inserted) == 2
        res = r.apply(refused, blob_present=lambda _: True)
        assert res.inserted == [] and len(res.rejected) == 4
        assert len(r.apply(inert).inserted) == 2
        assert set(live(r)) == {SOPS[0], SOPS[1]}
        # and without the policy's protection they would have done harm
        r.policy = dataclasses.replace(POLICY, delete_authority="any")
        r.apply([EVIL.delete(NOW + 99, SOPS[0], [puts[0][0]])])
        assert SOPS[0] not in live(r)
