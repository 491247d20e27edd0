"""LAN discovery between two nodes in two network namespaces joined by a veth pair.

Real multicast over a real (virtual) link: each node runs `syncnode run --discovery` in its
own namespace; each must see the other within 10 s, as untrusted, and accepting it through
the admin API must make them sync. The test creates the namespaces as root and removes
them afterwards; no traffic leaves them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 to create network namespaces"),
]

SUBNET = "10.231.77"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def in_ns(ns: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    ns = (f"sn{tag}a", f"sn{tag}b")
    veth = (f"vsn{tag}a", f"vsn{tag}b")
    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i, (n, v) in enumerate(zip(ns, veth, strict=True)):
            sh("ip", "link", "set", v, "netns", n)
            sh("ip", "netns", "exec", n, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", v)
            sh("ip", "netns", "exec", n, "ip", "link", "set", v, "up", "multicast", "on")
            sh("ip", "netns", "exec", n, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=20)


def syncnode(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncnode.cli", *args]


def test_nodes_discover_each_other_and_sync_after_accept(namespaces: tuple[str, str],
                                                        tmp_path: Path) -> None:
    data = [tmp_path / "a", tmp_path / "b"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        keys = []  # the read and admin API keys of each node, shown once by init
        for d in data:
            init = subprocess.run(syncnode("init", "--data", str(d), "--json"), check=True,
                                  capture_output=True, text=True, timeout=60)
            keys.append(json.loads(init.stdout)["api_keys"])
        src = Path(__import__("pydicom").__file__).parent / "data" / "test_files" / "CT_small.dcm"
        subprocess.run(syncnode("import", "--data", str(data[0]), str(src)), check=True,
                       capture_output=True, timeout=60)
        ids = [subprocess.run(syncnode("id", "--data", str(d)), check=True, text=True,
                              capture_output=True, timeout=60).stdout.strip() for d in data]
        for ns, d in zip(namespaces, data, strict=True):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, *syncnode(
                    "run", "--data", str(d), "--discovery", "--peer-port", "8443",
                    "--api-port", "8080", "--dicom-port", "0", "--sync-interval", "0.5")],
                stdout=subprocess.DEVNULL, stderr=open(d / "run.log", "wb"),
                start_new_session=True))

        def discovered(ns: str) -> list[dict[str, object]]:
            r = in_ns(ns, "curl", "-s", "--max-time", "2", "-H",
                      f"X-API-Key: {keys[namespaces.index(ns)]['read']}",
                      "http://127.0.0.1:8080/api/v1/discovered")
            return json.loads(r.stdout) if r.returncode == 0 and r.stdout else []

        deadline = time.monotonic() + 10
        seen: list[list[dict[str, object]]] = [[], []]
        while time.monotonic() < deadline and not all(seen):
            seen = [discovered(ns) for ns in namespaces]
            time.sleep(0.25)
        assert [s[0]["node_id"] if s else None for s in seen] == [ids[1], ids[0]], (
            seen, (data[0] / "run.log").read_text()[-2000:])
        assert seen[0][0]["url"] == f"https://{SUBNET}.2:8443"
        assert seen[1][0]["url"] == f"https://{SUBNET}.1:8443"

        # untrusted until accepted; the CLI sees the same list
        st_b = json.loads(subprocess.run(syncnode("status", "--data", str(data[1]), "--json"),
                                         capture_output=True, text=True, timeout=60).stdout)
        assert [d["node_id"] for d in st_b["discovered"]] == [ids[0]]
        assert st_b["peers"] == [] and st_b["instances"] == 0
        # A accepts B through the admin API, B accepts A with the CLI (run inside B's
        # namespace, so the certificate is fetched over the veth link)
        r = in_ns(namespaces[0], "curl", "-s", "-X", "POST", "-H",
                  f"X-API-Key: {keys[0]['admin']}",
                  f"http://127.0.0.1:8080/api/v1/discovered/{ids[1]}/accept")
        assert '"pinned": true' in r.stdout, r.stdout
        r = in_ns(namespaces[1], *syncnode("peer", "accept", "--data", str(data[1]), ids[0]),
                  timeout=60)
        assert r.returncode == 0 and f"https://{SUBNET}.1:8443" in r.stdout, r.stdout + r.stderr
        deadline = time.monotonic() + 20
        roots: list[str] = []
        while time.monotonic() < deadline:
            roots = []
            for ns, key in zip(namespaces, keys, strict=True):
                r = in_ns(ns, "curl", "-s", "--max-time", "2", "-H", f"X-API-Key: {key['read']}",
                          "http://127.0.0.1:8080/api/v1/status")
                roots.append(json.loads(r.stdout)["merkle_root"] if r.stdout else "")
            if roots[0] and roots[0] == roots[1]:
                break
            time.sleep(0.5)
        assert roots[0] == roots[1] and roots[0] != "0" * 64
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


AVAHI_TOOLS = ("avahi-daemon", "avahi-browse", "dbus-daemon")


@pytest.mark.skipif(any(shutil.which(t) is None for t in AVAHI_TOOLS),
                    reason="avahi-utils, avahi-daemon and dbus are needed")
def test_advertisement_is_visible_to_avahi(namespaces: tuple[str, str], tmp_path: Path) -> None:
    """An independent mDNS implementation (Avahi) in the other namespace sees the node."""
    data = tmp_path / "a"
    subprocess.run(syncnode("init", "--data", str(data)), check=True, capture_output=True,
                   timeout=60)
    node_id = subprocess.run(syncnode("id", "--data", str(data), "--json"), check=True,
                             text=True, capture_output=True, timeout=60).stdout
    compact = json.loads(node_id)["node_id"].replace("-", "")
    bus = tmp_path / "bus"
    (tmp_path / "bus.conf").write_text(f"""<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={bus}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/>
<allow eavesdrop="true"/><allow own="*"/><allow user="*"/></policy></busconfig>
""")
    veth_b = in_ns(namespaces[1], "ip", "-o", "link", "show", "type", "veth").stdout
    iface = veth_b.split(":")[1].strip().split("@")[0]
    (tmp_path / "avahi.conf").write_text(
        f"[server]\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces={iface}\nenable-dbus=yes\n"
        "[publish]\ndisable-publishing=yes\n")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(["dbus-daemon", "--config-file", str(tmp_path / "bus.conf"),
                                       "--nofork"], start_new_session=True))
        deadline = time.monotonic() + 5
        while not bus.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", namespaces[1], "avahi-daemon", "-f",
             str(tmp_path / "avahi.conf"), "--no-drop-root", "--no-chroot", "--no-rlimits"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", namespaces[0], *syncnode(
                "run", "--data", str(data), "--discovery", "--peer-port", "8443",
                "--api-port", "8080", "--dicom-port", "0")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 15
        found = ""
        while time.monotonic() < deadline and compact not in found:
            r = subprocess.run(["avahi-browse", "-rpt", "_syncnode._tcp"], env=env, text=True,
                               capture_output=True, timeout=10)
            found = r.stdout
            time.sleep(0.5)
        resolved = [line for line in found.splitlines() if line.startswith("=")]
        assert any(f"{SUBNET}.1;8443;" in line and f"id={compact}" in line
                   for line in resolved), found
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
