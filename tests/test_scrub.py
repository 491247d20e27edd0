"""The periodic background verify of a running node (``verify_interval``, ``verify_rate``).

Two in-process nodes over real mutual TLS: A's blob store has a blob damaged on disk; with a
short interval the background pass finds it, names it in the status (and /metrics), and
meanwhile A still pulls a new study from B (the pass runs in its own thread, rate-limited,
not on the event loop)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from syncsupport import add_peer, make_dicom, pin, uid, url_of, wait_for

from syncnode import scrub
from syncnode.config import InvalidInterval, parse_interval
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.service import NodeService

StartNode = Callable[..., Awaitable[RunningNode]]


@pytest.mark.parametrize(("text", "seconds"), [("7d", 604800.0), ("12h", 43200.0),
                                               ("30m", 1800.0), ("90", 90.0), ("0", 0.0),
                                               (2.5, 2.5), ("1w", 604800.0)])
def test_interval_forms(text: object, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("bad", ["weekly", "-1", "7 days", "400d", True])
def test_bad_intervals_say_how_to_write_one(bad: object) -> None:
    with pytest.raises(InvalidInterval):
        parse_interval(bad)


def test_scrub_keeps_to_its_rate(node: LocalNode, tmp_path: Path) -> None:
    files = [make_dicom(tmp_path / f"r{i}.dcm", sop=uid(91, i), study=uid(91),
                        series=uid(91, 0), pixel_bytes=120_000, seed=i) for i in range(5)]
    NodeService(node).import_paths(files)
    total = node.catalog.counts()["blob_bytes"]
    t0 = time.monotonic()
    result = scrub.scrub(node, rate=total / 0.5)  # half a second's worth at this rate
    assert result.ok and result.blobs_checked == 5 and result.bytes_checked == total
    assert time.monotonic() - t0 >= 0.4


async def test_background_verify_finds_damage_and_sync_goes_on(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    old = [make_dicom(tmp_path / f"a{i}.dcm", sop=uid(92, 1, i), study=uid(92, 1),
                      series=uid(92, 1, 0), pixel_bytes=120_000, seed=i) for i in range(16)]
    NodeService(a).import_paths(old)
    victim = a.catalog.instances()[0].blob
    path = a.store.path(victim)
    path.chmod(0o644)
    with open(path, "r+b") as f:  # one flipped byte, as a failing disk would
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    # ~1.9 MB at 1 MB/s: each pass takes over a second while the sync below runs
    ra = await running(a, verify_interval=1, verify_rate=1)
    rb = await running(b)
    add_peer(a, b, url_of(rb), push="never")
    # B only trusts A: were B to pull A's damaged blob, it would report it and A would
    # move it aside before the pass finds it (tests/test_damage_reports.py)
    pin(b, a)
    ra.peers_changed()

    def passing() -> bool:
        return ra.scrub is not None and ra.scrub.running
    await wait_for(passing, 10, "a background pass to start")
    new = [make_dicom(tmp_path / f"b{i}.dcm", sop=uid(92, 2, i), study=uid(92, 2),
                      series=uid(92, 2, 0), pixel_bytes=100_000, seed=50 + i) for i in range(5)]
    NodeService(b).import_paths(new)
    rb.local_change()
    took = await wait_for(lambda: a.catalog.live_count(uid(92, 2)) == 5, 15,
                          "A to pull B's new study during the background verify")
    assert took < 10
    status = await wait_for(lambda: (NodeService(a, ra).status().get("verify") or {})
                            .get("problems", 0) > 0, 15, "the pass to report the damage")
    assert status >= 0
    st = NodeService(a, ra).status()
    assert st["verify"]["source"] == "background" and st["verify"]["blobs_checked"] >= 16
    assert [d["blob"] for d in st["verify"]["damaged"]] == [victim]
    assert st["verify_schedule"]["interval"] == 1.0
