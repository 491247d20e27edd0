"""Helpers shared by the benchmarks in tools/ (imported by file: run them as scripts)."""

from __future__ import annotations

import contextlib
import importlib.util
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_generator() -> ModuleType:
    """``tools/gen_dataset.py`` as a module (by path: ``tools`` is not a package)."""
    path = REPO / "tools" / "gen_dataset.py"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the dataset generator is required")
    spec = importlib.util.spec_from_file_location("syncnode_bench_gen_dataset", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def dicom_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if p.is_file())


def sync_fs() -> None:
    subprocess.run(["sync"], check=True)


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


SCRATCH_FS_HELP = (
    "make a fresh ext4 filesystem of this many GB, with a journal (mkfs.ext4's default), "
    "in a loop device with direct I/O, and work in it (needs root, losetup, mkfs.ext4). "
    "Use it where the machine's own filesystem distorts the figures: an ext4 without a "
    "journal makes every new file after a mass delete scan past the inodes just freed "
    "(see the module doc)")


@contextlib.contextmanager
def scratch_fs(size_gb: float, parent: Path | None = None) -> Iterator[Path]:
    """A new journaled ext4 in a sparse image file under ``parent`` (default: the system
    temp dir), attached to a loop device with direct I/O (so its blocks are not cached a
    second time as pages of the image file), mounted on a new folder; yields the mount
    point and removes everything afterwards.

    Why: on ext4 without a journal, the inode allocator skips every inode freed in the
    last seconds (the kernel's ``recently_deleted`` check, done only when there is no
    journal) and reads an inode-table block to check each one. A benchmark that deletes
    one contender's output and then times the next makes that contender pay for the
    delete, in proportion to how many files and folders it creates. A journaled ext4,
    which is what ``mkfs.ext4`` makes by default, has no such cost."""
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            raise SystemExit(f"--scratch-fs needs {tool}")
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="syncnode-bench-fs-", dir=parent))
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    device = ""
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(int(size_gb * 1e9))
        device = run(["losetup", "--direct-io=on", "--find", "--show", str(image)]).stdout.strip()
        run(["mkfs.ext4", "-q", "-F", device])
        run(["mount", device, str(mnt)])
        mounted = True
        log(f"scratch filesystem: ext4 with a journal, {size_gb:g} GB, {device} on {mnt}")
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(base, ignore_errors=True)


def run(cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc
