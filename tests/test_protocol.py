"""The sans-IO peer-protocol core (syncnode.protocol): the Merkle answer, the diff walk
and the request shapes, driven without a network or a catalog.

The walk runs between two in-memory reference trees (:class:`syncnode.merkle.MemoryMerkle`)
answering through :func:`protocol.read_merkle`, the function the peer server uses.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from syncnode import merkle, protocol
from syncnode.blobstore import CHUNK_SIZE
from syncnode.protocol import BadRequest, DiffWalk, ProtocolError, RemoteNode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from merklekit import MemorySource
from merklekit import random_ids as ids


def walk(theirs: MemorySource, ours: MemorySource) -> tuple[list[str], list[str], int]:
    """Run the walk to its end: (ids only they have, ids only we have, nodes compared)."""
    w = DiffWalk()
    only_theirs: list[str] = []
    only_ours: list[str] = []
    steps = 0
    while (prefix := w.next_prefix()) is not None:
        # the peer's answer goes through the wire format, as over the network
        remote = protocol.parse_merkle(protocol.merkle_response(
            prefix, protocol.read_merkle(theirs, prefix)), prefix)
        step = w.feed(remote, protocol.read_merkle(ours, prefix))
        steps += 1
        only_theirs += step.theirs
        only_ours += step.ours
        for p in step.ours_under:
            only_ours += ours.ids_under(p)
    return only_theirs, only_ours, steps


@pytest.mark.parametrize("inline", [protocol.INLINE_IDS, 1])
def test_the_walk_finds_exactly_the_differences(monkeypatch: pytest.MonkeyPatch,
                                                inline: int) -> None:
    monkeypatch.setattr(protocol, "INLINE_IDS", inline)
    rng = random.Random(7)
    common, a_only, b_only = ids(rng, 600), ids(rng, 40), ids(rng, 25)
    a, b = MemorySource(common | a_only), MemorySource(common | b_only)
    theirs, ours, steps = walk(a, b)
    assert sorted(theirs) == sorted(a_only) and len(theirs) == len(set(theirs))
    assert sorted(ours) == sorted(b_only) and len(ours) == len(set(ours))
    # about k·LEAF_LEVEL nodes, not N: 65 differences, 665 events
    assert steps <= 65 * (merkle.LEAF_LEVEL + 1), steps


def test_equal_trees_take_one_step_and_a_one_sided_subtree_needs_no_request() -> None:
    rng = random.Random(8)
    same = ids(rng, 200)
    assert walk(MemorySource(same), MemorySource(same)) == ([], [], 1)
    extra = {"f" + i[1:] for i in ids(rng, 100)}
    theirs, ours, steps = walk(MemorySource(set()), MemorySource(extra))
    assert theirs == [] and sorted(ours) == sorted(extra)
    assert steps == 1  # the empty side's children say "nothing here": no descent


def test_a_peer_answer_without_children_where_digests_differ_is_refused() -> None:
    rng = random.Random(9)
    mine = protocol.read_merkle(MemorySource(ids(rng, 100)), "")
    bad = RemoteNode("", bytes(range(32)), 100, None, None)
    with pytest.raises(ProtocolError, match="no children"):
        DiffWalk().feed(bad, mine)
    with pytest.raises(ProtocolError, match="neither children nor ids"):
        protocol.parse_merkle({"prefix": "", "digest": "00" * 32, "count": 3}, "")


def test_answers_hold_ids_only_when_short_or_at_a_leaf() -> None:
    rng = random.Random(10)
    source = MemorySource(ids(rng, protocol.INLINE_IDS + 1))
    root = protocol.read_merkle(source, "")
    assert root.ids is None and root.children is not None and root.count == \
        protocol.INLINE_IDS + 1
    child = protocol.read_merkle(source, "a")
    assert child.ids is not None and len(child.ids) == child.count
    leaf = protocol.read_merkle(source, "abcd")
    assert leaf.children is None and leaf.ids is not None


@pytest.mark.parametrize("body", [
    {"blobs": ["x"]},
    {"blobs": [{"hash": "ab" * 32, "size": 2**62, "chunks": "00"}]},
    {"blobs": [{"hash": "ab" * 32, "size": 2**70, "chunks": "00"}]},
    {"blobs": [{"hash": "ab" * 32, "size": 10, "chunks": "zz" * 32}]},
    {"blobs": [{"hash": "ab" * 32, "size": -1, "chunks": ""}]},
    {"blobs": [{"hash": "ab" * 32, "size": True, "chunks": "00" * 32}]},
    {"blobs": [{"hash": "AB" * 32, "size": 10, "chunks": "00" * 32}]},
    {"blobs": [{"hash": "ab" * 32, "size": 3 * CHUNK_SIZE, "chunks": "00" * 64}]},
    {"blobs": {}},
    [],
])
def test_malformed_offers_are_bad_requests(body: object) -> None:
    with pytest.raises((BadRequest, ValueError)) as info:
        protocol.parse_offer(body, max_size=1 << 40)
    assert isinstance(info.value, BadRequest) or type(info.value).__name__ == "InvalidHash"


def test_an_offer_over_the_per_blob_maximum_is_refused_before_anything_else() -> None:
    offer = {"blobs": [{"hash": "ab" * 32, "size": 2 * CHUNK_SIZE, "chunks": "00" * 64}]}
    (o,) = protocol.parse_offer(offer, max_size=2 * CHUNK_SIZE)
    assert o.size == 2 * CHUNK_SIZE and o.digests == bytes(64)
    with pytest.raises(BadRequest, match="more than"):
        protocol.parse_offer(offer, max_size=CHUNK_SIZE)


def test_event_shapes_round_trip_and_reject_garbage() -> None:
    pairs = [("ab" * 32, b'{"kind":"put"}'), ("cd" * 32, b"{}")]
    assert protocol.parse_events(protocol.events_response(pairs)) == pairs
    for bad in [{"events": [{"id": "x", "body": ""}]}, {"events": "x"}, None,
                {"events": [{"id": "ab" * 32, "body": 3}]}]:
        with pytest.raises(ProtocolError):
            protocol.parse_events(bad)
    with pytest.raises(BadRequest):
        protocol.parse_events_request({"ids": ["ab" * 32] * (protocol.MAX_IDS + 1)})
    assert list(protocol.batched(list("abcde"), 2)) == [["a", "b"], ["c", "d"], ["e"]]


# -- hello with events --------------------------------------------------------------------

@pytest.mark.parametrize(("server_n", "shared_n", "asker_n"),
                         [(40, 0, 0), (40, 30, 5), (300, 0, 0), (300, 100, 20),
                          (300, 200, 0), (40, 40, 0)])
def test_a_hello_lists_only_events_the_asker_lacks(server_n: int, shared_n: int,
                                                  asker_n: int) -> None:
    """What the two root answers tell: every event the asker lacks when it lists its ids
    (or holds nothing under a child), never one it holds; what they cannot tell is left
    to the walk."""
    rng = random.Random(server_n * 1000 + shared_n + asker_n)
    server_ids = ids(rng, server_n)
    asker_ids = set(rng.sample(sorted(server_ids), shared_n)) | ids(rng, asker_n)
    server, asker = MemorySource(server_ids), MemorySource(asker_ids)
    mine, _ = protocol.parse_hello_request(
        protocol.hello_request(protocol.read_merkle(asker, "")))
    got = protocol.lacking_ids(protocol.read_merkle(server, ""), mine, server.ids_under,
                               protocol.MAX_HELLO_EVENTS)
    lacking = server_ids - asker_ids
    assert set(got) <= lacking and len(got) == len(set(got)) <= protocol.MAX_HELLO_EVENTS
    if len(asker_ids) <= protocol.INLINE_IDS or not asker_ids:
        assert len(got) == min(len(lacking), protocol.MAX_HELLO_EVENTS)
    assert protocol.lacking_ids(protocol.read_merkle(server, ""),
                                protocol.read_merkle(server, ""), server.ids_under, 500) == []


@pytest.mark.parametrize("body", [None, [], {}, {"merkle": {"prefix": "0"}},
                                  {"merkle": {"prefix": "", "digest": "00", "count": 0}}])
def test_a_malformed_hello_body_is_a_bad_request(body: object) -> None:
    with pytest.raises(BadRequest):
        protocol.parse_hello_request(body)


def test_a_hostile_askers_counts_never_make_the_server_read_more_ids() -> None:
    """An asker that lists its few ids but claims a huge count under a child would make
    the server read that many of its own ids; the server reads at most its limit plus the
    ids the asker listed. A root whose children's counts do not add up is refused."""
    rng = random.Random(9)
    server = MemorySource(ids(rng, 600))
    held = sorted(server.ids_under("", 600))[:3]
    honest = protocol.read_merkle(MemorySource(set(held)), "")
    assert honest.children is not None
    children = [merkle.NodeDigest(c.digest, 1 << 62 if c.count else 0)
                for c in honest.children]
    hostile = RemoteNode("", honest.digest, len(held), children, held)
    asked: list[int] = []

    def ids_under(prefix: str, n: int) -> list[str]:
        asked.append(n)
        return server.ids_under(prefix, n)

    got = protocol.lacking_ids(protocol.read_merkle(server, ""), hostile, ids_under, 50)
    assert set(got).isdisjoint(held) and len(got) <= 50
    assert asked and max(asked) <= 50 + len(held)
    # claiming nothing where it lists ids: those are still not sent back to it
    none = RemoteNode("", honest.digest, len(held),
                      [merkle.NodeDigest(c.digest, 0) for c in honest.children], held)
    got = protocol.lacking_ids(protocol.read_merkle(server, ""), none, ids_under, 50)
    assert set(got).isdisjoint(held) and len(got) == 50
    body = protocol.hello_request(honest)
    body["merkle"]["children"] = [[c.digest.hex(), c.count] for c in children]
    with pytest.raises(BadRequest, match="sum of its children"):
        protocol.parse_hello_request(body)


def test_the_events_of_a_hello_answer_are_bounded() -> None:
    rng = random.Random(7)
    good = [{"id": i, "body": "{}"} for i in sorted(ids(rng, 3))]
    events, certs = protocol.parse_hello_events({"events": good, "certs": []})
    assert [e for e, _ in events] == [g["id"] for g in good] and certs == []
    many = [{"id": i, "body": "{}"} for i in ids(rng, protocol.MAX_HELLO_EVENTS + 1)]
    large = [{"id": good[0]["id"], "body": "x" * (protocol.HELLO_EVENT_BYTES + 1)}]
    for bad in ({"events": many}, {"events": large}, {"events": good + good[:1]},
                {"events": "no"}, {"events": [{"id": "zz", "body": "{}"}]},
                {"events": good, "certs": ["not base64!"]}):
        with pytest.raises(ProtocolError, match="hello answer"):
            protocol.parse_hello_events(bad)


def test_the_list_of_a_hello_pack_is_checked_before_a_frame_is_read() -> None:
    rng = random.Random(8)
    blobs = sorted(ids(rng, 3))
    sizes = {blobs[0]: 1000, blobs[1]: CHUNK_SIZE, blobs[2]: CHUNK_SIZE + 1}
    assert protocol.parse_hello_pack([[blobs[0], 1000], [blobs[1], CHUNK_SIZE]], sizes) == [
        (blobs[0], 1000), (blobs[1], CHUNK_SIZE)]
    assert protocol.parse_hello_pack([], sizes) == []
    many = {b: 1 for b in ids(rng, protocol.PACK_MAX_BLOBS + 1)}
    big = {b: CHUNK_SIZE for b in ids(rng, protocol.HELLO_PACK_BYTES // CHUNK_SIZE + 1)}
    for raw, known in (([[blobs[0], 999]], sizes),  # not the size its event gives
                       ([[blobs[2], CHUNK_SIZE + 1]], sizes),  # over a chunk
                       ([[blobs[0], 1000], [blobs[0], 1000]], sizes),  # twice
                       ([[rng.randbytes(32).hex(), 10]], sizes),  # no event of ours names it
                       ([[blobs[0], True]], {blobs[0]: 1}), ([blobs[0]], sizes), ("x", sizes),
                       ([[b, 1] for b in many], many), ([[b, s] for b, s in big.items()], big)):
        with pytest.raises(ProtocolError, match="hello answer"):
            protocol.parse_hello_pack(raw, known)


def test_a_hello_asks_for_a_bounded_pack() -> None:
    mine = RemoteNode("", bytes(32), 0, [merkle.NodeDigest(bytes(32), 0)] * merkle.FANOUT,
                      [])
    body = protocol.hello_request(mine, protocol.HelloPackAsk(1 << 40, "native"))
    _, ask = protocol.parse_hello_request(body)
    assert ask == protocol.HelloPackAsk(protocol.HELLO_PACK_BYTES, "native")
    assert protocol.parse_hello_request(protocol.hello_request(mine))[1] is None
    for bad in ({"bytes": -1}, {"bytes": 10, "zstd": "maybe"}, {"bytes": True}, "all"):
        with pytest.raises(BadRequest):
            protocol.parse_hello_request({**body, "pack": bad})
