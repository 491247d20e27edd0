"""The catalog: the one owner of the node's SQLite file (events, live view, Merkle index,
peers, and the read models the DICOM bridge needs). No other module runs SQL.

- :mod:`.schema`: the tables, ``PRAGMA user_version`` and the forward migrations.
- :mod:`.core`: :class:`Catalog` — the event set, the one factory of local events and
  its clock, everything derived from events, peers.
- :mod:`.outbox`: the DICOM exporter's queue per destination.
- :mod:`.find`: the C-FIND matching queries.
- :mod:`.retrieved`: the studies retrieved from each PACS.
"""

from .core import (
    INDEXED_FIELDS,
    PUT_COLUMNS,
    ApplyResult,
    BlobNotPresent,
    Catalog,
    Instance,
    InvalidLocalPut,
    LocalPut,
    NoSigner,
    PutMismatch,
    SameInstance,
    indexed_attributes,
    put_contradictions,
)
from .schema import SCHEMA_VERSION, CatalogError, SchemaTooNew, open_database

__all__ = [
    "INDEXED_FIELDS", "PUT_COLUMNS", "SCHEMA_VERSION", "ApplyResult", "BlobNotPresent",
    "Catalog", "CatalogError", "Instance", "InvalidLocalPut", "LocalPut", "NoSigner",
    "PutMismatch", "SameInstance", "SchemaTooNew", "indexed_attributes", "open_database",
    "put_contradictions",
]
