"""The retriever's memory (``retrieved``, created by migration 2): per PACS source, each
Study Instance UID retrieved from it and the instance count the PACS reported then, so a
study is fetched again only when the PACS reports more instances."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Catalog


class Retrieved:
    """The retrieved studies of a :class:`~syncnode.catalog.Catalog` (``catalog.retrieved``)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def known(self, source: str) -> dict[str, int]:
        """Study Instance UID -> instance count recorded, for one source."""
        with self._catalog._read() as db:
            return {r[0]: r[1] for r in db.execute(
                "SELECT study_instance_uid, instances FROM retrieved WHERE source=?",
                (source,))}

    def record(self, source: str, study_uid: str, instances: int) -> None:
        with self._catalog._write() as db:
            db.execute("INSERT OR REPLACE INTO retrieved VALUES (?, ?, ?, ?)",
                       (source, study_uid, instances, time.time()))
