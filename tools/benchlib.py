"""Helpers shared by the benchmarks in tools/ (imported by file: run them as scripts)."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
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


def run(cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc
