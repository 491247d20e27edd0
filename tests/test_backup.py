"""``syncnode backup`` / ``restore``: consistent online copies that restore to their root.

- Under load: a node runs (``syncnode run``) while another process imports instances
  into it; the backup taken meanwhile restores to exactly the Merkle root its manifest
  records, ``verify`` finds nothing, and every blob the restored catalog references is
  present (the backup never references a missing blob).
- A node restored from an old backup catches up from its peer: what the peer got since,
  and what the node itself made after the backup (the peer holds it), come back.
- Refusals: a non-empty target, a folder with no manifest, a backup with a blob removed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import StartNode
from syncsupport import (
    add_instances,
    add_peer,
    converged,
    describe_nodes,
    make_dicom,
    root,
    uid,
    url_of,
    wait_for,
)
from syncsupport import run_cli as cli

from syncnode.backup import MANIFEST, BackupError, backup, read_manifest, restore
from syncnode.local import LocalNode


def instances(data: Path) -> int:
    node = LocalNode(data)
    try:
        return node.catalog.counts()["instances"]
    finally:
        node.close()


def test_backup_under_load_restores_to_the_manifest_root(tmp_path: Path) -> None:
    data, files = tmp_path / "node", tmp_path / "incoming"
    assert cli("init", "--data", data).returncode == 0
    study = uid(7, 1)
    files.mkdir()
    for i in range(300):
        make_dicom(files / f"{i:04d}.dcm", sop=uid(7, 1, i), study=study, series=study + ".1",
                   pixel_bytes=16384, seed=i)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    node = subprocess.Popen([sys.executable, "-m", "syncnode.cli", "run", "--data", str(data),
                             "--peer-host", "127.0.0.1", "--peer-port", "0", "--api-port", "0",
                             "--dicom-port", "0", "--no-discovery", "--duration", "120"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    importer = None
    try:
        deadline = time.monotonic() + 60
        while not (data / "ports.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.poll() is None and (data / "ports.json").exists()
        # one file at a time: the import commits as it goes, the backup lands in between
        importer = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, pathlib\nfrom syncnode.local import LocalNode\n"
             "from syncnode.importer import import_paths\n"
             "node = LocalNode(sys.argv[1])\n"
             "for f in sorted(pathlib.Path(sys.argv[2]).iterdir()):\n"
             "    assert not import_paths(node, [f]).failed\n",
             str(data), str(files)], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while instances(data) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = instances(data)
        assert importer.poll() is None and before >= 20, "the import must still be running"
        made = cli("backup", "--data", data, tmp_path / "backup", "--json")
        assert made.returncode == 0, made.stderr
        still_importing = importer.poll() is None
        importer.wait(timeout=120)
        assert importer.returncode == 0, importer.stderr.read() if importer.stderr else ""
    finally:
        for p in (importer, node):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    manifest = json.loads(made.stdout)
    assert manifest == json.loads((tmp_path / "backup" / MANIFEST).read_text())
    after = instances(data)
    assert after == 300
    print(f"backup under load: {before} instances before it, {manifest['instances']} in it, "
          f"{after} after; {manifest['snapshots']} snapshot(s), {manifest['blobs']} blobs")
    assert still_importing, "the backup must have been taken while the import ran"
    assert before <= manifest["instances"] < after, (before, manifest)
    assert manifest["linked"] == manifest["blobs"]  # same filesystem: hard links

    restored = cli("restore", tmp_path / "backup", "--data", tmp_path / "restored")
    assert restored.returncode == 0, restored.stderr
    node2 = LocalNode(tmp_path / "restored")
    try:
        assert root(node2) == manifest["merkle_root"]
        assert node2.catalog.counts()["instances"] == manifest["instances"]
        assert node2.catalog.referenced_blobs() <= set(node2.store.iter_hashes())
        assert str(node2.node_id) == manifest["node_id"]
    finally:
        node2.close()
    for name in ("node.key", "node.crt", "config.toml", "api-keys.json"):
        assert (tmp_path / "restored" / name).read_bytes() == (data / name).read_bytes(), name
    assert (tmp_path / "restored" / "node.key").stat().st_mode & 0o077 == 0
    checked = cli("verify", "--data", tmp_path / "restored")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # the copy (not links) works too, and also restores to the same root
    copied = backup(tmp_path / "restored", tmp_path / "backup2", copy=True)
    assert copied.linked == 0 and copied.merkle_root == manifest["merkle_root"]


async def test_a_node_restored_from_an_old_backup_catches_up(
        tmp_path: Path, running: StartNode) -> None:
    a, b = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    ra, rb = await running(a), await running(b)
    add_peer(a, b, url_of(rb))
    add_peer(b, a, url_of(ra))
    ra.peers_changed()
    rb.peers_changed()
    add_instances(a, [uid(8, 1, i) for i in range(5)])
    ra.local_change()
    await wait_for(lambda: converged([a, b]), 30, "a and b in sync",
                   describe=lambda: describe_nodes([a, b]))
    old = backup(a.data, tmp_path / "backup")
    assert old.instances == 5
    # after the backup: a makes more, b gets more, a deletes one of the first
    add_instances(a, [uid(8, 2, i) for i in range(3)])
    a.delete_instances([uid(8, 1, 0)])
    ra.local_change()
    add_instances(b, [uid(8, 3, i) for i in range(4)])
    rb.local_change()
    await wait_for(lambda: converged([a, b]), 30, "a and b in sync again",
                   describe=lambda: describe_nodes([a, b]))
    final = root(b)
    assert a.catalog.counts()["instances"] == 11
    await ra.stop()
    a.close()

    restore(tmp_path / "backup", tmp_path / "a2")
    a2 = LocalNode(tmp_path / "a2")
    try:
        assert root(a2) == old.merkle_root != final
        ra2 = await running(a2)  # same node id, same peers: b is still at its address
        ra2.peers_changed()
        await wait_for(lambda: converged([a2, b]), 60, "the restored node to catch up",
                       describe=lambda: describe_nodes([a2, b]))
        assert root(a2) == final
        assert a2.catalog.counts()["instances"] == 11
        assert a2.verify().ok
    finally:
        a2.close()


def test_refusals(tmp_path: Path) -> None:
    node = LocalNode.init(tmp_path / "n")
    add_instances(node, [uid(9, i) for i in range(3)])
    node.close()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(BackupError, match="not empty"):
        backup(tmp_path / "n", tmp_path / "busy")
    with pytest.raises(BackupError, match=r"no backup\.json"):
        restore(tmp_path / "busy", tmp_path / "r0")
    made = backup(tmp_path / "n", tmp_path / "b", copy=True)
    assert read_manifest(tmp_path / "b") == made
    with pytest.raises(BackupError, match="not empty"):
        restore(tmp_path / "b", tmp_path / "busy")
    # a backup that lost a blob is refused, not restored into a node that misses it
    victim = next(p for p in (tmp_path / "b" / "blobs").rglob("*") if p.is_file()
                  and not p.name.endswith(".chunks"))
    victim.unlink()
    with pytest.raises(BackupError, match="lacks 1 blobs"):
        restore(tmp_path / "b", tmp_path / "r1")
    bad = cli("restore", tmp_path / "b", "--data", tmp_path / "r2")
    assert bad.returncode == 1 and "damaged" in bad.stderr
