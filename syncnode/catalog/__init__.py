"""The catalog: the one owner of the node's SQLite file (events, live view, Merkle index,
peers, and the read models the DICOM bridge needs). No other module runs SQL.

- :mod:`.schema`: the tables, ``PRAGMA user_version`` and the forward migrations.
- :mod:`.core`: :class:`Catalog` — the connection, transactions, the one clock, the
  insert path and the event set; composed of one mixin per part:
- :mod:`.admission`: signing local events; admission and application of received ones.
- :mod:`.local_puts`: the one factory of local put events and its attribute rule.
- :mod:`.deletes`: local deletes and the garbage collection of unreferenced blobs.
- :mod:`.merkle_index`: the Merkle index, maintained in the insert transactions.
- :mod:`.live_view`: the live view and the read models on it (C-FIND, status counts).
- :mod:`.peers`: trusted peers, their sync state, nodes seen on the LAN.
- :mod:`.model`: the records and errors the catalog's methods return and raise.
- :mod:`.outbox`: the DICOM exporter's queue per destination.
- :mod:`.find`: the C-FIND matching queries.
- :mod:`.retrieved`: the studies retrieved from each PACS.
- :mod:`.part`: what the mixins declare they use of the core.
- :mod:`.files`: catalog files as files (online snapshot, referenced blobs) for backups.
"""

from .core import Catalog
from .local_puts import INDEXED_FIELDS, indexed_attributes, put_contradictions
from .model import (
    PUT_COLUMNS,
    ApplyResult,
    BlobNotPresent,
    Instance,
    InvalidLocalPut,
    LocalPut,
    NoSigner,
    PutMismatch,
    SameInstance,
)
from .schema import SCHEMA_VERSION, CatalogError, CatalogFull, SchemaTooNew, open_database

__all__ = [
    "INDEXED_FIELDS", "PUT_COLUMNS", "SCHEMA_VERSION", "ApplyResult", "BlobNotPresent",
    "Catalog", "CatalogError", "CatalogFull", "Instance", "InvalidLocalPut", "LocalPut", "NoSigner",
    "PutMismatch", "SameInstance", "SchemaTooNew", "indexed_attributes", "open_database",
    "put_contradictions",
]
