"""``syncnode run`` refuses to run half a node, and ``syncnode demo`` ends by itself.

A DICOM port already taken by another program makes ``run`` exit 2 with a message naming
the port and the setting (it used to log and keep running without its SCP); the demo gives
up with exit 1 at its timeout (that it exits 0 by itself once converged, with no
``--duration``, is shown by ``tests/e2e/test_demo.py``).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from syncsupport import run_cli as cli


def test_taken_dicom_port_exits_2(tmp_path: Path) -> None:
    data = tmp_path / "node"
    assert cli("init", "--data", data).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = cli("run", "--data", data, "--dicom-port", str(port), "--peer-port", "0",
                   "--peer-host", "127.0.0.1", "--api-port", "0", "--no-discovery",
                   "--duration", "30")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert time.monotonic() - started < 25  # it stopped at once, not at --duration
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "DICOM SCP cannot listen on" in text and f":{port}: " in text, text
    assert "--dicom-port" in text
    # what had started was stopped: the data folder can be run again at once
    again = cli("run", "--data", data, "--dicom-port", "0", "--peer-port", "0",
                "--peer-host", "127.0.0.1", "--api-port", "0", "--no-discovery",
                "--duration", "1")
    assert again.returncode == 0, (again.stdout, again.stderr)


def test_demo_gives_up_with_exit_1_at_its_timeout() -> None:
    proc = cli("demo", "--timeout", "0", timeout=120)  # no time at all: never converged
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "demo finished: did NOT converge" in proc.stdout
