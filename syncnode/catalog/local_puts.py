"""The one factory of local put events: instances stored on this node (``import``, the
SCP's ingest journal) become signed put events here, with this catalog's clock.

Invariants:

- Every local put is validated as a peer will validate it (:func:`events.decode`), its
  indexed attributes cleaned by the one rule :func:`indexed_attributes`, which is also
  the rule a peer's put is checked against (:func:`put_contradictions`).
- An instance that already has a live-or-superseded (not removed) version with the same
  bytes gets no new event: re-importing or re-sending is a no-op.
- A put that is not removed is inserted only when its blob is in the store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import events as ev
from ..blobstore import BlobInfo
from ..ids import check_uid
from .model import (
    ApplyResult,
    BlobNotPresent,
    InvalidLocalPut,
    LocalPut,
    SameInstance,
)
from .part import Part


class LocalPuts(Part):
    """Building and inserting put events for instances stored on this node.

    Mixed into :class:`~syncnode.catalog.core.Catalog`; runs on its connection, lock and
    transactions (``_write``, ``_read``, ``_lock``, ``_db``).
    """

    def build_local_puts(self, items: Iterable[tuple[dict[str, str], BlobInfo]],
                         in_flight: Mapping[str, tuple[str, str]] | None = None,
                         same_instance: SameInstance | None = None) -> list[LocalPut]:
        """The put events recording instances stored here, built but not committed (the
        SCP's ingest journal makes them durable itself, then :meth:`insert_local_puts`).

        ``items``: (attributes, blob) pairs, the attributes those of
        :class:`syncnode.dicomfile.InstanceInfo`. Every event is validated as a peer will
        validate it, its indexed attributes cleaned (:func:`_indexed`), its timestamp taken
        from this catalog's clock. An instance that already has a version with these exact
        bytes that is not deleted, in the catalog, earlier in ``items`` or ``in_flight``
        (SOP UID -> (blob, event id) of events built but not inserted yet), gets no new
        event: its ``body`` is None. So does one whose version in the catalog differs only
        in its file meta, when ``same_instance(stored blob, new blob)`` says so (the SCP
        writes its own file meta; ``import`` keeps the file's). An invalid item raises
        (:class:`~syncnode.ids.InvalidUID` for a UID, :class:`InvalidLocalPut` otherwise)
        and the whole batch is dropped.

        Look-ups use this catalog's read connection: they never wait for a write of this
        object (a commit and its flush) to finish.
        """
        with self._ro_lock:
            db = self._reader()
            db.execute("BEGIN")
            try:
                return self._build_puts(db, items, in_flight or {}, same_instance,
                                        persist_clock=False)
            finally:
                db.execute("COMMIT")

    def insert_local_puts(self, built: Iterable[LocalPut],
                          blob_present: Callable[[str], bool] | None = None) -> ApplyResult:
        """Insert put events made by :meth:`build_local_puts` (those with a body), without
        decoding or hashing them again. Idempotent. A put whose blob is not present
        (``blob_present``) and that no tombstone names is rejected, as in :meth:`apply`."""
        result = ApplyResult()
        dirty_leaves: set[int] = set()
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        max_hlc = 0
        with self._write() as db:
            for put in built:
                if put.body is None or put.event is None:
                    continue
                raw = bytes.fromhex(put.event_id)
                if (blob_present is not None and not blob_present(put.event.blob)
                        and db.execute("SELECT 1 FROM tombstones WHERE put_id=? LIMIT 1",
                                       (raw,)).fetchone() is None):
                    result.rejected[put.event_id] = f"blob {put.event.blob} not present"
                    continue
                max_hlc = max(max_hlc, put.event.hlc)
                if self._insert(db, raw, put.body, put.event, dirty_leaves, dirty_sops, freed):
                    result.inserted.append(put.event_id)
            self._observe(db, max_hlc)
            result.freed_blobs = self._finish(db, dirty_leaves, dirty_sops, freed)
        return self._inserted(result)

    def add_local_puts(self, items: Iterable[tuple[dict[str, str], BlobInfo]],
                       blob_present: Callable[[str], bool] | None = None,
                       same_instance: SameInstance | None = None,
                       ) -> list[tuple[str, bool]]:
        """Record instances stored here (``syncnode import``): :meth:`build_local_puts`
        and insert in one transaction. ``items``: (attributes, blob) pairs where the
        attributes are those of :class:`syncnode.dicomfile.InstanceInfo`.

        Returns (event id, new) per item; an instance that already has a version with these
        exact bytes (not deleted) gets no new event (re-importing is a no-op).
        """
        results: list[tuple[str, bool]] = []
        dirty_leaves: set[int] = set()
        dirty_sops: set[str] = set()
        freed: set[str] = set()
        items = list(items)
        with self._write() as db:
            if blob_present is not None:
                for attrs, blob in items:
                    if not blob_present(blob.hash):
                        raise BlobNotPresent(f"blob {blob.hash} of "
                                             f"{attrs.get('sop_instance_uid')} vanished "
                                             "before commit")
            for put in self._build_puts(db, items, {}, same_instance, persist_clock=True):
                new = put.event is not None and put.body is not None and self._insert(
                    db, bytes.fromhex(put.event_id), put.body, put.event, dirty_leaves,
                    dirty_sops, freed)
                results.append((put.event_id, new))
            self._finish(db, dirty_leaves, dirty_sops, freed)
        self._inserted(ApplyResult(inserted=[e for e, new in results if new]))
        return results

    def _build_puts(self, db: sqlite3.Connection,
                    items: Iterable[tuple[dict[str, str], BlobInfo]],
                    in_flight: Mapping[str, tuple[str, str]],
                    same_instance: SameInstance | None, *, persist_clock: bool,
                    ) -> list[LocalPut]:
        """The one factory of local put events (see :meth:`build_local_puts`)."""
        out: list[LocalPut] = []
        batch: dict[str, tuple[str, str]] = {}  # SOP UID -> (blob, event id) built here
        for attrs, blob in items:
            try:
                sop = check_uid(attrs["sop_instance_uid"], "SOP Instance UID")
                seen = batch.get(sop) or in_flight.get(sop)
                if seen is not None and seen[0] == blob.hash:
                    out.append(LocalPut(seen[1]))
                    continue
                held = db.execute("SELECT event_id, blob FROM puts WHERE sop_instance_uid=? "
                                  "AND removed=0", (sop,)).fetchall()
                same = next((r for r in held if r[1] == blob.hash), None)
                if same is None and same_instance is not None:
                    same = next((r for r in held if same_instance(r[1], blob.hash)), None)
                if same is not None:
                    out.append(LocalPut(bytes(same[0]).hex()))
                    continue
                fields: dict[str, Any] = dict(
                    origin=self.node_id, blob=blob.hash, size=blob.size,
                    chunks=blob.chunks_root, **indexed_attributes(attrs))
            except KeyError as exc:
                raise InvalidLocalPut(f"instance attributes lack {exc}") from exc
            event = self._sign(ev.PutEvent(hlc=self._tick(db, persist=persist_clock),
                                           **fields))
            body = ev.encode(event)
            try:
                ev.decode(body)  # the same validation a peer will apply
            except ev.InvalidEvent as exc:
                raise InvalidLocalPut(f"instance {sop} cannot be recorded: {exc}") from exc
            eid = ev.event_id(body)
            batch[sop] = (blob.hash, eid)
            out.append(LocalPut(eid, event, body))
        return out


INDEXED_FIELDS = (
    "sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
    "patient_id", "modality", "study_date", "transfer_syntax_uid",
)


def indexed_attributes(attrs: Mapping[str, str]) -> dict[str, str]:
    """The indexed attributes a put event carries for an instance whose inspected
    attributes (:class:`syncnode.dicomfile.InstanceInfo`) are ``attrs``: UIDs checked,
    text cleaned (:func:`_indexed`). The one rule for building puts and for checking a
    peer's puts against their bytes (:func:`put_contradictions`)."""
    return {
        "sop_class_uid": check_uid(attrs["sop_class_uid"], "SOP Class UID"),
        "sop_instance_uid": check_uid(attrs["sop_instance_uid"], "SOP Instance UID"),
        "series_instance_uid": check_uid(attrs["series_instance_uid"], "Series Instance UID"),
        "study_instance_uid": check_uid(attrs["study_instance_uid"], "Study Instance UID"),
        "patient_id": _indexed(attrs.get("patient_id", "")),
        "modality": _indexed(attrs.get("modality", "")),
        "study_date": _indexed(attrs.get("study_date", "")),
        "transfer_syntax_uid": _indexed(attrs.get("transfer_syntax_uid", "")),
    }


def put_contradictions(event: ev.PutEvent, attrs: Mapping[str, str]) -> list[str]:
    """The indexed fields in which a put event differs from what its blob's bytes give
    (``attrs``: the blob inspected); empty when the put tells the truth."""
    derived = indexed_attributes(attrs)
    return [f for f in INDEXED_FIELDS if getattr(event, f) != derived[f]]


def _indexed(value: str) -> str:
    """An indexed attribute as an event may carry it (see :func:`events.decode`): control
    characters become spaces, at most 64 characters. The stored file is not changed."""
    text = "".join(" " if ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    return text.strip()[:ev._ATTR_MAX]
