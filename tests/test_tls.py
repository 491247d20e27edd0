"""Node identity, trust store and mutual TLS (the modules of syncnode.tls).

The server side is a real aiohttp server on 127.0.0.1:0 using ``server_ssl_context``; most
clients are independent implementations (``curl`` and ``openssl s_client`` subprocesses), so the
tests check what goes over the wire, not what our own client believes.  "Refused" means: the TLS
handshake fails with an alert, the client gets no HTTP bytes, and the request handler never runs.
Every server is stopped and every subprocess has a timeout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from syncnode.nodeid import NodeId
from syncnode.tls import certificates
from syncnode.tls.contexts import client_ssl_context, peer_node_id, server_ssl_context, verify_peer
from syncnode.tls.errors import (
    CertificateRejected,
    IdentityError,
    IdentityExists,
    IdentityNotFound,
    InvalidPeerAddress,
    PeerUnreachable,
    UntrustedPeer,
)
from syncnode.tls.identity import Identity, create_ca, create_identity, load_identity
from syncnode.tls.peercert import fetch_peer_certificate
from syncnode.tls.truststore import TrustStore

pytestmark = pytest.mark.timeout(60)

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
SUBPROCESS_TIMEOUT = 20.0
CURL_TLS_ERRORS = (35, 56)  # handshake failed / TLS alert received when reading
HTTP_GET = b"GET /whoami HTTP/1.1\r\nHost: syncnode\r\nConnection: close\r\n\r\n"

Creds = tuple[Path, Path]  # (certificate PEM, key PEM)


def creds(identity: Identity) -> Creds:
    return identity.cert_path, identity.key_path


# ------------------------------------------------------------------------------------------------
# Certificates shared by the module (read-only)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("pki")
    ca = create_ca(base / "ca")
    other_ca = create_ca(base / "other-ca")  # same subject name as `ca`, different key
    ns = SimpleNamespace(
        ca=ca,
        other_ca=other_ca,
        alice=create_identity(base / "alice"),  # self-signed, gets pinned
        mallory=create_identity(base / "mallory"),  # self-signed, never trusted
        decoys=[create_identity(base / f"decoy{i}") for i in range(2)],  # same subject CN
        carol=create_identity(base / "carol", ca=ca),  # issued by the cluster CA
        eve=create_identity(base / "eve", ca=other_ca),  # issued by another CA
    )
    # A certificate from an unrelated CA made by another implementation (trustme).
    tm_ca = trustme.CA()
    leaf = tm_ca.issue_cert("syncnode")
    tm_pem = base / "trustme-leaf.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tm_pem))
    ns.trustme = (tm_pem, tm_pem)
    # A certificate "issued" by alice's key: pinning alice must not make it trusted.
    alice_key = serialization.load_pem_private_key(ns.alice.key_path.read_bytes(), None)
    alice_cert = x509.load_der_x509_certificate(ns.alice.cert_der)
    forged_key = ec.generate_private_key(ec.SECP256R1())
    forged = certificates.build_certificate(
        subject_key=forged_key,
        subject=alice_cert.subject,
        issuer_key=alice_key,  # type: ignore[arg-type]
        issuer_cert=alice_cert,
        is_ca=False,
        validity=certificates.NODE_VALIDITY,
    )
    forged_dir = base / "forged"
    forged_dir.mkdir()
    (forged_dir / "node.key").write_bytes(certificates.key_pem(forged_key))
    (forged_dir / "node.crt").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    ns.forged = (forged_dir / "node.crt", forged_dir / "node.key")
    return ns


# ------------------------------------------------------------------------------------------------
# A tiny peer server and independent clients


@dataclass
class Server:
    port: int
    identity: Identity
    trust: TrustStore
    hits: list[NodeId] = field(default_factory=list)
    sni_names: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/whoami"


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[StartServer]:
    runners: list[web.AppRunner] = []

    async def start(identity: Identity, *, disable_swap: bool = False) -> Server:
        trust = TrustStore(identity.data_dir)
        ctx = server_ssl_context(identity, trust)
        server = Server(0, identity, trust)
        swap = ctx.sni_callback
        assert swap is not None

        def recording_sni(obj: Any, name: str | None, context: ssl.SSLContext) -> int | None:
            server.sni_names.append(name)
            return None if disable_swap else swap(obj, name, context)

        ctx.sni_callback = recording_sni

        async def whoami(request: web.Request) -> web.Response:
            assert request.transport is not None
            node_id = peer_node_id(request.transport.get_extra_info("ssl_object"))
            server.hits.append(node_id)
            return web.json_response({"node_id": str(node_id)})

        app = web.Application()
        app.router.add_get("/whoami", whoami)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        server.port = runner.addresses[0][1]
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


async def run(args: list[str], stdin: bytes = b"") -> Result:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), SUBPROCESS_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args[0]} did not finish within {SUBPROCESS_TIMEOUT}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def curl(
    server: Server, client: Creds | None, *, sni: bool = False, extra: tuple[str, ...] = ()
) -> Result:
    assert CURL, "curl is required for these tests"
    args = [CURL, "-sS", "--max-time", "10", "--tlsv1.3", *extra]
    if client is not None:
        args += ["--cert", str(client[0]), "--key", str(client[1])]
    if sni:
        # By name: SNI "syncnode", and curl verifies our server certificate (SAN) itself.
        args += ["--resolve", f"syncnode:{server.port}:127.0.0.1"]
        args += ["--cacert", str(server.identity.cert_path)]
        args.append(f"https://syncnode:{server.port}/whoami")
    else:
        # By IP: curl sends no SNI.  Server chain not checked (-k): not what is under test.
        args += ["-k", server.url]
    return await run(args)


async def s_client(
    server: Server, client: Creds | None, *, version: str = "-tls1_3", sni: bool = False
) -> Result:
    assert OPENSSL, "openssl is required for these tests"
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", version, "-ign_eof"]
    args += ["-servername", "syncnode"] if sni else ["-noservername"]
    if client is not None:
        args += ["-cert", str(client[0]), "-key", str(client[1])]
    return await run(args, stdin=HTTP_GET)


def assert_accepted_curl(res: Result, expected: NodeId) -> None:
    assert res.rc == 0, res
    assert str(expected) in res.out, res


def assert_refused_curl(res: Result, alert: str = "alert") -> None:
    assert res.rc in CURL_TLS_ERRORS, res
    assert res.out == "", res  # not one byte of HTTP
    assert alert in res.err, res


def assert_refused_s_client(res: Result, alert: str = "alert") -> None:
    assert "HTTP/" not in res.out, res
    assert alert in res.text, res


# ------------------------------------------------------------------------------------------------
# Identity and CA


def test_identity_created_and_reloaded(tmp_path: Path) -> None:
    ident = create_identity(tmp_path / "n")
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600
    assert ident.key_path.name == "node.key" and ident.cert_path.name == "node.crt"
    again = load_identity(tmp_path / "n")
    assert again == ident
    assert ident.node_id == NodeId.from_certificate_der(ident.cert_der)
    assert ssl.PEM_cert_to_DER_cert(ident.cert_path.read_text()) == ident.cert_der
    assert not list((tmp_path / "n").glob(".*"))  # no temp files left behind
    with pytest.raises(IdentityExists, match="refusing to replace"):
        create_identity(tmp_path / "n")
    assert load_identity(tmp_path / "n").node_id == ident.node_id


def test_certificate_extensions(pki: SimpleNamespace) -> None:
    cert = x509.load_der_x509_certificate(pki.alice.cert_der)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest  # self-signed
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["syncnode"]
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["syncnode"]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3649 <= lifetime.days <= 3651
    carol = x509.load_der_x509_certificate(pki.carol.cert_der)
    ca_cert = x509.load_der_x509_certificate(pki.ca.cert_der)
    carol.verify_directly_issued_by(ca_cert)
    ca_bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca_bc.ca and ca_bc.path_length == 0
    assert (pki.carol.data_dir / "ca.crt").read_bytes() == pki.ca.cert_path.read_bytes()
    assert stat.S_IMODE(pki.ca.key_path.stat().st_mode) == 0o600


async def test_openssl_verifies_certificates_strictly(pki: SimpleNamespace) -> None:
    """An independent verifier (openssl verify -x509_strict) accepts what we generate."""
    assert OPENSSL
    alice = str(pki.alice.cert_path)
    for purpose in ("sslclient", "sslserver"):
        res = await run(
            [OPENSSL, "verify", "-x509_strict", "-purpose", purpose, "-CAfile", alice, alice]
        )
        assert res.rc == 0 and "OK" in res.out, res
        ca, carol = str(pki.ca.cert_path), str(pki.carol.cert_path)
        res = await run(
            [OPENSSL, "verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca, carol]
        )
        assert res.rc == 0 and "OK" in res.out, res
    res = await run([OPENSSL, "verify", "-CAfile", str(pki.ca.cert_path), str(pki.eve.cert_path)])
    assert res.rc != 0, res


def test_load_identity_errors(tmp_path: Path, pki: SimpleNamespace) -> None:
    with pytest.raises(IdentityNotFound, match="initialise"):
        load_identity(tmp_path / "empty")
    ident = create_identity(tmp_path / "n")
    ident.cert_path.unlink()
    with pytest.raises(IdentityError, match=r"node\.crt is missing"):
        load_identity(tmp_path / "n")
    shutil.copy(pki.mallory.cert_path, ident.cert_path)
    with pytest.raises(IdentityError, match="does not belong"):
        load_identity(tmp_path / "n")


# ------------------------------------------------------------------------------------------------
# Trust store


def test_trust_store_pin_list_remove_version(tmp_path: Path, pki: SimpleNamespace) -> None:
    trust = TrustStore(tmp_path)
    assert trust.list() == [] and trust.verify_locations_pem() == ""
    v0 = trust.version()
    with pytest.raises(UntrustedPeer) as info:
        trust.pin(pki.alice.cert_der, pki.mallory.node_id)
    assert info.value.expected == pki.mallory.node_id and info.value.actual == pki.alice.node_id
    assert str(pki.alice.node_id) in str(info.value) and str(pki.mallory.node_id) in str(info.value)
    assert trust.version() == v0
    assert trust.pin(pki.alice.cert_path.read_text(), pki.alice.node_id) == pki.alice.node_id
    v1 = trust.version()
    assert v1 != v0
    trust.pin(pki.alice.cert_der, pki.alice.node_id)  # idempotent
    assert trust.version() == v1
    assert (tmp_path / "trust" / f"{pki.alice.node_id.compact}.pem").exists()
    assert trust.list() == [pki.alice.node_id]
    assert trust.certificate(pki.alice.node_id) == pki.alice.cert_der
    assert trust.is_trusted(pki.alice.cert_der)
    assert not trust.is_trusted(pki.mallory.cert_der)
    assert not trust.is_trusted(pki.carol.cert_der)  # no CA configured
    assert trust.remove(pki.alice.node_id) is True
    assert trust.remove(pki.alice.node_id) is False
    assert trust.version() == v0 and trust.list() == []
    assert not trust.is_trusted(pki.alice.cert_der)
    shutil.copy(pki.ca.cert_path, tmp_path / "ca.crt")
    assert trust.version() != v0
    assert trust.is_trusted(pki.carol.cert_der)
    assert not trust.is_trusted(pki.eve.cert_der)  # other CA, same CA name
    assert not trust.is_trusted(b"garbage")


def test_trust_store_refuses_ca_certificates_and_ignores_tampering(
    tmp_path: Path, pki: SimpleNamespace
) -> None:
    trust = TrustStore(tmp_path)
    ca_id = NodeId.from_certificate_der(pki.ca.cert_der)
    with pytest.raises(CertificateRejected, match="CA:FALSE"):
        trust.pin(pki.ca.cert_der, ca_id)
    # A file whose name does not match its certificate is ignored, not trusted.
    (tmp_path / "trust").mkdir()
    fake = tmp_path / "trust" / f"{pki.alice.node_id.compact}.pem"
    fake.write_bytes(pki.mallory.cert_path.read_bytes())
    (tmp_path / "trust" / "not-a-node-id.pem").write_text("junk")
    assert trust.list() == [pki.alice.node_id]  # the name is listed...
    assert trust.certificate(pki.alice.node_id) is None  # ...but its content is rejected
    assert not trust.is_trusted(pki.mallory.cert_der)
    assert not trust.is_trusted(pki.alice.cert_der)
    assert trust.verify_locations_pem() == ""


# ------------------------------------------------------------------------------------------------
# The server, seen from curl and openssl s_client


async def test_client_without_certificate_is_refused(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    server = await serve(create_identity(tmp_path / "srv", ca=pki.ca))
    server.trust.pin(pki.alice.cert_der, pki.alice.node_id)
    assert_refused_curl(await curl(server, None), "alert certificate required")
    assert_refused_s_client(await s_client(server, None), "alert certificate required")
    assert server.hits == []


@pytest.mark.parametrize("who", ["mallory", "eve", "trustme", "forged"])
async def test_untrusted_certificates_are_refused(
    who: str, tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    """Unknown self-signed, another CA (same CA name), another CA (trustme), and a certificate
    signed with a pinned peer's key (a pinned node cannot vouch for others)."""
    server = await serve(create_identity(tmp_path / "srv", ca=pki.ca))
    for peer in (pki.alice, *pki.decoys):
        server.trust.pin(peer.cert_der, peer.node_id)
    client = getattr(pki, who)
    client_creds = creds(client) if isinstance(client, Identity) else client
    assert_refused_curl(await curl(server, client_creds))
    assert_refused_curl(await curl(server, client_creds, sni=True))
    assert_refused_s_client(await s_client(server, client_creds))
    assert server.hits == []


async def test_pinned_and_ca_signed_clients_are_accepted(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    server = await serve(create_identity(tmp_path / "srv", ca=pki.ca))
    for peer in (*pki.decoys, pki.alice):  # several pins share the subject name "syncnode"
        server.trust.pin(peer.cert_der, peer.node_id)
    assert_accepted_curl(await curl(server, creds(pki.alice)), pki.alice.node_id)
    assert_accepted_curl(await curl(server, creds(pki.alice), sni=True), pki.alice.node_id)
    res = await s_client(server, creds(pki.alice))
    assert "HTTP/1.1 200" in res.out and str(pki.alice.node_id) in res.out, res
    assert_accepted_curl(await curl(server, creds(pki.carol)), pki.carol.node_id)
    assert server.hits == [pki.alice.node_id] * 3 + [pki.carol.node_id]
    # the per-handshake swap ran for clients with and without SNI
    assert None in server.sni_names and "syncnode" in server.sni_names


async def test_pinned_ca_signed_peer_without_trusting_its_ca(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    """Pinning works for a certificate that is not self-signed (partial-chain trust)."""
    server = await serve(create_identity(tmp_path / "srv"))
    assert_refused_curl(await curl(server, creds(pki.eve)), "unknown ca")
    server.trust.pin(pki.eve.cert_der, pki.eve.node_id)
    assert_accepted_curl(await curl(server, creds(pki.eve)), pki.eve.node_id)
    assert_refused_curl(await curl(server, creds(pki.mallory)))  # eve's CA is still not trusted


@pytest.mark.parametrize("sni", [False, True], ids=["no-sni", "sni"])
async def test_trust_changes_apply_without_restart(
    sni: bool, tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    server = await serve(create_identity(tmp_path / "srv"))
    alice = creds(pki.alice)
    assert_refused_curl(await curl(server, alice, sni=sni), "unknown ca")  # empty trust list
    server.trust.pin(pki.alice.cert_der, pki.alice.node_id)
    assert_accepted_curl(await curl(server, alice, sni=sni), pki.alice.node_id)
    # removed through another TrustStore object, as the CLI in another process would do
    assert TrustStore(server.identity.data_dir).remove(pki.alice.node_id)
    assert_refused_curl(await curl(server, alice, sni=sni), "unknown ca")
    assert_refused_s_client(await s_client(server, alice, sni=sni), "unknown ca")
    server.trust.pin(pki.alice.cert_der, pki.alice.node_id)
    assert_accepted_curl(await curl(server, alice, sni=sni), pki.alice.node_id)
    assert server.hits == [pki.alice.node_id] * 2
    assert set(server.sni_names) == {"syncnode" if sni else None}
    # the CA file is watched too
    assert_refused_curl(await curl(server, creds(pki.carol), sni=sni))
    shutil.copy(pki.ca.cert_path, server.identity.data_dir / "ca.crt")
    assert_accepted_curl(await curl(server, creds(pki.carol), sni=sni), pki.carol.node_id)
    os.unlink(server.identity.data_dir / "ca.crt")
    assert_refused_curl(await curl(server, creds(pki.carol), sni=sni))


async def test_server_context_fails_closed_without_the_swap(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    """The context itself trusts nothing: trust only ever comes from the per-handshake swap,
    so a stale trust list can never be used (control for the tests above)."""
    server = await serve(create_identity(tmp_path / "srv"), disable_swap=True)
    server.trust.pin(pki.alice.cert_der, pki.alice.node_id)
    assert_refused_curl(await curl(server, creds(pki.alice)), "unknown ca")
    assert server.sni_names == [None] and server.hits == []


async def test_empty_trust_list_refuses_everyone(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    server = await serve(create_identity(tmp_path / "srv"))
    for who in (pki.alice, pki.carol, pki.mallory):
        assert_refused_curl(await curl(server, creds(who)), "unknown ca")
    assert server.hits == []


async def test_tls12_is_refused(tmp_path: Path, pki: SimpleNamespace, serve: StartServer) -> None:
    server = await serve(create_identity(tmp_path / "srv"))
    server.trust.pin(pki.alice.cert_der, pki.alice.node_id)
    res = await s_client(server, creds(pki.alice), version="-tls1_2")
    assert_refused_s_client(res, "alert protocol version")
    res = await curl(server, creds(pki.alice), extra=("--tlsv1.2", "--tls-max", "1.2"))
    assert res.rc == 35 and res.out == "", res
    assert server.hits == []
    assert_accepted_curl(await curl(server, creds(pki.alice)), pki.alice.node_id)


# ------------------------------------------------------------------------------------------------
# Our client side


async def test_aiohttp_client_with_verify_peer(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    server = await serve(create_identity(tmp_path / "srv"))
    server.trust.pin(pki.alice.cert_der, pki.alice.node_id)
    alice_trust = TrustStore(tmp_path / "alice-trust")
    alice_trust.pin(server.identity.cert_der, server.identity.node_id)
    ctx = client_ssl_context(pki.alice, alice_trust)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and not ctx.check_hostname
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(server.url) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["node_id"] == str(pki.alice.node_id)
    # verify_peer on a stream: check the node id, only then write the request
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=ctx)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        with pytest.raises(UntrustedPeer, match="refusing to talk"):
            verify_peer(ssl_object, pki.mallory.node_id)
        assert verify_peer(ssl_object, server.identity.node_id) == server.identity.node_id
        writer.write(HTTP_GET)
        reply = await asyncio.wait_for(reader.read(), 10)
        assert reply.startswith(b"HTTP/1.1 200") and str(pki.alice.node_id).encode() in reply
        assert not ssl_object.session.has_ticket  # no resumption that could skip the trust list
    finally:
        writer.close()
        await writer.wait_closed()
    # the client refuses a server it does not trust
    ctx = client_ssl_context(pki.alice, TrustStore(tmp_path / "nobody"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(server.url)
    assert server.hits == [pki.alice.node_id] * 2


async def test_client_rejects_unexpected_node_id_before_sending(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    """A CA-signed server that is not the node the client dialled for is dropped in the
    handshake: the request is never sent."""
    server = await serve(create_identity(tmp_path / "srv", ca=pki.ca))
    carol_trust = TrustStore(pki.carol.data_dir)  # trusts the cluster CA, no pins
    wrong = client_ssl_context(pki.carol, carol_trust, expected=pki.alice.node_id)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=wrong)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
            await session.get(server.url)
    err = info.value.certificate_error
    assert isinstance(err, UntrustedPeer)
    assert err.expected == pki.alice.node_id and err.actual == server.identity.node_id
    await asyncio.sleep(0.05)
    assert server.hits == []
    right = client_ssl_context(pki.carol, carol_trust, expected=server.identity.node_id)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=right)) as session,
        session.get(server.url) as resp,
    ):
        assert resp.status == 200
    assert server.hits == [pki.carol.node_id]
    # blocking sockets get the same check
    sync_ctx = client_ssl_context(pki.carol, carol_trust, expected=pki.alice.node_id)

    def blocking_connect() -> None:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
            sync_ctx.wrap_socket(sock),
        ):
            pass

    with pytest.raises(UntrustedPeer):
        await asyncio.to_thread(blocking_connect)


async def test_fetch_peer_certificate(
    tmp_path: Path, pki: SimpleNamespace, serve: StartServer
) -> None:
    """`peer add ID URL`: get the certificate from a peer that does not trust us yet."""
    server = await serve(create_identity(tmp_path / "srv"))
    expected = server.identity.node_id
    der = await fetch_peer_certificate(f"127.0.0.1:{server.port}", pki.mallory, expected)
    assert der == server.identity.cert_der
    der = await fetch_peer_certificate(server.url, pki.mallory, expected, timeout=5)
    assert der == server.identity.cert_der
    with pytest.raises(UntrustedPeer) as info:
        await fetch_peer_certificate(("127.0.0.1", server.port), pki.mallory, pki.alice.node_id)
    assert info.value.expected == pki.alice.node_id and info.value.actual == expected
    assert str(expected) in str(info.value) and str(pki.alice.node_id) in str(info.value)
    await asyncio.sleep(0.05)
    assert server.hits == []
    # then pin it, and the mutual-TLS client works
    mallory_trust = TrustStore(tmp_path / "mallory-trust")
    mallory_trust.pin(der, expected)
    server.trust.pin(pki.mallory.cert_der, pki.mallory.node_id)
    ctx = client_ssl_context(pki.mallory, mallory_trust, expected=expected)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
        session.get(server.url) as resp,
    ):
        assert (await resp.json())["node_id"] == str(pki.mallory.node_id)


async def test_fetch_peer_certificate_unreachable(pki: SimpleNamespace) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port}"):
        await fetch_peer_certificate(f"127.0.0.1:{port}", pki.alice, pki.mallory.node_id)
    # a listener that never answers the handshake: bounded by the timeout
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PeerUnreachable, match=r"within 0\.5s"):
            await fetch_peer_certificate(
                f"127.0.0.1:{port}", pki.alice, pki.mallory.node_id, timeout=0.5
            )
    with pytest.raises(InvalidPeerAddress):
        await fetch_peer_certificate("http://127.0.0.1:1", pki.alice, pki.mallory.node_id)
