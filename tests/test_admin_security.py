"""The admin API's perimeter, tried the way a stranger on the LAN or a web page would.

Every route of the OpenAPI document (so a new route cannot skip it) is called with no key,
a wrong key, the read-only key and the admin key, through two independent clients
(aiohttp and curl); a foreign ``Host`` is refused; every answer carries the security
headers and no CORS header; keys are stored hashed; sessions are HttpOnly, SameSite=Strict
and need their CSRF token for changes; off loopback the API speaks only HTTPS.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pydicom
import pytest
from syncsupport import start_new_node as start

from syncnode import config as cfg
from syncnode.admin import auth
from syncnode.admin.api import UnsafeBinding
from syncnode.admin.auth import WrongKeyLimiter
from syncnode.admin.openapi import OPENAPI
from syncnode.apikeys import KEYS_FILE, KeyStore
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.nodeid import NodeId

CURL = shutil.which("curl")
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
WRONG = "snk-admin-" + "A" * 43
OPERATIONS = sorted((path, method) for path, ops in OPENAPI["paths"].items() for method in ops)


@dataclass
class Node:
    running: RunningNode
    read_key: str
    admin_key: str
    sop: str  # a live instance
    patient_id: str  # what must never leak without a key

    @property
    def port(self) -> int:
        return self.running.ports["api"]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    running = await start(tmp_path / "a")
    # every route is tried with a wrong key from one address: lift the per-address limit
    # on wrong keys (tests/test_wrong_keys.py shows it)
    assert running.admin is not None
    running.admin.wrong_keys = WrongKeyLimiter(per_minute=10**6)
    keys = KeyStore(running.node.data)
    import_paths(running.node, [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"])
    inst = running.node.catalog.instances()[0]
    yield Node(running, keys.rotate("read"), keys.rotate("admin"), inst.sop_instance_uid,
               inst.patient_id)
    await running.stop()


def request_for(path: str, method: str, sop: str) -> tuple[str, dict | None]:
    """A concrete URL path and JSON body for an operation of the document."""
    untrusted = str(NodeId(bytes(range(32))))  # a valid id nobody here trusts
    concrete = path.replace("{node_id}", untrusted)
    # DELETE of a UID no instance has: the admin key gets 404, nothing is deleted
    concrete = concrete.replace("{sop_uid}", sop if method == "get" else "1.2.3.4.5.6")
    # DICOMweb: UIDs no instance has (404 for a key that may read), frame 1, pixel data
    for name, value in (("{study}", "1.2.3.4.5.6"), ("{series}", "1.2.3.4.5.7"),
                        ("{instance}", "1.2.3.4.5.8"), ("{frames}", "1"),
                        ("{tag}", "7FE00010")):
        concrete = concrete.replace(name, value)
    concrete = concrete.replace("{scope}", "in")
    body = {("/api/v1/nodes", "post"): {"node_id": untrusted, "url": "https://127.0.0.1:1"},
            ("/api/v1/config", "patch"): {"sync_interval": 4.0},
            ("/api/v1/limits/{scope}", "put"): {"schedule": "50MB/s"}}.get((path, method))
    return concrete, body


def expected(path: str, method: str, credential: str, status: int) -> bool:
    """Is ``status`` what a caller with ``credential`` must get for this operation?"""
    op = OPENAPI["paths"][path][method]
    role = op["x-role"]
    if (path, method) == ("/api/v1/session", "post"):  # the login checks the key itself
        return {"none": 401, "wrong": 403, "read": 201, "admin": 201}[credential] == status
    if role == "public":
        return status not in (401, 403, 421)
    if credential == "none":
        return status == 401
    if credential == "wrong":
        return status == 403
    if role == "admin" and credential == "read":
        return status == 403
    return status not in (401, 403, 421) and status < 500


def headers_for(node: Node, credential: str) -> dict[str, str]:
    key = {"none": None, "wrong": WRONG, "read": node.read_key, "admin": node.admin_key}
    return {} if key[credential] is None else {"X-API-Key": key[credential]}


async def call_aiohttp(node: Node, method: str, path: str, headers: dict[str, str],
                       body: dict | None) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.request(
            method.upper(), node.base + path, headers=headers, json=body,
            params={"timeout": "0"} if path.endswith("/events") else None) as r:
        return r.status, await r.read(), dict(r.headers)


async def call_curl(node: Node, method: str, path: str, headers: dict[str, str],
                    body: dict | None, tmp: Path) -> tuple[int, bytes, dict[str, str]]:
    assert CURL is not None
    out, head = tmp / "body", tmp / "headers"
    args = [CURL, "-s", "--max-time", "20", "-X", method.upper(), "-o", str(out),
            "-D", str(head), "-w", "%{http_code}"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
    proc = await asyncio.create_subprocess_exec(
        *args, node.base + path + ("?timeout=0" if path.endswith("/events") else ""),
        stdout=asyncio.subprocess.PIPE)
    code, _ = await asyncio.wait_for(proc.communicate(), 30)
    got = {}
    for line in head.read_text(errors="replace").splitlines()[1:]:
        name, _, value = line.partition(":")
        if value:
            got[name.strip()] = value.strip()
    return int(code), out.read_bytes() if out.exists() else b"", got


@pytest.mark.parametrize("client", ["aiohttp", "curl"])
async def test_every_route_with_every_credential(node: Node, client: str,
                                                 tmp_path: Path) -> None:
    if client == "curl" and CURL is None:
        pytest.fail("curl is required")
    wrong: list[str] = []
    calls = 0
    for path, method in OPERATIONS:
        concrete, body = request_for(path, method, node.sop)
        for credential in ("none", "wrong", "read", "admin"):
            headers = headers_for(node, credential)
            if client == "aiohttp":
                status, data, got = await call_aiohttp(node, method, concrete, headers, body)
            else:
                status, data, got = await call_curl(node, method, concrete, headers, body,
                                                    tmp_path)
            calls += 1
            if not expected(path, method, credential, status):
                wrong.append(f"{method.upper()} {path} with {credential} key: {status} "
                             f"{data[:120]!r}")
            if credential in ("none", "wrong") and node.patient_id:
                assert node.patient_id.encode() not in data, (path, credential)
            if OPENAPI["paths"][path][method]["x-role"] != "public" and \
                    credential in ("none", "wrong"):
                assert node.sop.encode() not in data, (path, credential)
            assert got.get("X-Frame-Options") == "DENY", (path, got)
            assert not any(h.lower().startswith("access-control-") for h in got)
    assert not wrong, "\n".join(wrong)
    assert calls == 4 * len(OPERATIONS) and len(OPERATIONS) >= 20
    # the instance deleted by nobody: every DELETE above named another UID
    assert node.running.node.catalog.instance(node.sop) is not None


async def test_the_document_gives_every_operation_a_role() -> None:
    roles = auth.route_roles(OPENAPI)
    assert {r for r in roles.values()} == {"public", "read", "admin"}
    assert roles[("GET", "/api/v1/instances/{sop_uid}/file")] == "read"
    assert roles[("DELETE", "/api/v1/instances/{sop_uid}")] == "admin"
    assert roles[("PATCH", "/api/v1/config")] == "admin"
    public = {p for (m, p), r in roles.items() if r == "public" and m == "GET"}
    assert public == {"/", "/dashboard.js", "/dashboard.css", "/healthz", "/metrics",
                      "/api/v1/openapi.json", "/api/v1/", "/api/v1",  # route lists
                      # the web viewer's files: the data they load needs a credential
                      "/viewer", "/viewer/app-config.js", "/viewer/{path}"}


async def test_open_routes_carry_no_patient_data(node: Node) -> None:
    for path in ("/healthz", "/metrics", "/api/v1/openapi.json", "/", "/viewer/app-config.js",
                 "/api/v1/"):
        status, data, _ = await call_aiohttp(node, "get", path, {}, None)
        assert status == 200
        assert node.patient_id.encode() not in data and node.sop.encode() not in data


@pytest.mark.parametrize("host", ["attacker.example:{port}", "attacker.example",
                                  "127.0.0.1:1", "127.0.0.1:", "127.0.0.1.nip.io:{port}",
                                  "127.0.0.1.nip.io", "localhost:{port}@evil", "[::2]:{port}",
                                  "[::2]"])
async def test_a_foreign_host_is_refused(node: Node, host: str, tmp_path: Path) -> None:
    header = {"Host": host.format(port=node.port), "X-API-Key": node.admin_key}
    for path in ("/api/v1/instances", "/", "/healthz"):
        status, data, got = await call_curl(node, "get", path, header, None, tmp_path)
        assert status == 421, (host, path, status)
        assert node.patient_id.encode() not in data
        assert got.get("Content-Security-Policy", "").startswith("default-src 'self'")


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}",
                                  "[::1]:{port}", "127.0.0.1", "localhost", "[::1]"])
async def test_the_names_the_node_serves_are_accepted(node: Node, host: str,
                                                      tmp_path: Path) -> None:
    header = {"Host": host.format(port=node.port), "X-API-Key": node.read_key}
    status, data, _ = await call_curl(node, "get", "/api/v1/instances", header, None, tmp_path)
    assert status == 200 and node.sop.encode() in data


async def test_configured_names_are_accepted_at_once(node: Node, tmp_path: Path) -> None:
    header = {"Host": f"pacs-gw.example.org:{node.port}", "X-API-Key": node.read_key}
    assert (await call_curl(node, "get", "/api/v1/status", header, None, tmp_path))[0] == 421
    status, _, _ = await call_aiohttp(node, "patch", "/api/v1/config",
                                      {"X-API-Key": node.admin_key},
                                      {"api_names": ["pacs-gw.example.org"]})
    assert status == 200
    assert (await call_curl(node, "get", "/api/v1/status", header, None, tmp_path))[0] == 200


async def test_security_headers_on_every_kind_of_answer(node: Node) -> None:
    cases = [("get", "/healthz", {}), ("get", "/api/v1/instances", {}),
             ("get", "/no/such/page", {}), ("get", "/api/v1/status", headers_for(node, "read")),
             ("get", f"/api/v1/instances/{node.sop}/file", headers_for(node, "read")),
             ("delete", "/api/v1/instances/1.2.3", headers_for(node, "read"))]
    for method, path, credential in cases:
        headers = {**credential, "Origin": "http://attacker.example"}
        _, _, got = await call_aiohttp(node, method, path, headers, None)
        csp = got.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert got.get("X-Frame-Options") == "DENY"
        assert got.get("X-Content-Type-Options") == "nosniff"
        assert got.get("Referrer-Policy") == "no-referrer"
        assert not any(h.lower().startswith("access-control-") for h in got), got


async def test_a_key_in_the_url_is_refused(node: Node) -> None:
    for param in ("api_key", "key", "X-API-Key"):
        status, data, _ = await call_aiohttp(
            node, "get", f"/api/v1/instances?{param}={node.read_key}", {}, None)
        assert status == 400 and b"X-API-Key header" in data


async def test_dashboard_session_cookie(node: Node) -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.post(node.base + "/api/v1/session",
                          headers={"X-API-Key": node.read_key}) as r:
            assert r.status == 201
            opened = await r.json()
            cookie = r.headers["Set-Cookie"]
        assert opened["role"] == "read" and opened["csrf"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert node.read_key not in cookie
        async with s.get(node.base + "/api/v1/instances") as r:  # the cookie alone
            assert r.status == 200 and node.sop in await r.text()
        async with s.get(node.base + "/api/v1/session") as r:
            assert (await r.json())["csrf"] == opened["csrf"]
        # a change with the cookie: refused without the CSRF token, and for the read role
        async with s.delete(node.base + f"/api/v1/instances/{node.sop}") as r:
            assert r.status == 403 and "X-CSRF-Token" in (await r.json())["error"]
        async with s.delete(node.base + f"/api/v1/instances/{node.sop}",
                            headers={"X-CSRF-Token": opened["csrf"]}) as r:
            assert r.status == 403 and "admin" in (await r.json())["error"]
        assert node.running.node.catalog.instance(node.sop) is not None
        # rotating the read key ends the sessions opened with it, in the running node
        KeyStore(node.running.node.data).rotate("read")
        async with s.get(node.base + "/api/v1/instances") as r:
            assert r.status == 401
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(node.base + "/api/v1/session",
                          headers={"X-API-Key": node.admin_key}) as r:
            csrf = (await r.json())["csrf"]
        async with s.delete(node.base + f"/api/v1/instances/{node.sop}",
                            headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with s.delete(node.base + "/api/v1/session",
                            headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with s.get(node.base + "/api/v1/instances") as r:
            assert r.status == 401  # logged out
    assert node.running.node.catalog.instance(node.sop) is None


async def test_keys_are_stored_hashed_and_rotate_at_once(node: Node) -> None:
    data = node.running.node.data
    on_disk = b"".join(p.read_bytes() for p in data.iterdir() if p.is_file())
    for key in (node.read_key, node.admin_key):
        assert key.encode() not in on_disk
    assert (data / KEYS_FILE).stat().st_mode & 0o077 == 0
    hashes = json.loads((data / KEYS_FILE).read_text())["keys"]
    assert set(hashes) == {"read", "admin"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h["hash"]) for h in hashes.values())
    old = node.admin_key
    new = KeyStore(data).rotate("admin")
    assert (await call_aiohttp(node, "get", "/api/v1/status", {"X-API-Key": old}, None))[0] \
        == 403
    assert (await call_aiohttp(node, "get", "/api/v1/status", {"X-API-Key": new}, None))[0] \
        == 200


async def test_a_clear_key_of_an_older_node_becomes_the_hashed_admin_key(
        tmp_path: Path) -> None:
    node = LocalNode.init(tmp_path / "old")
    (node.data / KEYS_FILE).unlink()  # as an older syncnode left it: the key in config.toml
    legacy = "legacy-key-0123456789abcdef"
    cfg.write_file(node.data, {"api_key": legacy, "sync_interval": 2.0})
    running = RunningNode(node, node.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                              dicom_port=0, discovery=False))
    await running.start()
    try:
        assert legacy not in (node.data / "config.toml").read_text()
        assert "sync_interval" in (node.data / "config.toml").read_text()
        assert KeyStore(node.data).role_of(legacy) == "admin"
        url = f"http://127.0.0.1:{running.ports['api']}/api/v1/status"
        async with aiohttp.ClientSession() as s, s.get(url, headers={"X-API-Key": legacy}) as r:
            assert r.status == 200
    finally:
        await running.stop()


async def test_off_loopback_without_tls_is_refused_before_anything_listens(
        tmp_path: Path) -> None:
    node = LocalNode.init(tmp_path / "a")
    running = RunningNode(node, node.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                              dicom_port=0, discovery=False,
                                              api_host="0.0.0.0", api_tls="off"))
    with pytest.raises(UnsafeBinding, match=r"plain HTTP.*api_tls"):
        await running.start()
    assert running.ports == {}
    await running.stop()


def test_run_refuses_plain_http_off_loopback_with_exit_2(tmp_path: Path) -> None:
    exe = shutil.which("syncnode")
    assert exe is not None
    init = subprocess.run([exe, "init", "--data", str(tmp_path / "a")], capture_output=True,
                          text=True, check=True, timeout=60)
    assert "read key: snk-read-" in init.stdout and "admin key: snk-admin-" in init.stdout
    proc = subprocess.run([exe, "run", "--data", str(tmp_path / "a"), "--api-host", "0.0.0.0",
                           "--peer-port", "0", "--api-port", "0", "--dicom-port", "0",
                           "--duration", "5"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**{k: v for k, v in os.environ.items()
                                  if not k.startswith("SYNCNODE_")},
                               "SYNCNODE_API_TLS": "off", "NO_COLOR": "1"})
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "plain HTTP" in message and "api_tls" in message and "127.0.0.1" in message


async def test_off_loopback_the_api_speaks_https_with_the_node_certificate(
        tmp_path: Path) -> None:
    running = await start(tmp_path / "a", api_host="0.0.0.0")
    try:
        port = running.ports["api"]
        key = KeyStore(running.node.data).rotate("read")
        ctx = ssl.create_default_context(cafile=str(running.node.identity.cert_path))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):  # plain HTTP gets nothing
                async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    await r.read()
            # by the certificate's name, verified against the node's own certificate
            resolver = aiohttp.resolver.ThreadedResolver()
            conn = aiohttp.TCPConnector(ssl=ctx, resolver=_Pinned(resolver, port))
            async with aiohttp.ClientSession(connector=conn) as tls:
                async with tls.get(f"https://syncnode:{port}/api/v1/status",
                                   headers={"X-API-Key": key}) as r:
                    assert r.status == 200 and (await r.json())["node_id"]
                async with tls.get(f"https://syncnode:{port}/api/v1/status") as r:
                    assert r.status == 401
        if CURL:
            proc = await asyncio.create_subprocess_exec(
                CURL, "-s", "--max-time", "10", "--cacert", str(running.node.identity.cert_path),
                "--resolve", f"syncnode:{port}:127.0.0.1", "-H", f"X-API-Key: {key}",
                "-o", "/dev/null", "-w", "%{http_code}", f"https://syncnode:{port}/api/v1/studies",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
            assert out == b"200"
    finally:
        await running.stop()


class _Pinned(aiohttp.abc.AbstractResolver):
    """Resolves the certificate's name ``syncnode`` to loopback (like curl --resolve)."""

    def __init__(self, inner: aiohttp.abc.AbstractResolver, port: int) -> None:
        self.inner, self.port = inner, port

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list:
        import socket

        if host == "syncnode":
            return [{"hostname": host, "host": "127.0.0.1", "port": port,
                     "family": socket.AF_INET, "proto": 0, "flags": 0}]
        return await self.inner.resolve(host, port, family)

    async def close(self) -> None:
        await self.inner.close()


async def test_api_actions_are_in_the_audit_trail_with_their_actor(node: Node) -> None:
    from syncnode.audit import AUDIT_DIR, read_entries

    base = {"X-API-Key": node.admin_key}
    read = {"X-API-Key": node.read_key}
    assert (await call_aiohttp(node, "post", "/api/v1/session", read, None))[0] == 201
    assert (await call_aiohttp(node, "post", "/api/v1/session",
                               {"X-API-Key": WRONG}, None))[0] == 403
    assert (await call_aiohttp(node, "get", f"/api/v1/instances/{node.sop}/file", read,
                               None))[0] == 200
    assert (await call_aiohttp(node, "patch", "/api/v1/config", base,
                               {"sync_interval": 3.0}))[0] == 200
    assert (await call_aiohttp(node, "delete", f"/api/v1/instances/{node.sop}", base,
                               None))[0] == 200
    stranger = NodeId(bytes(range(32)))
    assert (await call_aiohttp(node, "delete", f"/api/v1/nodes/{stranger}", base,
                               None))[0] == 404
    data = node.running.node.data
    await node.running.stop()  # flushes the trail's queue
    entries = [e for e in read_entries(data / AUDIT_DIR, None, None)
               if e["actor"].startswith("api:")]
    store = KeyStore(data)
    read_fp, admin_fp = store.fingerprint(node.read_key), store.fingerprint(node.admin_key)
    got = [(e["action"], e["outcome"], e["actor"]) for e in entries]
    assert got == [
        ("login", "success", f"api:read-key:{read_fp}"),
        ("login", "failure", f"api:unknown-key:{store.fingerprint(WRONG)}"),
        ("downloaded", "success", f"api:read-key:{read_fp}"),
        ("config-changed", "success", f"api:admin-key:{admin_fp}"),
        ("deleted", "success", f"api:admin-key:{admin_fp}"),
        ("trust-remove", "failure", f"api:admin-key:{admin_fp}"),
    ], got
    assert entries[2]["sops"] == [node.sop] and entries[4]["sops"] == [node.sop]
    assert entries[3]["subject"] == "sync_interval"
    trail = b"".join(p.read_bytes() for p in (data / AUDIT_DIR).iterdir() if p.is_file())
    assert node.patient_id.encode() not in trail and node.read_key.encode() not in trail


async def test_apikey_command_shows_and_rotates_for_a_running_node(node: Node) -> None:
    exe = shutil.which("syncnode")
    assert exe is not None
    data = str(node.running.node.data)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")},
           "NO_COLOR": "1"}

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(exe, *args, "--data", data, env=env,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, (out + err).decode()

    rc, shown = await cli("apikey", "show", "--json")
    store = KeyStore(data)
    assert rc == 0 and sorted((k["role"], k["fingerprint"]) for k in json.loads(shown)) == \
        sorted([("admin", store.fingerprint(node.admin_key)),
                ("read", store.fingerprint(node.read_key))])
    assert node.read_key not in shown and node.admin_key not in shown
    rc, out = await cli("apikey", "rotate", "read", "--json")
    new = json.loads(out)["key"]
    assert rc == 0 and new.startswith("snk-read-") and new != node.read_key
    old_status = (await call_aiohttp(node, "get", "/api/v1/status",
                                     {"X-API-Key": node.read_key}, None))[0]
    new_status = (await call_aiohttp(node, "get", "/api/v1/status",
                                     {"X-API-Key": new}, None))[0]
    assert (old_status, new_status) == (403, 200)
    rc, out = await cli("apikey", "rotate", "owner")
    assert rc == 2 and "read or admin" in out


async def test_a_refused_config_change_naming_anything_is_400_and_on_record(node: Node) -> None:
    from syncnode.audit import AUDIT_DIR, read_entries

    admin = {"X-API-Key": node.admin_key}
    for body in ({"ë\x1c": 1}, {"sync_interval": -1, "é": 2}):
        status, data, _ = await call_aiohttp(node, "patch", "/api/v1/config", admin, body)
        assert status == 400, data  # found by schemathesis: was a 500 from the audit call
    data_dir = node.running.node.data
    await node.running.stop()
    entries = [e for e in read_entries(data_dir / AUDIT_DIR, None, "config-changed")]
    assert [(e["outcome"], e.get("subject"), e["count"]) for e in entries] == [
        ("failure", None, 1), ("failure", "sync_interval", 2)]
