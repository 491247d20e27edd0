"""Certificates over a node's life: renewal, CA signing from a CSR, CA-admitted peers, the
deny list and the CA's revocation list.

Nodes run in-process (:class:`syncnode.node.RunningNode`, real mutual TLS on loopback); the
CSR flow, ``peer list`` and ``peer remove`` go through the real command line; refusals at
the TLS layer are checked with ``curl`` (an independent TLS client).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from syncsupport import (
    add_instances,
    add_peer,
    converged,
    describe_nodes,
    uid,
    url_of,
    wait_for,
)
from typer.testing import CliRunner

from syncnode import renewal
from syncnode.cli import app
from syncnode.introduction import IntroductionRefused, introduce
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.signing import load_private_key
from syncnode.status import peer_rows
from syncnode.tls.contexts import server_name_for
from syncnode.tls.identity import create_ca
from syncnode.tls.successor import SuccessorRejected, make_successor, verify_successor

pytestmark = pytest.mark.timeout(120)

CURL = shutil.which("curl")
StartNode = Callable[..., Awaitable[RunningNode]]


def cli(*args: str | Path, data: Path | None = None) -> str:
    """Run a ``syncnode`` command in this process (the real command line: parsing, exit
    code, output); its output, after checking it exited 0."""
    argv = [str(a) for a in args] + (["--data", str(data)] if data is not None else [])
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, (argv, result.exit_code, result.output, result.exception)
    return result.stdout


def cli_json(*args: str | Path, data: Path) -> Any:
    return json.loads(cli(*args, "--json", data=data))


async def start_on(node: LocalNode, port: int = 0) -> RunningNode:
    """A running node whose peer port is ``port`` (0: any), so that a restart keeps its URL."""
    settings = node.settings(peer_host="127.0.0.1", peer_port=port, api_host="127.0.0.1",
                             api_port=0, dicom_host="127.0.0.1", dicom_port=0,
                             sync_interval=0.5, discovery=False)
    running = RunningNode(node, settings)
    await running.start()
    return running


def row_of(node: LocalNode, peer: Any) -> dict[str, Any] | None:
    rows = [r for r in peer_rows(node) if r["node_id"] == str(peer)]
    return rows[0] if rows else None


async def served_node_id(running: RunningNode, client: LocalNode, server_name: str | None
                         ) -> str:
    """The node id of the certificate the peer port serves for a TLS server name (to
    ``client``, a peer it trusts)."""
    from syncnode.nodeid import NodeId

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(client.identity.cert_path, client.identity.key_path)
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", running.ports["peer"], ssl=ctx, server_hostname=server_name), 10)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()
    return str(NodeId.from_certificate_der(der))


# ----------------------------------------------------------------------------------------
# Renewal


async def test_a_renewed_node_keeps_syncing_with_its_peers_without_operator_action(
        new_node: Callable[[str], LocalNode]) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    started: list[RunningNode] = []
    renewed: LocalNode | None = None
    try:
        for n in (a, b, c):
            started.append(await start_on(n))
        ra, rb, rc = started
        for x, rx in ((a, ra), (b, rb), (c, rc)):
            for y, ry in ((a, ra), (b, rb), (c, rc)):
                if x is not y:
                    add_peer(x, y, url_of(ry))
            rx.peers_changed()
        add_instances(a, [uid(16, 1), uid(16, 2)])
        ra.local_change()
        await wait_for(lambda: converged([a, b, c]), 30, "the first sync",
                       describe=lambda: describe_nodes([a, b, c]))
        old_id, port = a.node_id, ra.ports["peer"]
        await ra.stop()
        started.remove(ra)

        done = renewal.renew(a, grace_days=30)
        a.close()
        renewed = LocalNode(a.data)
        assert renewed.node_id == done.new != old_id
        ra2 = await start_on(renewed, port)
        started.append(ra2)
        # during the grace period, a client asking for the old id gets the old certificate
        assert await served_node_id(ra2, b, server_name_for(old_id)) == str(old_id)
        assert await served_node_id(ra2, b, server_name_for(done.new)) == str(done.new)
        assert await served_node_id(ra2, b, None) == str(done.new)

        add_instances(renewed, [uid(16, 3)])  # signed by the new key
        ra2.local_change()

        def followed() -> bool:
            return converged([renewed, b, c]) and all(
                (row_of(n, done.new) or {}).get("renewed_from") == str(old_id)
                and row_of(n, old_id) is None for n in (b, c))

        await wait_for(followed, 40, "B and C to follow A's renewal",
                       describe=lambda: [describe_nodes([renewed, b, c]),
                                         peer_rows(b), peer_rows(c)])
        for n in (b, c):
            assert n.catalog.instance(uid(16, 3)) is not None
            assert {n.catalog.instance(uid(16, k)).to_dict()["origin"]  # type: ignore[union-attr]
                    for k in (1, 3)} == {old_id.compact, done.new.compact}
            row = row_of(n, done.new)
            assert row is not None and row["pinned"] and row["url"] == url_of(ra2)
            # the old certificate stays accepted during the grace period
            assert n.trust.certificate(old_id) is not None

        # delete authority follows the link: the renewed node removes what it put before
        renewed.delete_instances([uid(16, 1)])
        ra2.local_change()
        await wait_for(lambda: all(n.catalog.instance(uid(16, 1)) is None for n in (b, c)), 30,
                       "the renewed node's delete of an old put at B and C",
                       describe=lambda: describe_nodes([renewed, b, c]))
        assert converged([renewed, b, c])
    finally:
        for r in reversed(started):
            await r.stop()
        if renewed is not None:
            renewed.close()


async def test_a_forged_successor_is_refused_and_the_genuine_one_adopted(
        new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b, e = new_node("a"), new_node("b"), new_node("e")
    add_peer(b, a, "https://127.0.0.1:9")  # B trusts A; nobody listens there
    rb = await running(b)
    old_cert = a.identity.cert_der
    renewal.renew(a, grace_days=30)
    a.close()
    a2 = LocalNode(a.data)
    try:
        genuine = renewal.statement(a2.data)
        assert genuine is not None and genuine.old.compact != a2.node_id.compact
        # E claims to be A's successor, signing with its own key
        forged = make_successor(load_private_key(e.identity.key_path), old_cert,
                                e.identity.cert_der, 86_400)
        with pytest.raises(SuccessorRejected, match="not signed by its key"):
            verify_successor(forged, old_cert)
        with pytest.raises(SuccessorRejected):
            renewal.learn_successor(b, forged)
        with pytest.raises(IntroductionRefused):
            await introduce(url_of(rb), e.identity, b.node_id, successor=forged)
        assert b.trust.certificate(e.node_id) is None
        assert [p["node_id"] for p in b.catalog.peers()] == [genuine.old.compact]

        # the genuine statement, over the wire: A's new certificate is pinned, entry moved
        await introduce(url_of(rb), a2.identity, b.node_id, successor=genuine)
        assert b.trust.certificate(a2.node_id) == a2.identity.cert_der
        assert [p["node_id"] for p in b.catalog.peers()] == [a2.node_id.compact]
        assert row_of(b, a2.node_id)["renewed_from"] == str(genuine.old)  # type: ignore[index]
        # the CLI shows the link too
        listed = {r["node_id"]: r for r in cli_json("peer", "list", data=b.data)}
        assert listed[str(a2.node_id)]["renewed_from"] == str(genuine.old)

        # the grace period ends: B retires the old pin, A deletes the old key
        after = genuine.grace_until + 1
        assert b.trust.retire_expired(now=after) == [genuine.old]
        assert b.trust.certificate(genuine.old) is None
        assert b.trust.certificate(a2.node_id) is not None
        assert renewal.retire(a2.data, now=after)
        assert not (a2.data / "previous" / "node.key").exists()
    finally:
        a2.close()


def test_renewal_refuses_a_running_node_and_resumes_after_a_crash(
        new_node: Callable[[str], LocalNode]) -> None:
    import fcntl
    import os

    a = new_node("a")
    fd = os.open(a.data / "run.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as `syncnode run` holds it
        with pytest.raises(renewal.RenewalError, match="stop it"):
            renewal.renew(a)
    finally:
        os.close(fd)
    # a crash after the new pair was staged: opening the folder finishes the switch
    old = a.node_id
    staged = renewal.PREVIOUS_DIR
    real = renewal.finish_renewal
    try:
        renewal.finish_renewal = lambda data, catalog=None: None  # type: ignore[assignment]
        renewal.renew(a)
    finally:
        renewal.finish_renewal = real  # type: ignore[assignment]
    assert (a.data / staged / "next.crt").exists()
    a.close()
    reopened = LocalNode(a.data)
    try:
        assert reopened.node_id != old
        assert reopened.identity.node_id == reopened.node_id  # key matches certificate
        assert reopened.catalog.previous_node_ids() == [old.compact]
    finally:
        reopened.close()


# ----------------------------------------------------------------------------------------
# CA mode: a CSR signed elsewhere, CA-admitted peers listed and removable, the CRL


async def curl_hello(running: RunningNode, client: Path) -> tuple[int, str]:
    assert CURL, "curl is required for these tests"
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--max-time", "10", "--tlsv1.3", "-k", "--cert", str(client / "node.crt"),
        "--key", str(client / "node.key"),
        f"https://127.0.0.1:{running.ports['peer']}/peer/v1/hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, (out + err).decode(errors="replace")


async def test_a_node_signed_from_a_csr_joins_and_ca_admitted_peers_are_listed_removable(
        tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca = create_ca(ca_dir)
    m = LocalNode.init(tmp_path / "m", ca=ca)  # trusts the CA; pins nothing
    n_dir = tmp_path / "n"
    csr, crt = tmp_path / "n.csr", tmp_path / "n.crt"
    cli("init", "--csr", csr, data=n_dir)  # on the node's machine
    assert not (n_dir / "node.crt").exists() and csr.read_bytes().startswith(b"-----BEGIN")
    cli("ca", "sign", csr, "--ca", ca_dir, "--out", crt)  # on the CA's machine
    cli("cert", "install", crt, "--ca-cert", ca_dir / "ca.crt", data=n_dir)
    assert not list(n_dir.glob("ca.key")) and not (n_dir / "pending.key").exists()
    n = LocalNode(n_dir)
    p = LocalNode.init(tmp_path / "p", ca=ca)
    started: list[RunningNode] = []
    try:
        rm = await start_on(m)
        started.append(rm)
        rn = await start_on(n)
        started.append(rn)
        n.catalog.add_peer(m.node_id.compact, url_of(rm), "always")  # M knows nothing of N
        rn.peers_changed()
        add_instances(n, [uid(17, 1), uid(17, 2)])
        rn.local_change()
        await wait_for(lambda: converged([m, n]), 30, "N's data at M",
                       describe=lambda: describe_nodes([m, n]))

        # the regression: a CA-trusted node that pushed data is listed, and removable
        listed = {r["node_id"]: r for r in cli_json("peer", "list", data=m.data)}
        assert listed[str(n.node_id)]["trusted_by"] == "ca", listed
        api = f"http://127.0.0.1:{rm.ports['api']}/api/v1/nodes"
        async with aiohttp.ClientSession() as http, http.get(
                api, headers={"X-API-Key": m.new_api_keys["read"]}) as resp:
            assert resp.status == 200
            assert str(n.node_id) in {r["node_id"] for r in await resp.json()}
        assert (await curl_hello(rm, n.data))[0] == 0
        removed = time.time()
        async with aiohttp.ClientSession() as http, http.delete(
                f"{api}/{n.node_id}", headers={"X-API-Key": m.new_api_keys["admin"]}) as resp:
            assert resp.status in (200, 204), await resp.text()
        rc, text = await curl_hello(rm, n.data)
        assert rc != 0 and "node_id" not in text, (rc, text)  # refused at the handshake
        listed = {r["node_id"]: r for r in cli_json("peer", "list", data=m.data)}
        assert listed[str(n.node_id)]["trusted_by"] == "denied"
        # N's open connection is refused too (the peer server re-reads the trust list at
        # most once a second); then nothing more of N's gets in
        def failed_since(t: float) -> bool:
            return n.catalog.peer_states().get(m.node_id.compact, {}).get(
                "last_error_at", 0) > t

        await wait_for(lambda: failed_since(removed), 30, "N's sync with M to fail",
                       describe=n.catalog.peer_states)
        added = time.time()
        add_instances(n, [uid(17, 3)])
        rn.local_change()
        await wait_for(lambda: failed_since(added), 30, "N's next round with M to fail",
                       describe=n.catalog.peer_states)
        assert m.catalog.instance(uid(17, 3)) is None

        # the CA revokes P: M refuses it from the next handshake on, without a restart
        assert (await curl_hello(rm, p.data))[0] == 0
        cli("ca", "revoke", str(p.node_id), "--ca", ca_dir)
        shutil.copy(ca_dir / "crl.pem", m.data / "crl.pem")
        rc, text = await curl_hello(rm, p.data)
        assert rc != 0 and "node_id" not in text, (rc, text)
        assert (row_of(m, p.node_id) or {}).get("trusted_by") in ("denied", None)
        assert m.trust.refusal(p.identity.cert_der) is not None
        assert m.trust.refusal(n.identity.cert_der) is not None  # denied, not revoked
        # the command line removes a CA-admitted peer the same way
        assert "Removed peer" in cli("peer", "remove", str(p.node_id), data=m.data)
        assert m.trust.is_denied(p.node_id)
        assert (row_of(m, p.node_id) or {}).get("trusted_by") == "denied"
    finally:
        for r in reversed(started):
            await r.stop()
        n.close()
        p.close()
        m.close()


def test_a_revocation_list_not_signed_by_the_cluster_ca_revokes_nothing(
        tmp_path: Path) -> None:
    from syncnode.tls.issuance import revoke

    ca, other = create_ca(tmp_path / "ca"), create_ca(tmp_path / "other")
    m = LocalNode.init(tmp_path / "m", ca=ca)
    p = LocalNode.init(tmp_path / "p", ca=ca)
    q = LocalNode.init(tmp_path / "q", ca=other)
    try:
        revoke(other, str(q.identity.cert_path))
        shutil.copy(tmp_path / "other" / "crl.pem", m.data / "crl.pem")
        assert m.trust.refusal(p.identity.cert_der) is None
        assert m.trust.is_trusted(p.identity.cert_der)
        with pytest.raises(Exception, match="did not issue"):
            revoke(ca, str(q.identity.cert_path))
        revoke(ca, str(p.node_id))
        time.sleep(0.01)
        shutil.copy(tmp_path / "ca" / "crl.pem", m.data / "crl.pem")
        assert not m.trust.is_trusted(p.identity.cert_der)
    finally:
        for x in (m, p, q):
            x.close()
