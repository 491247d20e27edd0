"""The OHIF viewer at /viewer/ driven in real headless Chromium against a running node.

A node holds three generated studies (real CT/MR pixel data). Chromium opens /viewer/ with
no session, is sent to the dashboard's sign-in, signs in with the read-only key, comes back
to the viewer's study list (filled by the node's QIDO-RS), opens the CT study (WADO-RS
metadata and pixel data) and must draw it: the centre of the image viewport in a
screenshot must vary (a blank or failed viewport is one flat colour). The screenshot stays
under the test's tmp folder (its path is printed). No Content-Security-Policy violation and
no refused DICOMweb request may happen on the way.

The viewer is installed by `.ci/run` (`syncnode viewer install --dir .cache/viewer`); the
test is skipped only when it is not installed and this is not CI.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from syncnode.apikeys import KeyStore
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.viewer import PINNED_VERSION, current

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gen_dataset  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.async_api")
VIEWER = Path(os.environ.get("SYNCNODE_TEST_VIEWER", ROOT / ".cache" / "viewer"))
IN_CI = bool(os.environ.get("CI") or os.environ.get("SYNCNODE_CI"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MIN_VARIANCE = 100.0  # of the luma (0..255) of the viewport's centre; a blank one is ~0
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed")]


def luma_variance(png: bytes) -> float:
    """Variance of the luma (0..255) of a screenshot, decoded by Pillow (not by the browser
    that drew it)."""
    with Image.open(io.BytesIO(png)) as image:
        return float(np.asarray(image.convert("L"), dtype=np.float64).var())


def test_luma_variance_tells_a_flat_image_from_a_busy_one() -> None:
    def png(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB").save(out, "PNG")
        return out.getvalue()
    assert luma_variance(png(np.full((64, 64), 16))) == 0
    chequer = (np.indices((64, 64)).sum(axis=0) % 2) * 255
    assert luma_variance(png(chequer)) > 10_000 > MIN_VARIANCE


async def _wait(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.25)


async def test_viewer_lists_opens_and_draws_a_study(tmp_path: Path) -> None:
    if current(VIEWER) is None:
        reason = (f"the OHIF viewer {PINNED_VERSION} is not installed in {VIEWER}: run "
                  f"`syncnode viewer install --dir {VIEWER}` (.ci/run does)")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    gen_dataset.generate(tmp_path / "ds", scale=0.002, seed=5, studies=3)  # 9 images, 5 MB
    studies: dict[str, tuple[str, str]] = {}  # study UID -> description, modality
    for path in sorted((tmp_path / "ds").rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies[ds.StudyInstanceUID] = (ds.StudyDescription, ds.Modality)
    assert len(studies) == 3
    ct = next(uid for uid, (_, modality) in studies.items() if modality == "CT")
    node = LocalNode.init(tmp_path / "node")
    running = RunningNode(node, node.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                              dicom_port=0, discovery=False,
                                              viewer_dir=str(VIEWER)))
    await running.start()
    violations: list[str] = []
    refused: list[str] = []
    dicomweb: list[str] = []
    shot = tmp_path / "viewer-study.png"
    try:
        import_paths(running.node, [tmp_path / "ds"])
        key = KeyStore(node.data).rotate("read")
        base = f"http://127.0.0.1:{running.ports['api']}"
        async with playwright.async_playwright() as pw:
            browser = await pw.chromium.launch_persistent_context(
                tmp_path / "profile", executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 900})  # a fresh profile
            try:
                page = await browser.new_page()
                # An operator who has seen OHIF's guided tour once: it would cover the image.
                await page.add_init_script(
                    "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
                page.on("console", lambda m: violations.append(m.text)
                        if "Content Security Policy" in m.text else None)

                def seen(r: Any) -> None:
                    if "/dicom-web/" in r.url:
                        dicomweb.append(r.url)
                        if r.status >= 400:
                            refused.append(f"{r.status} {r.url}")
                page.on("response", seen)

                await page.goto(f"{base}/viewer/")
                await page.locator("#login-key").wait_for(timeout=15_000)  # sent to sign in
                assert "next=" in page.url
                await page.fill("#login-key", key)
                await page.click("#login-form button")
                await page.wait_for_url(f"{base}/viewer/**", timeout=15_000)
                # COOP + COEP: shared memory for volume rendering (OHIF's debug page checks it)
                assert await page.evaluate("window.crossOriginIsolated") is True
                for description, _ in studies.values():  # the study list, from QIDO-RS
                    await page.get_by_text(description, exact=True).first.wait_for(
                        timeout=30_000)
                await page.get_by_text(studies[ct][0], exact=True).first.click()
                await page.get_by_role("button", name="Basic Viewer").click()
                await page.wait_for_url(f"**/viewer/viewer?StudyInstanceUIDs={ct}*",
                                        timeout=15_000)
                canvas = page.locator("canvas.cornerstone-canvas").first
                await canvas.wait_for(timeout=30_000)
                box = await canvas.bounding_box()
                assert box is not None and box["width"] > 200 and box["height"] > 200
                # The middle half of the viewport each way: the image, not its text overlay.
                centre = {"x": box["x"] + box["width"] / 4, "y": box["y"] + box["height"] / 4,
                          "width": box["width"] / 2, "height": box["height"] / 2}
                last = {"variance": 0.0}

                async def drawn() -> bool:
                    png = await page.screenshot(clip=centre, timeout=10_000)
                    last["variance"] = luma_variance(png)
                    return last["variance"] > MIN_VARIANCE
                await _wait(drawn, "the CT image in the viewport", 20.0)
                await page.screenshot(path=str(shot), clip=box)
                print(f"\nviewer screenshot: {shot} (luma variance of the viewport's centre "
                      f"{last['variance']:.0f}, at least {MIN_VARIANCE:g} required)")
            finally:
                await browser.close()
    finally:
        await running.stop()
    assert not violations, violations
    assert not refused, refused
    assert any(f"/studies/{ct}/series" in u for u in dicomweb)
