"""Properties of the catalog: whatever happens, the derived state is a function of the events.

(a) After any sequence of local puts, local deletes and foreign events (from other origins,
    possibly tombstones that arrive before the puts they name, and duplicates), the
    incremental Merkle root equals a tree recomputed from scratch over the event ids, and
    the live view equals a brute-force evaluation of the live rule over the raw events.
(b) Catalogs given the same events in different orders, batches and with duplicates end
    up identical: same root, same ids, same live view, same counts.
"""

from __future__ import annotations

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
from syncnode import merkle
from syncnode.authority import Policy
from syncnode.blobstore import BlobInfo
from syncnode.catalog import Catalog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import origins

SETTINGS = settings(max_examples=60, deadline=None)
SIGNERS = origins("LOCALNODE", "NODEA", "NODEB", "NODEZ")  # ids ordered as the names
LOCAL = SIGNERS["LOCALNODE"].id
ORIGINS = ["NODEA", "NODEB", "NODEZ"]
# The live-view rule alone: any authentic delete counts, clocks unbounded (the admission
# rules have their own properties in test_hostile_props.py).
LIVE_RULE = Policy(local_node=LOCAL, delete_authority="any", max_clock_skew_ms=None)
SOPS = [f"1.2.40.{i}" for i in range(3)]
CT = "1.2.840.10008.5.1.4.1.1.2"
# few distinct clock values so that ties on hlc (and on hlc and origin) happen often
HLCS = [7, 1000 << 16, (1000 << 16) + 1]


def h(tag: str) -> str:
    return blake3.blake3(tag.encode()).hexdigest()


def blob(i: int) -> BlobInfo:
    return BlobInfo(h(f"blob{i}"), 100 + i, (h(f"chunk{i}"),), created=True)


def attrs(sop: str) -> dict[str, str]:
    return {"sop_instance_uid": sop, "sop_class_uid": CT, "study_instance_uid": "1.2.40",
            "series_instance_uid": "1.2.40.0", "patient_id": "P", "modality": "CT",
            "study_date": "", "transfer_syntax_uid": ""}


def foreign_put(origin: str, hlc: int, sop: str, b: int) -> tuple[str, bytes]:
    info = blob(b)
    signer = SIGNERS[origin]
    return signer.sign(ev.PutEvent(origin=signer.id, hlc=hlc, blob=info.hash, size=info.size,
                                   chunks=info.chunks_root, sop_class_uid=CT,
                                   sop_instance_uid=sop, series_instance_uid="1.2.40.0",
                                   study_instance_uid="1.2.40"))


def foreign_delete(origin: str, hlc: int, sop: str, removes: list[str]) -> tuple[str, bytes]:
    return SIGNERS[origin].delete(hlc, sop, removes)


@contextmanager
def catalogs(n: int) -> Iterator[list[Catalog]]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsyncs are free there
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        cats = [Catalog(Path(tmp) / f"c{i}.db", node_id=LOCAL, policy=LIVE_RULE,
                        signer=lambda: SIGNERS["LOCALNODE"].signer) for i in range(n)]
        for c in cats:
            c.offer_certificates(s.cert_der for s in SIGNERS.values())
        try:
            yield cats
        finally:
            for c in cats:
                c.close()


# -- the reference: the live rule written out by brute force -------------------------------


def brute_force(events: dict[str, ev.Event]) -> tuple[dict[str, str], set[str]]:
    """(SOP UID -> live put id, blobs of puts that are not removed) from the raw events."""
    named = {r for e in events.values() if isinstance(e, ev.DeleteEvent) for r in e.removes}
    best: dict[str, tuple[int, str, str]] = {}
    kept_blobs = set()
    for eid, e in events.items():
        if not isinstance(e, ev.PutEvent) or eid in named:
            continue
        kept_blobs.add(e.blob)
        key = (e.hlc, e.origin, eid)
        if e.sop_instance_uid not in best or key > best[e.sop_instance_uid]:
            best[e.sop_instance_uid] = key
    return {sop: key[2] for sop, key in best.items()}, kept_blobs


def live_view(c: Catalog) -> dict[str, str]:
    view = {i.sop_instance_uid: i.event_id for i in c.instances()}
    assert len(view) == len(c.instances())  # one live version per instance
    return view


def check_against_reference(c: Catalog, known: set[str]) -> None:
    ids = c.all_event_ids()
    assert set(ids) == known, "the catalog holds exactly the events it was given or made"
    bodies = dict(c.get_events(ids))
    events = {eid: ev.decode_checked(eid, body) for eid, body in bodies.items()}
    tree = merkle.MemoryMerkle(bytes.fromhex(e) for e in known)
    assert c.merkle_root() == tree.root()
    assert c.merkle_root() == c.recompute_merkle()
    for i in range(merkle.FANOUT):  # one level down as well, as a peer's diff walk sees it
        assert c.merkle_node("0123456789abcdef"[i]) == tree.node(1, i)
    live, kept_blobs = brute_force(events)
    assert live_view(c) == live
    assert c.referenced_blobs() == kept_blobs
    counts = c.counts()
    assert counts["events"] == len(known)
    assert counts["instances"] == len(live)
    assert counts["delete_events"] == sum(isinstance(e, ev.DeleteEvent)
                                          for e in events.values())


# -- (a) any sequence of operations --------------------------------------------------------

sop_i = st.integers(0, len(SOPS) - 1)
blob_i = st.integers(0, 4)
pick = st.integers(0, 10_000)
fput = st.tuples(st.just("fput"), st.sampled_from(ORIGINS), st.sampled_from(HLCS), sop_i,
                 blob_i)
# versions of one instance made concurrently on several peers: ties on hlc
concurrent = st.tuples(st.just("fconcurrent"), st.sampled_from(HLCS), sop_i,
                       st.lists(st.tuples(st.sampled_from(ORIGINS), blob_i), min_size=2,
                                max_size=3))
op = st.one_of(
    fput,
    concurrent,
    st.tuples(st.just("put"), sop_i, blob_i),
    st.tuples(st.just("put2"), sop_i, blob_i, sop_i, blob_i),
    st.tuples(st.just("delete"), st.lists(sop_i, min_size=1, max_size=2)),
    fput,
    # a foreign delete naming puts this node knows, and maybe one it has not received yet
    st.tuples(st.just("fdelete"), st.sampled_from(ORIGINS), st.sampled_from(HLCS), sop_i,
              st.lists(pick, max_size=3), st.booleans(), blob_i),
    st.tuples(st.just("deliver")),  # the puts named before they arrived, as one batch
    st.tuples(st.just("replay"), pick),  # a duplicate of an earlier foreign event
)


@SETTINGS
@given(st.lists(op, max_size=25))
def test_any_sequence_matches_the_reference(ops: list[tuple]) -> None:
    with catalogs(1) as (c,):
        known: set[str] = set()
        put_ids: list[str] = []
        foreign: list[tuple[str, bytes]] = []
        pending: list[tuple[str, bytes]] = []
        for o in ops:
            kind = o[0]
            if kind in ("put", "put2"):
                items = [(attrs(SOPS[o[1]]), blob(o[2]))]
                if kind == "put2":
                    items.append((attrs(SOPS[o[3]]), blob(o[4])))
                held = versions_held(c)
                results = c.add_local_puts(items)
                last_new = {}
                for (eid, new), (a, b) in zip(results, items, strict=True):
                    version = (a["sop_instance_uid"], b.hash)
                    # a new event exactly when the instance has no version with these bytes
                    assert new == (version not in held)
                    held.add(version)
                    known.add(eid)
                    put_ids.append(eid)
                    if new:
                        last_new[version[0]] = b.hash
                    assert c.instance(version[0]) is not None
                # a new version is shown, whatever came before (the local clock has moved
                # past every clock it observed)
                for sop, bh in last_new.items():
                    assert c.instance(sop).blob == bh
            elif kind == "delete":
                before = c.referenced_blobs()
                res = c.delete_instances([SOPS[i] for i in o[1]])
                check_freed(c, before, res.freed_blobs)
                known.update(res.inserted)
                for i in o[1]:
                    assert c.instance(SOPS[i]) is None
            elif kind == "fput":
                e = foreign_put(o[1], o[2], SOPS[o[3]], o[4])
                foreign.append(e)
                known.update(c.apply([e]).inserted)
                put_ids.append(e[0])
            elif kind == "fconcurrent":
                batch = [foreign_put(origin, o[1], SOPS[o[2]], b) for origin, b in o[3]]
                foreign.extend(batch)
                put_ids.extend(e for e, _ in batch)
                known.update(c.apply(batch).inserted)
            elif kind == "fdelete":
                _, origin, hlc, sop_idx, picks, ahead, b = o
                removes = [put_ids[p % len(put_ids)] for p in picks] if put_ids else []
                if ahead or not removes:
                    future = foreign_put(origin, hlc + 1, SOPS[sop_idx], b)
                    if future[0] not in known:
                        pending.append(future)
                    removes.append(future[0])
                e = foreign_delete(origin, hlc, SOPS[sop_idx], removes)
                foreign.append(e)
                before = c.referenced_blobs()
                res = c.apply([e])
                check_freed(c, before, res.freed_blobs)
                known.update(res.inserted)
            elif kind == "deliver":
                res = c.apply(pending + pending[:1])
                assert res.rejected == {}
                known.update(res.inserted)
                put_ids.extend(e for e, _ in pending)
                foreign.extend(pending)
                pending = []
            elif kind == "replay" and foreign:
                assert c.apply([foreign[o[1] % len(foreign)]]).inserted == []
            check_invariants_cheaply(c)
        check_against_reference(c, known)


def versions_held(c: Catalog) -> set[tuple[str, str]]:
    """(SOP UID, blob) of every put no delete names, from the raw events."""
    events = [ev.decode(body) for _, body in c.get_events(c.all_event_ids())]
    named = {r for e in events if isinstance(e, ev.DeleteEvent) for r in e.removes}
    return {(e.sop_instance_uid, e.blob) for e in events
            if isinstance(e, ev.PutEvent) and ev.event_id(ev.encode(e)) not in named}


def check_freed(c: Catalog, before: set[str], freed: set[str]) -> None:
    """The blobs a batch reports freed are exactly those it left unreferenced."""
    assert freed == before - c.referenced_blobs()


def check_invariants_cheaply(c: Catalog) -> None:
    assert c.merkle_root() == c.recompute_merkle()


# -- (b) order independence ----------------------------------------------------------------

local_op = st.one_of(
    fput,
    concurrent,
    st.tuples(st.just("put"), sop_i, blob_i),
    st.tuples(st.just("delete"), sop_i),
    fput,
    st.tuples(st.just("fdelete"), st.sampled_from(ORIGINS), st.sampled_from(HLCS), sop_i,
              st.lists(pick, min_size=1, max_size=3)),
)


@SETTINGS
@given(st.lists(local_op, min_size=1, max_size=25), st.randoms(use_true_random=False))
def test_same_events_any_order_same_catalog(ops: list[tuple], rng: random.Random) -> None:
    with catalogs(3) as (origin, b, c):
        # history made on one node: its own puts and deletes plus events from peers
        put_ids: list[str] = []
        for o in ops:
            if o[0] == "put":
                [(eid, _)] = origin.add_local_puts([(attrs(SOPS[o[1]]), blob(o[2]))])
                put_ids.append(eid)
            elif o[0] == "delete":
                origin.delete_instances([SOPS[o[1]]])
            elif o[0] == "fput":
                e = foreign_put(o[1], o[2], SOPS[o[3]], o[4])
                origin.apply([e])
                put_ids.append(e[0])
            elif o[0] == "fconcurrent":
                batch = [foreign_put(who, o[1], SOPS[o[2]], b) for who, b in o[3]]
                origin.apply(batch)
                put_ids.extend(e for e, _ in batch)
            elif put_ids:  # fdelete, possibly naming ids that are not puts here
                removes = [put_ids[p % len(put_ids)] for p in o[4]]
                origin.apply([foreign_delete(o[1], o[2], SOPS[o[3]], removes)])
        events = origin.get_events(origin.all_event_ids())
        assert len(events) == origin.event_count()
        # two other nodes receive them in different orders, batches, with duplicates
        for target in (b, c):
            shuffled = events + rng.sample(events, k=len(events) // 2)
            rng.shuffle(shuffled)
            while shuffled:
                n = rng.randint(1, 5)
                res = target.apply(shuffled[:n])
                assert res.rejected == {}
                shuffled = shuffled[n:]
        states = [(cat.merkle_root(), cat.ids_under(""), live_view(cat),
                   [i.to_dict() for i in cat.instances()], cat.referenced_blobs(),
                   cat.counts()) for cat in (origin, b, c)]
        assert states[0] == states[1] == states[2]
        check_against_reference(b, {e for e, _ in events})
