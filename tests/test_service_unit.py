"""The systemd unit and systemd's notify protocol, with the real tools.

- ``packaging/syncnode.service`` is the template rendered with its defaults, carries the
  hardening the README promises and passes ``systemd-analyze verify`` with no warning;
  so does the unit ``syncnode service install`` writes.
- ``syncnode run`` sends ``READY=1`` (after its listeners are bound), ``WATCHDOG=1``
  pings and ``STOPPING=1`` to a real unix datagram socket named by ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from syncsupport import run_cli as cli

from syncnode.unitfile import DEFAULT_BIN, UnitError, render

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "packaging" / "syncnode.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze is absent (Debian package systemd)")


def settings_of(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_shipped_unit_is_the_rendered_template() -> None:
    assert SHIPPED.read_text() == render()


def test_unit_is_hardened() -> None:
    s = settings_of(render("/opt/sn/bin/syncnode", "pacsync", "/srv/pacsync"))
    assert s["ExecStart"] == ["/opt/sn/bin/syncnode run --data /srv/pacsync"]
    assert s["User"] == ["pacsync"] and s["Group"] == ["pacsync"]
    assert s["Type"] == ["notify"] and s["WatchdogSec"] == ["60s"]
    assert s["Restart"] == ["on-failure"]
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == ["/srv/pacsync"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert s["CapabilityBoundingSet"] == [""]
    assert s["StandardError"] == ["journal"]


@pytest.mark.parametrize("args", [("relative/syncnode", "u", "/d"), ("/b", "u", "data"),
                                  ("/b", "u", "/my data"), ("/b", "bad user", "/d")])
def test_bad_paths_are_refused(args: tuple[str, str, str]) -> None:
    with pytest.raises(UnitError):
        render(*args)


@needs_analyze
def test_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this machine's python
    unit = tmp_path / "syncnode.service"
    unit.write_text(SHIPPED.read_text().replace(DEFAULT_BIN, sys.executable))
    proc = verify(unit)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr
    # and it does complain about a broken one (the check can fail)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    assert "ProtectSystem" in verify(unit).stderr or "protect system" in verify(unit).stderr


@needs_analyze
def test_service_install_writes_a_unit_that_verifies(tmp_path: Path) -> None:
    units = tmp_path / "units"
    proc = cli("service", "install", "--user", "pacsync", "--data", tmp_path / "data",
               "--unit-dir", units, "--executable", sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert "systemctl daemon-reload" in proc.stdout and "useradd" in proc.stdout
    text = (units / "syncnode.service").read_text()
    assert f"ReadWritePaths={tmp_path / 'data'}" in text
    checked = verify(units / "syncnode.service")
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    bad = cli("service", "install", "--data", tmp_path / "my data", "--unit-dir", units)
    assert bad.returncode == 2 and "absolute path" in bad.stderr


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="sn-notify-")  # short: unix socket paths are <108 bytes
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_run_tells_systemd_ready_watchdog_and_stopping(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    data = tmp_path / "node"
    assert cli("init", "--data", data).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncnode.cli", "run", "--data", str(data), "--peer-port", "0",
         "--peer-host", "127.0.0.1", "--api-port", "0", "--dicom-port", "0",
         "--no-discovery", "--duration", "3"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")},
             "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    received: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                m.startswith("STOPPING=1") for _, m in received):
            try:
                received.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                if proc.poll() is not None:
                    break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    messages = [m for _, m in received]
    ready = [i for i, m in enumerate(messages) if m.startswith("READY=1")]
    assert len(ready) == 1, messages
    # READY only once the listeners are bound: the ports file exists by then
    assert "STATUS=node " in messages[ready[0]] and "peer=" in messages[ready[0]]
    pings = [i for i, m in enumerate(messages) if m == "WATCHDOG=1"]
    assert len(pings) >= 5, messages  # every 0.2 s for 3 s after READY: ~15
    assert messages[-1] == "STOPPING=1", messages
    assert proc.returncode == 0, proc.stderr


def test_without_notify_socket_nothing_is_sent() -> None:
    from syncnode import sdnotify

    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) \
        is None
