"""C-GET and C-MOVE served by the node's SCP, driven by independent peers.

- DCMTK ``getscu`` into a folder: every received data set is byte-identical to the stored
  blob's data set (the file meta differs, the data set must not); SERIES and IMAGE level
  with UID lists take exactly the named instances.
- DCMTK ``movescu`` to a real Orthanc configured in ``dicom_destinations``: Orthanc lists
  the instances and a file downloaded from it carries the stored data set byte for byte.
- An unknown Move Destination -> 0xA801, nothing sent.
- Orthanc as the requester (REST ``/modalities/<node>/move`` to itself).
- A damaged blob is a failed sub-operation, never sent; large blobs are streamed.
- A known-good blob is sent without hashing it again; one altered in place (its mtime
  restored) is hashed and, damaged, refused.
- A requester accepting only Explicit VR Little Endian for an RLE Lossless instance gets
  it decoded (same pixels); a JPEG baseline (lossy) instance is never transcoded: failed.
- C-CANCEL stops a C-GET; pending responses carry the counts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE
from syncsupport import alter_in_place, count_verified_reads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.audit import AuditLog, read_entries
from syncnode.dicom import exporter, provider
from syncnode.dicom.scp import DicomServer
from syncnode.importer import import_paths
from syncnode.local import LocalNode

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"


def start_scp(node: LocalNode, destinations: dict[str, tuple[str, int]] | None = None,
              audit: AuditLog | None = None) -> DicomServer:
    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                         destinations=destinations, audit=audit)
    server.start()
    return server


@pytest.fixture
def study(tmp_path: Path, node: LocalNode) -> kit.StudyFiles:
    # 128 x 128: each instance (32 KiB) spans several PDUs of a 16 KiB-PDU requester
    files = kit.make_study(tmp_path / "study", 6, seed="retrieve", rows=128, cols=128)
    import_paths(node, files.files)
    return files


def stored_dataset(node: LocalNode, sop: str) -> bytes:
    inst = node.catalog.instance(sop)
    assert inst is not None
    return kit.dataset_bytes(node.store.path(inst.blob).read_bytes())


def received(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        out[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = data
    return out


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_getscu_study_is_byte_exact(tmp_path: Path, node: LocalNode, study: kit.StudyFiles,
                                    streamed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if streamed:  # every blob takes the large-instance path (streamed from its file)
        monkeypatch.setattr(exporter, "IN_MEMORY_LIMIT", 0)
    scp = start_scp(node)
    try:
        out = tmp_path / "got"
        out.mkdir()
        proc = kit.run_tool([kit.dcmtk("getscu"), "-S", "-aec", "SYNCNODE", "-od", str(out),
                             "-k", "QueryRetrieveLevel=STUDY",
                             "-k", f"StudyInstanceUID={study.study_uid}",
                             "127.0.0.1", str(scp.port)], timeout=120)
    finally:
        scp.stop()
    got = received(out)
    assert sorted(got) == sorted(study.sop_uids), proc.stderr[-1500:]
    for sop, data in got.items():
        assert kit.dataset_bytes(data) == stored_dataset(node, sop)


def test_getscu_series_and_image_uid_lists(tmp_path: Path, node: LocalNode,
                                           study: kit.StudyFiles) -> None:
    scp = start_scp(node)
    try:
        out = tmp_path / "img"
        out.mkdir()
        pick = sorted(study.sop_uids)[:2]
        inst = node.catalog.instance(pick[0])
        assert inst is not None
        kit.run_tool([kit.dcmtk("getscu"), "-S", "-aec", "SYNCNODE", "-od", str(out),
                      "-k", "QueryRetrieveLevel=IMAGE",
                      "-k", f"StudyInstanceUID={study.study_uid}",
                      "-k", f"SeriesInstanceUID={inst.series_instance_uid}",
                      "-k", "SOPInstanceUID=" + "\\".join(pick),
                      "127.0.0.1", str(scp.port)], timeout=120)
        assert sorted(received(out)) == pick
        out2 = tmp_path / "series"
        out2.mkdir()
        kit.run_tool([kit.dcmtk("getscu"), "-S", "-aec", "SYNCNODE", "-od", str(out2),
                      "-k", "QueryRetrieveLevel=SERIES",
                      "-k", f"StudyInstanceUID={study.study_uid}",
                      "-k", f"SeriesInstanceUID={inst.series_instance_uid}\\1.2.3.999",
                      "127.0.0.1", str(scp.port)], timeout=120)
        series = [i.sop_instance_uid for i in node.catalog.instances(
            series=inst.series_instance_uid)]
        assert sorted(received(out2)) == sorted(series)
    finally:
        scp.stop()


def _get(port: int, ident: Dataset, contexts: list[tuple[str, list[str]]],
         model: str = StudyRootQueryRetrieveInformationModelGet,
         cancel_after: int | None = None) -> tuple[list[Dataset], list[Dataset]]:
    """pynetdicom C-GET; returns (responses, received data sets)."""
    got: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    ae = AE("GETTER")
    ae.add_requested_context(model)
    roles = []
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNCNODE", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    responses = []
    try:
        msg_id = 7
        for status, _ident in assoc.send_c_get(ident, model, msg_id=msg_id):
            if not status:
                break
            responses.append(status)
            if cancel_after is not None and len(got) >= cancel_after \
                    and status.Status == 0xFF00:
                assoc.send_c_cancel(msg_id, query_model=model)
                cancel_after = None
    finally:
        assoc.release()
    return responses, got


def test_only_explicit_le_gets_rle_decoded_and_lossy_is_never_transcoded(
        tmp_path: Path, node: LocalNode) -> None:
    rle = PYDICOM_FILES / "MR_small_RLE.dcm"
    lossy = PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm"
    import_paths(node, [rle, lossy])
    rle_ds, lossy_ds = pydicom.dcmread(rle), pydicom.dcmread(lossy)
    assert rle_ds.file_meta.TransferSyntaxUID == RLE
    scp = start_scp(node)
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.PatientID = ""
        ident.StudyInstanceUID = [rle_ds.StudyInstanceUID, lossy_ds.StudyInstanceUID]
        ident.SeriesInstanceUID = [rle_ds.SeriesInstanceUID, lossy_ds.SeriesInstanceUID]
        ident.SOPInstanceUID = [rle_ds.SOPInstanceUID, lossy_ds.SOPInstanceUID]
        responses, got = _get(scp.port, ident,
                              [(rle_ds.SOPClassUID, [EXPLICIT_LE]),
                               (lossy_ds.SOPClassUID, [EXPLICIT_LE])])
    finally:
        scp.stop()
    assert [str(d.SOPInstanceUID) for d in got] == [rle_ds.SOPInstanceUID]
    assert got[0].file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(got[0].pixel_array, rle_ds.pixel_array)
    final = responses[-1]
    assert final.Status == 0xB000  # one sub-operation failed
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfFailedSuboperations == 1
    assert responses[0].Status == 0xFF00 and responses[0].NumberOfRemainingSuboperations == 1


def test_c_get_pending_counts_and_cancel(node: LocalNode, study: kit.StudyFiles) -> None:
    scp = start_scp(node)
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "PATIENT"
        ident.PatientID = node.catalog.instances(study=study.study_uid)[0].patient_id
        cls = node.catalog.instances(study=study.study_uid)[0].sop_class_uid
        ts = node.catalog.instances(study=study.study_uid)[0].transfer_syntax_uid
        responses, got = _get(scp.port, ident, [(cls, [ts])],
                              model=PatientRootQueryRetrieveInformationModelGet,
                              cancel_after=2)
    finally:
        scp.stop()
    pending = [r for r in responses if r.Status == 0xFF00]
    assert [r.NumberOfRemainingSuboperations for r in pending][:2] == [5, 4]
    assert responses[-1].Status == 0xFE00
    assert 2 <= len(got) < 6
    assert responses[-1].NumberOfCompletedSuboperations == len(got)


def test_bad_identifier_is_refused(node: LocalNode, study: kit.StudyFiles) -> None:
    scp = start_scp(node)
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"  # no SeriesInstanceUID
        ident.StudyInstanceUID = study.study_uid
        responses, got = _get(scp.port, ident, [])
    finally:
        scp.stop()
    assert got == [] and responses[-1].Status == 0xA900


@pytest.mark.skipif(not kit.have_orthanc(), reason="Orthanc not installed")
def test_movescu_to_orthanc_and_unknown_destination(tmp_path: Path, node: LocalNode,
                                                    study: kit.StudyFiles) -> None:
    audit = AuditLog(node.data / "audit")
    with kit.orthanc(tmp_path / "orthanc", check_called_aet=False) as orthanc:
        scp = start_scp(node, {"ORTHANC": ("127.0.0.1", orthanc.dicom_port)}, audit=audit)
        try:
            bad = kit.run_tool([kit.dcmtk("movescu"), "-S", "-aec", "SYNCNODE",
                                "-aem", "NOSUCHAE", "-k", "QueryRetrieveLevel=STUDY",
                                "-k", f"StudyInstanceUID={study.study_uid}",
                                "127.0.0.1", str(scp.port)], timeout=120, check=False)
            # DCMTK names status 0xA801 "Refused: MoveDestinationUnknown"
            assert "movedestinationunknown" in (bad.stdout + bad.stderr).lower()
            assert bad.returncode != 0
            assert orthanc.instance_ids() == []
            kit.run_tool([kit.dcmtk("movescu"), "-S", "-aec", "SYNCNODE", "-aem", "ORTHANC",
                          "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study.study_uid}",
                          "127.0.0.1", str(scp.port)], timeout=120)
            uids = orthanc.sop_uids()
            assert sorted(uids) == sorted(study.sop_uids)
            sop, oid = sorted(uids.items())[0]
            assert kit.dataset_bytes(orthanc.instance_file(oid)) == stored_dataset(node, sop)
        finally:
            scp.stop()
            audit.close()
    entries = [e for e in read_entries(node.data / "audit") if e["action"] == "retrieved"]
    assert [e["outcome"] for e in entries] == ["failure", "success"]
    assert entries[1]["count"] == 6 and entries[1]["studies"] == [study.study_uid]
    assert "ORTHANC" in entries[1]["destination"]


def test_damaged_blob_is_not_sent(node: LocalNode, study: kit.StudyFiles) -> None:
    insts = node.catalog.instances(study=study.study_uid)
    bad = insts[0]
    path = node.store.path(bad.blob)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped pixel byte
    path.write_bytes(bytes(data))
    scp = start_scp(node)
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study.study_uid
        responses, got = _get(scp.port, ident,
                              [(bad.sop_class_uid, [bad.transfer_syntax_uid])])
    finally:
        scp.stop()
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(
        i.sop_instance_uid for i in insts[1:])
    assert responses[-1].Status == 0xB000
    assert responses[-1].NumberOfFailedSuboperations == 1


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_known_good_blobs_are_not_hashed_altered_ones_are(
        node: LocalNode, study: kit.StudyFiles, streamed: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported blobs were hashed as they were written: a C-GET sends them without a
    verified read. A blob written in place with its mtime set back (only the change time
    tells) is read verified, found damaged and not sent; the others still go out."""
    if streamed:
        monkeypatch.setattr(exporter, "IN_MEMORY_LIMIT", 0)
    verified = count_verified_reads(monkeypatch)
    insts = node.catalog.instances(study=study.study_uid)
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study.study_uid
    contexts = [(insts[0].sop_class_uid, [insts[0].transfer_syntax_uid])]
    scp = start_scp(node)
    try:
        responses, got = _get(scp.port, ident, contexts)
        assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(study.sop_uids)
        assert responses[-1].Status == 0x0000
        assert verified == []  # every blob known good: none hashed again
        bad = insts[0]
        alter_in_place(node.store.path(bad.blob))  # one pixel byte, mtime set back
        responses, got = _get(scp.port, ident, contexts)
    finally:
        scp.stop()
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(
        i.sop_instance_uid for i in insts[1:])
    assert responses[-1].Status == 0xB000
    assert responses[-1].NumberOfFailedSuboperations == 1
    assert verified == [bad.blob]
    assert bad.blob not in node.store.known_good


@pytest.mark.skipif(not kit.have_orthanc(), reason="Orthanc not installed")
def test_orthanc_as_requester_moves_to_itself(tmp_path: Path, node: LocalNode,
                                              study: kit.StudyFiles) -> None:
    port = kit.free_port()
    orthanc = kit.Orthanc(tmp_path / "orthanc", check_called_aet=False,
                          modalities={"syncnode": ("SYNCNODE", "127.0.0.1", port)})
    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=port,
                         destinations={"ORTHANC": ("127.0.0.1", orthanc.dicom_port)})
    server.start()
    try:
        orthanc.start()
        try:
            orthanc.post("/modalities/syncnode/move", {
                "Level": "Study", "TargetAet": "ORTHANC",
                "Resources": [{"StudyInstanceUID": study.study_uid}]})
            uids = orthanc.sop_uids()
            assert sorted(uids) == sorted(study.sop_uids)
            sop, oid = sorted(uids.items())[-1]
            assert kit.dataset_bytes(orthanc.instance_file(oid)) == stored_dataset(node, sop)
        finally:
            kit.stop_all([orthanc], discard=True)  # its storage goes with tmp_path
    finally:
        server.stop()


def _move(port: int, ident: Dataset, dest: str, requester: dict[str, Any]) -> list[Dataset]:
    """pynetdicom C-MOVE (Study Root, message ID 3); returns the responses. The requester's
    association is put in ``requester["assoc"]`` before the request is sent."""
    ae = AE("MOVER")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNCNODE")
    assert assoc.is_established
    requester["assoc"] = assoc
    responses = []
    try:
        for status, _ident in assoc.send_c_move(ident, dest, MOVE, msg_id=3):
            if not status:
                break
            responses.append(status)
    finally:
        assoc.release()
    return responses


@pytest.mark.parametrize("cancel", [False, True], ids=["whole", "cancelled"])
def test_large_move_uses_parallel_associations(node: LocalNode, study: kit.StudyFiles,
                                               monkeypatch: pytest.MonkeyPatch,
                                               cancel: bool) -> None:
    """A move large enough for several associations (here: one per 2 instances, at most
    3) delivers every instance exactly once, over more than one association, with pending
    counts that add up; a C-CANCEL (sent while the first instances are being stored)
    stops every association: each sends at most the one it had started."""
    monkeypatch.setattr(provider, "INSTANCES_PER_ASSOCIATION", 2)
    got: list[str] = []
    assocs: set[int] = set()
    requester: dict[str, Any] = {}

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        assocs.add(id(event.assoc))
        if cancel and len(got) == 1:
            requester["assoc"].send_c_cancel(3, query_model=MOVE)
        time.sleep(0.3)  # a slow PACS: the extra associations join in, the cancel arrives
        return 0x0000

    dest = AE("DEST")
    dest.add_supported_context(node.catalog.instances(study=study.study_uid)[0].sop_class_uid,
                               [EXPLICIT_LE, "1.2.840.10008.1.2"])
    server = dest.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    scp = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                      destinations={"DEST": ("127.0.0.1", server.server_address[1])},
                      move_associations=3)
    scp.start()
    try:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study.study_uid
        responses = _move(scp.port, ident, "DEST", requester)
    finally:
        scp.stop()
        server.shutdown()
    final = responses[-1]
    pending = [r for r in responses if r.Status == 0xFF00]
    remaining = [r.NumberOfRemainingSuboperations for r in pending]
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == len(remaining)
    assert len(got) == len(set(got))  # nothing sent twice
    assert final.NumberOfFailedSuboperations == 0
    if not cancel:
        assert final.Status == 0x0000
        assert sorted(got) == sorted(study.sop_uids)
        assert final.NumberOfCompletedSuboperations == 6
        assert len(assocs) > 1
    else:
        assert final.Status == 0xFE00
        assert len(got) <= 3  # one per association at most
        assert final.NumberOfCompletedSuboperations == len(got)
        assert final.NumberOfRemainingSuboperations == 6 - len(got)
