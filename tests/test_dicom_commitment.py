"""Storage Commitment Push Model SCP, driven by pynetdicom as the SCU.

- The requester keeps its association open: N-ACTION is answered Success, then an
  N-EVENT-REPORT arrives on that association: Event Type 2 with the missing instance in
  Failed SOP Sequence (0x0112), the held ones in Referenced SOP Sequence; then a request
  for held instances only: Event Type 1.
- The requester releases at once: the report comes on a new association to its AE title
  from ``dicom_destinations``.
- A deleted instance is no longer held; a malformed request is refused.
- Toward a real Orthanc as export PACS: exported instances count as committed only once
  Orthanc confirms; ``syncnode rm --study`` of them sends Orthanc one IOCM rejection note
  (the reason asked for, exactly the deleted instances), committed too; sent again after
  a simulated crash it is the same note (same UID), not a second object.
"""

from __future__ import annotations

import io
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, evt
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.cli import app
from syncnode.dicom.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from syncnode.dicom.scp import DicomServer
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.rejection import KEY_OBJECT_SELECTION

MISSING = "1.2.826.0.1.3680043.8.498.99999"


@pytest.fixture
def held(tmp_path: Path, node: LocalNode) -> list[tuple[str, str]]:
    s = kit.make_study(tmp_path / "s", 3, seed="commit")
    import_paths(node, s.files)
    return [(i.sop_class_uid, i.sop_instance_uid)
            for i in node.catalog.instances(study=s.study_uid)]


def _request(uid: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = uid
    items = []
    for c, i in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = c
        item.ReferencedSOPInstanceUID = i
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


class Reports:
    """N-EVENT-REPORTs received, by Transaction UID."""

    def __init__(self) -> None:
        self.got: dict[str, tuple[int, Dataset, Any]] = {}
        self.cv = threading.Condition()

    def handler(self, event: evt.Event) -> tuple[int, None]:
        info = event.event_information
        with self.cv:
            self.got[str(info.TransactionUID)] = (int(event.event_type), info, event.assoc)
            self.cv.notify_all()
        return 0x0000, None

    def wait(self, uid: str, timeout: float = 30) -> tuple[int, Dataset, Any]:
        with self.cv:
            assert self.cv.wait_for(lambda: uid in self.got, timeout), f"no report for {uid}"
            return self.got[uid]


def _pairs(seq: Any) -> set[tuple[str, str]]:
    return {(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in seq}


def test_report_on_the_same_association(scp: DicomServer, node: LocalNode,
                                        held: list[tuple[str, str]]) -> None:
    reports = Reports()
    ae = AE("COMMITSCU")
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SYNCNODE",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    assert assoc.is_established
    try:
        # some held, one not: event type 2
        refs = [*held, (held[0][0], MISSING)]
        status, _ = assoc.send_n_action(_request("2.25.1001", refs), 1, STORAGE_COMMITMENT,
                                        STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        event_type, info, on = reports.wait("2.25.1001")
        assert on is assoc  # the requester's own association
        assert event_type == 2
        assert _pairs(info.ReferencedSOPSequence) == set(held)
        assert [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason))
                for i in info.FailedSOPSequence] == [(MISSING, 0x0112)]
        # all held: event type 1, no Failed SOP Sequence
        status, _ = assoc.send_n_action(_request("2.25.1002", held), 1, STORAGE_COMMITMENT,
                                        STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        event_type, info, _on = reports.wait("2.25.1002")
        assert event_type == 1 and "FailedSOPSequence" not in info
        assert _pairs(info.ReferencedSOPSequence) == set(held)
        # a deleted instance is not held any more
        node.delete_instances([held[1][1]])
        assoc.send_n_action(_request("2.25.1003", held), 1, STORAGE_COMMITMENT,
                            STORAGE_COMMITMENT_INSTANCE)
        event_type, info, _on = reports.wait("2.25.1003")
        assert event_type == 2
        assert [str(i.ReferencedSOPInstanceUID) for i in info.FailedSOPSequence] == \
            [held[1][1]]
        # no Transaction UID: refused, no report
        bad = _request("2.25.1004", held)
        del bad.TransactionUID
        status, _ = assoc.send_n_action(bad, 1, STORAGE_COMMITMENT,
                                        STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0120
    finally:
        assoc.release()


def test_report_on_a_new_association(node: LocalNode, held: list[tuple[str, str]]) -> None:
    reports = Reports()
    listener = AE("COMMITSCU")
    listener.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", 0), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    scp = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                      destinations={"COMMITSCU": ("127.0.0.1", server.server_address[1])})
    scp.start()
    try:
        ae = AE("COMMITSCU")
        ae.add_requested_context(STORAGE_COMMITMENT)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="SYNCNODE")
        assert assoc.is_established
        status, _ = assoc.send_n_action(_request("2.25.2001", held), 1, STORAGE_COMMITMENT,
                                        STORAGE_COMMITMENT_INSTANCE)
        assoc.release()  # at once: the report cannot come on this association
        assert status.Status == 0x0000
        event_type, info, on = reports.wait("2.25.2001")
        assert on is not assoc and event_type == 1
        assert _pairs(info.ReferencedSOPSequence) == set(held)
    finally:
        scp.stop()
        server.shutdown()


@pytest.mark.skipif(not kit.have_orthanc(), reason="Orthanc not installed")
def test_export_is_committed_only_after_orthanc_confirms(tmp_path: Path) -> None:
    """The exporter asks a real Orthanc (listed in ``export_commitment``) to commit what it
    sent; Orthanc reports on a new association to the node's SCP; the items count as
    committed only then (``syncnode status``: sent vs committed)."""
    from test_dicom_export import from_peer, wait_until

    from syncnode.dicom.exporter import Exporter, outbox_status

    a, b = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    scp_port = kit.free_port()
    orthanc = kit.Orthanc(tmp_path / "orthanc", check_called_aet=False,
                          modalities={"syncnode": ("SYNCNODE", "127.0.0.1", scp_port)})
    scp = DicomServer(b, ae_title="SYNCNODE", host="127.0.0.1", port=scp_port)
    ex = None
    try:
        orthanc.start()
        scp.start()
        s = kit.make_study(tmp_path / "peer", 3, seed="commit-export")
        from_peer(a, b, s.files)
        ex = Exporter(b, [orthanc.address], ae_title="SYNCNODE", poll_interval=0.05,
                      backoff_base=0.05, backoff_cap=0.4, commitment=["ORTHANC"])
        scp.on_commitment_report = ex.commitment_report
        ex.start()

        def status() -> dict[str, Any]:
            return outbox_status(b.data / "catalog.db").get(orthanc.address, {})

        wait_until(lambda: status().get("committed") == 3, 60, "3 committed")
        st = status()
        assert st["done"] == 3 and st["awaiting_commitment"] == 0
        assert st["not_committed"] == 0
        assert sorted(orthanc.sop_uids()) == sorted(s.sop_uids)

        # `syncnode rm --study` (the command, on the folder the exporter serves): Orthanc
        # is sent one IOCM rejection note naming exactly the deleted instances, with the
        # reason asked for and the patient/study of the instances, and asked to commit it
        b.catalog.index_find_attributes(b.store.path)  # (what `run` does as they arrive)
        rm = CliRunner().invoke(app, ["rm", "--study", s.study_uid, "--reason", "safety",
                                      "--data", str(b.data)])
        assert rm.exit_code == 0, rm.output
        wait_until(lambda: status()["rejection_notes"]["committed"] == 1, 60,
                   "the rejection note committed")
        held = orthanc.sop_uids()
        notes = sorted(set(held) - set(s.sop_uids))
        assert len(notes) == 1
        note = dcmread(io.BytesIO(orthanc.instance_file(held[notes[0]])))
        assert note.SOPClassUID == KEY_OBJECT_SELECTION and note.Modality == "KO"
        title = note.ConceptNameCodeSequence[0]
        assert (title.CodeValue, title.CodingSchemeDesignator) == ("113037", "DCM")
        (evidence,) = note.CurrentRequestedProcedureEvidenceSequence
        assert evidence.StudyInstanceUID == note.StudyInstanceUID == s.study_uid
        rejected = {(str(series.SeriesInstanceUID), str(ref.ReferencedSOPClassUID),
                     str(ref.ReferencedSOPInstanceUID))
                    for series in evidence.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence}
        original = dcmread(s.files[0], stop_before_pixels=True)
        assert rejected == {(str(original.SeriesInstanceUID), str(original.SOPClassUID), u)
                            for u in s.sop_uids}
        assert (note.PatientID, note.PatientName) == (original.PatientID,
                                                      original.PatientName)
        assert note.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert status()["done"] == 3  # (the instances' own items stay as they were)

        # sent again (a crash between Orthanc's answer and its record): the same note,
        # a duplicate to Orthanc, not a second object
        ex.stop()
        ex = None
        db = sqlite3.connect(b.data / "catalog.db")
        with db:
            assert db.execute("UPDATE outbox SET state='pending', commit_uid='', committed=0 "
                              "WHERE kind='reject'").rowcount == 1
        db.close()
        ex = Exporter(b, [orthanc.address], ae_title="SYNCNODE", poll_interval=0.05,
                      backoff_base=0.05, backoff_cap=0.4, commitment=["ORTHANC"])
        scp.on_commitment_report = ex.commitment_report
        ex.start()
        wait_until(lambda: status()["rejection_notes"]["committed"] == 1, 60,
                   "the rejection note sent and committed again")
        assert sorted(orthanc.sop_uids()) == sorted(held)
    finally:
        if ex is not None:
            ex.stop()
        scp.stop()
        kit.stop_all([orthanc], discard=True)  # its storage goes with tmp_path
        a.close()
        b.close()
