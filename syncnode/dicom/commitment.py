"""Storage Commitment Push Model (PS3.4 J), SCP side: "do you hold these instances durably?"

A requester sends N-ACTION (Action Type 1, Request Storage Commitment) with a Transaction
UID and a Referenced SOP Sequence (class and instance UIDs). The node answers the N-ACTION
at once (Success: the request is taken), then reports in an N-EVENT-REPORT:

- Event Type 1 (all held): every referenced instance is listed in Referenced SOP Sequence;
- Event Type 2 (some failed): the held ones in Referenced SOP Sequence, the others in
  Failed SOP Sequence with a Failure Reason: 0x0112 (no such object instance) when the
  node does not hold it, 0x0119 (class / instance conflict) when it holds the instance
  under another SOP class.

"Held durably" means: live in the catalog (not deleted, not superseded) and its blob
present in the blob store (a C-STORE is acknowledged only once bytes and event are
durable, so such an instance survives a crash). The report goes on the requester's own
association when it is still open (PS3.4 J.3.3: the SCP may use the same association),
otherwise on a new association to the requester's AE title as configured in
``dicom_destinations``, proposing the class with the SCP role (the node sends the report
as the Storage Commitment SCP).

:func:`commitment_report` decides (pure, given two look-ups); :class:`CommitmentReporter`
does the sending. Logs name the Transaction UID, counts and AE titles, never patient data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import build_role
from pynetdicom.presentation import build_context

from ..ids import is_uid

log = logging.getLogger("syncnode.dicom.commitment")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance
NO_SUCH_OBJECT = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
MAX_REFERENCES = 65535


class InvalidCommitmentRequest(ValueError):
    """An N-ACTION the node cannot take (wrong action type, no Transaction UID, malformed
    references); ``status`` is the N-ACTION failure status to answer with."""

    def __init__(self, message: str, status: int = 0x0110) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CommitmentReport:
    """What the N-EVENT-REPORT says: held (class, instance) pairs and failed ones with
    their reason."""

    transaction_uid: str
    held: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def event_type(self) -> int:
        return 2 if self.failed else 1

    def dataset(self) -> Dataset:
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.held:
            ds.ReferencedSOPSequence = Sequence([_ref(c, i) for c, i in self.held])
        if self.failed:
            items = []
            for c, i, reason in self.failed:
                item = _ref(c, i)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = Sequence(items)
        return ds


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def parse_request(action_type: int, info: Dataset | None) -> tuple[str, list[tuple[str, str]]]:
    """(Transaction UID, [(class, instance)]) of an N-ACTION Request Storage Commitment."""
    if action_type != 1:
        raise InvalidCommitmentRequest(f"action type {action_type} is not Request Storage "
                                       "Commitment (1)", 0x0123)  # no such action
    if info is None:
        raise InvalidCommitmentRequest("the request has no action information", 0x0120)
    uid = str(info.get("TransactionUID", "") or "").strip().rstrip("\0")
    if not is_uid(uid):
        raise InvalidCommitmentRequest("the request has no valid Transaction UID", 0x0120)
    refs: list[tuple[str, str]] = []
    for item in info.get("ReferencedSOPSequence", None) or []:
        c = str(item.get("ReferencedSOPClassUID", "") or "").strip().rstrip("\0")
        i = str(item.get("ReferencedSOPInstanceUID", "") or "").strip().rstrip("\0")
        refs.append((c, i))
    if not refs or len(refs) > MAX_REFERENCES:
        raise InvalidCommitmentRequest(f"the request references {len(refs)} instances "
                                       "(1 to 65535 expected)", 0x0120)
    return uid, refs


def commitment_report(transaction_uid: str, refs: list[tuple[str, str]],
                      held_class: Callable[[str], str | None]) -> CommitmentReport:
    """The report for ``refs``: ``held_class(sop_instance_uid)`` is the SOP class under
    which the node durably holds the instance, or None."""
    report = CommitmentReport(transaction_uid)
    for sop_class, sop in refs:
        have = held_class(sop) if is_uid(sop) else None
        if have is None:
            report.failed.append((sop_class, sop, NO_SUCH_OBJECT))
        elif have != sop_class:
            report.failed.append((sop_class, sop, CLASS_INSTANCE_CONFLICT))
        else:
            report.held.append((sop_class, sop))
    return report


class CommitmentReporter:
    """Sends N-EVENT-REPORTs after the N-ACTION response, from a thread of its own."""

    def __init__(self, ae_factory: Callable[[], Any],
                 destinations: dict[str, tuple[str, int]]) -> None:
        self.ae_factory = ae_factory
        self.destinations = destinations
        self.threads: list[threading.Thread] = []
        self.sent = 0

    def report(self, assoc: Any, calling_ae: str, report: CommitmentReport) -> None:
        t = threading.Thread(target=self._send, args=(assoc, calling_ae, report),
                             name="dicom-commitment", daemon=True)
        self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    def stop(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _send(self, assoc: Any, calling_ae: str, report: CommitmentReport) -> None:
        from .exporter import _reactor_paused

        # The N-ACTION response goes first: the reactor sends it before it gives up its
        # turn. Then the same association, if the requester kept it open.
        time.sleep(0.05)
        try:
            with _reactor_paused(assoc):
                usable = (assoc.is_established and not assoc.acse.is_release_requested()
                          and not assoc.acse.is_aborted())
                if usable:
                    status = self._event_report(assoc, report)
                    if status is not None:
                        self._done(report, calling_ae, "the same association", status)
                        return
        except (OSError, RuntimeError, ValueError) as exc:
            log.info("storage commitment %s: the requester's association cannot take the "
                     "report (%s)", report.transaction_uid, exc)
        address = self.destinations.get(calling_ae)
        if address is None:
            log.warning("storage commitment %s: the requester %s closed its association "
                        "and is not in dicom_destinations: the report cannot be delivered",
                        report.transaction_uid, calling_ae)
            return
        ae = self.ae_factory()
        cx = build_context(STORAGE_COMMITMENT)
        try:
            out = ae.associate(address[0], address[1], contexts=[cx], ae_title=calling_ae,
                               ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)])
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("storage commitment %s: cannot associate with %s: %s",
                        report.transaction_uid, calling_ae, exc)
            return
        if not out.is_established:
            log.warning("storage commitment %s: %s did not accept an association for the "
                        "report", report.transaction_uid, calling_ae)
            return
        try:
            with _reactor_paused(out):  # (pynetdicom's own pause races the reactor)
                status = self._event_report(out, report)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("storage commitment %s: sending the report to %s failed: %s",
                        report.transaction_uid, calling_ae, exc)
            status = None
        finally:
            if out.is_established:
                out.release()
        if status is None:
            log.warning("storage commitment %s: %s did not answer the report",
                        report.transaction_uid, calling_ae)
            return
        self._done(report, calling_ae, "a new association", status)

    def _event_report(self, assoc: Any, report: CommitmentReport) -> int | None:
        rsp = assoc.send_n_event_report(report.dataset(), report.event_type,
                                        STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        status = rsp[0] if isinstance(rsp, tuple) else rsp
        return int(status.Status) if status is not None and "Status" in status else None

    def _done(self, report: CommitmentReport, calling_ae: str, how: str, status: int) -> None:
        self.sent += 1
        log.info("storage commitment %s reported to %s on %s: %d held, %d failed "
                 "(answer 0x%04X)", report.transaction_uid, calling_ae, how,
                 len(report.held), len(report.failed), status)
