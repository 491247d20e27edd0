"""The event loop stays responsive under a flood of peer requests (one blocking boundary).

A node runs as a real ``syncnode run`` process. A trusted peer (a real client certificate
over mutual TLS) floods its peer port with push offers, Merkle requests and event
requests, several at a time, while a third process times the admin API's ``/healthz``
served by the same event loop: every SQLite call, fsync and hash of those handlers must
run off the event loop, so the probe's 99th percentile stays under 50 ms (more than
without the flood). Before the blocking boundary: p50 386 ms, p99 941 ms in this test.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from syncsupport import NodeProcess, add_instances, node_processes, pin, uid

from syncnode import protocol
from syncnode.blobstore import CHUNK_SIZE
from syncnode.local import LocalNode
from syncnode.tls.contexts import client_ssl_context

FLOOD_SECONDS = 6.0
WORKERS = 4
P99_LIMIT = 0.050
ATTEMPTS = 3  # flood windows; one must meet the bound
MAX_LOAD = 4.0  # runnable tasks per CPU above which the machine, not the node, is timed


PROBE = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
out, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        resp.read()
    out.append(time.perf_counter() - start)
    time.sleep(0.02)
print(json.dumps(out))
"""


async def _probe(url: str, seconds: float) -> list[float]:
    """GET ``url`` every 20 ms for ``seconds`` from another process (its own GIL: the
    flood in this one does not delay the measurement); each answer's latency."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, url, str(seconds), stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    return json.loads(out)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


OFFERED = [secrets.token_hex(32) for _ in range(1000)]  # within the pending-offer quota


def _offer() -> dict[str, object]:
    """An offer of 20 multi-chunk blobs nobody has (each an offer file written), drawn
    from a pool a peer may keep pending."""
    return {"blobs": [{"hash": h, "size": 8 * CHUNK_SIZE, "chunks": secrets.token_hex(32 * 8)}
                      for h in random.sample(OFFERED, 20)]}


@pytest.mark.timeout(240)
async def test_healthz_p99_under_50ms_while_peers_flood_the_peer_port(tmp_path: Path) -> None:
    load = os.getloadavg()[0]
    if load > MAX_LOAD * (os.cpu_count() or 1):
        pytest.skip(f"load average {load:.1f} on {os.cpu_count()} CPUs: other work, not "
                    "this node, would decide the latencies")
    a = LocalNode.init(tmp_path / "a")
    b = LocalNode.init(tmp_path / "b")
    pin(a, b)
    pin(b, a)
    add_instances(a, [uid(5, i) for i in range(3000)])  # Merkle answers with real work
    a.close()
    served = {"offer": 0, "merkle": 0, "events": 0}
    with node_processes() as procs:
        proc = NodeProcess(a.data, tmp_path / "a.log")
        procs.append(proc)
        peer_port = await asyncio.to_thread(proc.wait_ready)
        api_port = json.loads((a.data / "ports.json").read_text())["api"]
        base = f"https://127.0.0.1:{peer_port}{protocol.PREFIX}"
        ctx = client_ssl_context(b.identity, b.trust, expected=a.node_id)
        ids = [secrets.token_hex(32) for _ in range(protocol.MAX_IDS)]
        deadline = time.monotonic() + FLOOD_SECONDS

        async def flood(session: aiohttp.ClientSession, n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                i += 1
                if i % 3 == 0:
                    async with session.post(f"{base}/push/offer", json=_offer()) as r:
                        assert r.status == 200, await r.text()
                        await r.read()
                        served["offer"] += 1
                elif i % 3 == 1:
                    prefix = format(i % 256, "02x")[: 1 + i % 2]
                    async with session.get(f"{base}/merkle", params={"prefix": prefix}) as r:
                        assert r.status == 200, await r.text()
                        await r.read()
                        served["merkle"] += 1
                else:
                    async with session.post(f"{base}/events", json={"ids": ids}) as r:
                        assert r.status == 200, await r.text()
                        await r.read()
                        served["events"] += 1

        healthz = f"http://127.0.0.1:{api_port}/healthz"
        results = []
        for _attempt in range(ATTEMPTS):
            served.update(offer=0, merkle=0, events=0)
            quiet = await _probe(healthz, 2)  # the same probe without the flood
            deadline = time.monotonic() + FLOOD_SECONDS
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=ctx, limit=WORKERS)) as session:
                *_, latencies = await asyncio.gather(
                    *(flood(session, n) for n in range(WORKERS)),
                    _probe(healthz, FLOOD_SECONDS - 0.5))
            p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
            # 50 ms over what the same probe sees without the flood: on a shared machine
            # scheduling alone costs milliseconds at p99; the bound is on what the flood adds
            limit = P99_LIMIT + _percentile(quiet, 0.99)
            print(f"\nflood: {served} requests in {FLOOD_SECONDS:.0f}s; /healthz "
                  f"n={len(latencies)} p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms "
                  f"max={max(latencies) * 1000:.1f} ms; without the flood "
                  f"p50={_percentile(quiet, 0.5) * 1000:.1f} ms "
                  f"p99={_percentile(quiet, 0.99) * 1000:.1f} ms")
            # the flood really happened: thousands of offered blobs, Merkle and event answers
            assert min(served.values()) >= 20, served
            assert len(latencies) >= 50
            results.append((p99, limit))
            if p99 < limit:
                break
        proc.stop()
    b.close()
    # Other work on the machine can spoil one window; before the blocking boundary every
    # window was far off (p50 386 ms, p99 941 ms)
    assert any(p99 < limit for p99, limit in results), \
        [f"p99 {p99 * 1000:.1f} ms, limit {limit * 1000:.1f} ms" for p99, limit in results]
