"""Pulls spread over several peers that hold the same blobs (syncnode.sources), between
in-process nodes over real mutual TLS on 127.0.0.1.

A and C hold the same study (the same files imported on both: the same blobs, each
with its own put events); B trusts both and pulls. What an operator relies on: B ends with
every event and blob, no blob is pulled twice, both peers serve part of it (the faster
more), and a peer that serves at a trickle does not hold B back: its blobs are taken
over by the other after a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from syncsupport import (
    add_peer,
    assert_blobs_intact,
    blob_set,
    import_files,
    make_dicom,
    pin,
    uid,
    url_of,
    wait_for,
)

from syncnode.local import LocalNode
from syncnode.node import RunningNode

StartNode = Callable[..., Awaitable[RunningNode]]
KiB = 1 << 10


def _same_study(tmp_path: Path, nodes: list[LocalNode], files: int, size: int) -> int:
    """Import one study's files into every node; returns the bytes of its blobs."""
    folder = tmp_path / "study"
    folder.mkdir()
    study = uid(7)
    paths = [make_dicom(folder / f"{i}.dcm", sop=uid(7, 1, i), study=study,
                        series=uid(7, 1), pixel_bytes=size, seed=i) for i in range(files)]
    for n in nodes:
        import_files(n, *paths)
    return sum(p.stat().st_size for p in paths)


def _has_all(b: LocalNode, sources: list[LocalNode]) -> bool:
    want = set().union(*(set(s.catalog.all_event_ids()) for s in sources))
    return want <= set(b.catalog.all_event_ids()) and blob_set(b) == blob_set(sources[0])


async def _pulling_from_both(b: LocalNode, a: LocalNode, c: LocalNode, ra: RunningNode,
                             rc: RunningNode, running: StartNode, **settings: object
                             ) -> RunningNode:
    for src, r in ((a, ra), (c, rc)):
        add_peer(b, src, url_of(r), push="never")
        pin(src, b)
    return await running(b, **settings)


async def test_two_peers_share_the_pulls_and_the_faster_serves_more(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    total = _same_study(tmp_path, [a, c], files=60, size=120 * KiB)
    ra, rc = await running(a), await running(c)
    # B takes A at 6 MB/s and C at 2 MB/s: both loops busy at once for about 1.5 s
    caps = {f"{a.node_id.compact}:in": "6MB/s", f"{c.node_id.compact}:in": "2MB/s"}
    rb = await _pulling_from_both(b, a, c, ra, rc, running, bandwidth_caps=caps)
    await wait_for(lambda: _has_all(b, [a, c]), 30, "B to hold the study from A and C")
    got = {n: rb.engine.bytes.get(n.node_id.compact, {}).get("in", 0) for n in (a, c)}
    served = {n: ra.peer_server.stats.get(b.node_id.compact, {}).get("bytes_out", 0)
              if n is a else rc.peer_server.stats.get(b.node_id.compact, {}).get("bytes_out", 0)
              for n in (a, c)}
    assert got[a] > 0 and got[c] > 0, got  # both served part of it
    assert got[a] > got[c], got  # the faster more
    assert served[a] >= got[a] and served[c] >= got[c]
    if rb.engine.sources.steals == 0:  # nothing taken over: no byte pulled twice
        assert got[a] + got[c] == total, (got, total)
    for src in (a, c):  # each peer's adaptive window is in its state (status --json)
        assert rb.engine.peers[src.node_id.compact].state.window >= 1
    assert_blobs_intact(b)


async def test_a_trickling_peer_does_not_hold_the_pull_back(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    _same_study(tmp_path, [a, c], files=12, size=1100 * KiB)
    ra = await running(a)
    rc = await running(c, bandwidth_caps={"out": "16KB/s"})  # C serves at a trickle
    start = time.monotonic()
    rb = await _pulling_from_both(b, a, c, ra, rc, running)
    # at 16 KB/s C alone would need over 13 minutes
    await wait_for(lambda: _has_all(b, [a, c]), 25, "B to hold the study despite slow C",
                   describe=lambda: (rb.engine.bytes, rb.engine.sources.steals))
    took = time.monotonic() - start
    from_a = rb.engine.bytes.get(a.node_id.compact, {}).get("in", 0)
    from_c = rb.engine.bytes.get(c.node_id.compact, {}).get("in", 0)
    assert from_c < 1 << 20 < from_a, (from_a, from_c)
    assert rb.engine.sources.steals > 0  # C's blobs were taken over, not waited for
    assert took < 25
    assert_blobs_intact(b)
