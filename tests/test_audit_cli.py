"""``syncnode audit`` and the CLI actions it records, through the installed console script:
each action writes exactly one entry naming the CLI user; ``audit verify`` exits 0 on an
intact trail and 1, naming the entry, after one byte of it changed."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

SYNCNODE = shutil.which("syncnode")
CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
pytestmark = pytest.mark.skipif(SYNCNODE is None, reason="the syncnode script is not installed")


def run(*args: object, check: int = 0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    env["NO_COLOR"] = "1"
    proc = subprocess.run([SYNCNODE, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == check, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def entries(data: Path, *extra: str) -> list[dict[str, object]]:
    return json.loads(run("audit", "--data", data, "--json", *extra).stdout)


def test_cli_actions_each_write_one_entry(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run("init", "--data", a)
    b_id = run("init", "--data", b, "--json").stdout
    b_id = json.loads(b_id)["node_id"]
    compact = b_id.replace("-", "")
    actor = "cli:" + getpass.getuser()
    study = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
    sop = str(pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
    assert entries(a) == []

    run("import", "--data", a, CT, tmp_path / "a" / "node.crt", check=1)  # one file refused
    run("peer", "add", b_id, "https://127.0.0.1:9", "--cert", b / "node.crt", "--data", a)
    run("rm", sop, "--data", a)
    run("rm", sop, "--data", a, check=1)  # nothing left to delete: nothing recorded
    run("peer", "remove", b_id, "--data", a)
    run("config", "set", "sync_interval", "2.5", "--data", a)
    run("config", "set", "sync_interval", "-1", "--data", a, check=2)  # refused: no entry

    got = entries(a)
    assert [e["action"] for e in got] == ["import", "trust-add", "deleted", "trust-remove",
                                          "config-changed"]
    assert {e["actor"] for e in got} == {actor}
    imp, add, rm, remove, config = got
    assert config["subject"] == "sync_interval" and "2.5" not in json.dumps(config)
    assert (imp["files"], imp["instances"], imp["failed"], imp["studies"]) == (2, 1, 1, [study])
    assert add["subject"] == compact and add["url"] == "https://127.0.0.1:9"
    assert rm["studies"] == [study] and rm["sops"] == [sop] and rm["instances"] == 1
    assert remove["subject"] == compact
    assert [e["action"] for e in entries(a, "--action", "deleted")] == ["deleted"]
    assert [e["seq"] for e in entries(a, "--since", "3")] == [3, 4, 5]
    text = run("audit", "--data", a).stdout
    assert "trust-remove" in text and actor in text
    # Patient data never reaches the trail (CT_small's patient name and id).
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    raw = (a / "audit" / "audit.log").read_text()
    assert str(ds.PatientName) not in raw and str(ds.PatientID) not in raw

    ok = run("audit", "verify", "--data", a)
    assert ok.stdout.startswith("OK: 5 entries")
    log = a / "audit" / "audit.log"
    data = bytearray(log.read_bytes())
    second_line = data.index(b"\n") + 1
    data[second_line + 40] ^= 0x02
    log.write_bytes(bytes(data))
    broken = run("audit", "verify", "--data", a, check=1)
    assert broken.stdout.startswith("BROKEN at entry 2 (audit.log line 2)"), broken.stdout
    report = json.loads(run("audit", "verify", "--data", a, "--json", check=1).stdout)
    assert report["ok"] is False and report["broken_seq"] == 2


def test_audit_on_a_folder_without_a_node(tmp_path: Path) -> None:
    assert "no node" in run("audit", "verify", "--data", tmp_path, check=2).stderr
    assert "no node" in run("audit", "--data", tmp_path, check=2).stderr
