"""`syncnode demo`: exits 0 by itself once its three nodes converge, nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_exits_0_by_itself_once_converged_and_cleans_up() -> None:
    # no --duration: README's first command must end on its own, without an operator
    proc = subprocess.Popen([sys.executable, "-m", "syncnode.cli", "demo", "--timeout", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert "all three nodes hold the same catalog" in out
    assert "demo finished: converged" in out
    assert "Ctrl-C stops" not in out  # it did not wait for an operator
    workdir = re.search(r"three nodes on loopback in (\S+)", out)
    assert workdir and not Path(workdir.group(1)).exists()
    # nothing of the demo's process group survives it
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
