"""Sync end to end with `syncnode run` processes, the CLI, and independent TLS clients.

- Refusals: ``openssl s_client`` and ``curl`` against a running node's peer port: no client
  certificate, an unknown self-signed one, one from another CA -> refused during the TLS
  handshake (no HTTP byte); a pinned peer's identity -> served; removed -> refused again,
  without restarting the node.
- Restart: the receiving node is SIGKILLed in the middle of pulling a 110 MB blob through a
  bandwidth-capped fault proxy, restarted, and resumes from its ``.part`` file.
- Push: A can dial B, B cannot dial A; content only on A and only on B converges.

Every process runs in its own process group and is killed at the end of its test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from syncsupport import (
    NodeProcess,
    assert_blobs_intact,
    blob_set,
    cli,
    cli_json,
    import_files,
    live_view,
    load_faultproxy,
    make_dicom,
    node_processes,
    peer_state,
    root,
    settled_state_sync,
    uid,
)

from syncnode.blobstore import CHUNK_SIZE
from syncnode.local import LocalNode

pytestmark = pytest.mark.e2e

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
CURL_TLS_ERRORS = (35, 56)  # handshake failed / TLS alert received when reading
MB = 10**6




@pytest.fixture
def procs() -> Iterator[list[NodeProcess]]:
    with node_processes() as started:
        yield started


def start(procs: list[NodeProcess], data: Path, interval: float = 0.5) -> tuple[NodeProcess,
                                                                                   int]:
    p = NodeProcess(data, data.parent / f"{data.name}.log", interval)
    procs.append(p)
    return p, p.wait_ready()


def init(data: Path) -> str:
    return cli_json("init", data=data)["node_id"]


def poll(check: object, timeout: float, what: str, step: float = 0.1) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


# ----------------------------------------------------------------------------------------
# Refusals, seen by independent TLS clients


def run_client(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin.decode(), capture_output=True, text=True,
                          timeout=20, check=False)


def s_client(port: int, cert: Path | None = None, key: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    assert OPENSSL, "openssl is required"
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-noservername",
            "-ign_eof"]
    if cert is not None and key is not None:
        args += ["-cert", str(cert), "-key", str(key)]
    return run_client(args, b"GET /peer/v1/hello HTTP/1.1\r\nHost: peer\r\n"
                            b"Connection: close\r\n\r\n")


def curl(port: int, cert: Path | None = None, key: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    assert CURL, "curl is required"
    args = [CURL, "-sS", "--max-time", "10", "--tlsv1.3", "-k"]
    if cert is not None and key is not None:
        args += ["--cert", str(cert), "--key", str(key)]
    return run_client([*args, f"https://127.0.0.1:{port}/peer/v1/hello"])


def assert_refused(res_s: subprocess.CompletedProcess[str],
                   res_c: subprocess.CompletedProcess[str]) -> None:
    assert "HTTP/" not in res_s.stdout, res_s.stdout
    assert "alert" in res_s.stdout + res_s.stderr, res_s
    assert res_c.returncode in CURL_TLS_ERRORS, res_c
    assert res_c.stdout == "", res_c.stdout  # not one byte of HTTP


@pytest.mark.timeout(90)
def test_peer_port_refuses_untrusted_clients_at_the_tls_layer(
        tmp_path: Path, procs: list[NodeProcess]) -> None:
    node_dir, peer_dir = tmp_path / "node", tmp_path / "peer"
    node_id, peer_id = init(node_dir), init(peer_dir)
    # An unknown self-signed certificate, made by openssl itself.
    stranger = (tmp_path / "stranger.crt", tmp_path / "stranger.key")
    assert OPENSSL
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=stranger",
                    "-addext", "basicConstraints=critical,CA:FALSE",
                    "-addext", "keyUsage=critical,digitalSignature",
                    "-addext", "extendedKeyUsage=clientAuth,serverAuth",
                    "-keyout", str(stranger[1]), "-out", str(stranger[0])],
                   check=True, capture_output=True, timeout=20)
    # A certificate issued by another CA (trustme).
    ca = trustme.CA()
    other = tmp_path / "other-ca-leaf.pem"
    ca.issue_cert("peer.example").private_key_and_cert_chain_pem.write_to_path(str(other))
    # The pinned peer's identity is a syncnode node's own key and certificate.
    peer = (peer_dir / "node.crt", peer_dir / "node.key")
    cli("peer", "add", peer_id, "https://127.0.0.1:9", "--cert", peer[0], "--push", "never",
        data=node_dir)
    _, port = start(procs, node_dir)

    bare = s_client(port)
    assert_refused(bare, curl(port))
    assert "alert certificate required" in bare.stdout + bare.stderr
    assert_refused(s_client(port, *stranger), curl(port, *stranger))
    assert_refused(s_client(port, other, other), curl(port, other, other))

    served = curl(port, *peer)
    assert served.returncode == 0, served
    hello = json.loads(served.stdout)
    assert hello["node_id"] == node_id and hello["version"] == 1, hello
    assert "HTTP/1.1 200" in s_client(port, *peer).stdout

    cli("peer", "remove", peer_id, data=node_dir)  # the node keeps running
    assert_refused(s_client(port, *peer), curl(port, *peer))
    assert procs[0].proc.poll() is None


# ----------------------------------------------------------------------------------------
# SIGKILL in the middle of a pull, restart, resume


@pytest.mark.timeout(120)
def test_receiver_killed_mid_pull_resumes_from_its_part_file(
        tmp_path: Path, procs: list[NodeProcess], closed_port: int) -> None:
    fp = load_faultproxy()
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_id, b_id = init(a_dir), init(b_dir)
    big = make_dicom(tmp_path / "big.dcm", sop=uid(5, 1), study=uid(5), series=uid(5, 0),
                     pixel_bytes=110 * MB, seed=5)
    size = big.stat().st_size
    b = LocalNode(b_dir)
    import_files(b, big)
    (blob,) = blob_set(b)
    cli("peer", "add", a_id, f"https://127.0.0.1:{closed_port}", "--cert", a_dir / "node.crt",
        "--push", "never", data=b_dir)
    _, b_port = start(procs, b_dir)
    config = fp.FaultConfig(rate_down=40 * MB)  # ~3 s for the blob: the kill lands inside
    with fp.ThreadedFaultProxy(("127.0.0.1", b_port), config=config) as proxy:
        cli("peer", "add", b_id, f"https://127.0.0.1:{proxy.port}", "--push", "never",
            data=a_dir)
        a = LocalNode(a_dir)
        part = a.store.part_path(blob)
        first, _ = start(procs, a_dir)
        poll(lambda: part.exists() and part.stat().st_size >= 30 * MB, 30,
             "A's .part file to reach 30 MB")
        first.kill()  # SIGKILL to the process group
        held = part.stat().st_size
        down_at_kill = proxy.snapshot()["bytes_down"]
        assert 30 * MB <= held < size and not a.store.has(blob)

        start(procs, a_dir)
        poll(lambda: root(a) == root(b) and a.store.has(blob), 60,
             "A to finish the blob after its restart")
        state = settled_state_sync(a, b)
        down_total = proxy.snapshot()["bytes_down"]
    resumed = state["bytes_resumed"]
    print(f"\nrestart: blob {size / MB:.0f} MB, .part at kill {held / MB:.1f} MB, resumed from "
          f"{resumed / MB:.1f} MB; proxy forwarded {down_at_kill / MB:.1f} MB before the kill, "
          f"{down_total / MB:.1f} MB in all ({down_total / size:.2f}x the blob)")
    assert resumed > 0 and resumed % CHUNK_SIZE == 0
    assert resumed >= held - CHUNK_SIZE  # only the unverified tail of the file is dropped
    assert state["bytes_received"] <= size - resumed + CHUNK_SIZE
    assert down_total < 1.2 * size
    assert not part.exists()
    assert_blobs_intact(a)
    assert cli_json("verify", data=a_dir)["ok"] is True
    assert live_view(a) == live_view(b)


# ----------------------------------------------------------------------------------------
# Push: only A can dial


@pytest.mark.timeout(90)
def test_one_way_reachability_converges_by_push(
        tmp_path: Path, procs: list[NodeProcess], closed_port: int) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_id, b_id = init(a_dir), init(b_dir)
    a, b = LocalNode(a_dir), LocalNode(b_dir)
    study = uid(6)

    def f(n: int, size: int) -> Path:
        return make_dicom(tmp_path / f"f{n}.dcm", sop=uid(6, 0, n), study=study,
                          series=uid(6, 0), pixel_bytes=size, seed=n)

    import_files(a, f(1, 3 * MB), f(2, 5000), f(3, 5000))
    import_files(b, f(4, 2 * MB), f(5, 5000))
    a.delete_instances([uid(6, 0, 3)])  # a tombstone that must travel by push too
    # B cannot reach A: A's address is a closed port; B trusts A's certificate from its file.
    cli("peer", "add", a_id, f"https://127.0.0.1:{closed_port}", "--cert", a_dir / "node.crt",
        data=b_dir)
    _, b_port = start(procs, b_dir)
    cli("peer", "add", b_id, f"https://127.0.0.1:{b_port}", data=a_dir)  # fetches B's cert
    start(procs, a_dir)

    def converged() -> bool:
        return root(a) == root(b) and blob_set(a) == blob_set(b) and len(live_view(b)) == 4

    poll(converged, 45, "A and B to converge with only A dialling", step=0.2)
    views = [cli_json("ls", data=d) for d in (a_dir, b_dir)]
    assert views[0] == views[1]
    assert sorted(r["sop_instance_uid"] for r in views[0]) == sorted(
        uid(6, 0, n) for n in (1, 2, 4, 5))
    for n in (a, b):
        assert blob_set(n) == n.catalog.referenced_blobs()
        assert_blobs_intact(n)
    a_view_of_b = settled_state_sync(a, b)
    b_view_of_a = peer_state(b, a)
    assert a_view_of_b["events_sent"] >= 3 and a_view_of_b["bytes_sent"] >= 3 * MB
    assert a_view_of_b["bytes_received"] >= 2 * MB  # and pulled B's content
    # B never completed a round with A: everything came over A's connections.
    assert b_view_of_a["state"] == "unreachable" and b_view_of_a["last_success"] == 0
    assert b_view_of_a["bytes_pulled"] == 0 and b_view_of_a["events_received"] == 0
    # what B's status counts as received from A is what A pushed (to B's peer server)
    assert b_view_of_a["bytes_received"] == b_view_of_a["bytes_pushed_in"] >= 3 * MB
    status = cli_json("status", data=b_dir)
    assert status["peers"][0]["last_error"], status
