"""The catalog's in-memory Merkle cache never goes stale when another connection writes."""

from __future__ import annotations

import os
from pathlib import Path

from syncnode import events as ev
from syncnode.catalog import Catalog


def put(i: int, origin: str = "PEER") -> tuple[str, bytes]:
    e = ev.PutEvent(origin=origin, hlc=i + 1, blob=os.urandom(32).hex(), size=10,
                    chunks=os.urandom(32).hex(), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    sop_instance_uid=f"1.2.3.{i}", series_instance_uid="1.2.3",
                    study_instance_uid="1.2")
    body = ev.encode(e)
    return ev.event_id(body), body


def test_interleaved_writers_keep_the_incremental_root_exact(tmp_path: Path) -> None:
    one = Catalog(tmp_path / "c.db", node_id="A")
    two = Catalog(tmp_path / "c.db", node_id="A")
    n = 0
    for round_ in range(30):
        writer = one if round_ % 3 else two
        batch = [put(n + k) for k in range(round_ % 7 + 1)]
        n += len(batch)
        writer.apply(batch)
        assert one.merkle_root() == two.merkle_root() == one.recompute_merkle()
    # a failed transaction must not leave a poisoned cache behind
    bad = [put(n), ("0" * 64, b"{}")]
    result = one.apply(bad)
    assert result.rejected and one.merkle_root() == one.recompute_merkle()
    two.apply([put(n + 1)])
    one.apply([put(n + 2)])
    assert one.merkle_root() == two.merkle_root() == one.recompute_merkle()
    assert one.merkle_root().count == n + 3
