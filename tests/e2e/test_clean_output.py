"""A peer's hostile text never reaches a terminal or a log line raw.

A fake peer (a real TLS server holding a trusted key) answers every request with HTTP 500
and an error body full of terminal escapes (clear screen, set window title, bell). A real
``syncnode run`` syncs with it and logs JSON; then ``syncnode status``, ``status --json``
and ``peer list`` show the error escaped, and every log line is JSON without a control
character, raw or decoded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
from aiohttp import web

from syncnode.local import LocalNode
from syncnode.tls.contexts import server_ssl_context

pytestmark = pytest.mark.e2e
EVIL = "\x1b[2J\x1b]0;pwned\x07\x1b[31mred\u202eevil\nforged line"
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    return subprocess.run([sys.executable, "-m", "syncnode.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**env, "COLUMNS": "400"})


def unsafe_chars(text: str, allowed: str = "\n") -> list[str]:
    return [ch for ch in text if unicodedata.category(ch) in UNSAFE and ch not in allowed]


async def test_peer_error_body_is_shown_escaped(tmp_path: Path) -> None:
    a, fake = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "fake")
    fake.trust.pin(a.identity.cert_pem, a.node_id)
    fake_id, fake_cert = str(fake.node_id), tmp_path / "fake" / "node.crt"
    a.close()

    async def hostile(_request: web.Request) -> web.Response:
        return web.Response(status=500, text=EVIL)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hostile)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0,
                       ssl_context=server_ssl_context(fake.identity, fake.trust))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    added = await asyncio.to_thread(cli, "peer", "add", "--data", str(tmp_path / "a"), fake_id,
                                    f"https://127.0.0.1:{port}", "--cert", str(fake_cert))
    assert added.returncode == 0, added.stderr

    log_path = tmp_path / "a.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncnode.cli", "run", "--data", str(tmp_path / "a"),
             "--peer-host", "127.0.0.1", "--peer-port", "0", "--api-port", "0",
             "--dicom-port", "0", "--no-discovery", "--sync-interval", "0.3",
             "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        peer: dict = {}
        while time.monotonic() < deadline:
            st = json.loads((await asyncio.to_thread(
                cli, "status", "--data", str(tmp_path / "a"), "--json")).stdout)
            peer = st["peers"][0]
            if "pwned" in peer.get("last_error", ""):
                break
            await asyncio.sleep(0.3)
        assert "pwned" in peer.get("last_error", ""), peer
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        await runner.cleanup()
        fake.close()

    # JSON: escaped in the data itself, not only by the JSON encoding
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in peer["last_error"]
    assert "\\u202e" in peer["last_error"] and "\\nforged line" in peer["last_error"]
    assert unsafe_chars(peer["last_error"], allowed="") == []

    text = await asyncio.to_thread(cli, "status", "--data", str(tmp_path / "a"))
    assert text.returncode == 0
    assert "last error:" in text.stdout and "\\x1b]0;pwned\\x07" in text.stdout
    assert unsafe_chars(text.stdout) == [], text.stdout
    assert not any(line.startswith("forged line") for line in text.stdout.splitlines())

    listed = await asyncio.to_thread(cli, "peer", "list", "--data", str(tmp_path / "a"))
    assert "pwned" in listed.stdout and unsafe_chars(listed.stdout) == []

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert any("pwned" in line for line in lines), "the peer's error was never logged"
    for line in lines:
        rec = json.loads(line)  # JSON lines only
        assert unsafe_chars(line, allowed="") == []
        for value in rec.values():
            if isinstance(value, str):
                assert unsafe_chars(value, allowed="\n") == [], rec
