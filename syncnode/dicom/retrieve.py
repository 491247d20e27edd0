"""``--import-from AE@HOST:PORT``: poll a PACS and retrieve the studies we do not have yet.

Every ``poll_interval`` seconds a worker per source asks the PACS (C-FIND, Study Root,
STUDY level) for every study and its NumberOfStudyRelatedInstances. A study is
retrieved with C-MOVE to this node's own AE title (so the PACS must list this node's
AE title, host and DICOM port among its known modalities), and the instances arrive
through the node's SCP like any C-STORE: verified, stored byte for byte, durable.

Table ``retrieved`` (the catalog's read model :mod:`syncnode.catalog.retrieved`)
remembers, per source, each retrieved Study Instance UID and the instance count the PACS reported.
A study is never fetched twice: it is fetched again only if the PACS later reports
more instances than were recorded (new images added to it). A study whose instances
the node already holds (e.g. one the exporter delivered to that same PACS) is recorded
without being moved, so export and import of one PACS do not loop.

Failures (PACS unreachable, C-MOVE failed or partial) are logged and retried on the
next poll; a study is recorded only after a C-MOVE whose final status is Success.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ..config import parse_ae_address
from ..ids import is_uid
from ..local import LocalNode
from .transport import PduLimits, SyncnodeAE

log = logging.getLogger("syncnode.dicom.retrieve")
FIND_TIMEOUT = 10.0  # seconds to wait for each C-FIND answer from the PACS

class Source:
    def __init__(self, retriever: Retriever, address: str) -> None:
        self.r = retriever
        self.address = address
        self.ae_title, self.host, self.port = parse_ae_address(address)
        self.thread = threading.Thread(target=self._run, name=f"dicom-import-{self.ae_title}",
                                       daemon=True)
        self.last_error = ""
        self.moved_studies = 0
        self.moved_instances = 0
        self.runs = 0  # polls finished, with or without an error
        self.errors = 0
        self.last_run = 0.0
        self.state = "starting"  # polling, moving, idle, error

    def _hint(self, message: str) -> str:
        """An error with what the PACS administrator must check."""
        return (f"{message}. Check that the PACS knows this node as a DICOM modality: AE "
                f"title {self.r.ae_title!r} with this host's address and the node's DICOM "
                f"port, allowed to query (C-FIND) and to receive C-MOVE; and that "
                f"{self.address} is the PACS's own AE title, host and port")

    def _run(self) -> None:
        while not self.r.stopping.is_set():
            self.state = "polling"
            try:
                self.poll()
                self.last_error = ""
                self.state = "idle"
            except (OSError, RuntimeError, ValueError) as exc:
                self.last_error = self._hint(str(exc))
                self.errors += 1
                self.state = "error"
                log.warning("import from %s: %s", self.address, self.last_error)
            except Exception as exc:  # a bug must not end the worker: log it, go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.errors += 1
                self.state = "error"
                log.exception("import from %s failed", self.address)
            self.runs += 1
            self.last_run = time.time()
            self.r.stopping.wait(self.r.poll_interval)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "last_error": self.last_error, "runs": self.runs,
                "errors": self.errors, "last_run": self.last_run,
                "studies_retrieved": self.moved_studies,
                "instances_retrieved": self.moved_instances}

    def _associate(self, contexts: list[Any], dimse_timeout: float | None = None) -> Any:
        ae = SyncnodeAE(self.r.ae_title, PduLimits(max_pdata=1 << 20))
        ae.acse_timeout = 30
        ae.dimse_timeout = dimse_timeout or self.r.move_timeout
        ae.network_timeout = 60
        ae.connection_timeout = 10
        assoc = ae.associate(self.host, self.port, contexts=contexts, ae_title=self.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _socket_timeout)])
        if not assoc.is_established:
            why = ("rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted
                   else "not accepted")
            raise RuntimeError(f"association with {self.address} was {why}")
        return assoc

    def poll(self) -> None:
        studies = self.find_studies()
        known = self.r.node.catalog.retrieved.known(self.address)
        todo = [(uid, n) for uid, n in studies.items() if uid not in known or n > known[uid]]
        for uid, count in todo:
            if self.r.stopping.is_set():
                return
            have = self.r.local_count(uid)
            if count and have >= count:
                self.record(uid, count)  # already here (e.g. exported by us to it)
                continue
            self.state = "moving"
            before = have
            if self.move_study(uid):
                after = self.r.local_count(uid)
                self.record(uid, max(count, after))
                self.moved_studies += 1
                self.moved_instances += max(0, after - before)

    def find_studies(self) -> dict[str, int]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.NumberOfStudyRelatedInstances = ""
        # A PACS that refuses our AE may just never answer the C-FIND: a short DIMSE
        # timeout reports that within seconds (each answer of a long listing restarts it)
        assoc = self._associate([_cx(StudyRootQueryRetrieveInformationModelFind)],
                                FIND_TIMEOUT)
        found: dict[str, int] = {}
        done = False
        try:
            for status, ident in assoc.send_c_find(query,
                                                   StudyRootQueryRetrieveInformationModelFind):
                code = int(status.get("Status", 0xC000)) if status else None
                if code is None:
                    raise RuntimeError(f"C-FIND got no response from {self.address} (the "
                                       "PACS aborted or timed out)")
                if code in (0xFF00, 0xFF01) and ident is not None:
                    uid = str(ident.get("StudyInstanceUID", "") or "").strip()
                    if not is_uid(uid):
                        continue
                    try:
                        n = int(ident.get("NumberOfStudyRelatedInstances", 0) or 0)
                    except (TypeError, ValueError):
                        n = 0
                    found[uid] = n
                elif code != 0x0000:
                    raise RuntimeError(f"C-FIND failed with status 0x{code:04X}")
            done = True
        finally:
            if assoc.is_established:
                # after a refusal the PACS may never answer a release either (it waited
                # the whole ACSE timeout, 30 s, before the error was seen): abort then
                if done:
                    assoc.release()
                else:
                    assoc.abort()
        return found

    def move_study(self, study_uid: str) -> bool:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study_uid
        assoc = self._associate([_cx(StudyRootQueryRetrieveInformationModelMove)])
        final: int | None = None
        failed = done = 0
        try:
            for status, _ident in assoc.send_c_move(
                    ident, self.r.ae_title, StudyRootQueryRetrieveInformationModelMove):
                if not status:
                    break
                code = int(status.get("Status", 0xC000))
                if code not in (0xFF00,):
                    final = code
                    failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                    done = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
        finally:
            if assoc.is_established:
                assoc.release()
        if final == 0x0000:
            log.info("import from %s: study %s retrieved (%d instances)", self.address,
                     study_uid, done)
            return True
        log.warning("import from %s: C-MOVE of study %s ended with %s%s", self.address,
                    study_uid, "no final status" if final is None else f"0x{final:04X}",
                    "" if final is None else f" ({failed} failed)")
        return False

    def record(self, uid: str, count: int) -> None:
        self.r.node.catalog.retrieved.record(self.address, uid, count)


def _cx(model: str) -> Any:
    from pynetdicom.presentation import build_context

    return build_context(model)


def _socket_timeout(event: evt.Event) -> None:
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.settimeout(120)


class Retriever:
    """One :class:`Source` worker per ``import_from`` address."""

    def __init__(self, node: LocalNode, sources: list[str], *, ae_title: str,
                 poll_interval: float = 60.0, move_timeout: float = 600.0) -> None:
        self.node = node
        self.ae_title = ae_title
        self.poll_interval = poll_interval
        self.move_timeout = move_timeout
        self.stopping = threading.Event()
        self.sources = [Source(self, a) for a in dict.fromkeys(sources)]

    def local_count(self, study_uid: str) -> int:
        return self.node.catalog.live_count(study_uid)

    def start(self) -> None:
        for s in self.sources:
            s.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for s in self.sources:
            if s.thread.is_alive():
                s.thread.join(max(0.1, deadline - time.monotonic()))
