"""Properties of the events a hello answer carries (syncnode.protocol.lacking_ids), for
any two sets of event ids: never an event the asker holds, never more than the limit,
every event the asker lacks when the two root answers can tell (the asker lists its ids,
or holds nothing under a child of the root), and nothing when the roots agree. Whatever a
hostile asker claims under each child, the server reads at most its limit plus the ids
the asker listed."""

from __future__ import annotations

import random
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode import merkle, protocol
from syncnode.protocol import RemoteNode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from merklekit import MemorySource, random_ids

SETTINGS = settings(max_examples=100, deadline=None)

# event ids: 32 pseudo-random bytes from a drawn seed, in sets whose sizes are drawn (so
# both sides of INLINE_IDS = 256, which decides whether a root answer lists its ids, come
# up as often as not, and a failure shrinks to the smallest sizes)


@st.composite
def id_set(draw: st.DrawFn, max_size: int) -> set[str]:
    return random_ids(random.Random(draw(st.integers(0, 2**32))),
                      draw(st.integers(0, max_size)))


@st.composite
def two_sets(draw: st.DrawFn) -> tuple[set[str], set[str]]:
    """The server's ids and the asker's: some shared, some only on either side."""
    shared = draw(id_set(320))
    server_only = draw(id_set(320))
    asker_only = draw(id_set(40))
    return shared | server_only, shared | asker_only


def asked_root(ids: set[str]) -> RemoteNode:
    """The asker's root answer as the server parses it off the wire."""
    mine, _ = protocol.parse_hello_request(
        protocol.hello_request(protocol.read_merkle(MemorySource(ids), "")))
    return mine


@SETTINGS
@given(sets=two_sets(), limit=st.integers(0, 600))
def test_only_lacking_events_at_most_the_limit_all_when_the_roots_tell(
        sets: tuple[set[str], set[str]], limit: int) -> None:
    server_ids, asker_ids = sets
    server = MemorySource(server_ids)
    got = protocol.lacking_ids(protocol.read_merkle(server, ""), asked_root(asker_ids),
                               server.ids_under, limit)
    lacking = server_ids - asker_ids
    assert set(got) <= lacking
    assert len(got) == len(set(got)) <= max(limit, 0)
    if len(asker_ids) <= protocol.INLINE_IDS:  # the asker lists its ids: all are found
        assert len(got) == min(len(lacking), limit)
    else:  # children where the asker holds nothing: all of the server's ids there
        assert asker_root_children_empty_ids(server, asker_ids) & lacking <= set(got) \
            or len(got) == limit


def asker_root_children_empty_ids(server: MemorySource, asker_ids: set[str]) -> set[str]:
    """The server's ids under root children where the asker holds nothing."""
    held = {i[0] for i in asker_ids}
    return {i for i in server.ids_under("") if i[0] not in held}


@SETTINGS
@given(ids=id_set(400), limit=st.integers(0, 600))
def test_equal_roots_carry_nothing(ids: set[str], limit: int) -> None:
    source = MemorySource(ids)
    assert protocol.lacking_ids(protocol.read_merkle(source, ""), asked_root(ids),
                                source.ids_under, limit) == []


@SETTINGS
@given(sets=two_sets(), claims=st.lists(st.integers(0, 2**62), min_size=16, max_size=16),
       limit=st.integers(1, 600))
def test_a_hostile_askers_counts_bound_nothing_but_its_own_list(
        sets: tuple[set[str], set[str]], claims: list[int], limit: int) -> None:
    """An asker that lists its ids but claims any counts under the root's children: the
    server still reads at most ``limit`` plus the ids listed, and sends none of them."""
    server_ids, asker_ids = sets
    listed = sorted(asker_ids)[:protocol.INLINE_IDS]
    honest = protocol.read_merkle(MemorySource(set(listed)), "")
    assert honest.children is not None
    children = [merkle.NodeDigest(c.digest, n) for c, n in zip(honest.children, claims,
                                                                strict=True)]
    hostile = RemoteNode("", honest.digest, len(listed), children, listed)
    server = MemorySource(server_ids)
    asked: list[int] = []

    def ids_under(prefix: str, n: int) -> list[str]:
        asked.append(n)
        return server.ids_under(prefix, n)

    got = protocol.lacking_ids(protocol.read_merkle(server, ""), hostile, ids_under, limit)
    assert set(got).isdisjoint(listed) and len(got) <= limit
    assert all(n <= limit + len(listed) for n in asked)
