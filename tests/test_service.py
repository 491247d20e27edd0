"""The service layer shared by the CLI and the admin API: one answer, whichever front end.

Peer URLs are checked in one place (a ``http://`` URL was once stored by the CLI as
``https://http://…`` with exit 0 while the API refused it); node ids are read in every
form; the push mode is checked once; refusals map to one exit code and one HTTP status.
The front ends are driven for real: the ``syncnode`` script as a subprocess and the admin
API of an in-process node over aiohttp.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from syncnode.apikeys import KeyStore
from syncnode.local import LocalNode
from syncnode.nodeid import NodeId
from syncnode.protocol import InvalidPeerURL, parse_peer_url
from syncnode.service import Conflict, NodeService, NotFound, UsageError
from syncnode.tls.errors import InvalidPeerAddress
from syncnode.tls.peercert import fetch_peer_certificate

SYNCNODE = shutil.which("syncnode")
needs_script = pytest.mark.skipif(SYNCNODE is None, reason="the syncnode script is not installed")

GOOD = [
    ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("https://127.0.0.1:8443/", "https://127.0.0.1:8443"),
    ("127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("  HTTPS://pacs-gw.example.org:9000 ", "https://pacs-gw.example.org:9000"),
    ("https://[::1]:8443", "https://[::1]:8443"),
    ("[fe80::1]:8443", "https://[fe80::1]:8443"),
]
BAD = [
    ("http://host:8443", "must start with https://"),
    ("https://http://host:8443", "only scheme, host and port"),
    ("ftp://host:21", "must start with https://"),
    ("https://host", "no port"),
    ("host", "no port"),
    ("https://host:0", "no port"),
    ("https://host:99999", "port must be a number"),
    ("https://host:84x3", "port must be a number"),
    ("https://user:pw@host:8443", "no user name or password"),
    ("https://host:8443/peer/v1", "only scheme, host and port"),
    ("https://host:8443?x=1", "only scheme, host and port"),
    ("https://:8443", "no host name"),
    ("https://[nothex]:8443", "IPv6"),
    ("https://ho st:8443", "not a peer URL"),
    ("https://h%41st:8443", "not a host name"),
    ("", "not a peer URL"),
]


@pytest.mark.parametrize(("text", "normal"), GOOD)
def test_peer_urls_accepted_in_their_normal_form(text: str, normal: str) -> None:
    assert parse_peer_url(text).url == normal


@pytest.mark.parametrize(("text", "fragment"), BAD)
def test_peer_urls_refused_with_what_to_type(text: str, fragment: str) -> None:
    with pytest.raises(InvalidPeerURL, match="https://HOST:PORT") as info:
        parse_peer_url(text)
    assert fragment in str(info.value)


async def test_the_tls_layer_uses_the_same_check(new_node) -> None:
    a = new_node("a")
    with pytest.raises(InvalidPeerAddress, match="must start with https://"):
        await fetch_peer_certificate("http://127.0.0.1:1", a.identity, a.node_id)


def id_forms(node_id: NodeId) -> list[str]:
    """Every way an operator may type or paste an id."""
    dashed = str(node_id)
    return [dashed, node_id.compact, dashed.lower(), f"  {dashed}\n",
            dashed.replace("-", " "), node_id.compact.lower()]


# -- the service itself ----------------------------------------------------------------------


async def test_service_refusals_are_typed(new_node) -> None:
    a, b = new_node("a"), new_node("b")
    svc = NodeService(a)
    with pytest.raises(UsageError, match="must start with https://"):
        await svc.add_peer(str(b.node_id), "http://127.0.0.1:8443")
    with pytest.raises(UsageError, match="own id"):
        await svc.add_peer(str(a.node_id), "https://127.0.0.1:8443")
    with pytest.raises(UsageError, match="push is auto, always or never"):
        await svc.add_peer(str(b.node_id), "https://127.0.0.1:8443", push="sometimes")
    with pytest.raises(UsageError, match="not a node id"):
        await svc.add_peer("NOT-AN-ID", "https://127.0.0.1:8443")
    with pytest.raises(NotFound, match="not a trusted peer"):
        svc.remove_peer(str(b.node_id))
    with pytest.raises(NotFound, match="not been seen on the LAN"):
        await svc.accept_peer(str(b.node_id))
    with pytest.raises(NotFound, match="nothing matched"):
        svc.delete(["1.2.3.4"])
    with pytest.raises(UsageError, match="invalid"):
        svc.delete(["1.2.x"])
    with pytest.raises(UsageError, match="data folder"):
        svc.patch_config({"data": "/elsewhere"})
    with pytest.raises(UsageError, match="'sync_interval'"):
        svc.patch_config({"sync_interval": -1})
    assert a.catalog.peers() == []  # nothing was written by any refusal


async def test_accept_matches_the_id_in_every_form(new_node, running) -> None:
    a, b = new_node("a"), new_node("b")
    rb = await running(b)
    url = f"https://127.0.0.1:{rb.ports['peer']}"
    svc = NodeService(a)
    for form in id_forms(b.node_id):
        a.catalog.note_discovered(b.node_id.compact, url)
        added = await svc.accept_peer(form)
        assert added.node_id == b.node_id and added.pinned and added.url == url
        assert [p["node_id"] for p in a.catalog.peers()] == [b.node_id.compact]
        assert svc.remove_peer(form) == b.node_id  # and remove reads every form too
        assert a.catalog.peers() == [] and a.trust.certificate(b.node_id) is None


async def test_accept_refuses_a_node_announcing_another_id(new_node, running) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    rb = await running(b)
    # C's id announced at B's address: B's certificate does not hash to C's id
    a.catalog.note_discovered(c.node_id.compact, f"https://127.0.0.1:{rb.ports['peer']}")
    with pytest.raises(Conflict, match=str(b.node_id)):
        await NodeService(a).accept_peer(str(c.node_id))
    assert a.catalog.peers() == [] and a.trust.certificate(c.node_id) is None


# -- both front ends, same answers ---------------------------------------------------------


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    assert SYNCNODE is not None
    return subprocess.run([SYNCNODE, *map(str, args)], capture_output=True, text=True,
                          env={**env, "NO_COLOR": "1"}, timeout=60, check=False)


def admin_key(running_node) -> str:
    return KeyStore(running_node.node.data).rotate("admin")


async def api_post(running_node, path: str, body: dict[str, str]) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{running_node.ports['api']}{path}"
    async with aiohttp.ClientSession() as s, s.post(
            url, json=body, headers={"X-API-Key": admin_key(running_node)}) as r:
        return r.status, await r.json()


@needs_script
@pytest.mark.parametrize(("url", "fragment"), [
    ("http://127.0.0.1:8443", "must start with https://"),
    ("https://http://127.0.0.1:8443", "only scheme, host and port"),
    ("127.0.0.1", "no port"),
])
async def test_a_wrong_peer_url_is_refused_by_cli_and_api_alike(
        new_node, running, url: str, fragment: str) -> None:
    a, b = new_node("a"), new_node("b")
    proc = cli("peer", "add", "--data", a.data, str(b.node_id), url)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    cli_message = " ".join(proc.stderr.split()).removeprefix("error: ")
    assert fragment in cli_message and "https://HOST:PORT" in cli_message
    assert a.catalog.peers() == []
    ra = await running(a)
    status, body = await api_post(ra, "/api/v1/nodes", {"node_id": str(b.node_id), "url": url})
    assert status == 400 and body["error"] == cli_message
    assert a.catalog.peers() == []


@needs_script
async def test_cli_and_api_store_the_same_normal_form(new_node, running) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    rb, rc = await running(b), await running(c)
    # bare HOST:PORT and a lower-case compact id, through the CLI
    proc = cli("peer", "add", "--data", a.data, b.node_id.compact.lower(),
               f"127.0.0.1:{rb.ports['peer']}")
    assert proc.returncode == 0, proc.stderr
    ra = await running(a)
    status, body = await api_post(ra, "/api/v1/nodes", {
        "node_id": c.node_id.compact.lower(), "url": f"127.0.0.1:{rc.ports['peer']}/"})
    assert status == 201 and body["pinned"] is True
    stored = {p["node_id"]: p["url"] for p in a.catalog.peers()}
    assert stored == {b.node_id.compact: f"https://127.0.0.1:{rb.ports['peer']}",
                      c.node_id.compact: f"https://127.0.0.1:{rc.ports['peer']}"}
    # a wrong push mode: exit 2 and 400 with one message
    proc = cli("peer", "add", "--data", a.data, "--push", "sometimes", str(b.node_id),
               f"https://127.0.0.1:{rb.ports['peer']}")
    status, body = await api_post(ra, "/api/v1/nodes", {
        "node_id": str(b.node_id), "url": f"https://127.0.0.1:{rb.ports['peer']}",
        "push": "sometimes"})
    assert proc.returncode == 2 and status == 400
    assert " ".join(proc.stderr.split()) == f"error: {body['error']}"


@needs_script
def test_exit_codes_follow_one_table(new_node) -> None:
    a, b = new_node("a"), new_node("b")
    malformed = cli("peer", "remove", "--data", a.data, "NOT-AN-ID")
    unknown = cli("peer", "remove", "--data", a.data, str(b.node_id))
    not_seen = cli("peer", "accept", "--data", a.data, str(b.node_id))
    wrong_url = cli("peer", "add", "--data", a.data, str(b.node_id), "http://127.0.0.1:1")
    nothing = cli("rm", "--data", a.data, "1.2.3.4")
    assert (malformed.returncode, wrong_url.returncode) == (2, 2)
    assert (unknown.returncode, not_seen.returncode, nothing.returncode) == (1, 1, 1)
    assert "not a trusted peer" in unknown.stderr and "not been seen" in not_seen.stderr


@needs_script
def test_status_json_keeps_the_export_outbox(new_node) -> None:
    a = new_node("a")
    proc = cli("status", "--data", a.data, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["export"] == {}


def test_a_node_service_without_runtime_reads_the_config_file(tmp_path: Path) -> None:
    a = LocalNode.init(tmp_path / "a")
    svc = NodeService(a)
    assert svc.patch_config({"sync_interval": 7.5}) == {"changed": ["sync_interval"],
                                                        "restart_required": []}
    shown = svc.config()["config"]
    assert shown["sync_interval"] == 7.5 and shown["api_key"] == ""  # keys: not settings
    with pytest.raises(UsageError, match="apikey rotate"):
        svc.patch_config({"api_key": "k" * 20})
    a.close()


@needs_script
async def test_a_bad_setting_is_refused_by_cli_and_api_alike(new_node, running) -> None:
    a = new_node("a")
    proc = cli("config", "set", "--data", a.data, "ae_title", "X" * 20)
    assert proc.returncode == 2
    ra = await running(a)
    url = f"http://127.0.0.1:{ra.ports['api']}/api/v1/config"
    async with aiohttp.ClientSession() as s, s.patch(
            url, json={"ae_title": "X" * 20}, headers={"X-API-Key": admin_key(ra)}) as r:
        status, body = r.status, await r.json()
    assert status == 400 and " ".join(proc.stderr.split()) == f"error: {body['error']}"
    proc = cli("config", "set", "--data", a.data, "sync_interval", "2.5")
    assert proc.returncode == 0
    shown = json.loads(cli("config", "show", "--data", a.data, "--json").stdout)
    assert shown["config"]["sync_interval"] == 2.5 and shown["config"]["api_key"] == ""
