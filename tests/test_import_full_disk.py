"""``syncnode import`` on a full disk: a reason per file, no traceback, nothing half-done.

The data folder lives on a small tmpfs the test mounts (root only) and unmounts. Files that
fit are imported; every other file is listed as not imported for lack of space; the node
verifies clean; after the filesystem is grown the same command imports the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from syncsupport import run_cli as cli

from syncnode.demo import make_study

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)


def test_import_on_a_full_disk_reports_each_file(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "node"
    assert cli("init", "--data", str(data)).returncode == 0
    study = tmp_path / "study"
    make_study(study, images=12, size=512)  # 12 x ~525 KB: about twice what fits
    files = sorted(str(p) for p in study.iterdir())

    first = cli("import", "--data", str(data), "--json", str(study))
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr and "Traceback" not in first.stdout
    report = json.loads(first.stdout)
    failed = {f["path"]: f["reason"] for f in report["failed"]}
    assert failed, "the disk did not fill up: nothing to test"
    assert report["imported"] >= 1 and report["imported"] + len(failed) == len(files)
    assert set(failed) <= set(files)
    assert all("no space left" in reason for reason in failed.values()), failed

    text = cli("import", "--data", str(data), str(study))  # the human-readable form
    assert text.returncode == 1 and "Traceback" not in text.stderr + text.stdout
    for path in failed:
        assert f"FAILED {path}: not imported: no space left" in text.stdout, text.stdout

    listed = json.loads(cli("ls", "--data", str(data), "--json").stdout)
    assert len(listed) == report["imported"]
    assert cli("verify", "--data", str(data)).returncode == 0

    # more space: the same command imports the rest
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True, timeout=30)
    again = cli("import", "--data", str(data), "--json", str(study))
    assert again.returncode == 0, again.stdout + again.stderr
    after = json.loads(again.stdout)
    assert after["failed"] == [] and after["imported"] == len(failed)
    assert len(json.loads(cli("ls", "--data", str(data), "--json").stdout)) == len(files)
    assert cli("verify", "--data", str(data)).returncode == 0
