"""The DICOM SCP of ``syncnode run``: C-ECHO, C-STORE into the blob store, C-FIND over the catalog.

Receiving an instance (C-STORE)
-------------------------------
1. While the P-DATA PDUs of a C-STORE request arrive, the data set bytes are written, as
   received, into a blob-store temp file (:class:`StoreSpool`), after a preamble, ``DICM``
   and a file meta group built from the association: Media Storage SOP Class/Instance
   UID = the request's Affected SOP Class/Instance UID, Transfer Syntax UID = the
   negotiated one, Implementation Class UID/Version Name = syncnode's (we write the file),
   and nothing else (no sender-specific element: the same data set sent by two AEs is
   the same blob, so re-sending adds nothing). The data set is never decoded
   or re-encoded; memory does not grow with its size; it is hashed while written.
2. When the request is complete, the thread that received it (:class:`StreamingDIMSE`,
   no hand-off to pynetdicom's association thread) inspects the temp file
   (:func:`syncnode.dicomfile.inspect_file`) and hands (attributes, staged temp file) to
   the :class:`Committer`.
3. The :class:`Committer` (group commit across associations) appends the put events
   of everything queued so far to the ingest journal, then installs the batch's blobs
   with :meth:`~syncnode.blobstore.BlobStore.install_staged`: one filesystem sync for the
   temp files and the journal, the renames, one sync for the renames
   (:mod:`syncnode.dicom.journal`); the journal's thread inserts the events into the
   catalog right after (milliseconds) and replays them after a crash.
4. Only then is the response sent (encoded directly, :func:`store_response`): Success
   0x0000 means the bytes and the event are durable. Failures store nothing: 0xA700
   out of resources (disk full); 0xA900 data set does not match SOP class (identity
   UIDs missing, invalid or contradicting the request); 0xC000 cannot understand
   (truncated, corrupt, unsupported encoding; the reason is in the Error Comment);
   0x0110 processing failure (unexpected error).

Association policy
------------------
Called AE title must be ours (``require_called_aet``); if ``allowed_aes`` is set, the
calling AE title (and, for ``AE@HOST`` entries, the peer address) must be on it, else
A-ASSOCIATE-RJ (calling AE not recognised). PDU reads are capped, sockets have
TCP_NODELAY, and a connection becomes an association (and counts toward the limit) only
once its A-ASSOCIATE-RQ arrived within the ARTIM timeout (:mod:`syncnode.dicom.transport`,
``perimeter``). With ``ssl_context`` the SCP speaks DICOM TLS (PS3.15 B.1).

Logs name UIDs, hashes, AE titles and addresses; never patient names, IDs or dates.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from .. import __version__
from ..audit import AuditLog, dicom_actor
from ..blobstore import BlobInfo, BlobStore, StagedBlob, StoreFull
from ..catalog import InvalidLocalPut
from ..dicomfile import InstanceInfo, InvalidDicom, InvalidIdentity, inspect_file
from ..ids import InvalidUID, is_uid
from ..local import CATALOG_FILE, LocalNode
from ..rejection import KEY_OBJECT_SELECTION, InvalidRejectionNote
from . import commitment, provider, query
from .ingest import SpoolWriter
from .journal import IngestJournal
from .transport import (
    GuardedServer,
    PduLimits,
    Perimeter,
    SyncnodeAE,
    copy_contexts,
    set_nodelay,
    start_server,
)

log = logging.getLogger("syncnode.dicom")

# 2.25 + a UUID5: globally unique by construction, no registered root needed.
IMPLEMENTATION_CLASS_UID = "2.25.222123623580638095036409013028739790235"
IMPLEMENTATION_VERSION = f"SYNCNODE_{__version__}"[:16]

# Every standard transfer syntax whose data set is self-contained (JPIP-referenced and
# SMPTE ST 2110 syntaxes carry no pixel data in the data set and are left out).
STORE_TRANSFER_SYNTAXES = [
    ts for ts in AllTransferSyntaxes
    if not ts.startswith("1.2.840.10008.1.2.7.")
    and ts not in ("1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95",
                   "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205")
]
FIND_MODELS = (StudyRootQueryRetrieveInformationModelFind,
               PatientRootQueryRetrieveInformationModelFind)
RETRIEVE_MODELS = (StudyRootQueryRetrieveInformationModelGet,
                   PatientRootQueryRetrieveInformationModelGet,
                   StudyRootQueryRetrieveInformationModelMove,
                   PatientRootQueryRetrieveInformationModelMove)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110
COMMIT_WAIT = 300.0  # seconds a handler waits for its group commit before giving up



class RejectedInstance(InvalidDicom):
    """An instance an IOCM rejection note rejected for good, arriving again."""


def status_for(exc: Exception) -> int:
    """The C-STORE failure status for an error, by its type: the instance's identity
    (:class:`InvalidIdentity`, :class:`InvalidUID`, :class:`InvalidLocalPut`) -> 0xA900;
    any other unacceptable file -> 0xC000; no space -> 0xA700; anything else -> 0x0110."""
    if isinstance(exc, RejectedInstance):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, InvalidIdentity | InvalidUID | InvalidLocalPut):
        return STATUS_DATASET_MISMATCH
    if isinstance(exc, InvalidDicom):
        return STATUS_CANNOT_UNDERSTAND
    if isinstance(exc, StoreFull):
        return STATUS_OUT_OF_RESOURCES
    return STATUS_PROCESSING_FAILURE


# --------------------------------------------------------------------------------------------
# File meta


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str,
                    source_ae: str = "") -> bytes:
    """Preamble, ``DICM`` and the group 0002 elements (explicit VR little endian)."""
    body = b"".join([
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _ui(sop_class)),
        _element(0x00020003, b"UI", _ui(sop_instance)),
        _element(0x00020010, b"UI", _ui(transfer_syntax)),
        _element(0x00020012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        _element(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION)),
        *([_element(0x00020016, b"AE", _text(source_ae[:16]))] if source_ae else []),
    ])
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


# --------------------------------------------------------------------------------------------
# Streaming the data set of a C-STORE request to disk


class StoreSpool:
    """File-like target for the data set of one C-STORE request (pynetdicom writes
    ``write(bytes)``, calls ``file.flush()``, and at the end ``close()``/unlinks ``name``).

    Errors while writing (disk full) are remembered, not raised: they surface in the
    handler as a failure status. ``claim()`` hands the writer to the handler; a spool that
    is never claimed (association aborted mid-transfer) is discarded by ``close()``.
    """

    def __init__(self, store: BlobStore, header: bytes) -> None:
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.writer: SpoolWriter | None = None
        self._claimed = False
        try:
            self.writer = SpoolWriter(store)
            self.writer.write(header)
        except (StoreFull, OSError) as exc:
            self._fail(exc)

    @property
    def file(self) -> StoreSpool:
        return self

    @property
    def name(self) -> str:
        return str(self.writer.tmp_path) if self.writer is not None else ""

    def flush(self) -> None:
        """No-op: bytes are handed to the OS when the request is complete."""

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def write(self, data: bytes) -> int:
        with self._lock:
            if self.writer is None or self._claimed:
                return len(data)
            try:
                self.writer.write(data)
            except (StoreFull, OSError) as exc:
                self._fail(exc)
        return len(data)

    def claim(self) -> SpoolWriter:
        with self._lock:
            self._claimed = True
            if self.error is not None or self.writer is None:
                raise self.error or StoreFull("spool lost")
            return self.writer

    def close(self) -> None:
        with self._lock:
            if not self._claimed and self.writer is not None:
                self.writer.abort()
                self.writer = None

    def __bool__(self) -> bool:
        return True


class _StreamingMessage(DIMSEMessage):
    """A DIMSE message whose C-STORE data set goes to a :class:`StoreSpool`.

    pynetdicom's ``DIMSEMessage.decode_msg`` with the temp-file branch replaced. Once the
    command set is decoded the instance's class becomes the concrete message class, whose
    own ``decode_msg`` then writes further data set fragments into ``_data_set_file``.
    """

    def __init__(self, provider: StreamingDIMSE) -> None:
        # DIMSEMessage.__init__ keys its set-up on the class name; do what it does for the
        # base class (the concrete class is chosen once the command set is decoded).
        self.context_id = None
        self.encoded_command_set = BytesIO()
        self.data_set = BytesIO()
        self.command_set = Dataset()
        self._data_set_path = None
        self._data_set_file = None
        self._provider = provider

    def decode_msg(self, primitive: P_DATA, assoc: Any = None) -> bool:
        if primitive.__class__ != P_DATA or primitive is None:
            return False
        for context_id, data in primitive.presentation_data_value_list:
            header = data[0]
            if header & 1:
                self.encoded_command_set.write(data[1:])
                if header & 2:
                    self.context_id = context_id
                    self.command_set = decode(self.encoded_command_set, True, True)
                    self.__class__ = _MESSAGE_TYPES[cast(int, self.command_set.CommandField)][1]
                    if self.command_set.CommandDataSetType == 0x0101:
                        return True
                    if isinstance(self, C_STORE_RQ):
                        spool = self._provider.new_spool(self, context_id)
                        self._data_set_file = spool  # type: ignore[assignment]
                        self._data_set_path = Path(spool.name) if spool.name else None
            else:
                if self._data_set_file:
                    self._data_set_file.write(data[1:])
                else:
                    cast(Any, self.data_set).write(data[1:])
                if header & 2:
                    return True
        return False


StoreFn = Callable[[Any, C_STORE, str], "int | Dataset"]


class StreamingDIMSE(DIMSEServiceProvider):
    """DIMSE provider that streams C-STORE data sets into the blob store.

    With ``direct_store``, a complete C-STORE request is also *served* here, in the DUL
    thread that received it, and its response queued right away: the association thread
    is not involved, which saves two thread hand-offs per instance. (The peer waits for
    the response anyway, so the DUL has nothing else to read meanwhile.) Other requests,
    and C-STOREs on a context that is not accepted, take pynetdicom's usual path.
    """

    def __init__(self, assoc: Any, store: BlobStore, direct_store: StoreFn | None = None
                 ) -> None:
        super().__init__(assoc)
        self._store = store
        self.direct_store = direct_store
        self.spools: list[StoreSpool] = []

    def receive_primitive(self, primitive: P_DATA) -> None:
        # pynetdicom's DIMSEServiceProvider.receive_primitive, plus the direct C-STORE path.
        if self.message is None:
            self.message = _StreamingMessage(self)
        msg = self.message
        if not msg.decode_msg(primitive, self.assoc):
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": msg})
        context_id = cast(int, msg.context_id)
        try:
            request = msg.message_to_primitive()
        except Exception as exc:  # a malformed message: the peer's fault; abort
            log.warning("invalid DIMSE message received: %s", type(exc).__name__)
            self.dul.event_queue.put("Evt19")
            return
        msg.encoded_command_set = BytesIO()
        msg.data_set = BytesIO()
        msg._data_set_file = None
        msg._data_set_path = None
        self.message = None
        if isinstance(request, C_CANCEL):
            if len(self.cancel_req) < 10:
                self.cancel_req[cast(int, request.MessageIDBeingRespondedTo)] = request
            return
        cx = self.assoc._accepted_cx.get(context_id)
        if (self.direct_store is not None and isinstance(request, C_STORE)
                and request.is_valid_request and cx is not None
                and not self.assoc._sent_release):
            self._serve_store(request, context_id, str(cx.transfer_syntax[0]))
            return
        self.msg_queue.put((context_id, request))

    def _serve_store(self, req: C_STORE, context_id: int, transfer_syntax: str) -> None:
        assert self.direct_store is not None
        try:
            status = self.direct_store(self.assoc, req, transfer_syntax)
        except Exception:  # never leave the peer without an answer
            log.exception("C-STORE handling failed")
            status = STATUS_PROCESSING_FAILURE
        finally:
            spool = getattr(req, "_dataset_file", None)
            if isinstance(spool, StoreSpool):
                spool.close()
        if isinstance(status, Dataset):
            code, comment = int(status.Status), str(status.get("ErrorComment", "") or "")
        else:
            code, comment = int(status), ""
        if self.assoc.is_established:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + store_response(
                str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or ""),
                int(req.MessageID or 0), code, comment)))
            self.dul.send_pdu(pdata)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """pynetdicom's ``send_msg``, except that a Pending C-GET/C-MOVE response without an
        identifier (one per sub-operation) is encoded directly (:func:`pending_response`):
        through pydicom it cost a quarter of the CPU of a large retrieve."""
        if (isinstance(primitive, C_MOVE | C_GET) and primitive.Status == 0xFF00
                and primitive.Identifier is None
                and primitive.MessageIDBeingRespondedTo is not None):
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + pending_response(
                0x8021 if isinstance(primitive, C_MOVE) else 0x8010,
                str(primitive.AffectedSOPClassUID or ""),
                int(primitive.MessageIDBeingRespondedTo),
                [int(getattr(primitive, f"Number{k}Suboperations") or 0)
                 for k in ("OfRemaining", "OfCompleted", "OfFailed", "OfWarning")])))
            self.dul.send_pdu(pdata)
            return
        super().send_msg(primitive, context_id)

    def new_spool(self, msg: DIMSEMessage, context_id: int) -> StoreSpool:
        cs = msg.command_set
        cx = self.assoc._accepted_cx.get(context_id)
        ts = str(cx.transfer_syntax[0]) if cx is not None else ""
        header = file_meta_bytes(str(cs.AffectedSOPClassUID or ""),
                                 str(cs.AffectedSOPInstanceUID or ""), ts)
        spool = StoreSpool(self._store, header)
        # Keep only spools that may still need discarding (bounded per association).
        self.spools = [s for s in self.spools if not s._claimed and s.writer is not None]
        self.spools.append(spool)
        return spool

    def discard(self) -> None:
        for s in self.spools:
            s.close()
        self.spools = []


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def store_response(sop_class: str, sop_instance: str, message_id: int, status: int,
                   comment: str = "") -> bytes:
    """The command set of a C-STORE-RSP (implicit VR little endian, PS3.7 9.3.1.2),
    encoded directly: the same bytes pynetdicom would send, without building a data set."""
    body = b"".join([
        _implicit(0x00000002, _ui(sop_class)),
        _implicit(0x00000100, struct.pack("<H", 0x8001)),
        _implicit(0x00000120, struct.pack("<H", message_id & 0xFFFF)),
        _implicit(0x00000800, struct.pack("<H", 0x0101)),
        _implicit(0x00000900, struct.pack("<H", status & 0xFFFF)),
        *([_implicit(0x00000902, _text(comment[:64]))] if comment else []),
        _implicit(0x00001000, _ui(sop_instance)),
    ])
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def pending_response(command: int, sop_class: str, message_id: int, counts: list[int]
                     ) -> bytes:
    """The command set of a Pending C-GET-RSP (0x8010) or C-MOVE-RSP (0x8021) without an
    identifier, encoded directly (PS3.7 9.3.3.2, 9.3.4.2): ``counts`` are the numbers of
    remaining, completed, failed and warning sub-operations."""
    body = b"".join([
        _implicit(0x00000002, _ui(sop_class)),
        _implicit(0x00000100, struct.pack("<H", command)),
        _implicit(0x00000120, struct.pack("<H", message_id & 0xFFFF)),
        _implicit(0x00000800, struct.pack("<H", 0x0101)),
        _implicit(0x00000900, struct.pack("<H", 0xFF00)),
        *(_implicit(tag, struct.pack("<H", n & 0xFFFF))
          for tag, n in zip((0x00001020, 0x00001021, 0x00001022, 0x00001023), counts,
                            strict=True)),
    ])
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


# --------------------------------------------------------------------------------------------
# Group commit


@dataclass
class _Pending:
    info: InstanceInfo
    staged: StagedBlob
    blob: BlobInfo | None = None  # once installed
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    new: bool = False


class Committer:
    """Makes stored blobs durable and inserts their put events, many at a time.

    Leader-based group commit, on its own catalog connection: a handler thread that
    submits an item while no commit is running becomes the leader and commits everything
    queued so far (its own item included); handlers arriving meanwhile queue up and wait,
    and the next leader takes them all in one batch. A single association therefore pays
    no thread hand-off, and concurrent associations share device flushes. Per batch: the
    put events are appended to the ingest journal (:mod:`syncnode.dicom.journal`), then
    the blobs are installed as a group (:meth:`BlobStore.install_staged`: their bytes and
    the journal are synced before any rename, the renames and the journal's keep links
    after); the journal's thread then inserts the events into the catalog. A batch that
    fails is retried item by item so one bad item cannot fail the others.
    """

    MAX_BATCH = 256

    def __init__(self, journal: IngestJournal, store: BlobStore) -> None:
        self.journal = journal
        self._store = store
        self._cv = threading.Condition()
        self._pending: list[_Pending] = []
        self._leader = False
        self._closed = False
        self.batches = 0
        self.committed = 0

    def commit(self, info: InstanceInfo, staged: StagedBlob, timeout: float) -> _Pending:
        """Queue an item (its temp file is the committer's from now on); return once it is
        committed, failed, or ``timeout`` passed."""
        item = _Pending(info, staged)
        deadline = time.monotonic() + timeout
        with self._cv:
            if self._closed:
                item.error = RuntimeError("the DICOM bridge is stopping")
                item.done.set()
                return item
            self._pending.append(item)
        while not item.done.is_set():
            with self._cv:
                if self._leader or not self._pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return item
                    self._cv.wait(min(left, 1.0))
                    continue
                self._leader = True
                batch = self._pending[:self.MAX_BATCH]
                del self._pending[:self.MAX_BATCH]
            try:
                self._commit(batch)
            finally:
                with self._cv:
                    self._leader = False
                    self._cv.notify_all()
        return item

    def stop(self) -> None:
        with self._cv:
            self._closed = True
            deadline = time.monotonic() + 30
            while (self._leader or self._pending) and time.monotonic() < deadline:
                self._cv.wait(0.5)
        self.journal.close()

    def _commit(self, batch: list[_Pending]) -> None:
        results: list[tuple[str, bool, bytes | None]] = []
        try:
            results = self.journal.record([(p.info, p.staged.info(created=False))
                                           for p in batch],
                                          {p.staged.digest: p.staged.tmp for p in batch})

            def keep(_infos: list[BlobInfo]) -> None:
                for p, (_eid, _new, body) in zip(batch, results, strict=True):
                    if body is not None:
                        self.journal.keep(p.staged.digest)

            infos = self._store.install_staged([p.staged for p in batch],
                                               before_final_sync=keep)
            recorded, results = results, []  # durable now: nothing to abandon
            self.journal.durable([(eid, body) for eid, _new, body in recorded if body])
            for p, info, (_eid, new, _body) in zip(batch, infos, recorded, strict=True):
                p.blob, p.new = info, new
            self.batches += 1
            self.committed += len(batch)
        except Exception as exc:  # reported per item below
            if results:
                self.journal.abandon(results)
            if len(batch) > 1:
                for p in batch:
                    self._commit([p])
                return
            batch[0].error = exc
        for p in batch:
            p.done.set()

    def forget(self, item: _Pending) -> None:
        """After a failed commit: remove the item's temp file, or the blob this bridge
        created from it if nothing references it."""
        item.staged.tmp.unlink(missing_ok=True)
        if item.staged.chunks_tmp is not None:
            item.staged.chunks_tmp.unlink(missing_ok=True)
        if item.blob is not None and item.blob.created:
            self.journal.catalog.collect_garbage([item.blob.hash], self._store.delete)


# --------------------------------------------------------------------------------------------
# Allow-list


def parse_allowed(entries: list[str]) -> list[tuple[str, str | None]]:
    """``AE`` or ``AE@HOST`` entries -> (ae, host or None)."""
    out: list[tuple[str, str | None]] = []
    for e in entries:
        if "@" in e:
            ae, host = e.rsplit("@", 1)
            out.append((ae.strip(), host.strip() or None))
        else:
            out.append((e.strip(), None))
    return out


def _host_matches(wanted: str, address: str) -> bool:
    if wanted == address:
        return True
    try:
        infos = socket.getaddrinfo(wanted, None)
    except OSError:
        return False
    return any(info[4][0] == address for info in infos)


@dataclass
class ScpStats:
    associations: int = 0  # requested (the rejected ones included)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    rejected_associations: int = 0
    finds: int = 0


@dataclass(slots=True)
class _Received:
    """What one association stored: recorded as one ``received`` audit entry at its end."""

    actor: str
    studies: set[str] = field(default_factory=set)
    new: int = 0
    unchanged: int = 0
    failed: int = 0
    nbytes: int = 0


def _requestor_actor(assoc: Any) -> str:
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title or "") if primitive else ""
    return dicom_actor(calling or str(assoc.requestor.ae_title or ""),
                       str(assoc.requestor.address))


def _matching_keys(identifier: Dataset) -> list[str]:
    """The keywords of the attributes a query matches on (those given a value); the values
    themselves are never recorded."""
    keys = []
    for elem in identifier:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if elem.VR == "SQ" or elem.value in (None, "", b"") or elem.is_empty:
            continue
        keys.append(elem.keyword or f"x{int(elem.tag):08X}")
    return keys


@functools.cache
def _supported_contexts() -> tuple[PresentationContext, ...]:
    """What the SCP supports, built once per process: Verification, every storage class in
    every transfer syntax it stores, C-FIND and C-GET/C-MOVE, storage commitment. Each
    server takes copies (:func:`copy_contexts`): building these 178 contexts validates
    ~18,000 UIDs, ~60 ms of CPU per node start."""
    ae = AE()
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        # SCP/SCU role selection accepted: a C-GET requester is the storage SCP
        ae.add_supported_context(cx.abstract_syntax, STORE_TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)
    for model in FIND_MODELS + RETRIEVE_MODELS:
        ae.add_supported_context(model)
    # Storage commitment (push model): we are its SCP; the SCU role is accepted too so
    # that a PACS can send us the report of a commitment we requested (exporter)
    ae.add_supported_context(commitment.STORAGE_COMMITMENT, scu_role=True, scp_role=True)
    return tuple(ae.supported_contexts)


class DicomServer:
    """The node's DICOM SCP. ``start()`` binds and serves in background threads.

    With an ``audit`` trail, each association that stored instances is one ``received``
    entry (counts and studies, actor ``dicom:<calling AE>@<IP>``), each C-FIND one
    ``query`` entry (matching keys by name), each refused calling AE one
    ``connection-refused`` entry."""

    def __init__(self, node: LocalNode, *, ae_title: str, host: str = "0.0.0.0",
                 port: int = 11112, allowed_aes: list[str] | None = None,
                 max_pdu: int = 262_144, max_associations: int = 16,
                 network_timeout: float = 60.0,
                 on_stored: Callable[[], None] | None = None,
                 perimeter: Perimeter | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 audit: AuditLog | None = None,
                 destinations: dict[str, tuple[str, int]] | None = None,
                 move_associations: int = 4) -> None:
        self.node = node
        self.destinations = dict(destinations or {})
        self.move_associations = move_associations
        self.audit = audit
        self._received: dict[int, _Received] = {}  # id(association) -> its tally
        self._received_lock = threading.Lock()
        self.perimeter = perimeter or Perimeter()
        self.ssl_context = ssl_context
        self.on_stored = on_stored
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.allowed = parse_allowed(allowed_aes or [])
        self.max_pdu = max_pdu
        self.stats = ScpStats()
        # Its own blob store object (same folders): its folder-fsync bookkeeping is ours.
        self.store = BlobStore(node.data)
        self.catalog_path = node.data / CATALOG_FILE
        self.committer: Committer | None = None
        self.limits = PduLimits(max_pdata=max_pdu)
        self.ae = SyncnodeAE(ae_title, self.limits)
        self.ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        self.ae.implementation_version_name = IMPLEMENTATION_VERSION
        self.ae.maximum_pdu_size = max_pdu
        self.ae.require_called_aet = True
        self.ae.maximum_associations = max_associations
        self.ae.network_timeout = network_timeout
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        self.network_timeout = network_timeout
        # pynetdicom keeps an AE's supported contexts in this dict; our own copies of the
        # process-wide templates (add_supported_context would validate every UID again)
        self.ae._supported_contexts = {cx.abstract_syntax: cx
                                       for cx in copy_contexts(list(_supported_contexts()))}
        self.commitments = commitment.CommitmentReporter(self._report_ae, self.destinations)
        # told of each N-EVENT-REPORT of a commitment we requested: (transaction, report)
        # (True if the transaction was one of ours)
        self.on_commitment_report: Callable[[str, Dataset], bool] | None = None
        # C-MOVE sub-associations send stored instances from their blobs
        self.ae.prepare_requested = provider.install_sender
        self._server: GuardedServer | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> int:
        journal = IngestJournal(self.node.data, self.catalog_path, self.node.node_id.compact,
                                self.store, on_applied=self._applied,
                                signer=self.node.signer)
        self.committer = Committer(journal, self.store)
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_N_EVENT_REPORT, self._on_n_event_report),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        try:
            self._server = start_server(
                self.ae, (self.host, self.port), ae_title=self.ae_title, evt_handlers=handlers,
                limits=self.limits,
                dimse_factory=lambda assoc: StreamingDIMSE(assoc, self.store,
                                                           self.store_request),
                read_timeout=self.network_timeout, perimeter=self.perimeter,
                ssl_context=self.ssl_context)
        except BaseException:
            self.committer.stop()
            self.committer = None
            raise
        self.port = int(self._server.server_address[1])
        if self.audit is not None:
            self._server.on_tls_refused = self._on_tls_refused
        log.info("DICOM SCP %s listening on %s:%d%s", self.ae_title, self.host, self.port,
                 " (DICOM TLS)" if self.ssl_context else "")
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            deadline = time.monotonic() + 10
            for assoc in list(server.active_associations):
                assoc.abort()
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.02)
        self.commitments.stop()
        if self.committer is not None:
            self.committer.stop()
            self.committer = None
        with self._received_lock:
            left, self._received = list(self._received.values()), {}
        for tally in left:
            self._record_received(tally)

    def refused_connections(self) -> dict[str, int]:
        """Connections closed before associating, by reason (see transport.PerimeterStats)."""
        server = self._server
        return server.refused.as_dict() if server is not None else {}

    def wait_applied(self, timeout: float = 30.0) -> bool:
        """Block until every acknowledged instance is in the catalog (normally ms)."""
        return self.committer is None or self.committer.journal.wait_applied(timeout)

    def _applied(self, _count: int) -> None:
        if self.on_stored is not None:
            self.on_stored()

    # -- handlers ----------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_close(self, event: evt.Event) -> None:
        dimse = event.assoc.dimse
        if isinstance(dimse, StreamingDIMSE):
            dimse.discard()
        with self._received_lock:
            tally = self._received.pop(id(event.assoc), None)
        if tally is not None:
            self._record_received(tally)

    def _on_tls_refused(self, address: str, reason: str) -> None:
        assert self.audit is not None
        self.audit.record("connection-refused", f"dicom:?@{address}"[:200], "failure",
                          remote=address[:300], reason="DICOM TLS handshake: " + "".join(
                              c for c in reason if " " <= c <= "~")[:200])

    def _tally(self, assoc: Any) -> _Received:
        with self._received_lock:
            tally = self._received.get(id(assoc))
            if tally is None:
                tally = self._received[id(assoc)] = _Received(_requestor_actor(assoc))
            return tally

    def _record_received(self, t: _Received) -> None:
        if self.audit is None or not (t.new or t.unchanged or t.failed):
            return
        self.audit.record("received", t.actor,
                          "failure" if t.failed and not (t.new or t.unchanged) else "success",
                          instances=t.new, unchanged=t.unchanged, failed=t.failed,
                          bytes=t.nbytes, studies=t.studies)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        self.stats.associations += 1
        _prefer_requestor_order(assoc)
        if not self.allowed:
            return
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title or "").strip() if primitive else ""
        address = str(assoc.requestor.address)
        for ae, host in self.allowed:
            if ae == calling and (host is None or _host_matches(host, address)):
                return
        self.stats.rejected_associations += 1
        log.warning("DICOM association refused: calling AE %r from %s is not allowed",
                    calling, address)
        if self.audit is not None:
            self.audit.record("connection-refused", dicom_actor(calling, address), "failure",
                              reason="calling AE title not allowed")
        assoc.acse.send_reject(0x01, 0x01, 0x03)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        return self.store_request(event.assoc, event.request, str(event.context.transfer_syntax))

    def store_request(self, assoc: Any, req: C_STORE, transfer_syntax: str) -> int | Dataset:
        """Store one C-STORE request's data set; return the status to answer with."""
        status = self._store_request(assoc, req, transfer_syntax)
        if self.audit is not None and status != STATUS_SUCCESS:
            self._tally(assoc).failed += 1
        return status

    def _store_request(self, assoc: Any, req: C_STORE, transfer_syntax: str
                       ) -> int | Dataset:
        sop = str(req.AffectedSOPInstanceUID or "")
        shown_sop = sop if is_uid(sop) else "(invalid UID)"
        try:
            writer = self._writer_for(req, transfer_syntax)
        except StoreFull:
            self.stats.failed += 1
            log.error("C-STORE %s refused: no space left for the blob store", shown_sop)
            return _status(STATUS_OUT_OF_RESOURCES, "no space left on the receiving node")
        except OSError as exc:
            self.stats.failed += 1
            log.error("C-STORE %s refused: %s", shown_sop, exc.strerror or type(exc).__name__)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot write to the blob store")
        try:
            writer.flush()
            info = inspect_file(writer.tmp_path)
            if info.sop_instance_uid != sop:  # inspect checks it against the file meta too
                raise InvalidIdentity(f"SOP Instance UID {info.sop_instance_uid} does not "
                                      "match the request's Affected SOP Instance UID")
            refusal = self.node.refused_as_rejected(sop)
            if refusal is not None:
                raise RejectedInstance(refusal)
            staged = writer.stage()
        except InvalidDicom as exc:
            writer.abort()
            self.stats.failed += 1
            log.warning("C-STORE %s from %s refused: %s", shown_sop,
                        assoc.requestor.ae_title, exc.reason)
            return _status(status_for(exc), exc.reason)
        except StoreFull:
            writer.abort()
            self.stats.failed += 1
            log.error("C-STORE %s refused: no space left for the blob store", shown_sop)
            return _status(STATUS_OUT_OF_RESOURCES, "no space left on the receiving node")
        except OSError as exc:
            writer.abort()
            self.stats.failed += 1
            log.error("C-STORE %s failed: %s", shown_sop, exc.strerror or type(exc).__name__)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot write to the blob store")
        committer = self.committer
        if committer is None:
            staged.tmp.unlink(missing_ok=True)
            return _status(STATUS_PROCESSING_FAILURE, "node is stopping")
        pending = committer.commit(info, staged, COMMIT_WAIT)
        if not pending.done.is_set() or pending.error is not None:
            self.stats.failed += 1
            log.error("C-STORE %s: catalog commit failed: %s", sop,
                      type(pending.error).__name__ if pending.error else "timeout")
            if pending.error is not None:
                committer.forget(pending)
            if isinstance(pending.error, StoreFull):
                return _status(STATUS_OUT_OF_RESOURCES, "no space left on the receiving node")
            if isinstance(pending.error, InvalidUID | InvalidLocalPut):
                return _status(status_for(pending.error), str(pending.error))
            return _status(STATUS_PROCESSING_FAILURE, "could not record the instance")
        if pending.new:
            self.stats.stored += 1
        else:
            self.stats.duplicates += 1
        if self.audit is not None:
            tally = self._tally(assoc)
            tally.studies.add(info.study_instance_uid)
            tally.nbytes += staged.size
            if pending.new:
                tally.new += 1
            else:
                tally.unchanged += 1
        log.debug("C-STORE %s stored as blob %s", sop, staged.digest)
        if info.sop_class_uid == KEY_OBJECT_SELECTION and pending.new:
            self._apply_rejection(staged.digest, sop)
        return STATUS_SUCCESS

    def _apply_rejection(self, blob: str, sop: str) -> None:
        """A stored Key Object Selection: if it is an IOCM rejection note, apply it (the
        note itself stays stored; it was acknowledged as durable). Instances acknowledged
        just before are first let into the catalog, so the note finds them."""
        self.wait_applied(30)
        try:
            self.node.apply_rejection(blob)
        except (InvalidRejectionNote, ValueError, OSError) as exc:
            log.warning("Key Object Selection %s: not applied as a rejection note: %s",
                        sop, exc)

    def _writer_for(self, req: C_STORE, transfer_syntax: str) -> SpoolWriter:
        spool = getattr(req, "_dataset_file", None)
        if isinstance(spool, StoreSpool):
            return spool.claim()
        # Not streamed (e.g. a C-STORE arriving on a C-GET association we requested).
        header = file_meta_bytes(str(req.AffectedSOPClassUID or ""),
                                 str(req.AffectedSOPInstanceUID or ""), transfer_syntax)
        writer = SpoolWriter(self.store)
        try:
            writer.write(header)
            writer.write(cast(Any, req.DataSet).getbuffer())
        except BaseException:
            writer.abort()
            raise
        return writer

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        self.stats.finds += 1
        model = str(event.request.AffectedSOPClassUID)
        try:
            identifier = event.identifier
        except Exception as exc:  # an undecodable identifier is the peer's error
            log.warning("C-FIND identifier cannot be decoded: %s", type(exc).__name__)
            yield _status(STATUS_CANNOT_UNDERSTAND, "identifier cannot be decoded"), None
            return
        matches = 0
        outcome, reason = "success", None
        self.wait_applied(30)  # what was acknowledged just before is found too
        try:
            results = query.find(self.node.catalog, model, identifier,
                                 blob_path=self.node.store.path)
            for ds in results:
                if event.is_cancelled:
                    reason = "cancelled by the requestor"
                    yield 0xFE00, None
                    return
                matches += 1
                yield 0xFF00, ds
        except query.QueryError as exc:
            # (its message may quote a matching value: the status only, never the text)
            outcome, reason = "failure", f"refused with status 0x{exc.status:04X}"
            yield _status(exc.status, str(exc)), None
            return
        finally:
            if self.audit is not None:
                self._record_query(event, model, identifier, matches, outcome, reason)
        yield STATUS_SUCCESS, None

    # -- storage commitment ------------------------------------------------------------
    def _report_ae(self) -> SyncnodeAE:
        ae = SyncnodeAE(self.ae_title, self.limits)
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.connection_timeout = 10
        return ae

    def held_class(self, sop_uid: str) -> str | None:
        """The SOP class under which this node durably holds an instance: live in the
        catalog and its blob in the store; else None."""
        inst = self.node.catalog.instance(sop_uid)
        if inst is None or not self.store.has(inst.blob):
            return None
        return inst.sop_class_uid

    def _on_n_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-ACTION Request Storage Commitment: answered at once, reported after
        (:mod:`syncnode.dicom.commitment`)."""
        actor = _requestor_actor(event.assoc)
        if str(event.request.RequestedSOPClassUID) != commitment.STORAGE_COMMITMENT:
            return 0x0118, None  # no such SOP class
        try:
            uid, refs = commitment.parse_request(int(event.action_type or 0),
                                                 event.action_information)
        except commitment.InvalidCommitmentRequest as exc:
            log.warning("storage commitment from %s refused: %s", actor, exc)
            return exc.status, None
        except Exception as exc:  # an undecodable request is the peer's error
            log.warning("storage commitment from %s cannot be decoded: %s", actor,
                        type(exc).__name__)
            return 0x0110, None
        self.wait_applied(30)  # instances acknowledged just before are held too
        report = commitment.commitment_report(uid, refs, self.held_class)
        log.info("storage commitment %s from %s: %d held, %d not", uid, actor,
                 len(report.held), len(report.failed))
        self.commitments.report(event.assoc, str(event.assoc.requestor.ae_title).strip(),
                                report)
        return 0x0000, None

    def _on_n_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """The report of a storage commitment this node requested (as the exporter)."""
        if str(event.request.AffectedSOPClassUID) != commitment.STORAGE_COMMITMENT:
            return 0x0118, None
        try:
            info = event.event_information
        except Exception:  # undecodable: the peer's error
            return 0x0110, None
        uid = str(info.get("TransactionUID", "") or "").strip()
        handler = self.on_commitment_report
        if handler is None or not is_uid(uid):
            log.warning("storage commitment report for an unknown transaction from %s",
                        _requestor_actor(event.assoc))
            return 0x0110, None
        return (0x0000 if handler(uid, info) else 0x0110), None

    def _retrieve_set(self, event: evt.Event) -> list[Any]:
        """The instances a C-GET/C-MOVE names; raises provider.RetrieveError."""
        try:
            identifier = event.identifier
        except Exception as exc:  # an undecodable identifier is the peer's error
            raise provider.RetrieveError("identifier cannot be decoded", 0xC000) from exc
        self.wait_applied(30)  # what was acknowledged just before is retrieved too
        found = provider.resolve(self.node.catalog, str(event.request.AffectedSOPClassUID),
                                 identifier)
        if len(found) > provider.MAX_SUBOPERATIONS:
            raise provider.RetrieveError(f"{len(found)} instances match: more than one "
                                         "retrieve can count (65535)", 0xA701)
        return found

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET: sub-operations on the requester's own association (it is the SCP of the
        storage contexts it proposed with role selection)."""
        actor = _requestor_actor(event.assoc)
        try:
            found = self._retrieve_set(event)
        except provider.RetrieveError as exc:
            log.warning("C-GET from %s refused: %s", actor, exc)
            self._record_retrieve(actor, "C-GET", [], None, f"refused with status "
                                  f"0x{exc.status:04X}")
            yield 1  # (with 0 pynetdicom would answer Success at once)
            yield _status(exc.status, str(exc)), None
            return
        provider.install_sender(event.assoc)
        log.info("C-GET from %s: %d instances", actor, len(found))
        self._record_retrieve(actor, "C-GET", found, None, None)
        yield from self._sub_operations(event, found)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE: sub-operations on a new association to a configured destination."""
        actor = _requestor_actor(event.assoc)
        dest = str(event.move_destination or "").strip()
        address = self.destinations.get(dest)
        if address is None:
            log.warning("C-MOVE from %s refused: move destination %r is not configured "
                        "(dicom_destinations)", actor, dest[:16])
            self._record_retrieve(actor, "C-MOVE", [], dest,
                                  "move destination not configured")
            yield None, None  # pynetdicom answers 0xA801
            return
        try:
            found = self._retrieve_set(event)
            contexts = provider.move_contexts(found)
        except provider.RetrieveError as exc:
            log.warning("C-MOVE from %s refused: %s", actor, exc)
            self._record_retrieve(actor, "C-MOVE", [], dest,
                                  f"refused with status 0x{exc.status:04X}")
            yield address[0], address[1]
            yield 1  # (with 0 pynetdicom would answer Success at once)
            yield _status(exc.status, str(exc)), None
            return
        log.info("C-MOVE from %s: %d instances to %s", actor, len(found), dest)
        self._record_retrieve(actor, "C-MOVE", found, dest, None)
        yield address[0], address[1], {"contexts": contexts or None}
        extra = provider.move_associations(len(found), self.move_associations) - 1
        if extra <= 0:
            yield from self._sub_operations(event, found)
            return
        workers = provider.MoveWorkers(found, self.store, ae_title=self.ae_title,
                                       destination=address, called_ae=dest,
                                       contexts=contexts, extra=extra, max_pdu=self.max_pdu,
                                       cancelled=lambda: bool(event.is_cancelled))
        yield len(found)
        workers.start()
        try:
            for ds in workers.results():
                if ds is None:
                    yield 0xFE00, None
                    return
                yield 0xFF00, ds
        finally:
            workers.stop()

    def _sub_operations(self, event: evt.Event, found: list[Any]) -> Iterator[Any]:
        """What C-GET and C-MOVE yield to pynetdicom after the set is known: its size, then
        each stored data set (Pending), or Cancel once the requester sent C-CANCEL."""
        yield len(found)
        for ds in provider.stored_instances(found, self.store):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def _record_retrieve(self, actor: str, service: str, found: list[Any],
                         destination: str | None, reason: str | None) -> None:
        if self.audit is None:
            return
        self.audit.record("retrieved", actor, "failure" if reason else "success",
                          count=len(found), studies={i.study_instance_uid for i in found},
                          destination=f"{service} {destination}" if destination else service,
                          reason=reason)

    def _record_query(self, event: evt.Event, model: str, identifier: Dataset, matches: int,
                      outcome: str, reason: str | None) -> None:
        assert self.audit is not None
        level = str(identifier.get("QueryRetrieveLevel", "") or "")
        self.audit.record("query", _requestor_actor(event.assoc), outcome,
                          keys=_matching_keys(identifier), count=matches,
                          level=level if level.isalpha() else None,
                          sop_class=model if is_uid(model) else None, reason=reason)


def _prefer_requestor_order(assoc: Any) -> None:
    """Accept, for each proposed context, the requestor's *first* transfer syntax we support.

    pynetdicom picks the acceptor's first syntax that the requestor proposed; a sender
    proposing [JPEG, Explicit LE] would then have to transcode its JPEG file to explicit
    little endian. The requestor lists what it has first, so its order wins here and the
    data set arrives as the sender holds it. (This association's copy of the supported
    contexts is reordered; the server's list is untouched.)
    """
    primitive = assoc.requestor.primitive
    if primitive is None:
        return
    wanted: dict[str, list[str]] = {}
    for cx in primitive.presentation_context_definition_list:
        order = wanted.setdefault(str(cx.abstract_syntax), [])
        order.extend(str(ts) for ts in cx.transfer_syntax if str(ts) not in order)
    for cx in assoc.acceptor.supported_contexts:
        order = wanted.get(str(cx.abstract_syntax))
        if order and len(cx.transfer_syntax) > 1:
            rank = {ts: i for i, ts in enumerate(order)}
            cx._transfer_syntax = sorted(cx.transfer_syntax,
                                         key=lambda ts: rank.get(str(ts), len(rank)))


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment and code != STATUS_SUCCESS:
        ds.ErrorComment = comment[:64]
    return ds


def nodelay_handler(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for plain pynetdicom associations: set TCP_NODELAY."""
    set_nodelay(event.assoc.dul.socket.socket)
