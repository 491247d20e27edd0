"""Cost of choosing the TLS context by server name on the peer port (a benchmark, not a test).

The peer port reads each ClientHello without consuming it (``MSG_PEEK``) before starting TLS,
so that introductions (server name ``introduce.syncnode``) get a context that asks for no
client certificate. This measures what that costs a new mutual-TLS connection: the same
aiohttp app, syncnode's own contexts (``server_ssl_context`` / ``client_ssl_context``,
pinned both ways), served once through :func:`syncnode.listeners.start_listener` without
``sni_contexts`` (asyncio's own TLS) and once with them (peek, then ``loop.start_tls``).
Each sample is one fresh connection: TCP, TLS 1.3 handshake, one GET, close. Both listeners
run in one process, alternating in rounds, so a noisy machine affects both alike.

    python3 tools/bench_handshake.py [--connections 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from syncnode.listeners import ListenerLimits, start_listener
from syncnode.tls.contexts import (
    INTRODUCTION_NAME,
    client_ssl_context,
    introduction_ssl_context,
    server_ssl_context,
)
from syncnode.tls.identity import create_identity
from syncnode.tls.truststore import TrustStore


async def one(port: int, ctx: object) -> float:
    start = time.perf_counter()
    conn = aiohttp.TCPConnector(ssl=ctx, force_close=True)  # type: ignore[arg-type]
    async with aiohttp.ClientSession(connector=conn) as session, \
            session.get(f"https://127.0.0.1:{port}/hello") as resp:
        assert resp.status == 200, resp.status
        await resp.read()
    return time.perf_counter() - start


async def main(n: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="bench-handshake-"))
    server, client = create_identity(work / "server"), create_identity(work / "client")
    s_trust, c_trust = TrustStore(server.data_dir), TrustStore(client.data_dir)
    s_trust.pin(client.cert_der, client.node_id)
    c_trust.pin(server.cert_der, server.node_id)
    app = web.Application()
    app.router.add_get("/hello", lambda _: web.json_response({"ok": True}))
    limits = ListenerLimits()
    plain = await start_listener(app, "127.0.0.1", 0, limits=limits,
                                 ssl_context=server_ssl_context(server, s_trust))
    routed = await start_listener(
        app, "127.0.0.1", 0, limits=limits, ssl_context=server_ssl_context(server, s_trust),
        sni_contexts={INTRODUCTION_NAME: introduction_ssl_context(server)})
    ctx = client_ssl_context(client, c_trust, expected=server.node_id)
    samples: dict[str, list[float]] = {"asyncio_tls": [], "sni_routed": []}
    try:
        for _ in range(10):  # warm-up
            await one(plain[1].port, ctx)
            await one(routed[1].port, ctx)
        for _ in range(n):
            samples["asyncio_tls"].append(await one(plain[1].port, ctx))
            samples["sni_routed"].append(await one(routed[1].port, ctx))
    finally:
        for runner, _site in (plain, routed):
            await runner.cleanup()
    out: dict[str, object] = {"connections": n}
    for name, xs in samples.items():
        xs.sort()
        out[name] = {"median_ms": round(statistics.median(xs) * 1e3, 2),
                     "p95_ms": round(xs[int(0.95 * (len(xs) - 1))] * 1e3, 2)}
    out["median_ratio"] = round(statistics.median(samples["sni_routed"])
                                / statistics.median(samples["asyncio_tls"]), 3)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.connections))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
