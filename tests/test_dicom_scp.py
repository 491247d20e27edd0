"""The DICOM SCP in-process, driven by a real DICOM client (pynetdicom) over loopback.

- Every valid pydicom test file, sent as its exact data set bytes in its own transfer
  syntax, is stored byte for byte (data set after the file meta identical to the file's)
  and indexed.
- Broken input over the wire gets a failure status, stores nothing, and the SCP keeps
  serving (C-ECHO afterwards).
- A 6-byte PDU header claiming ~4 GiB does not make the process grow and is cut off.
- Association policy: called AE title checked; allow-list by AE and AE@HOST.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import sys
import time
from pathlib import Path

import pydicom.data
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.dicom.scp import DicomServer, file_meta_bytes, status_for
from syncnode.dicomfile import InvalidDicom, InvalidIdentity, inspect_file
from syncnode.local import LocalNode

CT = "1.2.840.10008.5.1.4.1.1.2"


def pydicom_file(name: str) -> str:
    return str(Path(pydicom.data.__file__).parent / "test_files" / name)
EXPLICIT_LE = "1.2.840.10008.1.2.1"


PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def valid_pydicom_files() -> list[Path]:
    """pydicom's bundled test files that inspect_file accepts (no download is tried)."""
    out = []
    for f in sorted(PYDICOM_FILES.glob("*.dcm")):
        try:
            inspect_file(f)
        except InvalidDicom:
            continue
        out.append(Path(f))
    return out


def blobs_of(node: LocalNode, sop: str) -> list[str]:
    with sqlite3.connect(node.data / "catalog.db") as db:
        return [r[0] for r in db.execute("SELECT blob FROM puts WHERE sop_instance_uid=?",
                                         (sop,))]


def stored_datasets(node: LocalNode, sop: str) -> list[bytes]:
    return [kit.dataset_bytes(node.store.path(b).read_bytes()) for b in blobs_of(node, sop)]


def ct_small() -> tuple:
    """(SOP class, SOP instance, transfer syntax, data set bytes) of pydicom's CT_small."""
    return kit.file_item(Path(pydicom_file("CT_small.dcm")))


def tmp_files(node: LocalNode) -> list[str]:
    """Files left in the store's tmp folder (temp files, journal keep links)."""
    return sorted(p.name for p in (node.data / "tmp").rglob("*") if p.is_file())


def test_echo(scp: DicomServer) -> None:
    assert kit.echo("127.0.0.1", scp.port) == 0x0000


def test_pydicom_files_stored_byte_for_byte(scp: DicomServer, node: LocalNode) -> None:
    files = valid_pydicom_files()
    assert len(files) > 40
    items = [kit.file_item(f) for f in files]
    # one association per file: some files share a SOP Instance UID with another version
    for f, item in zip(files, items, strict=True):
        assert kit.send_raw("127.0.0.1", scp.port, [item]) == [0x0000], f.name
    assert scp.wait_applied()
    for f, (_cls, sop, _ts, data) in zip(files, items, strict=True):
        assert data in stored_datasets(node, sop), f"{f.name}: stored bytes differ"
        for blob in blobs_of(node, sop):
            meta = inspect_file(node.store.path(blob))
            assert meta.sop_instance_uid == sop
    assert node.verify().ok
    live = {i.sop_instance_uid for i in node.catalog.instances()}
    assert live == {item[1] for item in items}
    assert tmp_files(node) == []
    # the file meta names the negotiated transfer syntax and syncnode as the writer, and
    # nothing about the sender (the same data set from another AE is the same blob)
    jpeg = next(f for f in files if f.name == "JPEG2000.dcm")
    blob = blobs_of(node, kit.file_item(jpeg)[1])[0]
    head = node.store.path(blob).read_bytes()[:400]
    assert b"1.2.840.10008.1.2.4.91" in head and b"SYNCNODE_" in head


def test_duplicate_store_is_success_and_adds_nothing(scp: DicomServer, node: LocalNode) -> None:
    item = ct_small()
    assert kit.send_raw("127.0.0.1", scp.port, [item, item]) == [0, 0]
    assert scp.wait_applied()
    assert node.catalog.counts()["put_events"] == 1
    assert scp.stats.stored == 1 and scp.stats.duplicates == 1


def _truncated(data: bytes, keep: int) -> bytes:
    return data[:keep]


@pytest.mark.parametrize("case", ["truncated_pixels", "truncated_header", "no_sop_instance",
                                  "sop_mismatch", "garbage"])
def test_broken_input_refused_and_nothing_stored(scp: DicomServer, node: LocalNode,
                                                  case: str) -> None:
    cls, sop, ts, data = ct_small()
    expect: set[int]
    if case == "truncated_pixels":
        payload, expect = data[:-100], {0xC000}
    elif case == "truncated_header":
        payload, expect = data[:37], {0xC000}
    elif case == "no_sop_instance":
        from pydicom import dcmread
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        ds = dcmread(pydicom_file("CT_small.dcm"))
        del ds.SOPInstanceUID
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        payload, expect = buf.getvalue(), {0xA900}
    elif case == "sop_mismatch":
        sop = "1.2.3.4.5.6.7"  # the request names another instance than the data set
        payload, expect = data, {0xA900}
    else:
        payload, expect = os.urandom(5000), {0xC000, 0xA900}
    statuses = kit.send_raw("127.0.0.1", scp.port, [(cls, sop, ts, payload)])
    assert statuses[0] in expect, hex(statuses[0] or 0)
    assert scp.wait_applied()
    assert node.catalog.counts()["events"] == 0
    assert list(node.store.iter_hashes()) == []
    assert tmp_files(node) == []
    assert kit.echo("127.0.0.1", scp.port) == 0  # still serving


def test_pydicom_broken_files_refused(scp: DicomServer, node: LocalNode) -> None:
    """pydicom's own broken files (they load without error in pydicom) sent as they are."""
    for name, expect in (("MR_truncated.dcm", 0xC000), ("rtplan_truncated.dcm", 0xC000),
                         ("badVR.dcm", None)):
        cls, sop, ts, data = kit.file_item(Path(pydicom_file(name)))
        status = kit.send_raw("127.0.0.1", scp.port, [(cls, sop, ts, data)])[0]
        assert status is not None and status != 0, name
        if expect is not None:
            assert status == expect, (name, hex(status))
    assert node.catalog.counts()["events"] == 0
    assert list(node.store.iter_hashes()) == []
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_unknown_sop_class_not_accepted(scp: DicomServer, node: LocalNode) -> None:
    _cls, sop, ts, data = ct_small()
    unknown = "2.25.1234567890123456789"  # no such SOP class
    # its presentation context is refused, so nothing can be sent under it ...
    assert kit.send_raw("127.0.0.1", scp.port, [(unknown, sop, ts, data)],
                        contexts=[(unknown, ts), (CT, ts)]) == [None]
    # ... and a data set of another class sent under a CT context does not match it
    status = kit.send_raw("127.0.0.1", scp.port, [(CT, sop, ts, data.replace(
        b"1.2.840.10008.5.1.4.1.1.2\x00", b"1.2.840.10008.5.1.4.1.1.4\x00", 1))])[0]
    assert status == 0xA900
    assert node.catalog.counts()["events"] == 0
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_oversized_pdu_header_is_cut_off(scp: DicomServer, node: LocalNode) -> None:
    before = kit.rss_kib()
    for pdu_type in (0x01, 0x04):
        with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as s:
            s.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0))
            sent = 0
            block = b"\0" * (1 << 20)
            try:
                while sent < (64 << 20):  # try to push 64 MiB after the header
                    s.sendall(block)
                    sent += len(block)
            except OSError:
                pass  # the server stopped reading / closed: what we want
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
        assert sent < (64 << 20), "the server kept reading the oversized PDU"
    grown = kit.rss_kib() - before
    assert grown < 32 << 10, f"process grew by {grown} KiB"
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_called_ae_title_checked(scp: DicomServer) -> None:
    assert kit.echo("127.0.0.1", scp.port, called="OTHER") is None
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_allow_list(node: LocalNode) -> None:
    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                         allowed_aes=["GOODSCU", "HOSTSCU@127.0.0.1", "FARSCU@192.0.2.7"])
    port = server.start()
    try:
        assert kit.echo("127.0.0.1", port, calling="GOODSCU") == 0
        assert kit.echo("127.0.0.1", port, calling="HOSTSCU") == 0
        assert kit.echo("127.0.0.1", port, calling="FARSCU") is None  # wrong host
        assert kit.echo("127.0.0.1", port, calling="BADSCU") is None
        assert server.stats.rejected_associations == 2
        assert kit.echo("127.0.0.1", port, calling="GOODSCU") == 0
    finally:
        server.stop()


def test_concurrent_associations_group_commit(scp: DicomServer, node: LocalNode,
                                              tmp_path: Path) -> None:
    import threading

    study = kit.make_study(tmp_path / "s", 40, seed="concurrent")
    items = [kit.file_item(f) for f in study.files]
    results: list[list[int | None]] = []

    def send(part: list[tuple[str, str, str, bytes]]) -> None:
        results.append(kit.send_raw("127.0.0.1", scp.port, part))

    threads = [threading.Thread(target=send, args=(items[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(s for r in results for s in r) == [0] * 40
    assert scp.wait_applied()
    assert {i.sop_instance_uid for i in node.catalog.instances()} == set(study.sop_uids)
    for item in items:
        assert stored_datasets(node, item[1]) == [item[3]]


def test_store_refused_when_disk_full(scp: DicomServer, node: LocalNode,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from syncnode.blobstore import StoreFull
    from syncnode.dicom import ingest

    real_write = ingest.SpoolWriter.write
    calls = {"n": 0}

    def full(self: ingest.SpoolWriter, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the file meta is written, then the disk "fills up"
            self.abort()
            raise StoreFull("no space left for the blob store") from OSError(
                errno.ENOSPC, "full")
        real_write(self, data)

    monkeypatch.setattr(ingest.SpoolWriter, "write", full)
    assert kit.send_raw("127.0.0.1", scp.port, [ct_small()]) == [0xA700]
    assert node.catalog.counts()["events"] == 0
    assert tmp_files(node) == []
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_aborted_transfer_leaves_nothing(scp: DicomServer, node: LocalNode) -> None:
    """A peer that aborts in the middle of a data set: its temp file is removed."""
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.presentation import build_context

    cls, sop, ts, data = ct_small()
    ae = AE("TESTSCU")
    assoc = ae.associate("127.0.0.1", scp.port, contexts=[build_context(cls, [ts])],
                         ae_title="SYNCNODE", max_pdu=16384)
    assert assoc.is_established
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = cls, sop
    import io

    req.DataSet = io.BytesIO(data)
    msg_pdus = []
    from pynetdicom.dimse_messages import C_STORE_RQ

    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    for pdata in msg.encode_msg(assoc.accepted_contexts[0].context_id, 4096):
        msg_pdus.append(pdata)
    for pdata in msg_pdus[:-2]:  # everything but the last fragments
        assoc.dul.send_pdu(pdata)
    time.sleep(0.5)
    assoc.abort()
    deadline = time.monotonic() + 10
    while tmp_files(node) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tmp_files(node) == []
    assert node.catalog.counts()["events"] == 0
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_file_meta_bytes_parse_back(tmp_path: Path) -> None:
    from pydicom import dcmread

    head = file_meta_bytes(CT, "1.2.3", EXPLICIT_LE, "SOMEAE")
    (tmp_path / "f.dcm").write_bytes(head + kit.file_item(
        Path(pydicom_file("CT_small.dcm")))[3])
    meta = dcmread(tmp_path / "f.dcm", stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPClassUID == CT
    assert meta.MediaStorageSOPInstanceUID == "1.2.3"
    assert meta.TransferSyntaxUID == EXPLICIT_LE
    assert meta.SourceApplicationEntityTitle == "SOMEAE"
    assert meta.FileMetaInformationGroupLength == len(head) - 132 - 12


def test_status_for() -> None:
    assert status_for(InvalidIdentity("missing SOP Instance UID")) == 0xA900
    assert status_for(InvalidIdentity("SOP Class UID 1.2 does not match Media Storage ...")
                      ) == 0xA900
    assert status_for(InvalidDicom("truncated: file ends inside ...")) == 0xC000


@pytest.mark.parametrize(("status", "comment"), [(0x0000, ""), (0xC000, "truncated: x"),
                                                 (0xA700, "no space left")])
def test_store_response_encoding_matches_pynetdicom(status: int, comment: str) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from syncnode.dicom.scp import store_response

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPInstanceUID = "1.2.3.44"
    rsp.AffectedSOPClassUID = CT
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    theirs = next(iter(msg.encode_msg(1, 16384))).presentation_data_value_list[0][1][1:]
    assert store_response(CT, "1.2.3.44", 7, status, comment) == theirs


def _find(port: int, model: str, ident: dict[str, str]) -> list[tuple[int, dict[str, str]]]:
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    ae = AE("TESTSCU")
    ae.add_requested_context(model)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNCNODE")
    assert assoc.is_established
    ds = Dataset()
    for k, v in ident.items():
        setattr(ds, k, v)
    out = []
    try:
        for status, found in assoc.send_c_find(ds, model):
            out.append((int(status.Status), {e.keyword: str(e.value) for e in found}
                        if found is not None else {}))
    finally:
        assoc.release()
    return out


def test_c_find_levels_and_refusals(scp: DicomServer, node: LocalNode, tmp_path: Path) -> None:
    from syncnode.importer import import_paths

    study_root = "1.2.840.10008.5.1.4.1.2.2.1"
    patient_root = "1.2.840.10008.5.1.4.1.2.1.1"
    s = kit.make_study(tmp_path / "s", 4, seed="find", series=2, patient_id="ÄB^12",
                       study_date="20230304")
    import_paths(node, s.files)
    res = _find(scp.port, study_root, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                                       "PatientID": "", "PatientName": "",
                                       "NumberOfStudyRelatedSeries": ""})
    assert [r[0] for r in res] == [0xFF00, 0x0000]
    found = res[0][1]
    assert found["StudyInstanceUID"] == s.study_uid
    assert found["PatientID"] == "ÄB^12"  # non-ASCII, returned in UTF-8
    assert found["NumberOfStudyRelatedSeries"] == "2"
    assert found["PatientName"] == "TEST^find"  # the stored value
    res = _find(scp.port, patient_root, {"QueryRetrieveLevel": "PATIENT", "PatientID": "Ä*"})
    assert [r[1].get("PatientID") for r in res if r[0] == 0xFF00] == ["ÄB^12"]
    # a level the model does not have, and a malformed date range: failure statuses
    assert _find(scp.port, study_root, {"QueryRetrieveLevel": "PATIENT",
                                        "PatientID": ""})[-1][0] == 0xA900
    assert _find(scp.port, study_root, {"QueryRetrieveLevel": "STUDY",
                                        "StudyDate": "2020-13-01x"})[-1][0] == 0xC000
    assert kit.echo("127.0.0.1", scp.port) == 0


def test_blob_bytes_are_durable_before_their_name(scp: DicomServer, node: LocalNode,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in ``blobs/`` must be whole even after a power loss: the SCP's batch syncs
    the temp file's bytes before renaming it in, and the rename before answering."""
    from syncnode import blobstore

    log: list[tuple[str, str]] = []
    real_sync, real_replace = blobstore.sync_filesystem, os.replace

    def sync(path: Path) -> None:
        log.append(("sync", ""))
        real_sync(path)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if "blobs" in Path(dst).parts:
            log.append(("rename", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(blobstore, "sync_filesystem", sync)
    monkeypatch.setattr(blobstore.os, "replace", replace)
    item = ct_small()
    assert kit.send_raw("127.0.0.1", scp.port, [item]) == [0]
    answered = list(log)
    assert scp.wait_applied()
    (blob,) = blobs_of(node, item[1])
    renames = [i for i, (what, name) in enumerate(answered) if what == "rename"]
    assert [answered[i][1] for i in renames] == [blob]
    assert ("sync", "") in answered[: renames[0]], answered
    assert ("sync", "") in answered[renames[-1] + 1 :], answered
    assert node.verify().ok


def test_disk_full_at_install_is_out_of_resources(scp: DicomServer, node: LocalNode,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk filling up while a batch is installed: 0xA700, nothing stored, no temp
    file left, and the SCP goes on (the next store succeeds)."""
    from syncnode import blobstore

    real = blobstore.BlobStore.install_staged
    fail = {"left": 1}

    def install(self: blobstore.BlobStore, staged: list, **kw: object) -> list:
        if fail["left"]:
            fail["left"] -= 1
            raise blobstore.StoreFull("no space left for the blob store")
        return real(self, staged, **kw)

    monkeypatch.setattr(blobstore.BlobStore, "install_staged", install)
    item = ct_small()
    assert kit.send_raw("127.0.0.1", scp.port, [item]) == [0xA700]
    assert tmp_files(node) == []
    assert node.catalog.counts()["events"] == 0
    assert list(node.store.iter_hashes()) == []
    assert kit.send_raw("127.0.0.1", scp.port, [item]) == [0]
    assert scp.wait_applied()
    assert blobs_of(node, item[1]) != []
    assert node.verify().ok


def test_c_cancel_stops_a_running_c_find(scp: DicomServer, node: LocalNode, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A requester's C-CANCEL stops a query in progress: the node answers 0xFE00 (Cancel)
    and sends no further matches. (The query is made slow - 0.2 s per match, 50 matches -
    so the cancel arrives long before it could end on its own.)"""
    from pydicom.dataset import Dataset
    from pynetdicom import AE

    from syncnode.dicom import query
    from syncnode.importer import import_paths

    s = kit.make_study(tmp_path / "s", 1, seed="cancel-find")
    import_paths(node, s.files)
    real_find = query.find

    def slow_find(*args: object, **kwargs: object) -> object:
        match = next(iter(real_find(*args, **kwargs)))  # type: ignore[arg-type]
        for _ in range(50):
            yield match
            time.sleep(0.2)

    monkeypatch.setattr(query, "find", slow_find)
    model = "1.2.840.10008.5.1.4.1.2.2.1"
    ae = AE("TESTSCU")
    ae.add_requested_context(model)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SYNCNODE")
    assert assoc.is_established
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    statuses = []
    started = time.monotonic()
    try:
        for status, _found in assoc.send_c_find(ds, model, msg_id=5):
            statuses.append(int(status.Status))
            if len(statuses) == 1:
                assoc.send_c_cancel(5, query_model=model)
    finally:
        assoc.release()
    assert statuses[0] == 0xFF00 and statuses[-1] == 0xFE00
    assert len(statuses) < 50 and time.monotonic() - started < 9
