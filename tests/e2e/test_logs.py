"""Logs: one structured line per event (JSON or key=value), UIDs and hashes, never PHI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncnode.demo import make_study
from syncnode.local import LocalNode

pytestmark = pytest.mark.e2e
PHI = ("DEMO^PHANTOM", "DEMO0001", "PHANTOM")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncnode.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("fmt", ["json", "kv"])
def test_sync_logs_are_structured_and_free_of_patient_data(tmp_path: Path, fmt: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    nodes = [LocalNode.init(d) for d in (a, b)]
    for x, y in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
        x.trust.pin(y.identity.cert_pem, y.node_id)
    for n in nodes:
        n.close()
    make_study(tmp_path / "study", images=4, size=64)
    assert cli("import", "--data", str(a), str(tmp_path / "study")).returncode == 0
    procs = []
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        for d, log in zip((a, b), logs, strict=True):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "syncnode.cli", "run", "--data", str(d),
                 "--peer-host", "127.0.0.1", "--peer-port", "0", "--api-port", "0",
                 "--dicom-port", "0", "--sync-interval", "0.3", "--log-format", fmt,
                 "--log-level", "debug"],
                stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True))
        ports = {}
        deadline = time.monotonic() + 20
        while len(ports) < 2 and time.monotonic() < deadline:
            for d in (a, b):
                if (d / "ports.json").exists():
                    ports[d] = json.loads((d / "ports.json").read_text())
            time.sleep(0.1)
        assert len(ports) == 2
        ids = [cli("id", "--data", str(d)).stdout.strip() for d in (a, b)]
        assert cli("peer", "add", "--data", str(b), ids[0],
                   f"https://127.0.0.1:{ports[a]['peer']}").returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = json.loads(cli("status", "--data", str(b), "--json").stdout)
            if st["instances"] == 4:
                break
            time.sleep(0.3)
        assert st["instances"] == 4
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)
    text = logs[1].read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any("sync round with" in line for line in lines), text
    for line in lines:
        if fmt == "json":
            rec = json.loads(line)
            assert {"ts", "level", "logger", "event"} <= set(rec)
        else:
            assert line.startswith("ts=") and " level=" in line and " event=" in line
    for log in logs:
        content = log.read_text()
        for phi in PHI:
            assert phi not in content
