"""Online backup and restore of a node's data folder.

A backup is a folder that is itself a data folder, plus ``backup.json`` (the manifest):

    backup.json          written last: its presence means the backup is complete
    catalog.db           a snapshot of the catalog (SQLite online backup API)
    blobs/               every blob (and chunk list) the snapshot references
    node.key, node.crt, ca.crt, config.toml, api-keys.json, trust/, audit/

Invariants:

- **Consistent without stopping the node.** The catalog is copied first, in one step of
  SQLite's backup API (one read transaction: a snapshot of one commit, while ``run``,
  imports and the DICOM SCP keep writing). Then every blob that snapshot references is
  copied. Blobs are immutable once written, so a blob present at copy time is the blob
  the snapshot means; one deleted after the snapshot was taken (its put removed later)
  makes the backup take a new snapshot and fetch the difference (bounded attempts). A
  backup therefore never references a blob it does not hold.
- **Cheap on the same filesystem.** Blobs are hard-linked when the destination is on the
  data folder's filesystem (nothing writes a blob in place, so a link cannot change),
  copied (and fsynced) otherwise or with ``copy=True``.
- **Verifiable.** The manifest records the Merkle root, instance and blob counts of the
  snapshot; ``restore`` refuses a result whose root differs, so a restored node is the
  node as it was at the snapshot, and it catches up from its peers like any node that
  was offline.
- What is not in a backup: instances the DICOM SCP stored whose events were not yet in
  the catalog at the snapshot (they are in the next backup), temp files, peer progress
  (``ports.json``, locks). The node key is in it: keep backups as secret as the node.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .blobstore import BlobStore
from .catalog import Catalog
from .catalog.files import live_blobs_in, make_self_contained, snapshot_file
from .durable import fsync_dir
from .local import CATALOG_FILE, LocalNode

MANIFEST = "backup.json"
FORMAT = 1
ATTEMPTS = 5  # snapshots taken at most when blobs keep vanishing under a busy node
# Small files and folders of the data folder a backup carries (audit: head before logs).
FILES = ("node.key", "node.crt", "ca.crt", "config.toml", "api-keys.json")
FOLDERS = ("trust",)


class BackupError(Exception):
    """A backup or restore could not be made; the message says what to do."""


@dataclass(slots=True)
class Manifest:
    format: int
    syncnode_version: str
    node_id: str
    created: str  # UTC, ISO 8601
    merkle_root: str
    events: int
    instances: int
    blobs: int
    blob_bytes: int
    linked: int  # blobs hard-linked rather than copied
    snapshots: int  # catalog snapshots taken (more than one: blobs vanished meanwhile)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackupError(f"{folder} is not a complete backup (no {MANIFEST}): the backup "
                          "was interrupted or this is not a backup folder") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {path}: {exc}") from exc
    if raw.get("format") != FORMAT:
        raise BackupError(f"{path}: backup format {raw.get('format')!r} is not {FORMAT} "
                          f"(made by syncnode {raw.get('syncnode_version')})")
    try:
        return Manifest(**raw)
    except TypeError as exc:
        raise BackupError(f"{path}: malformed manifest: {exc}") from exc


def _empty_target(folder: Path, what: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BackupError(f"{folder} exists and is not empty: choose a new {what} folder")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)


def _link_or_copy(src: Path, dst: Path, copy: bool) -> bool:
    """Put ``src`` at ``dst``; True if hard-linked. Raises FileNotFoundError if ``src``
    vanished."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return False
    if not copy:
        try:
            os.link(src, dst)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o444)
    os.replace(tmp, dst)
    return False


def _copy_blobs(src: BlobStore, dst: BlobStore, hashes: set[str], copy: bool
                ) -> tuple[int, set[str]]:
    """Link or copy each blob and its chunk list; (how many linked, vanished hashes)."""
    linked = 0
    vanished: set[str] = set()
    for h in sorted(hashes):
        try:
            chunks = src.chunks_path(h)
            if chunks.exists():  # the chunk list first, as the store writes it
                _link_or_copy(chunks, dst.chunks_path(h), copy)
            linked += _link_or_copy(src.path(h), dst.path(h), copy)
        except FileNotFoundError:
            vanished.add(h)
    return linked, vanished


def _copy_small(data: Path, dest: Path) -> None:
    for name in FILES:
        if (data / name).exists():
            shutil.copy2(data / name, dest / name)
    for name in FOLDERS:
        if (data / name).is_dir():
            shutil.copytree(data / name, dest / name)
    audit = data / "audit"
    if audit.is_dir():  # the head first: the logs copied after are at least that long
        (dest / "audit").mkdir(mode=0o700)
        names = sorted(os.listdir(audit), key=lambda n: (n != "head", n))
        for name in names:
            if name != "lock" and (audit / name).is_file():
                shutil.copy2(audit / name, dest / "audit" / name)


def backup(data: Path, dest: Path, *, copy: bool = False) -> Manifest:
    """Take a consistent backup of the node in ``data`` (running or not) into ``dest``
    (new or empty). Returns the manifest, also written to ``dest/backup.json``."""
    node = LocalNode(data)  # NodeNotInitialised if this is no node
    try:
        _empty_target(dest, "backup")
        src_store, dst_store = node.store, BlobStore(dest)
        linked = snapshots = 0
        wanted: set[str] = set()
        while True:
            snapshots += 1
            snapshot_file(node.data / CATALOG_FILE, dest / CATALOG_FILE)
            wanted = live_blobs_in(dest / CATALOG_FILE)
            have = {h for h in wanted if dst_store.path(h).exists()}
            n_linked, vanished = _copy_blobs(src_store, dst_store, wanted - have, copy)
            linked += n_linked
            if not vanished:
                break
            if snapshots >= ATTEMPTS:
                raise BackupError(
                    f"{len(vanished)} blobs were deleted while the backup copied them, "
                    f"{ATTEMPTS} times over: run the backup again when fewer deletes happen")
        # blobs of an earlier snapshot that the final one no longer references
        for h in set(dst_store.iter_hashes()) - wanted:
            dst_store.path(h).unlink()
            dst_store.chunks_path(h).unlink(missing_ok=True)
        size = sum(dst_store.path(h).stat().st_size for h in wanted)
        _copy_small(node.data, dest)
        snap = Catalog(dest / CATALOG_FILE)
        try:
            counts = snap.counts()
            manifest = Manifest(
                format=FORMAT, syncnode_version=__version__, node_id=str(node.node_id),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                merkle_root=snap.merkle_root().digest.hex(), events=snap.event_count(),
                instances=counts["instances"], blobs=len(wanted), blob_bytes=size,
                linked=linked, snapshots=snapshots)
        finally:
            snap.close()
        make_self_contained(dest / CATALOG_FILE)
        _sync_tree(dest)
        tmp = dest / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest / MANIFEST)
        fsync_dir(dest)
        return manifest
    finally:
        node.close()


def _sync_tree(folder: Path) -> None:
    for dirpath, _dirs, _files in os.walk(folder):
        fsync_dir(Path(dirpath))


def restore(backup_dir: Path, data: Path, *, copy: bool = False) -> Manifest:
    """Make ``data`` (new or empty) the node recorded in ``backup_dir``; check its Merkle
    root against the manifest. Blobs are hard-linked where possible (``copy``: never)."""
    manifest = read_manifest(backup_dir)
    _empty_target(data, "data")
    src_store, dst_store = BlobStore(backup_dir), BlobStore(data)
    wanted = live_blobs_in(backup_dir / CATALOG_FILE)
    _, missing = _copy_blobs(src_store, dst_store, wanted, copy)
    if missing:
        raise BackupError(f"the backup in {backup_dir} lacks {len(missing)} blobs its "
                          f"catalog references (e.g. {sorted(missing)[0]}): it is damaged")
    snapshot_file(backup_dir / CATALOG_FILE, data / CATALOG_FILE)
    _copy_small(backup_dir, data)
    os.chmod(data / "node.key", 0o600)
    _sync_tree(data)
    node = LocalNode(data)
    try:
        root = node.catalog.merkle_root().digest.hex()
        if str(node.node_id) != manifest.node_id:
            raise BackupError(f"the restored node is {node.node_id}, the manifest says "
                              f"{manifest.node_id}: the backup in {backup_dir} is damaged")
        if root != manifest.merkle_root:
            raise BackupError(f"the restored catalog's Merkle root {root[:16]}… is not the "
                              f"backup's {manifest.merkle_root[:16]}…: it is damaged")
    finally:
        node.close()
    return manifest
