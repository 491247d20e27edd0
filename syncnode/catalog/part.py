"""What every part of :class:`~syncnode.catalog.core.Catalog` may use of its core.

The catalog is one class made of mixins, one module each (admission, local puts, deletes,
the Merkle index, the live view, peers). Each mixin derives from :class:`Part`, which
declares the state and the core methods they share, so a reader (and a type checker) of a
mixin sees what it relies on and where it comes from: the attributes are set by
``Catalog.__init__`` and the methods defined in :mod:`syncnode.catalog.core` (``_sign`` in
:mod:`syncnode.catalog.admission`). The declarations exist only for the type checker: at
run time :class:`Part` is empty, so it never shadows the real methods.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .. import events as ev
    from .. import merkle
    from ..authority import Policy
    from ..signing import OriginKeys, Signer
    from .model import ApplyResult


class Part:
    """The shared state and core methods of the catalog's parts (declarations only)."""

    path: Path
    node_id: str
    policy: Policy
    _db: sqlite3.Connection  # the one read-write connection; use under _lock
    _lock: threading.RLock
    _ro_lock: threading.Lock  # guards the read-only connection of _reader
    _signer_of: Callable[[], Signer] | None
    _signer: Signer | None
    _keys: OriginKeys | None
    _offered: dict[str, bytes]  # origin -> certificate a peer sent
    _merkle_cache: dict[tuple[int, int], merkle.NodeDigest] | None  # see Catalog._write
    _merkle_version: int | None

    if TYPE_CHECKING:
        def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...
        def _reader(self) -> sqlite3.Connection: ...
        def _tick(self, db: sqlite3.Connection, *, persist: bool = True) -> int: ...
        def _observe(self, db: sqlite3.Connection, remote: int, limit: int = ...) -> None: ...
        def _insert(self, db: sqlite3.Connection, eid: bytes, body: bytes, event: ev.Event,
                    dirty_leaves: set[int], dirty_sops: set[str], freed: set[str]) -> bool: ...
        def _finish(self, db: sqlite3.Connection, dirty_leaves: set[int],
                    dirty_sops: set[str], freed: set[str]) -> set[str]: ...
        def _inserted(self, result: ApplyResult) -> ApplyResult: ...
        def _sign(self, event: ev.AnyEvent) -> ev.AnyEvent: ...
        def get_meta(self, key: str) -> str | None: ...
