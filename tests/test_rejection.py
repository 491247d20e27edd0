"""IOCM rejection notes: a Key Object Selection with a CID 7011 title deletes what it names.

- A note made with pydicom and stored with DCMTK ``storescu`` removes the instance it
  rejects (tombstone; C-FIND no longer finds it); re-sending that instance is refused
  with status 0xC000 and an Error Comment naming the rejection (113037); after a
  113039 (retention expired) rejection the instance is accepted again.
- The same note by ``syncnode import``; the tombstone reaches a peer like any delete.
- A peer that takes the notes by sync remembers the rejections (a 113037-rejected instance
  sent to it is refused, a 113039 one accepted); a note with malformed evidence is logged
  and not recorded, and does not fail the sync.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.dicom import query
from syncnode.dicom.scp import DicomServer
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.rejection import KEY_OBJECT_SELECTION

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"


def rejection_note(path: Path, study: kit.StudyFiles, sops: list[str], code: str,
                   series_uid: str, sop_class: str) -> str:
    """Write a rejection note (KOS) rejecting ``sops`` with ``code``; return its UID."""
    uid = kit.uid_from(f"note/{code}/{','.join(sops)}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = KEY_OBJECT_SELECTION
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = kit.uid_from(f"note-series/{code}")
    ds.PatientID = "PAT-1"
    ds.Modality = "KO"
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue = code
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = "Rejected"
    ds.ConceptNameCodeSequence = Sequence([title])
    refs = []
    for sop in sops:
        r = Dataset()
        r.ReferencedSOPClassUID = sop_class
        r.ReferencedSOPInstanceUID = sop
        refs.append(r)
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedSOPSequence = Sequence(refs)
    evidence = Dataset()
    evidence.StudyInstanceUID = study.study_uid
    evidence.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.save_as(path, enforce_file_format=True)
    return uid


def storescu(scp: DicomServer, *files: Path) -> None:
    kit.run_tool([kit.dcmtk("storescu"), "-aec", "SYNCNODE", "127.0.0.1", str(scp.port),
                  *map(str, files)], timeout=60)
    assert scp.wait_applied(30)  # the events are in the catalog


def c_store(scp: DicomServer, path: Path) -> Dataset:
    ds = pydicom.dcmread(path)
    ae = AE("RESENDER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SYNCNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()
        assert scp.wait_applied(30)


def found_sops(node: LocalNode, study_uid: str) -> set[str]:
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = study_uid
    ident.SeriesInstanceUID = ""
    ident.SOPInstanceUID = ""
    return {str(r.SOPInstanceUID) for r in query.find(node.catalog, STUDY_ROOT, ident,
                                                       blob_path=node.store.path)}


def test_rejection_note_by_c_store(scp: DicomServer, node: LocalNode, tmp_path: Path) -> None:
    study = kit.make_study(tmp_path / "s", 3, seed="reject")
    storescu(scp, *study.files)
    by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
              for f in study.files}
    first, second, third = sorted(by_sop)
    inst = node.catalog.instance(first)
    assert inst is not None
    note = tmp_path / "note.dcm"
    note_uid = rejection_note(note, study, [first], "113037", inst.series_instance_uid,
                              inst.sop_class_uid)
    storescu(scp, note)
    assert node.catalog.instance(first) is None  # tombstoned
    assert node.catalog.instance(note_uid) is not None  # the note itself is kept
    assert found_sops(node, study.study_uid) == {second, third, note_uid}
    # the rejected instance sent again: refused, and the comment says why
    status = c_store(scp, by_sop[first])
    assert status.Status == 0xC000
    assert "113037" in str(status.ErrorComment)
    assert node.catalog.instance(first) is None
    # retention expired (113039): the instance may come back
    note2 = tmp_path / "note2.dcm"
    rejection_note(note2, study, [second], "113039", inst.series_instance_uid,
                   inst.sop_class_uid)
    storescu(scp, note2)
    assert node.catalog.instance(second) is None
    assert c_store(scp, by_sop[second]).Status == 0x0000
    assert node.catalog.instance(second) is not None


def test_rejection_note_by_import_reaches_a_peer(tmp_path: Path) -> None:
    from test_dicom_export import from_peer

    a, b = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    try:
        study = kit.make_study(tmp_path / "s", 2, seed="reject-import")
        from_peer(a, b, study.files)  # b holds a's instances
        sops = sorted(i.sop_instance_uid for i in a.catalog.instances(study=study.study_uid))
        inst = a.catalog.instance(sops[0])
        assert inst is not None
        note = tmp_path / "note.dcm"
        rejection_note(note, study, [sops[0]], "113001", inst.series_instance_uid,
                       inst.sop_class_uid)
        before = set(a.catalog.all_event_ids())
        report = import_paths(a, [note])
        assert report.imported == 1 and not report.failed
        assert a.catalog.instance(sops[0]) is None
        # the tombstone travels like any event
        new = [e for e in a.catalog.all_event_ids() if e not in before]
        events = a.catalog.get_events(new)
        b.catalog.offer_certificates(a.catalog.certificates_for(new))
        b.catalog.apply([e for e in events if a.catalog.put_event(e[0]) is None],
                        blob_present=b.store.has)
        assert b.catalog.instance(sops[0]) is None
        assert b.catalog.instance(sops[1]) is not None
        # importing the rejected file again: refused with the reason
        again = import_paths(a, [study.files[[str(pydicom.dcmread(
            f, stop_before_pixels=True).SOPInstanceUID) for f in study.files].index(sops[0])]])
        assert again.imported == 0 and "113001" in again.failed[0][1]
    finally:
        a.close()
        b.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # (the malformed note)
async def test_peers_remember_rejections(tmp_path: Path, running: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A and B sync (B pulls from A). Rejection notes stored at A by ``storescu`` reach B as
    puts (and tombstones); B records them, so the 113037-rejected instance sent to B is
    refused (0xC000) while the 113039-rejected one is accepted again. A note whose evidence
    is malformed passes through the sync like any instance, is logged and not recorded."""
    from syncsupport import converged, peer_state, pull_from, url_of, wait_for

    a, b = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    try:
        ra, rb = await running(a), await running(b)
        study = kit.make_study(tmp_path / "s", 3, seed="reject-peers")
        await asyncio.to_thread(send, ra.ports["dicom"], *study.files)
        await wait_for(lambda: len(a.catalog.instances(study=study.study_uid)) == 3, 30,
                       "3 instances at A")
        pull_from(b, rb, a, url_of(ra))
        await wait_for(lambda: converged([a, b]), 30, "B in sync with A")
        by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                  for f in study.files}
        first, second, third = sorted(by_sop)
        inst = a.catalog.instance(first)
        assert inst is not None
        notes = [tmp_path / "n1.dcm", tmp_path / "n2.dcm", tmp_path / "bad.dcm"]
        rejection_note(notes[0], study, [first], "113037", inst.series_instance_uid,
                       inst.sop_class_uid)
        rejection_note(notes[1], study, [second], "113039", inst.series_instance_uid,
                       inst.sop_class_uid)
        bad = rejection_note(notes[2], study, ["1.2.3.x"], "113001", inst.series_instance_uid,
                             inst.sop_class_uid)
        caplog.set_level(logging.WARNING)
        await asyncio.to_thread(send, ra.ports["dicom"], *notes)
        await wait_for(lambda: a.catalog.instance(bad) is not None
                       and a.catalog.instance(second) is None, 30, "the notes applied at A")
        await wait_for(lambda: converged([a, b]), 30, "B in sync with A again")
        # B took the notes by sync: the two good ones recorded (just after the events'
        # commit, so a moment after the roots match), no second round of deletes
        await wait_for(lambda: b.catalog.rejections.code(first) == "113037"
                       and b.catalog.rejections.code(second) == "113039"
                       and any(bad in r.getMessage() and "not recorded" in r.getMessage()
                               and r.name == "syncnode.local" for r in caplog.records), 30,
                       "B to record the notes it took by sync")
        assert b.catalog.rejections.code(third) is None
        assert b.catalog.instance(bad) is not None  # the malformed note: stored, not applied
        assert b.catalog.rejections.code("1.2.3.x") is None
        assert peer_state(b, a).get("integrity_errors", 0) == 0
        # sent again to B: the 113037 one refused, the 113039 one accepted again
        refused = await asyncio.to_thread(send, rb.ports["dicom"], by_sop[first],
                                          check=False)
        assert "Error: CannotUnderstand" in refused.stderr  # DCMTK's name of 0xC000
        assert b.catalog.instance(first) is None
        assert any(first in r.getMessage() and "113037" in r.getMessage()
                   and "refused" in r.getMessage() for r in caplog.records)
        await asyncio.to_thread(send, rb.ports["dicom"], by_sop[second])
        await wait_for(lambda: b.catalog.instance(second) is not None, 30,
                       "the 113039-rejected instance accepted again at B")
    finally:
        a.close()
        b.close()


def send(port: int, *files: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` to a node's SCP on ``port`` (verbose: statuses in its output)."""
    return kit.run_tool([kit.dcmtk("storescu"), "-v", "-aec", "SYNCNODE", "127.0.0.1",
                         str(port), *map(str, files)], timeout=60, check=check)
