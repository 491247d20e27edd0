"""DICOM TLS (PS3.15 B.1) on the SCP, with DCMTK's echoscu/storescu ``+tls`` as clients.

The SCP presents the node's own certificate; with ``dicom_tls_clients`` a client must
present a certificate issued by one of those CAs. Shown with real TLS:

- a trusted client (``+tls key cert +cf node.crt``) echoes and stores; the stored bytes
  are the sent data sets;
- plain DICOM on the TLS port, and a client whose certificate comes from another CA, are
  refused (counted as ``tls_failed``);
- the TLS handshake is part of the ARTIM deadline and runs off the accept thread: 50 idle
  sockets on the TLS port do not delay a trusted client;
- ``dicom_tls = true`` in the settings reaches the SCP through the bridge, and an
  unreadable ``dicom_tls_clients`` file is a configuration error naming the key.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode import config as cfg
from syncnode.dicom.scp import DicomServer
from syncnode.dicom.service import DicomBridge
from syncnode.dicom.transport import DicomTLSError, Perimeter, dicom_tls_context
from syncnode.local import LocalNode


def client_files(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA of its own and a client certificate from it: (ca.pem, client.key, client.crt)."""
    ca = trustme.CA()
    cert = ca.issue_cert(f"{name}.example")
    paths = (tmp_path / f"{name}-ca.pem", tmp_path / f"{name}.key", tmp_path / f"{name}.crt")
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    cert.cert_chain_pems[0].write_to_path(str(paths[2]))
    return paths


@pytest.fixture
def tls_scp(node: LocalNode, tmp_path: Path) -> Iterator[tuple[DicomServer, Path, Path]]:
    ca, key, crt = client_files(tmp_path, "modality")
    ctx = dicom_tls_context(node.identity.cert_path, node.identity.key_path, ca)
    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                         ssl_context=ctx, perimeter=Perimeter(artim_timeout=5.0))
    server.start()
    yield server, key, crt
    server.stop()


def tls_args(node: LocalNode, key: Path, crt: Path) -> list[str]:
    return ["+tls", str(key), str(crt), "+cf", str(node.identity.cert_path)]


def echo(port: int, *extra: str) -> tuple[int, float]:
    started = time.monotonic()
    proc = kit.run_tool([kit.dcmtk("echoscu"), "-aec", "SYNCNODE", "-to", "5", "-ta", "5",
                         *extra, "127.0.0.1", str(port)], timeout=30, check=False)
    return proc.returncode, time.monotonic() - started


def test_trusted_client_echoes_and_stores(tls_scp: tuple[DicomServer, Path, Path],
                                          node: LocalNode, tmp_path: Path) -> None:
    scp, key, crt = tls_scp
    assert echo(scp.port, *tls_args(node, key, crt))[0] == 0
    study = kit.make_study(tmp_path / "study", 3)
    kit.run_tool([kit.dcmtk("storescu"), "-aec", "SYNCNODE", *tls_args(node, key, crt),
                  "127.0.0.1", str(scp.port), *map(str, study.files)], timeout=60)
    assert scp.wait_applied()
    live = {i.sop_instance_uid: i for i in node.catalog.instances()}
    assert set(live) == set(study.sop_uids)
    for f in study.files:
        _cls, sop, _ts, data = kit.file_item(f)
        stored = node.store.path(live[sop].blob).read_bytes()
        assert kit.dataset_bytes(stored) == data
    assert scp.refused_connections()["tls_failed"] == 0


def test_plain_and_untrusted_clients_are_refused(tls_scp: tuple[DicomServer, Path, Path],
                                                 node: LocalNode, tmp_path: Path) -> None:
    scp, _key, _crt = tls_scp
    assert echo(scp.port)[0] != 0  # plain DICOM on the TLS port
    _ca, other_key, other_crt = client_files(tmp_path, "stranger")
    assert echo(scp.port, *tls_args(node, other_key, other_crt))[0] != 0
    # (the client may give up before the server's thread has counted its refusal)
    deadline = time.monotonic() + 5
    while scp.refused_connections()["tls_failed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scp.refused_connections()["tls_failed"] == 2
    assert node.catalog.counts()["instances"] == 0


def test_idle_sockets_do_not_delay_a_tls_client(tls_scp: tuple[DicomServer, Path, Path],
                                                node: LocalNode) -> None:
    scp, key, crt = tls_scp
    with ExitStack() as stack:
        for i in range(50):
            s = stack.enter_context(socket.socket())
            s.bind((f"127.0.3.{1 + i // 8}", 0))
            s.connect(("127.0.0.1", scp.port))
        time.sleep(0.2)
        code, took = echo(scp.port, *tls_args(node, key, crt))
        assert code == 0 and took < 2.0, took


def test_settings_reach_the_scp(node: LocalNode, tmp_path: Path) -> None:
    ca, key, crt = client_files(tmp_path, "modality")
    settings = cfg.load(node.data, dicom_port=0, dicom_host="127.0.0.1", dicom_tls=True,
                        dicom_tls_clients=str(ca))
    bridge = DicomBridge(node, settings)
    port = bridge.start()
    try:
        assert bridge.status()["tls"] is True
        assert echo(port, *tls_args(node, key, crt))[0] == 0
        assert echo(port)[0] != 0
    finally:
        bridge.stop()
    missing = cfg.load(node.data, dicom_tls=True, dicom_tls_clients=str(tmp_path / "nope.pem"))
    with pytest.raises(DicomTLSError, match="dicom_tls_clients"):
        DicomBridge(node, missing)


def test_run_refuses_a_bad_client_ca_file_in_its_log_format(node: LocalNode,
                                                             tmp_path: Path) -> None:
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    env.update(SYNCNODE_DICOM_TLS="true", SYNCNODE_DICOM_TLS_CLIENTS=str(tmp_path / "no.pem"))
    node.close()
    proc = subprocess.run(
        [sys.executable, "-m", "syncnode.cli", "run", "--data", str(node.data),
         "--dicom-port", "0", "--peer-port", "0", "--peer-host", "127.0.0.1",
         "--api-port", "0", "--no-discovery", "--log-format", "json", "--duration", "20"],
        capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # JSON lines only
    fatal = [r for r in records if r["level"] == "critical"]
    assert len(fatal) == 1 and "dicom_tls_clients" in fatal[0]["event"], records
