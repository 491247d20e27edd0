"""`syncnode demo --duration 20`: exit 0, all three nodes converged, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_converges_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "syncnode.cli", "demo", "--duration", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert "all three nodes hold the same catalog" in out
    assert "demo finished: converged" in out
    workdir = re.search(r"three nodes on loopback in (\S+)", out)
    assert workdir and not Path(workdir.group(1)).exists()
    # nothing of the demo's process group survives it
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
