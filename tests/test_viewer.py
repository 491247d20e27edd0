"""Installing the web viewer and serving it at /viewer/ (syncnode.viewer, admin.viewer).

A small package shaped like ``@ohif/app`` (index.html with inline bootstrap scripts, a
hashed app bundle with webpack's public path, a style sheet naming a font from the root, a
WebAssembly codec, a module worker, the build's own app-config.js) stands in for the real
50 MB one here; the real viewer is driven in Chromium by tests/e2e/test_viewer_browser.py.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from syncnode import viewer
from syncnode.apikeys import KeyStore
from syncnode.local import LocalNode
from syncnode.node import RunningNode

INDEX = ('<!doctype html><html><head><script>console.time("scriptToView"),'
         'window.PUBLIC_URL="/"</script><link rel="manifest" href="/manifest.json">'
         '<script src="/app-config.js"></script><script>window.PUBLIC_URL="/"</script>'
         '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
         '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div>'
         '</body></html>')
FILES = {
    "index.html": INDEX.encode(),
    "app.bundle.0123456789abcdef.js": b'/* app */\n__webpack_require__.p = "/";\n'
                                      + b"var x = 1;\n" * 400,
    "app.bundle.css": b"@font-face{src:url(/a34f9d1faa5f3315.woff2)}",
    "a34f9d1faa5f3315.woff2": b"wOF2font",
    "codec.fedcba9876543210.wasm": b"\0asm\1\0\0\0",
    "worker.mjs": b"self.onmessage = () => {};\n",
    "manifest.json": b"{}",
    "app-config.js": b"window.config = {dataSources: [{url: 'https://example.org'}]};",
    "_redirects": b"/* /index.html 200",
}


def fake_package(folder: Path, version: str = "9.9.9", *, files: dict[str, bytes] | None = None,
                 extra: tuple[tuple[str, bytes], ...] = ()) -> Path:
    """An npm tarball shaped like @ohif/app's (``package/dist/...``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tgz = folder / f"ohif-app-{version}.tgz"
    members = {"package/package.json": json.dumps({"name": "@ohif/app",
                                                   "version": version}).encode()}
    members |= {f"package/dist/{k}": v for k, v in (files or FILES).items()}
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in (*members.items(), *extra):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tgz


def test_install_rebases_the_build_to_viewer_and_records_it(tmp_path: Path) -> None:
    tgz = fake_package(tmp_path / "src")
    info = viewer.install(tmp_path / "v", tgz)
    v = tmp_path / "v"
    html = (v / "index.html").read_text()
    assert html.count('window.PUBLIC_URL="/viewer/"') == 2 and 'PUBLIC_URL="/"' not in html
    assert 'src="/viewer/app.bundle.0123456789abcdef.js"' in html
    assert 'href="/viewer/app.bundle.css"' in html and 'src="/viewer/app-config.js"' in html
    assert b'__webpack_require__.p = "/viewer/";' in (
        v / "app.bundle.0123456789abcdef.js").read_bytes()
    assert (v / "app.bundle.css").read_text() == \
        "@font-face{src:url(/viewer/a34f9d1faa5f3315.woff2)}"
    assert not (v / "app-config.js").exists() and not (v / "_redirects").exists()
    assert (v / "codec.fedcba9876543210.wasm").read_bytes() == FILES[
        "codec.fedcba9876543210.wasm"]
    assert (info.package, info.version, info.base) == ("@ohif/app", "9.9.9", "/viewer/")
    assert info.files == len(list(p for p in v.rglob("*") if p.is_file())) - 1  # + manifest
    assert viewer.installed(v) == info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "v"]  # no staging left


def test_reinstall_swaps_whole_and_a_folder_source_is_left_alone(tmp_path: Path) -> None:
    viewer.install(tmp_path / "v", fake_package(tmp_path / "a", "1.0.0"))
    src = tmp_path / "unpacked"
    with tarfile.open(fake_package(tmp_path / "b", "2.0.0")) as tar:
        tar.extractall(src, filter="data")
    before = (src / "package" / "dist" / "index.html").read_bytes()
    info = viewer.install(tmp_path / "v", src / "package")
    assert info.version == "2.0.0" and viewer.installed(tmp_path / "v").version == "2.0.0"
    assert (src / "package" / "dist" / "index.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "unpacked", "v"]


def test_the_pinned_version_with_another_digest_is_refused(tmp_path: Path) -> None:
    viewer.install(tmp_path / "v", fake_package(tmp_path / "ok", "1.0.0"))
    forged = fake_package(tmp_path / "forged", viewer.PINNED_VERSION)
    with pytest.raises(viewer.ViewerError, match="modified package"):
        viewer.install(tmp_path / "v", forged)
    assert viewer.installed(tmp_path / "v").version == "1.0.0"  # the old one still whole


@pytest.mark.parametrize("case", ["traversal", "no-public-url", "not-ohif", "no-dist",
                                  "not-gzip"])
def test_bad_sources_are_refused_and_change_nothing(tmp_path: Path, case: str) -> None:
    if case == "traversal":
        src = fake_package(tmp_path / "s", extra=(("package/../../evil.txt", b"x"),))
    elif case == "no-public-url":
        src = fake_package(tmp_path / "s", files={**FILES, "index.html": b"<html></html>"})
    elif case == "not-ohif":
        src = fake_package(tmp_path / "s")
        shutil.rmtree(tmp_path / "x", ignore_errors=True)
        with tarfile.open(src) as tar:
            tar.extractall(tmp_path / "x", filter="data")
        (tmp_path / "x" / "package" / "package.json").write_text(
            json.dumps({"name": "left-pad", "version": "1.0.0"}))
        src = tmp_path / "x" / "package"
    elif case == "no-dist":
        (tmp_path / "s").mkdir()
        src = tmp_path / "s"
    else:
        src = tmp_path / "s.tgz"
        src.write_bytes(b"this is not a tarball")
    with pytest.raises(viewer.ViewerError):
        viewer.install(tmp_path / "v", src)
    assert not (tmp_path / "v").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".viewer-")]


def test_a_damaged_install_is_reported_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(viewer.ViewerNotInstalled, match="syncnode viewer install"):
        viewer.installed(tmp_path / "v")
    viewer.install(tmp_path / "v", fake_package(tmp_path / "s"))
    (tmp_path / "v" / "app.bundle.0123456789abcdef.js").unlink()
    with pytest.raises(viewer.ViewerNotInstalled, match=r"app\.bundle\..*missing"):
        viewer.installed(tmp_path / "v")


def test_without_npm_the_operator_is_told_what_to_do(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    with pytest.raises(viewer.ViewerError) as exc:
        viewer.npm_pack(tmp_path)
    assert f"npm pack @ohif/app@{viewer.PINNED_VERSION}" in str(exc.value)
    assert "--from" in str(exc.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncnode.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_install_and_status(tmp_path: Path) -> None:
    LocalNode.init(tmp_path / "n").close()
    data = str(tmp_path / "n")
    missing = _cli("viewer", "status", "--data", data)
    assert missing.returncode == 1 and "syncnode viewer install" in missing.stderr
    done = _cli("viewer", "install", "--from", str(fake_package(tmp_path / "s")),
                "--data", data, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == "9.9.9"
    status = _cli("viewer", "status", "--data", data, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["path"] == str(
        (tmp_path / "n" / "viewer").resolve())
    bad = _cli("viewer", "install", "--from", str(tmp_path / "nothing"), "--data", data)
    assert bad.returncode == 2 and "neither an npm tarball" in bad.stderr


# -- serving ------------------------------------------------------------------------------
@dataclass
class Served:
    running: RunningNode
    base: str
    read_key: str
    folder: Path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    node = LocalNode.init(tmp_path / "n")
    folder = tmp_path / "shared-viewer"
    viewer.install(folder, fake_package(tmp_path / "s"))
    running = RunningNode(node, node.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                              dicom_port=0, discovery=False,
                                              viewer_dir=str(folder)))
    await running.start()
    key = KeyStore(node.data).rotate("read")
    yield Served(running, f"http://127.0.0.1:{running.ports['api']}", key, folder)
    await running.stop()


async def _session(s: Served) -> aiohttp.ClientSession:
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with client.post(s.base + "/api/v1/session", headers={"X-API-Key": s.read_key}) as r:
        assert r.status == 201
    return client


async def test_pages_need_a_session_and_send_the_visitor_to_sign_in(served: Served) -> None:
    async with aiohttp.ClientSession() as anon:
        async with anon.get(served.base + "/viewer", allow_redirects=False) as r:
            assert r.status == 308 and r.headers["Location"] == "/viewer/"
        for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3"):
            async with anon.get(served.base + path, allow_redirects=False) as r:
                assert r.status == 303, path
                target = URL(r.headers["Location"])
                assert target.path == "/" and target.query["next"] == path
        # the files themselves hold no patient data: open
        async with anon.get(served.base + "/viewer/app.bundle.0123456789abcdef.js") as r:
            assert r.status == 200
    client = await _session(served)
    async with client:
        for path in ("/viewer/", "/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/local"):
            async with client.get(served.base + path, allow_redirects=False) as r:
                assert r.status == 200 and r.content_type == "text/html", path
                assert 'PUBLIC_URL="/viewer/"' in await r.text()
                assert r.headers["Cache-Control"] == "no-store"
    async with aiohttp.ClientSession() as keyed, keyed.get(
            served.base + "/viewer/", headers={"X-API-Key": served.read_key},
            allow_redirects=False) as r:
        assert r.status == 200


async def test_types_caching_and_missing_files(served: Served) -> None:
    bundle = (served.folder / "app.bundle.0123456789abcdef.js").read_bytes()
    assert (served.folder / "app.bundle.0123456789abcdef.js.gz").is_file()
    async with aiohttp.ClientSession() as c:
        async with c.get(f"{served.base}/viewer/app.bundle.0123456789abcdef.js",
                         headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert int(r.headers["Content-Length"]) < len(bundle) // 5
            assert await r.read() == bundle  # as the browser unpacks it
            assert r.content_type == "text/javascript"
        async with c.get(f"{served.base}/viewer/app.bundle.0123456789abcdef.js",
                         headers={"Accept-Encoding": "identity"}) as r:
            assert "Content-Encoding" not in r.headers and await r.read() == bundle
        for path, kind, cache in (
                ("app.bundle.0123456789abcdef.js", "text/javascript", "immutable"),
                ("codec.fedcba9876543210.wasm", "application/wasm", "immutable"),
                ("worker.mjs", "text/javascript", "no-cache"),
                ("app.bundle.css", "text/css", "no-cache"),
                ("a34f9d1faa5f3315.woff2", "font/woff2", "immutable")):
            async with c.get(f"{served.base}/viewer/{path}") as r:
                assert r.status == 200, path
                assert r.content_type == kind, path
                assert cache in r.headers["Cache-Control"], path
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/viewer/nothing.js", "/viewer/../config.toml", "/viewer/%2e%2e/node.key",
                     "/viewer/..%2fnode.key", "/viewer/syncnode-viewer.json"):
            async with c.get(served.base + path, headers={"X-API-Key": served.read_key},
                             allow_redirects=False) as r:
                body = await r.read()
                assert r.status in (303, 404), path
                assert b"PRIVATE KEY" not in body and b"api_port" not in body


async def test_the_viewer_has_its_own_policy_and_nothing_off_origin(served: Served) -> None:
    client = await _session(served)
    async with client, client.get(served.base + "/viewer/") as r:
        csp = r.headers["Content-Security-Policy"]
        html = await r.text()
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if d.strip())
    script = directives["script-src"].split()
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script
    assert "'wasm-unsafe-eval'" in script and "blob:" in directives["worker-src"]
    inline = re.findall(r"<script>(.*?)</script>", html, re.S)
    assert len(inline) == 2
    import base64
    import hashlib
    for body in inline:
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in script
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert not re.search(r"https?:|wss?:|\*", csp), csp  # this origin only
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"  # isolated: shared
    assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"      # memory for volumes
    async with aiohttp.ClientSession() as c, c.get(served.base + "/") as r:
        assert "unsafe" not in r.headers["Content-Security-Policy"]  # the dashboard's: strict
        assert 'href="/viewer/"' in await r.text()  # the dashboard links to the viewer


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the config")
async def test_the_generated_config_points_at_this_nodes_dicomweb(served: Served) -> None:
    async with aiohttp.ClientSession() as c, c.get(served.base + "/viewer/app-config.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
        script = await r.text()
    run = ("const window = {location: {origin: 'https://node.example:8080'}};\n" + script +
           "\nprocess.stdout.write(JSON.stringify(window.config));")
    proc = subprocess.run(["node", "-e", run], capture_output=True, text=True, timeout=60,
                          check=True)
    config = json.loads(proc.stdout)
    assert config["routerBasename"] == "/viewer"
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    assert config["defaultDataSourceName"] == source["sourceName"]
    src = source["configuration"]
    for root in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert src[root] == "https://node.example:8080/dicom-web"
    assert src["imageRendering"] == src["thumbnailRendering"] == "wadors"
    assert src["supportsFuzzyMatching"] is True
    assert "example.org" not in script  # the build's own config is never served


async def test_not_installed_says_how_to_install(tmp_path: Path) -> None:
    node = LocalNode.init(tmp_path / "n")
    running = RunningNode(node, node.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                              dicom_port=0, discovery=False))
    await running.start()
    try:
        async with aiohttp.ClientSession() as c, c.get(
                f"http://127.0.0.1:{running.ports['api']}/viewer/") as r:
            assert r.status == 404
            text = await r.text()
            assert "syncnode viewer install" in text and str(tmp_path) not in text
    finally:
        await running.stop()


def test_where_the_viewer_lives() -> None:
    data = Path("/srv/node")
    assert viewer.folder_of(data, "") == data / "viewer"
    assert viewer.folder_of(data, "/srv/ohif") == Path("/srv/ohif")
    assert viewer.folder_of(data, "v2") == data / "v2"


async def test_installing_under_a_running_node_serves_the_new_files(served: Served,
                                                                    tmp_path: Path) -> None:
    index = INDEX.replace("<body>", "<body><p>version two</p>")
    viewer.install(served.folder, fake_package(tmp_path / "two", "2.0.0",
                                               files={**FILES, "index.html": index.encode()}))
    async with aiohttp.ClientSession() as c, c.get(
            served.base + "/viewer/", headers={"X-API-Key": served.read_key}) as r:
        assert "version two" in await r.text()
