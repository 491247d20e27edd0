"""A node tells its peers when its catalog changes, so a study arrives without waiting
for the peers' next sync round."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from syncsupport import start_new_node as start

from syncnode.demo import make_study
from syncnode.importer import import_paths


async def wait_for(predicate, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_change_reaches_peer_long_before_its_next_round(tmp_path: Path) -> None:
    a, b = await start(tmp_path / "a", 60), await start(tmp_path / "b", 60)
    try:
        for x, y in ((a, b), (b, a)):
            x.node.trust.pin(y.node.identity.cert_pem, y.node.node_id)
            x.node.catalog.add_peer(y.node.node_id.compact,
                                    f"https://127.0.0.1:{y.ports['peer']}", "never")
            x.peers_changed()
        # both loops ran their first round (nothing to do) and now sleep for 60 s
        assert await wait_for(lambda: all(
            s.get("state") == "in_sync" for r in (a, b)
            for s in r.node.catalog.peer_states().values()), 10)
        await asyncio.sleep(2)  # let any retry or follow-up round finish
        next_rounds = [s["next_attempt"] for s in b.node.catalog.peer_states().values()]
        assert min(next_rounds) > time.time() + 30  # B's loop sleeps for its interval
        make_study(tmp_path / "study", images=5, size=64)
        import_paths(a.node, [tmp_path / "study"])  # as the CLI would, beside the node
        t0 = time.monotonic()
        assert await wait_for(lambda: b.node.catalog.counts()["instances"] == 5, 10)
        assert time.monotonic() - t0 < 5  # the interval is 60 s: only a notice explains it
        assert b.node.catalog.merkle_root() == a.node.catalog.merkle_root()
    finally:
        await a.stop()
        await b.stop()
