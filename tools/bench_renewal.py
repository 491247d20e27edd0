"""How long peers take to follow a certificate renewal (a benchmark, not a test).

Three nodes run in-process on loopback (real mutual TLS), each trusting the other two by
pinned certificate, syncing every ``--interval`` seconds. Each round stops node A, renews
its certificate (``syncnode.renewal.renew``), starts it again on the same port, and times
until both B and C (a) trust A's new id, having moved their entry from the old one, and (b)
completed a sync round with A under the new id. No operator action on B or C.

    python3 tools/bench_renewal.py [--rounds 5] [--interval 0.5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from syncnode import renewal
from syncnode.local import LocalNode
from syncnode.node import RunningNode


async def start(node: LocalNode, port: int, interval: float) -> RunningNode:
    settings = node.settings(peer_host="127.0.0.1", peer_port=port, api_host="127.0.0.1",
                             api_port=0, dicom_host="127.0.0.1", dicom_port=0,
                             sync_interval=interval, discovery=False)
    running = RunningNode(node, settings)
    await running.start()
    return running


def followed(peer: LocalNode, new: str, since: float) -> bool:
    listed = {p["node_id"] for p in peer.catalog.peers()}
    state = peer.catalog.peer_states().get(new, {})
    return new in listed and state.get("last_success", 0.0) > since


async def main(rounds: int, interval: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-renewal-"))
    nodes = {name: LocalNode.init(work / name) for name in "abc"}
    runs = {name: await start(n, 0, interval) for name, n in nodes.items()}
    for name, node in nodes.items():
        for other, peer in nodes.items():
            if other != name:
                node.trust.pin((peer.data / "node.crt").read_bytes(), peer.node_id)
                node.catalog.add_peer(peer.node_id.compact,
                                      f"https://127.0.0.1:{runs[other].ports['peer']}")
        runs[name].peers_changed()
    times: list[float] = []
    try:
        for _ in range(rounds):
            a = nodes["a"]
            port = runs["a"].ports["peer"]
            await runs["a"].stop()
            done = renewal.renew(a, grace_days=30)
            a.close()
            nodes["a"] = a = LocalNode(a.data)
            t0 = time.time()
            runs["a"] = await start(a, port, interval)
            deadline = time.monotonic() + 60
            while not all(followed(nodes[x], done.new.compact, t0) for x in "bc"):
                if time.monotonic() > deadline:
                    raise SystemExit("peers did not follow the renewal within 60 s")
                await asyncio.sleep(0.02)
            times.append(time.time() - t0)
    finally:
        for r in runs.values():
            await r.stop()
        for n in nodes.values():
            n.close()
    return {"rounds": rounds, "sync_interval_s": interval,
            "follow_s_median": round(statistics.median(times), 3),
            "follow_s_max": round(max(times), 3), "follow_s": [round(t, 3) for t in times]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.rounds, args.interval))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"B and C followed A's renewal (trust moved, a sync round done) in "
              f"{result['follow_s_median']} s median, {result['follow_s_max']} s max over "
              f"{args.rounds} renewals (sync interval {args.interval} s)")
