"""C-GET and C-MOVE SCP: the node's instances go out to a requester or a destination.

Patient Root and Study Root, levels PATIENT / STUDY / SERIES / IMAGE. The identifier's
unique keys (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, each UID key
a single UID or a ``\\``-separated UID list) name the instances
(:meth:`syncnode.catalog.Catalog.retrieve_set`); a unique key below the requested level,
a level not in the model, or a level whose own unique key is missing is refused with
0xA900 (identifier does not match SOP class). Other keys are ignored, as PS3.4 C.4.2.2.1
requires.

Sending (pynetdicom drives the pending responses, their remaining/completed/failed/warning
counts and C-CANCEL; this module chooses what goes on the wire):

- Each instance is a :class:`StoredInstance` naming a blob. When the association has an
  accepted context for (SOP class, stored transfer syntax), the data set bytes of the blob
  are sent unchanged (:func:`syncnode.dicom.exporter.send_store`). A blob known good
  (:mod:`syncnode.knowngood`: its file unchanged since it was hashed intact) is read
  without hashing it again; any other is read through
  :meth:`~syncnode.blobstore.BlobStore.read_verified` first, so a blob changed on disk is
  checked and a damaged one is never sent.
- Otherwise, when the stored syntax is lossless (:data:`LOSSLESS`) and the requester
  accepted an uncompressed syntax for the class, the instance is decoded and sent
  uncompressed (pydicom and its pixel-data plugins; RLE needs only numpy, JPEG Lossless
  and JPEG-LS need ``pylibjpeg-libjpeg`` or GDCM, JPEG 2000 ``pylibjpeg-openjpeg``).
  Nothing is ever transcoded lossily.
- What cannot be sent is a failed sub-operation; the log says why, by SOP Instance UID.

C-MOVE destinations are the operator's ``dicom_destinations`` (AE title -> host:port); an
unknown Move Destination is answered 0xA801. The sub-association is opened by the SCP's
own :class:`~syncnode.dicom.transport.SyncnodeAE` (TCP_NODELAY), proposing for each
(SOP class, stored syntax) pair that syntax, plus an uncompressed context for classes
stored compressed. Logs and audit entries name UIDs, counts and AE titles, never patient
data.
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import PresentationContext

from ..blobstore import BlobError, BlobStore
from ..catalog import Catalog, Instance
from ..dicomfile import dataset_offset
from .exporter import send_store, stored_payload
from .query import LEVELS

log = logging.getLogger("syncnode.dicom.retrieve")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
# Stored syntaxes whose decoding gives back exactly the original pixels.
LOSSLESS = frozenset({
    DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.5",       # RLE Lossless
    "1.2.840.10008.1.2.4.57",    # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",    # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.80",    # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",    # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.201",   # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",   # HTJ2K Lossless RPCL
})
UNIQUE = (("PATIENT", "PatientID"), ("STUDY", "StudyInstanceUID"),
          ("SERIES", "SeriesInstanceUID"), ("IMAGE", "SOPInstanceUID"))
MAX_SUBOPERATIONS = 65535  # the counts are US


class RetrieveError(Exception):
    """A C-GET/C-MOVE request that cannot be served; ``status`` is the DIMSE status."""

    def __init__(self, message: str, status: int = 0xA900) -> None:
        super().__init__(message)
        self.status = status


class NotSendable(Exception):
    """One instance cannot go out on this association (no suitable accepted context,
    a decoder missing, a damaged blob); the message says why, with UIDs only."""


class StoredInstance(Dataset):
    """What the C-GET/C-MOVE handler yields: an instance of the catalog, by blob. Only the
    attributes pynetdicom looks at are set; the bytes are read when it is sent.

    ``outcome`` is set when the instance was already sent on another association of the
    same C-MOVE (:class:`MoveWorkers`): the status data set of its C-STORE response, or
    the :class:`NotSendable` that stopped it. pynetdicom's sub-operation then only counts
    it."""

    instance: Instance
    store: BlobStore
    outcome: Dataset | NotSendable | None

    def __init__(self, instance: Instance, store: BlobStore) -> None:
        super().__init__()
        # (object.__setattr__: pydicom's checks every name against its dictionary, and
        # the two UIDs are properties; this runs once per instance sent)
        object.__setattr__(self, "instance", instance)
        object.__setattr__(self, "store", store)
        object.__setattr__(self, "outcome", None)

    def __bool__(self) -> bool:  # (it holds no elements; pynetdicom tests its truth)
        return True

    @property
    def SOPClassUID(self) -> str:  # (the DICOM keywords pynetdicom reads)
        return self.instance.sop_class_uid

    @property
    def SOPInstanceUID(self) -> str:
        return self.instance.sop_instance_uid


def _uids(identifier: Dataset, keyword: str) -> list[str] | None:
    if keyword not in identifier:
        return None
    raw = identifier[keyword].value
    if raw is None or raw == "":
        return None
    values = raw if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" \
        else str(raw).split("\\")
    return [str(v).strip().rstrip("\0") for v in values if str(v).strip()]


def resolve(catalog: Catalog, model: str, identifier: Dataset) -> list[Instance]:
    """The instances a C-MOVE/C-GET identifier names under a Q/R information model
    (given as the FIND model's UID family: Patient Root or Study Root)."""
    root = next((r for r in LEVELS if model.startswith(r[:-1])), None)
    if root is None:
        raise RetrieveError(f"information model {model} is not supported")
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    levels = LEVELS[root]
    if level not in levels:
        raise RetrieveError(f"Query/Retrieve Level {level[:16]!r} is not valid for this model")
    depth = [name for name, _kw in UNIQUE].index(level)
    keys: dict[str, Any] = {}
    for i, (name, keyword) in enumerate(UNIQUE):
        if name not in levels:
            continue
        if keyword == "PatientID":
            value = str(identifier.get("PatientID", "") or "").strip() or None
        else:
            value = _uids(identifier, keyword)
        if i > depth and value:
            raise RetrieveError(f"{keyword} is below the requested level {level}")
        if i == depth and not value:
            raise RetrieveError(f"the {level} level needs {keyword}")
        if i <= depth and value:
            keys[keyword] = value
    try:
        return catalog.retrieve_set(patient_id=keys.get("PatientID"),
                                    study_uids=keys.get("StudyInstanceUID"),
                                    series_uids=keys.get("SeriesInstanceUID"),
                                    sop_uids=keys.get("SOPInstanceUID"))
    except ValueError as exc:  # an invalid UID
        raise RetrieveError(str(exc)) from exc


def move_contexts(instances: list[Instance]) -> list[PresentationContext]:
    """Contexts for a C-MOVE sub-association: each (SOP class, stored syntax) pair as
    stored, plus an uncompressed context per class stored compressed (at most 128)."""
    pairs = dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in instances)
    out: list[PresentationContext] = []
    fallback: set[str] = set()
    for sop_class, ts in pairs:
        cx = PresentationContext()
        cx.abstract_syntax = sop_class
        cx.transfer_syntax = [ts] if ts not in UNCOMPRESSED else list(UNCOMPRESSED)
        out.append(cx)
        if ts not in UNCOMPRESSED and ts in LOSSLESS:
            fallback.add(sop_class)
    for sop_class in sorted(fallback):
        cx = PresentationContext()
        cx.abstract_syntax = sop_class
        cx.transfer_syntax = list(UNCOMPRESSED)
        out.append(cx)
    if len(out) > 128:
        raise RetrieveError(f"the instances need {len(out)} presentation contexts, more than "
                            "one association can carry (128)", 0xA702)
    return out


def _context(assoc: Any, sop_class: str, syntaxes: tuple[str, ...]) -> PresentationContext | None:
    """An accepted context where we are the storage SCU, for the class, in one of the
    syntaxes (in that order of preference)."""
    found: dict[str, PresentationContext] = {}
    for cx in assoc.accepted_contexts:
        if str(cx.abstract_syntax) != sop_class or not cx.transfer_syntax:
            continue
        ts = str(cx.transfer_syntax[0])
        if assoc.is_requestor and cx.as_scu is False:
            continue
        if assoc.is_acceptor and not cx.as_scu:
            continue
        found.setdefault(ts, cx)
    return next((found[ts] for ts in syntaxes if ts in found), None)


def _stored_bytes(store: BlobStore, inst: Instance) -> tuple[bytes, int]:
    """The blob's bytes (known good, or verified against its chunk hashes) and its data
    set offset."""
    try:
        data = store.read_known_whole(inst.blob)
    except (BlobError, OSError) as exc:
        raise NotSendable(f"blob {inst.blob} cannot be read: {type(exc).__name__}") from exc
    try:
        return data, dataset_offset(data[:65536])
    except ValueError as exc:
        raise NotSendable(f"blob {inst.blob} is not a Part-10 file") from exc


def _as_stored(store: BlobStore, inst: Instance) -> io.BytesIO | tuple[Path, int]:
    """The stored data set bytes as the exporter sends them
    (:func:`~syncnode.dicom.exporter.stored_payload`: known good or verified first; in
    memory up to ``IN_MEMORY_LIMIT``, else streamed from the blob file)."""
    try:
        return stored_payload(store, inst.blob, inst.size)
    except (BlobError, OSError) as exc:
        raise NotSendable(f"blob {inst.blob} cannot be read: {type(exc).__name__}") from exc
    except ValueError as exc:
        raise NotSendable(f"blob {inst.blob} is not a Part-10 file") from exc


def _decoded(data: bytes, stored_ts: str, target: str) -> bytes:
    """A losslessly stored data set, decoded and encoded in an uncompressed syntax."""
    from pydicom.filewriter import dcmwrite

    ds = dcmread(io.BytesIO(data))
    try:
        if stored_ts != DeflatedExplicitVRLittleEndian and "PixelData" in ds:
            ds.decompress(generate_instance_uid=False)  # same instance, same UID
    except (RuntimeError, NotImplementedError, ValueError, ImportError) as exc:
        raise NotSendable(f"cannot decode {UID(stored_ts).name} losslessly here: "
                          f"{type(exc).__name__}: {str(exc)[:160]}") from exc
    target_uid = UID(target)
    ds.file_meta.TransferSyntaxUID = target_uid
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=False, little_endian=target_uid.is_little_endian,
             implicit_vr=target_uid.is_implicit_VR)
    written = out.getvalue()
    return written[dataset_offset(written[:65536]):] if written[128:132] == b"DICM" \
        else written


def send_stored(assoc: Any, ds: Dataset, msg_id: int = 1, **_originator: Any) -> Dataset:
    """``Association.send_c_store`` for :class:`StoredInstance` (other data sets are
    handed to pynetdicom's own): the status data set of the C-STORE response. Raises
    :class:`NotSendable` (pynetdicom then counts a failed sub-operation)."""
    if not isinstance(ds, StoredInstance):
        return type(assoc).send_c_store(assoc, ds, msg_id=msg_id, **_originator)
    if ds.outcome is not None:  # sent already, by a MoveWorkers association
        if isinstance(ds.outcome, NotSendable):
            raise ds.outcome
        return ds.outcome
    inst = ds.instance
    stored = inst.transfer_syntax_uid
    cx = _context(assoc, inst.sop_class_uid, (stored,))
    try:
        if cx is not None:
            payload = _as_stored(ds.store, inst)
        else:
            if stored not in LOSSLESS:
                raise NotSendable(f"the requester accepts no context for {inst.sop_class_uid} "
                                  f"in {UID(stored).name}, and it is not stored losslessly")
            cx = _context(assoc, inst.sop_class_uid, tuple(UNCOMPRESSED))
            if cx is None:
                raise NotSendable(f"the requester accepts {inst.sop_class_uid} neither in "
                                  f"{UID(stored).name} nor uncompressed")
            data, _offset = _stored_bytes(ds.store, inst)
            payload = io.BytesIO(_decoded(data, stored, str(cx.transfer_syntax[0])))
    except NotSendable as exc:
        log.warning("retrieve: instance %s not sent: %s", inst.sop_instance_uid, exc)
        raise
    status = send_store(assoc, int(cx.context_id or 1), msg_id, inst.sop_class_uid,
                        inst.sop_instance_uid, payload)
    if status is None:
        raise NotSendable(f"no C-STORE response for {inst.sop_instance_uid}")
    return status


def install_sender(assoc: Any) -> None:
    """Make this association send :class:`StoredInstance` data sets from their blobs."""
    assoc.send_c_store = lambda ds, msg_id=1, **kw: send_stored(assoc, ds, msg_id, **kw)


def stored_instances(instances: list[Instance], store: BlobStore) -> Iterator[StoredInstance]:
    for inst in instances:
        yield StoredInstance(inst, store)


def move_associations(count: int, cap: int) -> int:
    """How many associations a C-MOVE of ``count`` instances uses: one per
    ``INSTANCES_PER_ASSOCIATION`` (a small move is not worth a second handshake), at most
    ``cap``."""
    return max(1, min(cap, count // INSTANCES_PER_ASSOCIATION))


INSTANCES_PER_ASSOCIATION = 20


class MoveWorkers:
    """The extra associations of one large C-MOVE, each sending from a shared queue.

    The sub-association pynetdicom opened stays the first sender: the C-MOVE handler
    (:meth:`results`) yields to it the next unsent instance whenever no instance sent by a
    worker is waiting to be reported, so every association is kept busy and every instance
    is reported exactly once (a worker's instance carries its ``outcome``). A worker that
    cannot associate, or loses its association, stops; the instances it did not take are
    sent by the others. Each association sends one instance at a time and waits for its
    response (PS3.7 allows no more without asynchronous operations negotiated).
    """

    def __init__(self, instances: list[Instance], store: BlobStore, *, ae_title: str,
                 destination: tuple[str, int], called_ae: str,
                 contexts: list[PresentationContext], extra: int, max_pdu: int,
                 cancelled: Callable[[], bool], timeout: float = 120.0) -> None:
        self.queue: collections.deque[StoredInstance] = collections.deque(
            StoredInstance(i, store) for i in instances)
        self.total = len(instances)
        self.done: queue.Queue[StoredInstance] = queue.Queue()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._cancel_check = cancelled  # (pynetdicom forgets a C-CANCEL once it told us)
        self._cancel_seen = False
        self.ae_title = ae_title
        self.destination = destination
        self.called_ae = called_ae
        self.contexts = contexts
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.associations: list[Any] = []
        self.threads = [threading.Thread(target=self._work, name=f"dicom-move-{n}",
                                         daemon=True) for n in range(extra)]
        self.running = len(self.threads)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def cancelled(self) -> bool:
        """Whether the requester sent C-CANCEL (remembered once seen)."""
        with self.lock:
            if not self._cancel_seen and self._cancel_check():
                self._cancel_seen = True
            return self._cancel_seen

    def take(self) -> StoredInstance | None:
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def _associate(self) -> Any:
        from .transport import PduLimits, SyncnodeAE

        ae = SyncnodeAE(self.ae_title, PduLimits(max_pdata=self.max_pdu))
        ae.acse_timeout = 30
        ae.dimse_timeout = self.timeout
        ae.network_timeout = 60
        ae.connection_timeout = 10
        return ae.associate(self.destination[0], self.destination[1], contexts=self.contexts,
                            ae_title=self.called_ae, max_pdu=self.max_pdu)

    def _work(self) -> None:
        try:
            assoc = self._associate()
        except (OSError, RuntimeError, ValueError) as exc:
            log.info("C-MOVE: an extra association to %s failed: %s", self.called_ae, exc)
            assoc = None
        try:
            if assoc is None or not assoc.is_established:
                return
            with self.lock:
                self.associations.append(assoc)
            msg_id = 0
            while not self.stopping.is_set() and assoc.is_established:
                if self.cancelled():
                    break
                item = self.take()
                if item is None:
                    break
                msg_id = msg_id % 65535 + 1
                try:
                    object.__setattr__(item, "outcome", send_stored(assoc, item, msg_id))
                except NotSendable as exc:
                    object.__setattr__(item, "outcome", exc)
                except Exception as exc:  # the association failed mid-send: report it
                    log.warning("C-MOVE: sending %s failed: %s", item.SOPInstanceUID,
                                type(exc).__name__)
                    object.__setattr__(item, "outcome",
                                       NotSendable(f"sending failed: {type(exc).__name__}"))
                self.done.put(item)
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
            with self.lock:
                self.running -= 1
            self.done.put(_WORKER_DONE)

    def results(self) -> Iterator[StoredInstance | None]:
        """Every instance once, in the order they complete: a worker's (with its
        outcome) or one still to be sent on pynetdicom's association; None once the
        requester cancelled (the workers are stopped first, what they sent is reported)."""
        reported = 0
        while reported < self.total:
            if self.cancelled():
                self.stop()
                while True:
                    try:
                        item = self.done.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _WORKER_DONE:
                        yield item
                yield None
                return
            try:
                item = self.done.get_nowait()
            except queue.Empty:
                item = self.take()
                if item is None:  # all taken: wait for the workers' last ones
                    item = self.done.get(timeout=self.timeout + 30)
            if item is _WORKER_DONE:
                continue
            reported += 1
            yield item

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            if t.is_alive():
                t.join(self.timeout + 30)


_WORKER_DONE = StoredInstance.__new__(StoredInstance)
