"""State one process keeps per file or folder, shared by every object that opens it.

Several objects of one process may open the same data folder (the node, the DICOM
bridge, a backup, a test): a record about that folder (which blobs are known good, the
room promised to pulls under way, the latest catalog timestamp issued) must be one
object among them, not one each."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class PerPath(Generic[T]):
    """One ``T`` per path in this process, made by ``factory`` on first use; thread-safe.
    ``resolve``: paths that name the same file through links or ``..`` share one."""

    def __init__(self, factory: Callable[[], T], *, resolve: bool = False) -> None:
        self._factory = factory
        self._resolve = resolve
        self._by_path: dict[Path, T] = {}
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> T:
        key = path.resolve() if self._resolve else path
        with self._lock:
            found = self._by_path.get(key)
            if found is None:
                found = self._by_path[key] = self._factory()
            return found
