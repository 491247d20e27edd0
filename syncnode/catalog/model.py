"""The catalog's nouns: the records its methods return and the errors they raise.

- :class:`LocalPut`: a put event this node built (or the existing version it matched).
- :class:`ApplyResult`: what one batch of events changed (inserted, freed, rejected).
- :class:`Instance`: one row of the live view.
- ``PUT_COLUMNS``: the columns of ``puts`` that mirror a put event's fields, in order.

Invariants: pure (no SQL, no I/O); every error is a :class:`CatalogError` whose message
names fields, UIDs and hashes, never patient data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import events as ev
from ..protocol import PeerError
from .schema import CatalogError

_SEQ_OF = "SELECT seq FROM events WHERE id=?"  # a put's row, found through the events index
PUT_COLUMNS = (
    "sop_instance_uid", "sop_class_uid", "series_instance_uid", "study_instance_uid",
    "patient_id", "modality", "study_date", "transfer_syntax_uid", "blob", "size", "chunks",
    "hlc", "origin",
)


class NoSigner(CatalogError):
    """This catalog was opened without the node's key and cannot make events."""


class BlobNotPresent(CatalogError):
    """A put event whose blob is not in the store cannot be made live."""


SameInstance = Callable[[str, str], bool]
"""(stored blob, new blob) -> whether both hold the same data set (see build_local_puts)."""


class InvalidLocalPut(CatalogError, ValueError):
    """An instance whose attributes cannot make a valid put event (e.g. a UID that is not
    a UID); the message names the field."""


class PutMismatch(CatalogError, PeerError):
    """A peer's put event whose blob is not the DICOM instance it claims to be (another
    SOP Instance UID, Patient ID, modality... or not DICOM at all): refused, and the peer
    that sent it is in error. The message names fields and UIDs, never patient data."""


@dataclass(frozen=True, slots=True)
class LocalPut:
    """A put event built by :meth:`Catalog.build_local_puts`. ``event``/``body`` are None
    when the instance already has a version with these bytes: ``event_id`` is that one."""

    event_id: str
    event: ev.PutEvent | None = None
    body: bytes | None = None

    @property
    def new(self) -> bool:
        return self.body is not None


@dataclass(slots=True)
class ApplyResult:
    """What a batch of events changed."""

    inserted: list[str] = field(default_factory=list)  # hex ids of events new to this node
    freed_blobs: set[str] = field(default_factory=set)  # blobs no put references any more
    rejected: dict[str, str] = field(default_factory=dict)  # id -> reason
    # puts refused because their blob contradicts them (also in ``rejected``)
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Instance:
    """A live instance as the catalog lists it."""

    event_id: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str
    study_date: str
    transfer_syntax_uid: str
    blob: str
    size: int
    chunks: str
    hlc: int
    origin: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}
