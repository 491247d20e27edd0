"""Introduction: a peer trusted by its node id alone gets its certificate pinned by dialling.

A real node (:class:`syncnode.node.RunningNode`, peer port on 127.0.0.1) trusts some ids
without their certificates, as ``syncnode peer add ID URL`` leaves it when it cannot reach
the peer. The clients are ``curl`` (an independent TLS and HTTP implementation) and our own
:func:`syncnode.introduction.introduce`. "Refused" means: no HTTP byte comes back, nothing is
pinned, and the refusing node logs the refused node id and address.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from syncsupport import (
    add_instances,
    converged,
    describe_nodes,
    peer_state,
    uid,
    url_of,
    wait_for,
)

from syncnode import protocol
from syncnode.audit import AUDIT_DIR, read_entries
from syncnode.introduction import (
    INTRODUCTION_PATH,
    IntroductionRefused,
    introduce,
    refused_our_certificate,
)
from syncnode.listeners import ListenerLimits, server_name
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.tls.contexts import INTRODUCTION_NAME, client_ssl_context
from syncnode.tls.errors import UntrustedPeer

pytestmark = pytest.mark.timeout(90)

CURL = shutil.which("curl")
SUBPROCESS_TIMEOUT = 20.0
CURL_TLS_ERRORS = (35, 56)  # handshake failed / TLS alert received when reading
CURL_EMPTY_REPLY = 52  # the server closed the connection without an HTTP answer
StartNode = Callable[..., Awaitable[RunningNode]]


@dataclass
class Result:
    rc: int
    out: str
    err: str


async def curl(*args: str) -> Result:
    assert CURL, "curl is required for these tests"
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--max-time", "10", "--tlsv1.3", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"curl did not finish within {SUBPROCESS_TIMEOUT}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def port_of(running: RunningNode) -> int:
    return int(running.ports["peer"])


async def curl_introduce(running: RunningNode, cert: Path, path: str = INTRODUCTION_PATH
                         ) -> Result:
    """POST ``cert`` as an introduction (SNI ``introduce.syncnode``, no client certificate);
    prints the HTTP status. The server's certificate is not what is under test (-k)."""
    port = port_of(running)
    return await curl("-k", "--resolve", f"{INTRODUCTION_NAME}:{port}:127.0.0.1",
                      "-X", "POST", "-H", "Content-Type: application/pem-certificate-chain",
                      "--data-binary", f"@{cert}", "-w", "%{http_code}",
                      f"https://{INTRODUCTION_NAME}:{port}{path}")


async def curl_hello(running: RunningNode, client: LocalNode) -> Result:
    """GET /hello with mutual TLS as ``client`` (its node.crt and node.key), no SNI."""
    return await curl("-k", "--cert", str(client.data / "node.crt"),
                      "--key", str(client.data / "node.key"),
                      f"https://127.0.0.1:{port_of(running)}{protocol.PREFIX}/hello")


def assert_closed_without_a_byte(res: Result) -> None:
    """curl got no HTTP answer at all ("000" is what curl's -w prints for that)."""
    assert res.rc == CURL_EMPTY_REPLY and res.out in ("", "000"), res


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "syncnode.introduction" and r.getMessage().startswith("refused ")]


# ----------------------------------------------------------------------------------------
# The introduction on the wire, with curl


async def test_id_trusted_peer_introduces_itself_and_strangers_get_nothing(
        new_node: Callable[[str], LocalNode], running: StartNode,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a, b, d = new_node("a"), new_node("b"), new_node("d")
    b.catalog.add_peer(a.node_id.compact, "https://127.0.0.1:9")  # trusted by id alone
    rb = await running(b)

    # Before: A's certificate is not pinned, so mutual TLS refuses it during the handshake.
    res = await curl_hello(rb, a)
    assert res.rc in CURL_TLS_ERRORS and res.out == "", res
    assert b.trust.certificate(a.node_id) is None

    # A stranger (D: its id is trusted nowhere) introduces itself: the connection is closed
    # without an HTTP byte, nothing is pinned, and B logs D's id and address.
    res = await curl_introduce(rb, d.data / "node.crt")
    assert_closed_without_a_byte(res)
    assert b.trust.certificate(d.node_id) is None
    assert any(f"refused node {d.node_id} from 127.0.0.1:" in m for m in refusals(caplog)), \
        caplog.text
    # ... and an introduction connection serves nothing else, to anyone.
    for path in (f"{protocol.PREFIX}/hello", f"{protocol.PREFIX}/merkle?prefix="):
        res = await curl("-k", "--resolve", f"{INTRODUCTION_NAME}:{port_of(rb)}:127.0.0.1",
                         f"https://{INTRODUCTION_NAME}:{port_of(rb)}{path}")
        assert_closed_without_a_byte(res)
    res = await curl_introduce(rb, a.data / "node.crt", path=f"{protocol.PREFIX}/push/events")
    assert_closed_without_a_byte(res)
    assert b.trust.certificate(a.node_id) is None
    # A certificate of the wrong size or not a certificate at all: closed as well.
    junk = a.data / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
    res = await curl_introduce(rb, junk)
    assert_closed_without_a_byte(res)

    # A introduces itself (the certificate's SHA-256 is the id B trusts): pinned, 204.
    res = await curl_introduce(rb, a.data / "node.crt")
    assert res.rc == 0 and res.out == "204", res
    assert b.trust.certificate(a.node_id) == a.identity.cert_der
    res = await curl_introduce(rb, a.data / "node.crt")  # again: nothing changes
    assert res.rc == 0 and res.out == "204", res

    # After: mutual TLS with A's certificate (which proves A holds the key) is served.
    res = await curl_hello(rb, a)
    assert res.rc == 0 and str(b.node_id) in res.out, res
    # D is still refused during the handshake and has learned nothing.
    res = await curl_hello(rb, d)
    assert res.rc in CURL_TLS_ERRORS and res.out == "", res
    assert b.trust.list() == [a.node_id]

    # Each refusal and the pin are on B's audit trail, with who and from where.
    assert rb.audit is not None and rb.audit.flush()
    entries = list(read_entries(b.data / AUDIT_DIR))
    refused = [(e["actor"], e["reason"]) for e in entries if e["action"] == "connection-refused"]
    assert (f"peer:{d.node_id.compact}", "introduction: node id not trusted") in refused
    assert refused.count(("peer:?", "introduction: not an introduction")) == 3, refused
    assert ("peer:?", "introduction: not a certificate") in refused
    tls_refusals = [who for who, why in refused if why == "TLS handshake: self-signed certificate"]
    assert tls_refusals == ["peer:?", "peer:?"], refused  # A before its introduction, D
    pins = [e for e in entries if e["action"] == "trust-add"]
    assert [(p["actor"], p["subject"]) for p in pins] == [("node", a.node_id.compact)]
    assert all(str(e.get("remote", "")).startswith("127.0.0.1:")
               for e in entries if e["action"] in ("connection-refused", "trust-add"))


# ----------------------------------------------------------------------------------------
# Our own client


async def test_introduce_checks_the_server_before_sending_and_reports_a_refusal(
        new_node: Callable[[str], LocalNode], running: StartNode,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a, b, d = new_node("a"), new_node("b"), new_node("d")
    rb = await running(b)
    url = url_of(rb)

    # The server at URL is B, not D: nothing is sent, B sees no introduction at all.
    with pytest.raises(UntrustedPeer) as wrong:
        await introduce(url, a.identity, d.node_id)
    assert wrong.value.actual == b.node_id and wrong.value.expected == d.node_id
    assert refusals(caplog) == []

    # B does not trust A: refused, and the message tells the operator what to do.
    with pytest.raises(IntroductionRefused) as refused:
        await introduce(url, a.identity, b.node_id)
    assert f"syncnode peer add {a.node_id}" in str(refused.value)
    assert b.trust.certificate(a.node_id) is None
    assert any(f"refused node {a.node_id}" in m for m in refusals(caplog))

    # Once B trusts A's id (no certificate), the same call pins A at B.
    b.catalog.add_peer(a.node_id.compact, "https://127.0.0.1:9")
    await introduce(url, a.identity, b.node_id)
    assert b.trust.certificate(a.node_id) == a.identity.cert_der


async def test_the_refusal_our_client_sees_is_recognised(
        new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    rb = await running(b)
    a.trust.pin(b.identity.cert_der, b.node_id)  # A trusts B; B does not know A
    ctx = client_ssl_context(a.identity, a.trust, expected=b.node_id)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        with pytest.raises(aiohttp.ClientError) as exc:
            async with session.get(f"{url_of(rb)}{protocol.PREFIX}/hello") as resp:
                await resp.read()
    assert refused_our_certificate(exc.value), repr(exc.value)
    assert not refused_our_certificate(aiohttp.ClientConnectionError("connection reset"))
    assert not refused_our_certificate(ssl.SSLError(1, "[SSL] unexpected eof"))


# ----------------------------------------------------------------------------------------
# Sync with one side unable to dial the other, trusting it by id alone


async def test_sync_converges_when_the_unreachable_side_trusts_by_id_alone(
        new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    add_instances(a, [uid(8, 1, n) for n in range(3)], study=uid(8, 1))
    add_instances(b, [uid(8, 2, n) for n in range(2)], study=uid(8, 2))
    b.catalog.add_peer(a.node_id.compact, "https://127.0.0.1:9")  # B cannot dial A
    rb = await running(b)
    a.catalog.add_peer(b.node_id.compact, url_of(rb))  # A trusts B by id, with its URL
    ra = await running(a)
    ra.peers_changed()
    await wait_for(lambda: converged([a, b]), 30, "A and B to converge",
                   describe=lambda: describe_nodes([a, b]))
    assert b.trust.certificate(a.node_id) == a.identity.cert_der  # pinned by introduction
    assert a.trust.certificate(b.node_id) == b.identity.cert_der  # pinned when A dialled B
    assert peer_state(a, b)["last_error"] == ""


# ----------------------------------------------------------------------------------------
# Choosing the TLS context by the ClientHello's server name


def client_hello(server_hostname: str | None) -> bytes:
    """The first TLS record a real client (Python's ssl, OpenSSL) sends."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_server_name_is_read_from_a_real_client_hello() -> None:
    hello = client_hello(INTRODUCTION_NAME)
    assert server_name(hello) == INTRODUCTION_NAME
    assert server_name(client_hello("Peer.Example")) == "peer.example"
    assert server_name(client_hello(None)) is None  # no SNI extension
    for cut in (0, 5, 9, 43, 60, len(hello) // 2, len(hello) - 1):
        assert server_name(hello[:cut]) in (None, INTRODUCTION_NAME)  # never raises
    assert server_name(b"GET / HTTP/1.1\r\n\r\n") is None
    assert server_name(bytes(range(256)) * 4) is None
    assert server_name(b"\x16\x03\x01\x00\x05\x01\xff\xff\xff") is None


@pytest.mark.parametrize("sent", ["nothing", "part of a ClientHello"])
async def test_a_client_hello_that_never_completes_is_dropped_at_the_handshake_bound(
        new_node: Callable[[str], LocalNode], sent: str) -> None:
    b = new_node("b")
    settings = b.settings(peer_host="127.0.0.1", peer_port=0, api_port=0, dicom_port=0,
                          discovery=False)
    rb = RunningNode(b, settings, limits=ListenerLimits(tls_handshake_timeout=0.5))
    await rb.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(rb))
        try:
            if sent != "nothing":
                writer.write(client_hello(INTRODUCTION_NAME)[:20])
                await writer.drain()
            start = time.monotonic()
            try:
                data = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                data = b""
            took = time.monotonic() - start
            assert data == b"" and 0.4 <= took < 1.3, (data[:100], took)
        finally:
            writer.close()
    finally:
        await rb.stop()
