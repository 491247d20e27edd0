"""The admin API of a running node: every resource, the refusals, the OpenAPI document."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pydicom
import pytest
from syncsupport import start_new_node as start

from syncnode.admin.api import UnsafeBinding, check_binding
from syncnode.admin.openapi import OPENAPI
from syncnode.apikeys import KeyStore
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.node import RunningNode

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb.dcm", "rtplan.dcm"]


class Api:
    def __init__(self, running: RunningNode, session: aiohttp.ClientSession) -> None:
        self.running, self.session = running, session
        self.base = f"http://127.0.0.1:{running.ports['api']}"
        self.key = KeyStore(running.node.data).rotate("admin")

    def url(self, path: str) -> str:
        return self.base + path

    async def get(self, path: str, **kw: object) -> tuple[int, object]:
        kw.setdefault("headers", {"X-API-Key": self.key})
        async with self.session.get(self.url(path), **kw) as r:
            return r.status, await (r.json() if "json" in r.content_type else r.read())

    async def send(self, method: str, path: str, key: str | None = "", **kw: object
                   ) -> tuple[int, object]:
        headers = {} if key is None else {"X-API-Key": key or self.key}
        async with self.session.request(method, self.url(path), headers=headers, **kw) as r:
            return r.status, await r.json()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    src = tmp_path / "src"
    src.mkdir()
    for name in FILES:
        if (TEST_FILES / name).exists():
            shutil.copy(TEST_FILES / name, src / name)
    running = await start(tmp_path / "a")
    import_paths(running.node, [src])
    async with aiohttp.ClientSession() as session:
        yield Api(running, session)
    await running.stop()


async def test_health_status_metrics(api: Api) -> None:
    status, body = await api.get("/healthz")
    assert status == 200 and body["node_id"] == str(api.running.node.node_id)
    status, st = await api.get("/api/v1/status")
    assert status == 200 and st["instances"] >= 3 and len(st["merkle_root"]) == 64
    assert st["ports"]["api"] == api.running.ports["api"]
    status, text = await api.get("/metrics")
    text = text.decode()
    assert status == 200 and f"syncnode_instances {float(st['instances'])}" in text
    assert "syncnode_blob_bytes" in text


async def test_api_root_lists_its_routes_without_a_key(api: Api) -> None:
    for path in ("/api/v1/", "/api/v1"):
        status, body = await api.get(path, headers={})
        assert status == 200, body
        routes = {(r["method"], r["path"]): r["role"] for r in body["routes"]}
        assert routes[("GET", "/api/v1/status")] == "read"
        assert routes[("POST", "/api/v1/nodes")] == "admin"
        assert body["openapi"] == "/api/v1/openapi.json" and "X-API-Key" in body["auth"]


async def test_dashboard_is_served(api: Api) -> None:
    async with api.session.get(api.url("/")) as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
    async with api.session.get(api.url("/dashboard.js")) as r:
        assert r.status == 200 and r.content_type == "text/javascript"
        script = await r.text()
    assert '<script src="/dashboard.js">' in html and "<script>" not in html  # CSP: no inline
    assert "/api/v1/status" in script and "/api/v1/events" in script


async def test_instances_filters_paging_and_file(api: Api) -> None:
    status, body = await api.get("/api/v1/instances")
    assert status == 200
    rows = body["instances"]
    listed = {r["sop_instance_uid"] for r in rows}
    assert listed == {i.sop_instance_uid for i in api.running.node.catalog.instances()}
    one = rows[0]
    status, body = await api.get("/api/v1/instances", params={"study": one["study_instance_uid"]})
    assert {r["study_instance_uid"] for r in body["instances"]} == {one["study_instance_uid"]}
    status, body = await api.get("/api/v1/instances", params={"modality": "MR"})
    assert body["instances"] and all(r["modality"] == "MR" for r in body["instances"])
    status, page1 = await api.get("/api/v1/instances", params={"limit": "2"})
    status, page2 = await api.get("/api/v1/instances", params={"limit": "2", "offset": "2"})
    assert page1["more"] is True and len(page1["instances"]) == 2
    assert not {r["sop_instance_uid"] for r in page1["instances"]} & {
        r["sop_instance_uid"] for r in page2["instances"]}
    # the exact bytes
    status, raw = await api.get(f"/api/v1/instances/{one['sop_instance_uid']}/file")
    assert status == 200
    with api.running.node.store.open(one["blob"]) as f:
        assert raw == f.read()


@pytest.mark.parametrize(("params", "fragment"), [
    ({"study": "1.2.abc"}, "invalid"),
    ({"limit": "0"}, "limit"),
    ({"limit": "5000"}, "limit"),
    ({"date_from": "2020-01-01"}, "YYYYMMDD"),
    ({"colour": "red"}, "unknown filter"),
    ({"offset": "x"}, "invalid literal"),
])
async def test_instances_bad_filters(api: Api, params: dict[str, str], fragment: str) -> None:
    status, body = await api.get("/api/v1/instances", params=params)
    assert status == 400 and fragment in body["error"]


async def test_file_of_unknown_or_malformed_uid(api: Api) -> None:
    assert (await api.get("/api/v1/instances/1.2.3.4.5/file"))[0] == 404
    assert (await api.get("/api/v1/instances/1.2.x/file"))[0] == 400


async def test_changes_need_the_key(api: Api) -> None:
    sop = api.running.node.catalog.instances()[0].sop_instance_uid
    status, body = await api.send("DELETE", f"/api/v1/instances/{sop}", key=None)
    assert status == 401 and "X-API-Key" in body["error"]
    status, body = await api.send("DELETE", f"/api/v1/instances/{sop}", key="x" * 30)
    assert status == 403 and "wrong API key" in body["error"]
    assert api.running.node.catalog.instance(sop) is not None  # nothing happened
    status, body = await api.send("DELETE", f"/api/v1/instances/{sop}?reason=because")
    assert status == 400 and "unknown rejection reason" in body["error"]
    assert api.running.node.catalog.instance(sop) is not None
    status, body = await api.send("DELETE", f"/api/v1/instances/{sop}?reason=safety")
    assert status == 200 and len(body["tombstones"]) == 1
    assert api.running.node.catalog.instance(sop) is None
    # the reason is kept for the export PACS's rejection note
    assert api.running.node.catalog.delete_reason(body["tombstones"][0]) == "113037"
    status, body = await api.send("DELETE", f"/api/v1/instances/{sop}")
    assert status == 404


async def test_nodes_add_list_remove(api: Api, tmp_path: Path) -> None:
    other = await start(tmp_path / "b")
    try:
        peer_url = f"https://127.0.0.1:{other.ports['peer']}"
        peer_id = str(other.node.node_id)
        status, body = await api.send("POST", "/api/v1/nodes", key=None,
                                      json={"node_id": peer_id, "url": peer_url})
        assert status == 401
        status, body = await api.send("POST", "/api/v1/nodes",
                                      json={"node_id": "NOT-AN-ID", "url": peer_url})
        assert status == 400
        # the id must match the certificate served at that URL
        wrong = str(api.running.node.node_id)
        status, body = await api.send("POST", "/api/v1/nodes",
                                      json={"node_id": wrong, "url": peer_url})
        assert status == 400 and "own id" in body["error"]
        status, body = await api.send("POST", "/api/v1/nodes",
                                      json={"node_id": peer_id, "url": peer_url})
        assert status == 201 and body["pinned"] is True
        status, nodes = await api.get("/api/v1/nodes")
        assert [n["node_id"] for n in nodes] == [peer_id] and nodes[0]["pinned"] is True
        status, body = await api.send("DELETE", f"/api/v1/nodes/{peer_id}")
        assert status == 200
        assert (await api.get("/api/v1/nodes"))[1] == []
        assert api.running.node.trust.certificate(other.node.node_id) is None
        status, body = await api.send("DELETE", f"/api/v1/nodes/{peer_id}")
        assert status == 404
    finally:
        await other.stop()


async def test_node_with_another_certificate_is_refused(api: Api, tmp_path: Path) -> None:
    other = await start(tmp_path / "b")
    impostor = LocalNode.init(tmp_path / "c")
    try:
        status, body = await api.send("POST", "/api/v1/nodes", json={
            "node_id": str(impostor.node_id),
            "url": f"https://127.0.0.1:{other.ports['peer']}"})
        assert status == 409 and str(other.node.node_id) in body["error"]
        assert api.running.node.catalog.peers() == []
    finally:
        await other.stop()


async def test_config_read_and_patch(api: Api) -> None:
    status, body = await api.get("/api/v1/config")
    assert status == 200 and body["config"]["api_key"] == ""  # keys are not settings
    assert "dicom_port" in body["restart_keys"]
    status, body = await api.send("PATCH", "/api/v1/config", json={"sync_interval": 2.5})
    assert status == 200 and body["restart_required"] == []
    assert api.running.engine is not None and api.running.engine.interval == 2.5
    status, body = await api.send("PATCH", "/api/v1/config", json={"dicom_port": 11113})
    assert status == 200 and body["restart_required"] == ["dicom_port"]
    status, body = await api.send("PATCH", "/api/v1/config", json={"ae_title": "X" * 20})
    assert status == 400 and "'ae_title'" in body["error"]
    status, body = await api.send("PATCH", "/api/v1/config", json={"data": "/elsewhere"})
    assert status == 400
    status, body = await api.send("PATCH", "/api/v1/config", key=None,
                                  json={"sync_interval": 9})
    assert status == 401
    text = (api.running.node.data / "config.toml").read_text()
    assert "sync_interval = 2.5" in text and "dicom_port = 11113" in text


async def test_event_feed_long_poll(api: Api) -> None:
    status, first = await api.get("/api/v1/events", params={"since": "0", "timeout": "0"})
    last = first["last_id"]
    sop = api.running.node.catalog.instances()[0].sop_instance_uid

    async def change_soon() -> None:
        await asyncio.sleep(0.3)
        await api.send("DELETE", f"/api/v1/instances/{sop}")

    task = asyncio.create_task(change_soon())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status, body = await api.get("/api/v1/events", params={"since": str(last), "timeout": "10"})
    await task
    assert status == 200 and body["events"] and body["last_id"] > last
    assert all(e["id"] > last for e in body["events"])
    assert loop.time() - t0 < 9  # answered by the change, not by the timeout
    status, body = await api.get("/api/v1/events", params={"timeout": "100"})
    assert status == 400


def test_binding_to_network_without_tls_or_key_is_refused() -> None:
    with pytest.raises(UnsafeBinding, match=r"plain HTTP.*api_tls"):
        check_binding("0.0.0.0", tls=False, has_keys=True)
    with pytest.raises(UnsafeBinding, match=r"no API key.*apikey rotate"):
        check_binding("0.0.0.0", tls=True, has_keys=False)
    check_binding("0.0.0.0", tls=True, has_keys=True)
    check_binding("127.0.0.1", tls=False, has_keys=False)
    check_binding("::1", tls=False, has_keys=False)


async def test_openapi_matches_routes(api: Api) -> None:
    status, doc = await api.get("/api/v1/openapi.json")
    assert status == 200 and doc == OPENAPI
    routes = set()
    for r in api.running.admin.app.router.routes():
        info = r.resource.get_info() if r.resource else {}
        path = info.get("path") or info.get("formatter")
        if r.method != "HEAD":
            routes.add((r.method.lower(), path))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented


@pytest.mark.skipif(shutil.which("st") is None, reason="schemathesis CLI not installed")
async def test_schemathesis_against_running_server(api: Api) -> None:
    proc = await asyncio.create_subprocess_exec(
        "st", "run", api.url("/api/v1/openapi.json"), "--url", api.base,
        "-H", f"X-API-Key: {api.key}", "--max-examples", "15",
        # adding peers would dial whatever URL is generated: never leave loopback
        # (one filter: schemathesis requires an operation to match all of several)
        # STOW-RS bodies (multipart/related) are not generated by schemathesis: its
        # refusals are tested in test_dicomweb; so are the instance sub-resources' (time)
        "--exclude-name-regex", r"^\w+ /api/v1/(nodes|discovered/.*/accept|events)$"
                                r"|^POST /dicom-web/|/instances/\{instance\}/",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"})
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, out.decode()[-4000:]
