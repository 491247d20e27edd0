"""The rejection notes this node applied (``rejected``, created by migration 5): per
rejected SOP Instance UID, the code and the note that rejected it, so that an instance
arriving again can be refused (:mod:`syncnode.rejection`). Local to this node."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Catalog


class Rejections:
    """The ``rejected`` table of a :class:`~syncnode.catalog.Catalog`
    (``catalog.rejections``)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def record(self, note_uid: str, code: str, sop_uids: list[str]) -> None:
        now = time.time()
        with self._catalog._write() as db:
            db.executemany("INSERT OR REPLACE INTO rejected (sop_instance_uid, code, note, "
                           "at) VALUES (?, ?, ?, ?)", [(s, code, note_uid, now)
                                                       for s in sop_uids])

    def code(self, sop_uid: str) -> str | None:
        """The code of the rejection note that rejected this instance, if any."""
        with self._catalog._read() as db:
            row = db.execute("SELECT code FROM rejected WHERE sop_instance_uid=?",
                             (sop_uid,)).fetchone()
        return str(row[0]) if row else None
