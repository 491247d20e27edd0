"""Sync on the audit trail: what one round moves between two in-process nodes (real TLS on
loopback) is one entry per round and direction, naming the peer — on the pulling node
``peer-received``, on the serving node ``peer-sent`` — never one per instance."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from syncsupport import (
    converged,
    import_files,
    make_dicom,
    pull_from,
    uid,
    url_of,
    wait_for,
)

from syncnode.audit import read_entries, verify
from syncnode.local import LocalNode
from syncnode.node import RunningNode

N = 12
StartNode = Callable[..., Awaitable[RunningNode]]


@pytest.mark.timeout(120)
async def test_a_round_is_one_entry_each_side(tmp_path: Path,
                                              new_node: Callable[[str], LocalNode],
                                              running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    study = uid(7)
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(7, 1, i), study=study,
                        series=uid(7, 1), pixel_bytes=4000, seed=i) for i in range(N)]
    import_files(a, *files)
    ra = await running(a)
    rb = await running(b)
    pull_from(b, rb, a, url_of(ra))  # b pulls from a, a only serves
    await wait_for(lambda: converged([a, b]), 60, "b to hold a's study")
    await rb.stop()
    await ra.stop()

    got_b = [e for e in read_entries(b.data / "audit") if e["action"].startswith("peer-")]
    got_a = [e for e in read_entries(a.data / "audit") if e["action"].startswith("peer-")]
    assert {e["action"] for e in got_b} == {"peer-received"}
    assert {e["action"] for e in got_a} == {"peer-sent"}
    assert sum(e["instances"] for e in got_b) == N
    assert sum(e["instances"] for e in got_a) == N
    for e in got_b:
        assert e["actor"] == f"peer:{a.node_id.compact}" and e["peer"] == a.node_id.compact
    for e in got_a:
        assert e["actor"] == f"peer:{b.node_id.compact}"
    assert {s for e in got_b + got_a for s in e.get("studies", [])} == {study}
    # rounds, not instances: the twelve went in a round or two
    assert 1 <= len(got_b) <= 2 and 1 <= len(got_a) <= 2
    assert sum(e["bytes"] for e in got_b) >= N * 4000
    assert verify(a.data / "audit").ok and verify(b.data / "audit").ok
