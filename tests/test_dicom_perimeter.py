"""The DICOM SCP's perimeter: strangers who connect and say nothing cannot block it.

A real SCP on loopback, real sockets, DCMTK's ``echoscu`` as the legitimate client:

- 200 idle TCP connections (no A-ASSOCIATE-RQ) do not count toward the association
  limit: a C-ECHO from an allowed AE succeeds within 2 s while they are open, and the
  node closes every one of them after the ARTIM timeout (not before).
- Per source address at most ``per_address`` connections wait to associate; more evict
  the oldest at once, so a client behind the same address still associates.
- A first PDU that is not an A-ASSOCIATE-RQ, or one announcing more than the cap, is
  answered by A-ABORT and the connection closed; a request trickled byte by byte is cut
  at the ARTIM deadline however slowly it arrives.

Loopback sources 127.0.1.x stand for distinct hosts (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.dicom.scp import DicomServer
from syncnode.dicom.transport import Perimeter
from syncnode.local import LocalNode

ARTIM = 3.0


def make_scp(node: LocalNode, **perimeter: float) -> DicomServer:
    server = DicomServer(node, ae_title="SYNCNODE", host="0.0.0.0", port=0,
                         allowed_aes=["ECHOER"], max_associations=16,
                         perimeter=Perimeter(**{"artim_timeout": ARTIM, **perimeter}))
    server.start()
    return server


def idle_socket(stack: ExitStack, port: int, source: str) -> socket.socket:
    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def is_closed_by_peer(s: socket.socket) -> bool:
    """True once the node has closed the connection (EOF or reset), without blocking."""
    readable, _, _ = select.select([s], [], [], 0)
    if not readable:
        return False
    try:
        return s.recv(4096, socket.MSG_DONTWAIT) == b"" or True
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def dcmtk_echo(port: int, calling: str = "ECHOER") -> tuple[int, float, str]:
    started = time.monotonic()
    proc = subprocess.run([kit.dcmtk("echoscu"), "-aet", calling, "-aec", "SYNCNODE",
                           "-to", "5", "-ta", "5", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=kit.tool_env())
    return proc.returncode, time.monotonic() - started, proc.stdout + proc.stderr


def wait_until(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_200_idle_sockets_do_not_block_an_allowed_echo(node: LocalNode) -> None:
    scp = make_scp(node, per_address=8, total=256)
    try:
        with ExitStack() as stack:
            # 25 "hosts" x 8 connections: all 200 stay pending (within both limits)
            opened = time.monotonic()
            idle = [idle_socket(stack, scp.port, f"127.0.1.{1 + i // 8}") for i in range(200)]
            time.sleep(0.3)  # let the server accept them all
            assert not any(is_closed_by_peer(s) for s in idle)

            code, took, out = dcmtk_echo(scp.port)
            assert code == 0, out
            assert took < 2.0, f"C-ECHO took {took:.2f} s with 200 idle sockets open"
            # a stranger's AE is still refused
            code, _took, _out = dcmtk_echo(scp.port, calling="STRANGER")
            assert code != 0

            # none is closed before the ARTIM timeout, all are closed after it
            early = ARTIM - 0.7 - (time.monotonic() - opened)
            if early > 0:
                time.sleep(early)
                assert not any(is_closed_by_peer(s) for s in idle)
            assert wait_until(lambda: all(is_closed_by_peer(s) for s in idle), ARTIM + 5), \
                f"{sum(not is_closed_by_peer(s) for s in idle)} idle sockets still open"
            assert time.monotonic() - opened >= ARTIM - 0.1
        refused = scp.refused_connections()
        assert refused["artim_expired"] == 200, refused
        assert refused["evicted"] == 0
        # the echo still works once the strangers are gone
        assert dcmtk_echo(scp.port)[0] == 0
    finally:
        scp.stop()


def test_per_address_limit_evicts_the_oldest(node: LocalNode) -> None:
    scp = make_scp(node, per_address=4, total=256, artim_timeout=30.0)
    try:
        with ExitStack() as stack:
            idle = [idle_socket(stack, scp.port, "127.0.1.50") for _ in range(20)]
            # the 16 oldest are closed at once (not after 30 s), the newest 4 wait
            assert wait_until(lambda: all(is_closed_by_peer(s) for s in idle[:16]), 3.0)
            assert not any(is_closed_by_peer(s) for s in idle[16:])
            # (counted by each victim's own thread, just after its socket was shut)
            assert wait_until(lambda: scp.refused_connections()["evicted"] == 16, 3.0), \
                scp.refused_connections()
            # a client from the same address still associates (evicting the oldest)
            from pynetdicom import AE
            ae = AE("ECHOER")
            ae.add_requested_context("1.2.840.10008.1.1")
            ae.acse_timeout = ae.network_timeout = 5
            started = time.monotonic()
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="SYNCNODE",
                                 bind_address=("127.0.1.50", 0))
            assert assoc.is_established
            assert int(assoc.send_c_echo().Status) == 0
            assoc.release()
            assert time.monotonic() - started < 2.0
            assert wait_until(lambda: is_closed_by_peer(idle[16]), 3.0)
    finally:
        scp.stop()


def test_total_limit_evicts_the_oldest(node: LocalNode) -> None:
    scp = make_scp(node, per_address=8, total=16, artim_timeout=30.0)
    try:
        with ExitStack() as stack:
            idle = [idle_socket(stack, scp.port, f"127.0.2.{1 + i}") for i in range(40)]
            assert wait_until(lambda: all(is_closed_by_peer(s) for s in idle[:24]), 3.0)
            assert not any(is_closed_by_peer(s) for s in idle[24:])
            code, took, out = dcmtk_echo(scp.port)
            assert code == 0 and took < 2.0, out
    finally:
        scp.stop()


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_a_first_pdu_other_than_associate_rq_is_aborted(node: LocalNode) -> None:
    scp = make_scp(node)
    try:
        with ExitStack() as stack:
            s = idle_socket(stack, scp.port, "127.0.0.1")
            s.sendall(struct.pack(">BBL", 0x04, 0, 6) + b"\0" * 6)  # a P-DATA-TF first
            answer = _read_all(s, 2.0)
            assert answer[:1] == b"\x07"  # A-ABORT, then closed
            s2 = idle_socket(stack, scp.port, "127.0.0.1")
            s2.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))  # ~4 GiB A-ASSOCIATE-RQ
            assert _read_all(s2, 2.0)[:1] == b"\x07"
        assert scp.refused_connections()["not_association"] == 2
        assert dcmtk_echo(scp.port)[0] == 0
    finally:
        scp.stop()


def test_a_trickled_request_is_cut_at_the_artim_deadline(node: LocalNode) -> None:
    scp = make_scp(node, artim_timeout=2.0)
    try:
        with ExitStack() as stack:
            s = idle_socket(stack, scp.port, "127.0.0.1")
            started = time.monotonic()
            header = struct.pack(">BBL", 0x01, 0, 200)
            closed_at = None
            for i in range(40):  # one byte every 0.25 s: never whole within 2 s
                try:
                    s.send((header + b"\0" * 200)[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    closed_at = time.monotonic()
                    break
                if is_closed_by_peer(s):
                    closed_at = time.monotonic()
                    break
                time.sleep(0.25)
            assert closed_at is not None, "the trickling connection was never closed"
            assert 1.8 <= closed_at - started <= 3.5
        assert scp.refused_connections()["artim_expired"] == 1
    finally:
        scp.stop()


def test_init_prints_how_to_set_allowed_aes(tmp_path: Path) -> None:
    import os
    import shutil

    from syncnode import config as cfg

    exe = shutil.which("syncnode")
    if exe is None:
        pytest.skip("the syncnode script is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    data = tmp_path / "new node"
    out = subprocess.run([exe, "init", "--data", str(data)], capture_output=True, text=True,
                         env={**env, "NO_COLOR": "1", "COLUMNS": "200"}, check=True,
                         timeout=60).stdout
    assert cfg.load(data).allowed_aes == []  # the documented default: any calling AE
    command = next(line.strip() for line in out.splitlines() if "allowed_aes =" in line)
    subprocess.run(["bash", "-c", command], check=True, timeout=10)  # as printed
    assert cfg.load(data).allowed_aes == ["MODALITY1", "PACS@10.0.0.5"]
