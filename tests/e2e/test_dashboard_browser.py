"""The dashboard driven in real headless Chromium (Debian's package, through Playwright).

Node A trusts two peers: B holds a study behind a slow link (a bandwidth-capped fault
proxy), C a small one on a direct link. The page must show both peers, B syncing with a
progress bar whose filled width grows between two screenshots, then both in sync, the
arrival of both studies, and the export outbox toward A's local PACS (down: pending).
Screenshots are kept as test artifacts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from syncnode.apikeys import KeyStore
from syncnode.demo import make_study
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.node import RunningNode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from faultproxy import FaultConfig, FaultProxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.async_api")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed")]
ARTIFACTS = Path(os.environ.get("SYNCNODE_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


async def login(page: Any, key: str) -> None:
    """Sign in on the dashboard's own form, as an operator would, once."""
    await page.locator("#login-key").wait_for(timeout=10_000)
    await page.fill("#login-key", key)
    await page.click("#login-form button")
    await page.wait_for_selector("body[data-ready='1']", timeout=10_000)


async def start(data: Path, **settings: Any) -> RunningNode:
    node = LocalNode.init(data)
    running = RunningNode(node, node.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                              dicom_port=0, discovery=False, sync_interval=0.5,
                                              **settings))
    await running.start()
    return running


async def test_dashboard_shows_syncing_then_in_sync(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:  # A's local PACS: a port nobody listens on
        s.bind(("127.0.0.1", 0))
        pacs = f"PACS@127.0.0.1:{s.getsockname()[1]}"
    a = await start(tmp_path / "a", export=[pacs])
    b, c = [await start(tmp_path / n) for n in "bc"]
    make_study(tmp_path / "big", images=60, size=512, seed=1)   # ~31 MB at B
    make_study(tmp_path / "small", images=5, size=128, seed=2)  # at C
    import_paths(b.node, [tmp_path / "big"])
    import_paths(c.node, [tmp_path / "small"])
    proxy = FaultProxy(upstream=("127.0.0.1", b.ports["peer"]),
                       config=FaultConfig(shared_rate_down=4_000_000, seed=1))
    await proxy.start()
    try:
        for peer, url in ((b, f"https://127.0.0.1:{proxy.port}"),
                          (c, f"https://127.0.0.1:{c.ports['peer']}")):
            a.node.trust.pin(peer.node.identity.cert_pem, peer.node.node_id)
            peer.node.trust.pin(a.node.identity.cert_pem, a.node.node_id)
            a.node.catalog.add_peer(peer.node.node_id.compact, url, "never")
        async with playwright.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"http://127.0.0.1:{a.ports['api']}/")
            await login(page, KeyStore(a.node.data).rotate("read"))
            a.peers_changed()
            rows = page.locator("#peers tbody tr")
            b_row = page.locator(f"#peers tr[data-node-id='{b.node.node_id}']")
            c_row = page.locator(f"#peers tr[data-node-id='{c.node.node_id}']")
            await b_row.locator(".pill.syncing").wait_for(timeout=20_000)
            await b_row.locator(".bar .fill").wait_for(timeout=20_000)
            assert await rows.count() == 2
            assert "still needed" in await b_row.locator(".need").inner_text()
            # the bar's filled width, read in the page (the row is re-drawn on every change)
            width = """([id, w]) => {
                const f = document.querySelector(`#peers tr[data-node-id='${id}'] .fill`);
                const x = f ? f.getBoundingClientRect().width : -1;
                return x > w ? x : false; }"""
            peer = str(b.node.node_id)
            first = await (await page.wait_for_function(
                width, arg=[peer, -1], timeout=10_000)).json_value()
            await page.screenshot(path=str(ARTIFACTS / "dashboard-syncing-1.png"),
                                  full_page=True)
            assert 0 <= first < 160
            # later, the same bar is wider: bytes arrived (bounded wait)
            second = await (await page.wait_for_function(
                width, arg=[peer, first + 5], timeout=30_000, polling=200)).json_value()
            await page.screenshot(path=str(ARTIFACTS / "dashboard-syncing-2.png"),
                                  full_page=True)
            assert first < second <= 160
            await b_row.locator(".pill.in_sync").wait_for(timeout=60_000)
            await c_row.locator(".pill.in_sync").wait_for(timeout=20_000)
            assert await b_row.locator(".bar").count() == 0
            await b_row.locator("svg.spark polyline.in").wait_for(timeout=10_000)
            await page.locator(f"#outbox tr[data-dest='{pacs}']").wait_for(timeout=20_000)
            await page.wait_for_function(
                "document.querySelectorAll('#arrivals tbody tr').length === 2",
                timeout=10_000)
            studies = page.locator("#studies tbody tr")
            await page.wait_for_function(
                "document.querySelectorAll('#studies tbody tr').length === 2", timeout=10_000)
            assert await studies.count() == 2
            await page.screenshot(path=str(ARTIFACTS / "dashboard-in-sync.png"), full_page=True)
            await browser.close()
        assert a.node.catalog.counts()["instances"] == 60 + 5
    finally:
        await proxy.stop()
        for r in (a, b, c):
            await r.stop()
        await asyncio.sleep(0)
