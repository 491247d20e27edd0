"""The admin API against a hostile web page, in real headless Chromium (Debian's package).

An operator signs in on the dashboard (it asks for the key once and keeps a session). In
the same browser, a page from another origin - ``http://attacker.test:<port>``, mapped to
127.0.0.1 with ``--host-resolver-rules`` and served by this test - tries to read the
patient list and a file, to delete an instance, to frame the dashboard, and, as DNS
rebinding would, to load the API under its own name. Everything must fail, and the
dashboard must still work afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from aiohttp import web
from syncsupport import start_new_node as start

from syncnode.apikeys import KeyStore
from syncnode.importer import import_paths
from syncnode.local import LocalNode

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.async_api")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP attacker.test 127.0.0.1"]
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

# The attacker's page: every attempt records what it got into #result (JSON).
ATTACK = """<!doctype html><html><body><pre id="result"></pre>
<iframe id="frame" src="http://127.0.0.1:API/" width="600" height="300"></iframe>
<script>
const api = "http://127.0.0.1:API", rebound = "http://attacker.test:API";
async function attempt(name, url, options) {
  try {
    const r = await fetch(url, options);
    return [name, "read " + r.status + " " + (await r.text()).slice(0, 2000)];
  } catch (e) { return [name, "blocked " + e.name]; }
}
(async () => {
  const results = Object.fromEntries(await Promise.all([
    attempt("list", api + "/api/v1/instances", { credentials: "include" }),
    attempt("file", api + "/api/v1/instances/SOP/file", { credentials: "include" }),
    attempt("rebound", rebound + "/api/v1/instances", { credentials: "include" }),
    // a "simple" request, sent without a pre-flight: the answer is opaque, but is the
    // change made? (trust a node at the attacker's address)
    attempt("trust", api + "/api/v1/nodes",
            { method: "POST", credentials: "include", mode: "no-cors",
              headers: { "Content-Type": "text/plain" },
              body: JSON.stringify({ node_id: "PEER", url: "https://127.0.0.1:1" }) }),
    attempt("delete-csrf", api + "/api/v1/instances/SOP",
            { method: "DELETE", credentials: "include", headers: { "X-CSRF-Token": "x" } }),
  ]));
  document.getElementById("result").textContent = JSON.stringify(results);
  document.body.dataset.done = "1";
})();
</script></body></html>"""


async def test_another_origin_cannot_read_or_change_and_the_dashboard_works(
        tmp_path: Path) -> None:
    a = await start(tmp_path / "a")
    import_paths(a.node, [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"])
    inst = a.node.catalog.instances()[0]
    secrets = [inst.patient_id, inst.sop_instance_uid]
    assert all(secrets)
    admin_key = KeyStore(a.node.data).rotate("admin")
    api_port = a.ports["api"]
    stranger = LocalNode.init(tmp_path / "stranger").node_id
    page_html = (ATTACK.replace("API", str(api_port)).replace("SOP", inst.sop_instance_uid)
                 .replace("PEER", str(stranger)))
    evil = web.Application()

    async def attack_page(_request: web.Request) -> web.Response:
        return web.Response(text=page_html, content_type="text/html")

    evil.router.add_get("/", attack_page)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    evil_port = runner.addresses[0][1]  # port 0: the one the OS chose
    try:
        async with playwright.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = await browser.new_context()
            dash = await context.new_page()
            # the operator signs in once: the dashboard shows the node
            await dash.goto(f"http://127.0.0.1:{api_port}/")
            await dash.locator("#login-key").wait_for(timeout=10_000)
            await dash.fill("#login-key", admin_key)
            await dash.click("#login-form button")
            await dash.wait_for_selector("body[data-ready='1']", timeout=10_000)
            assert await dash.text_content("#node-id") == str(a.node.node_id)
            assert await dash.text_content("#n-instances") == "2"
            cookies = await context.cookies()
            assert [c["httpOnly"] for c in cookies] == [True]
            assert [c["sameSite"] for c in cookies] == ["Strict"]
            assert admin_key not in json.dumps(cookies)
            assert admin_key not in await dash.evaluate(
                "JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
            # the attacker's page, in the same browser while the session is open: from
            # another site, and from this machine's own address on another port (same
            # site: the session cookie is sent along, the CSRF check must stop the change)
            evil_page = await context.new_page()
            for origin in (f"http://attacker.test:{evil_port}", f"http://127.0.0.1:{evil_port}"):
                await evil_page.goto(origin + "/")
                await evil_page.wait_for_selector("body[data-done='1']", timeout=20_000)
                results = json.loads(await evil_page.text_content("#result") or "{}")
                assert set(results) == {"list", "file", "rebound", "trust", "delete-csrf"}
                for name in ("list", "file", "rebound", "delete-csrf"):
                    assert results[name] == "blocked TypeError", (origin, name, results[name])
                # no-cors: sent, but the answer is withheld (Cross-Origin-Resource-Policy)
                # or opaque; what counts is that nothing changed
                assert results["trust"] in ("blocked TypeError", "read 0 "), results["trust"]
                assert a.node.catalog.peers() == []
                assert a.node.catalog.instance(inst.sop_instance_uid) is not None
                shown = json.dumps(results)
                assert not any(s in shown for s in secrets)
            # the dashboard in a frame of that page shows nothing (frame-ancestors, DENY)
            frame = evil_page.frame_locator("#frame")
            assert await frame.locator("#node-id").count() == 0
            # DNS rebinding: the API under the attacker's name is refused outright
            rebound = await evil_page.goto(f"http://attacker.test:{api_port}/api/v1/instances")
            assert rebound is not None and rebound.status == 421
            body = await evil_page.content()
            assert not any(s in body for s in secrets)
            rebound = await evil_page.goto(f"http://attacker.test:{api_port}/")
            assert rebound is not None and rebound.status == 421
            # the operator's dashboard still works, and a reload keeps the session
            await dash.reload()
            await dash.wait_for_selector("body[data-ready='1']", timeout=10_000)
            assert await dash.locator("#login").is_hidden()
            assert await dash.text_content("#n-instances") == "2"
            await browser.close()
    finally:
        await runner.cleanup()
        await a.stop()
