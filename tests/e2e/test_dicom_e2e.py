"""The DICOM bridge end to end with real peers: Orthanc servers, DCMTK tools, syncnode nodes.

- Orthanc A pushes a study (its own C-STORE, REST ``/modalities/nodeA/store``) into node A;
  node A syncs to node B over mutual TLS (trust set with ``syncnode peer add``); node B's
  exporter delivers to Orthanc B. Orthanc B ends with every SOP Instance UID, pixel data
  identical. Orthanc B is then stopped, more is sent, it is started again: the outbox
  drains, nothing lost, nothing sent twice.
- ``storescu`` of a generated study (byte-identical data sets, listed by ``syncnode ls``)
  and of every valid pydicom test file (each with a transfer-syntax option that makes
  storescu send it in its own syntax).
- ``findscu`` against the node: study / series / image levels, wildcard, date range,
  universal matching, counts.
- ``--import-from``: a study on an Orthanc is found by C-FIND and retrieved by C-MOVE.

Every Orthanc runs with TCP_NODELAY=1, on free loopback ports, storage in tmp, and is
stopped at teardown; nodes run in-process and are stopped in ``finally``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files
from syncsupport import cli, url_of, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import dicom_testkit as kit

from syncnode.dicom.service import DicomBridge
from syncnode.dicomfile import InvalidDicom, inspect_file
from syncnode.local import LocalNode
from syncnode.node import RunningNode

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not kit.have_orthanc(), reason="Orthanc not installed")]

# storescu option that makes it propose (and so send) a file in its own transfer syntax
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
}


@pytest.fixture
def orthancs(tmp_path: Path) -> Iterator[Callable[..., kit.Orthanc]]:
    made: list[kit.Orthanc] = []

    def make(name: str, **kw: Any) -> kit.Orthanc:
        o = kit.Orthanc(tmp_path / f"orthanc-{name}", aet=name.upper()[:16], **kw)
        made.append(o)
        return o

    yield make
    kit.stop_all(made, discard=True)  # their storage goes with tmp_path


async def start_node(node: LocalNode, interval: float, **flags: Any) -> RunningNode:
    """An in-process node on loopback with the DICOM settings given."""
    settings = node.settings(peer_host="127.0.0.1", peer_port=0, api_host="127.0.0.1",
                             api_port=0, sync_interval=interval, discovery=False, **flags)
    running = RunningNode(node, settings)
    await running.start()
    return running


def pixel_hash(data: bytes) -> str:
    return hashlib.sha256(dcmread(io.BytesIO(data)).PixelData).hexdigest()


def outbox(node: LocalNode) -> dict[str, Any]:
    from syncnode.dicom.exporter import outbox_status

    st = outbox_status(node.data / "catalog.db")
    return next(iter(st.values())) if st else {}


async def test_orthanc_to_orthanc_through_two_nodes(tmp_path: Path,
                                                    orthancs: Callable[..., kit.Orthanc]
                                                    ) -> None:
    a_node, b_node = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    a_port, b_port = kit.free_port(), kit.free_port()
    orthanc_b = orthancs("orthancb", modalities={"nodeb": ("NODEB", "127.0.0.1", b_port)})
    orthanc_a = orthancs("orthanca", modalities={"nodea": ("NODEA", "127.0.0.1", a_port)})
    orthanc_a.start()
    orthanc_b.start()
    a = await start_node(a_node, interval=0.3, dicom_port=a_port, dicom_host="127.0.0.1",
                         ae_title="NODEA")
    b = await start_node(b_node, interval=0.3, dicom_port=b_port, dicom_host="127.0.0.1",
                         ae_title="NODEB", export=[orthanc_b.address])
    try:
        # trust each other, as an operator would
        await asyncio.to_thread(cli, "peer", "add", str(b_node.node_id), url_of(b),
                                data=a_node.data)
        await asyncio.to_thread(cli, "peer", "add", str(a_node.node_id), url_of(a),
                                data=b_node.data)
        a.peers_changed()
        b.peers_changed()

        first = kit.make_study(tmp_path / "s1", 20, seed="e2e-first", series=2, rows=128,
                               cols=128)
        expected = await asyncio.to_thread(push_via_orthanc, orthanc_a, first.files)
        await wait_for(lambda: set(orthanc_b.sop_uids()) == set(expected), 90,
                       "Orthanc B to hold the first study",
                       describe=lambda: (len(orthanc_b.sop_uids()), outbox(b_node)))
        await asyncio.to_thread(assert_same_pixels, orthanc_a, orthanc_b, expected)
        # node A stored exactly what Orthanc A sent (its data set bytes)
        for sop, oid in orthanc_a.sop_uids().items():
            inst = a_node.catalog.instance(sop)
            assert inst is not None
            assert kit.dataset_bytes(a_node.store.path(inst.blob).read_bytes()) == \
                kit.dataset_bytes(orthanc_a.instance_file(oid))
        assert outbox(a_node) == {}  # node A exports nowhere; B's instances are not echoed

        # Orthanc B goes away; more arrives; it comes back
        orthanc_b.stop()
        second = kit.make_study(tmp_path / "s2", 15, seed="e2e-second", rows=128, cols=128)
        more = await asyncio.to_thread(push_via_orthanc, orthanc_a, second.files)
        await wait_for(lambda: outbox(b_node).get("pending") == 15 and
                       bool(outbox(b_node).get("last_error")), 60,
                       "B to queue the second study while Orthanc B is down",
                       describe=lambda: outbox(b_node))
        orthanc_b.start()
        await wait_for(lambda: outbox(b_node).get("done") == 35, 120,
                       "the outbox to drain", describe=lambda: outbox(b_node))
        uids = orthanc_b.sop_uids()
        assert set(uids) == set(expected) | set(more)
        assert len(orthanc_b.instance_ids()) == 35
        st = outbox(b_node)
        assert (st["pending"], st["failed"], st["done"]) == (0, 0, 35)
        assert b.dicom.exporter.sent == 35  # each instance sent once
        await asyncio.to_thread(assert_same_pixels, orthanc_a, orthanc_b, list(uids))
    finally:
        await b.stop()
        await a.stop()


def push_via_orthanc(orthanc: kit.Orthanc, files: list[Path]) -> list[str]:
    """Upload files to Orthanc, then have Orthanc C-STORE their study to its modality."""
    studies = set()
    sops = []
    for f in files:
        res = orthanc.upload(f)
        studies.add(res["ParentStudy"])
        sops.append(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID))
    modality = next(iter(orthanc.modalities))
    orthanc.post(f"/modalities/{modality}/store",
                 {"Resources": sorted(studies), "Synchronous": True})
    return sops


def assert_same_pixels(a: kit.Orthanc, b: kit.Orthanc, sops: list[str]) -> None:
    ua, ub = a.sop_uids(), b.sop_uids()
    for sop in sops:
        assert pixel_hash(a.instance_file(ua[sop])) == pixel_hash(b.instance_file(ub[sop])), sop


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[tuple[LocalNode, DicomBridge]]:
    node = LocalNode.init(tmp_path / "n")
    settings = node.settings(dicom_port=0, dicom_host="127.0.0.1")
    br = DicomBridge(node, settings)
    br.start()
    try:
        yield node, br
    finally:
        br.stop()
        node.close()


def test_storescu_generated_study(bridge: tuple[LocalNode, DicomBridge],
                                  tmp_path: Path) -> None:
    """tools/gen_dataset.py's studies (CT and MR, up to 1024 x 1024) through storescu."""
    import gen_dataset

    node, br = bridge
    gen_dataset.generate(tmp_path / "s", scale=0.02, studies=3)
    files = sorted((tmp_path / "s").rglob("*.dcm"))
    sops = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    assert len(files) >= 10
    kit.run_tool([kit.dcmtk("storescu"), "-aec", "SYNCNODE", "127.0.0.1", str(br.port),
                  "+sd", "+r", "+sp", "*.dcm", str(tmp_path / "s")])
    assert br.server.wait_applied()
    listed = json.loads(cli("ls", "--json", data=node.data).stdout)
    assert sorted(r["sop_instance_uid"] for r in listed) == sorted(sops)
    by_sop = {r["sop_instance_uid"]: r for r in listed}
    for f, sop in zip(files, sops, strict=True):
        stored = node.store.path(by_sop[sop]["blob"]).read_bytes()
        assert kit.dataset_bytes(stored) == kit.dataset_bytes(f.read_bytes()), f.name
    assert node.verify().ok


def test_storescu_every_valid_pydicom_file(bridge: tuple[LocalNode, DicomBridge]) -> None:
    node, br = bridge
    groups: dict[str, list[Path]] = defaultdict(list)
    sops: dict[Path, str] = {}
    for f in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        try:
            info = inspect_file(f)
        except InvalidDicom:
            continue
        groups[info.transfer_syntax_uid].append(f)
        sops[f] = info.sop_instance_uid
    assert len(sops) > 40
    # (storescu cannot propose the others: the raw-sender test covers them)
    todo = [(ts, f) for ts, files in sorted(groups.items()) if ts in STORESCU_TS_FLAG
            for f in files]

    def store(item: tuple[str, Path]) -> bool:
        ts, f = item
        res = kit.run_tool([kit.dcmtk("storescu"), STORESCU_TS_FLAG[ts], "-R", "-aec",
                            "SYNCNODE", "127.0.0.1", str(br.port), str(f)], check=False)
        return res.returncode == 0

    # one storescu per file, four associations at a time: its result is the file's status
    with ThreadPoolExecutor(4) as pool:
        sent = [f for (_, f), ok in zip(todo, pool.map(store, todo), strict=True) if ok]
    # (a file not sent: storescu's own limits, it cannot read or re-encode a few of these
    # files; the node refusing one would show in its failure count below)
    assert len(sent) >= 30
    assert br.server.wait_applied()
    listed = {r["sop_instance_uid"]
              for r in json.loads(cli("ls", "--json", data=node.data).stdout)}
    assert {sops[f] for f in sent} <= listed
    assert br.server.stats.failed == 0
    assert node.verify().ok


def _find(port: int, level: str, keys: dict[str, str], out: Path,
          model: str = "-S") -> list[dict[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    args = [kit.dcmtk("findscu"), model, "-aec", "SYNCNODE", "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    kit.run_tool([*args, "127.0.0.1", str(port)])
    rows = []
    for f in sorted(out.iterdir()):
        ds = dcmread(f)
        rows.append({e.keyword: str(e.value) for e in ds if e.keyword})
    return rows


def test_findscu_levels(bridge: tuple[LocalNode, DicomBridge], tmp_path: Path) -> None:
    from syncnode.importer import import_paths

    node, br = bridge
    s1 = kit.make_study(tmp_path / "s1", 6, seed="find1", series=2, patient_id="PAT-ONE",
                        study_date="20200115", modality="CT")
    s2 = kit.make_study(tmp_path / "s2", 3, seed="find2", patient_id="PAT-TWO",
                        study_date="20211130", modality="MR")
    s3 = kit.make_study(tmp_path / "s3", 2, seed="find3", patient_id="OTHER",
                        study_date="20190601", modality="CT")
    import_paths(node, [*s1.files, *s2.files, *s3.files])
    port, out = br.port, tmp_path / "rsp"

    every = _find(port, "STUDY", {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": "",
                                  "NumberOfStudyRelatedSeries": "", "ModalitiesInStudy": ""},
                  out)
    counts = {r["StudyInstanceUID"]: (r["NumberOfStudyRelatedInstances"],
                                      r["NumberOfStudyRelatedSeries"]) for r in every}
    assert counts == {s1.study_uid: ("6", "2"), s2.study_uid: ("3", "1"),
                      s3.study_uid: ("2", "1")}

    def studies(keys: dict[str, str]) -> set[str]:
        return {r["StudyInstanceUID"] for r in _find(port, "STUDY",
                                                      {"StudyInstanceUID": "", **keys}, out)}

    assert studies({"PatientID": "PAT-*"}) == {s1.study_uid, s2.study_uid}
    assert studies({"PatientID": "PAT-T?O"}) == {s2.study_uid}
    assert studies({"PatientID": "PAT-ONE"}) == {s1.study_uid}
    assert studies({"StudyDate": "20200101-20201231"}) == {s1.study_uid}
    assert studies({"StudyDate": "-20200115"}) == {s1.study_uid, s3.study_uid}
    assert studies({"StudyDate": "2020-"}) == {s1.study_uid, s2.study_uid}
    assert studies({"StudyDate": "20211130"}) == {s2.study_uid}
    assert studies({"ModalitiesInStudy": "MR"}) == {s2.study_uid}
    assert studies({"ModalitiesInStudy": "CT", "StudyDate": "2020"}) == {s1.study_uid}
    assert studies({"StudyInstanceUID": s3.study_uid}) == {s3.study_uid}
    assert studies({"PatientID": "NOBODY"}) == set()

    series = _find(port, "SERIES", {"StudyInstanceUID": s1.study_uid, "SeriesInstanceUID": "",
                                    "Modality": "", "NumberOfSeriesRelatedInstances": ""}, out)
    assert {r["SeriesInstanceUID"]: r["NumberOfSeriesRelatedInstances"] for r in series} == \
        {s1.series_uids[0]: "3", s1.series_uids[1]: "3"}
    assert all(r["Modality"] == "CT" for r in series)
    assert {r["SeriesInstanceUID"] for r in _find(
        port, "SERIES", {"SeriesInstanceUID": "", "Modality": "M*"}, out)} == \
        set(s2.series_uids)

    images = _find(port, "IMAGE", {"StudyInstanceUID": s1.study_uid,
                                   "SeriesInstanceUID": s1.series_uids[1],
                                   "SOPInstanceUID": "", "SOPClassUID": ""}, out)
    assert sorted(r["SOPInstanceUID"] for r in images) == sorted(s1.sop_uids[1::2])
    one = _find(port, "IMAGE", {"SOPInstanceUID": s2.sop_uids[0]}, out)
    assert [r["SOPInstanceUID"] for r in one] == [s2.sop_uids[0]]

    patients = _find(port, "PATIENT", {"PatientID": "", "NumberOfPatientRelatedStudies": "",
                                       "NumberOfPatientRelatedInstances": ""}, out, model="-P")
    assert {r["PatientID"]: r["NumberOfPatientRelatedInstances"] for r in patients} == \
        {"PAT-ONE": "6", "PAT-TWO": "3", "OTHER": "2"}
    assert br.server.stats.finds > 10


def _find_status(port: int, level: str, keys: dict[str, str], out: Path
                 ) -> tuple[list[dict[str, str]], str]:
    """The responses of a findscu query and findscu's log (which shows the final status)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    args = [kit.dcmtk("findscu"), "-S", "-v", "-aec", "SYNCNODE", "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    proc = kit.run_tool([*args, "127.0.0.1", str(port)], check=False)
    rows = [{e.keyword: str(e.value) for e in dcmread(f) if e.keyword}
            for f in sorted(out.iterdir())]
    return rows, proc.stdout + proc.stderr


def test_findscu_key_the_node_cannot_match_never_widens(
        bridge: tuple[LocalNode, DicomBridge], tmp_path: Path) -> None:
    from syncnode.importer import import_paths

    node, br = bridge
    s1 = kit.make_study(tmp_path / "s1", 2, seed="widen1", patient_id="PAT-W1")
    s2 = kit.make_study(tmp_path / "s2", 2, seed="widen2", patient_id="PAT-W2")
    import_paths(node, [*s1.files, *s2.files])
    out = tmp_path / "rsp"
    rows, _ = _find_status(br.port, "STUDY", {"StudyInstanceUID": ""}, out)
    assert {r["StudyInstanceUID"] for r in rows} == {s1.study_uid, s2.study_uid}
    # a matching value on a key the node does not match: refused, never every study
    for keys in ({"ReferencedStudySequence": "", "(0010,1000)": "NOSUCH*"},
                 {"IssuerOfPatientID": "NOSUCH"},
                 {"Modality": "CT"}):  # Modality is a SERIES key: not at STUDY level
        rows, log = _find_status(br.port, "STUDY", {"StudyInstanceUID": "", **keys}, out)
        assert rows == [], keys
        assert "Failed: UnableToProcess" in log, log[-600:]
    # the same key without a value is a return key: answered
    rows, _ = _find_status(br.port, "STUDY", {"StudyInstanceUID": "", "(0010,1000)": ""},
                           out)
    assert {r["StudyInstanceUID"] for r in rows} == {s1.study_uid, s2.study_uid}


def _restamp(files: list[Path], charset: str | list[str], **values: Any) -> None:
    """Rewrite test files with other attribute values (and their Specific Character Set)."""
    for f in files:
        ds = dcmread(f)
        ds.SpecificCharacterSet = charset
        for k, v in values.items():
            setattr(ds, k, v)
        ds.save_as(f, enforce_file_format=True)


def test_findscu_matches_and_answers_the_stored_values(
        bridge: tuple[LocalNode, DicomBridge], tmp_path: Path) -> None:
    from syncnode.importer import import_paths

    node, br = bridge
    a = kit.make_study(tmp_path / "a", 4, seed="vals-a", series=2, patient_id="PA",
                       study_date="20200115")
    b = kit.make_study(tmp_path / "b", 2, seed="vals-b", patient_id="PB",
                       study_date="20230301")
    c = kit.make_study(tmp_path / "c", 1, seed="vals-c", patient_id="PC",
                       study_date="20230302")
    _restamp(a.files, "ISO_IR 100", PatientName="SYNTH^PATIENT08", AccessionNumber="ACC-A1",
             StudyDescription="CT ABDOMEN 3-PHASE LIVER", SeriesDescription="AXIAL",
             StudyTime="081500", PatientBirthDate="19600203", ReferringPhysicianName="DOC^A",
             BodyPartExamined="ABDOMEN")
    _restamp(b.files, "ISO_IR 100", PatientName="Müller^Jürgen", AccessionNumber="ACC-B1",
             StudyDescription="MR KNEE", StudyTime="143000", PatientBirthDate="19800707")
    _restamp(c.files, "ISO_IR 192", PatientName="Ελληνικά^Δοκιμή", AccessionNumber="ACC-C1",
             StudyDescription="Ünïcödé study", StudyTime="235959")
    # ISO 2022 IR 87 (Japanese), the name of pydicom's chrH31.dcm, encoded by pydicom
    jap = str(dcmread(get_charset_files("chrH31.dcm")[0]).PatientName)
    d = kit.make_study(tmp_path / "d", 1, seed="vals-d", patient_id="PD")
    _restamp(d.files, ["", "ISO 2022 IR 87"], PatientName=jap, StudyTime="060000")
    assert b"\x1b$B" in d.files[0].read_bytes()  # really stored as ISO 2022
    import_paths(node, [*a.files, *b.files, *c.files, *d.files])
    out, port = tmp_path / "rsp", br.port

    def studies(keys: dict[str, str]) -> set[str]:
        rows, log = _find_status(port, "STUDY", {"StudyInstanceUID": "", **keys}, out)
        assert "Success" in log, log[-600:]
        return {r["StudyInstanceUID"] for r in rows}

    # the queries: nothing matches, nothing is answered
    assert studies({"PatientName": "NOSUCHNAME*"}) == set()
    assert studies({"AccessionNumber": "XYZ"}) == set()
    # PN: wildcards, case-insensitive (documented choice)
    assert studies({"PatientName": "SYNTH^*"}) == {a.study_uid}
    assert studies({"PatientName": "synth^patient0?"}) == {a.study_uid}
    assert studies({"PatientName": "*"}) == {a.study_uid, b.study_uid, c.study_uid,
                                             d.study_uid}
    assert studies({"AccessionNumber": "ACC-B1"}) == {b.study_uid}
    assert studies({"AccessionNumber": "ACC-A1\\ACC-C1"}) == {a.study_uid, c.study_uid}
    assert studies({"StudyDescription": "*LIVER"}) == {a.study_uid}
    assert studies({"StudyDescription": "ct abdomen*"}) == set()  # not PN: case-sensitive
    assert studies({"StudyDate": "20230301-20231231"}) == {b.study_uid, c.study_uid}
    assert studies({"StudyTime": "080000-120000"}) == {a.study_uid}
    assert studies({"StudyTime": "14-"}) == {b.study_uid, c.study_uid}
    assert studies({"PatientBirthDate": "-19691231"}) == {a.study_uid}
    assert studies({"ReferringPhysicianName": "doc^a"}) == {a.study_uid}

    # answers carry the stored values and the counts
    rows, _ = _find_status(port, "STUDY", {
        "StudyInstanceUID": a.study_uid, "PatientName": "", "PatientID": "",
        "AccessionNumber": "", "StudyDescription": "", "StudyTime": "",
        "PatientBirthDate": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": ""}, out)
    assert len(rows) == 1
    r = rows[0]
    assert (r["PatientName"], r["PatientID"], r["AccessionNumber"], r["StudyDescription"],
            r["PatientBirthDate"]) == ("SYNTH^PATIENT08", "PA", "ACC-A1",
                                       "CT ABDOMEN 3-PHASE LIVER", "19600203")
    assert r["StudyTime"].startswith("081500")
    assert (r["NumberOfStudyRelatedSeries"], r["NumberOfStudyRelatedInstances"]) == ("2", "4")

    series, _ = _find_status(port, "SERIES", {
        "StudyInstanceUID": a.study_uid, "SeriesInstanceUID": "", "SeriesNumber": "",
        "SeriesDescription": "", "BodyPartExamined": "",
        "NumberOfSeriesRelatedInstances": ""}, out)
    assert sorted((x["SeriesNumber"], x["SeriesDescription"], x["BodyPartExamined"],
                   x["NumberOfSeriesRelatedInstances"]) for x in series) == \
        [("1", "AXIAL", "ABDOMEN", "2"), ("2", "AXIAL", "ABDOMEN", "2")]
    two, _ = _find_status(port, "SERIES", {"StudyInstanceUID": a.study_uid,
                                           "SeriesInstanceUID": "", "SeriesNumber": "2"}, out)
    assert [x["SeriesInstanceUID"] for x in two] == [a.series_uids[1]]
    images, _ = _find_status(port, "IMAGE", {
        "StudyInstanceUID": a.study_uid, "SeriesInstanceUID": a.series_uids[0],
        "SOPInstanceUID": "", "InstanceNumber": "3"}, out)
    assert [x["SOPInstanceUID"] for x in images] == [a.sop_uids[2]]

    # Specific Character Set: stored Latin-1 and UTF-8 values decoded, answered in UTF-8
    rows, _ = _find_status(port, "STUDY", {"StudyInstanceUID": "", "PatientName": "MÜLLER*",
                                           "SpecificCharacterSet": "ISO_IR 192",
                                           "StudyDescription": ""}, out)
    assert [(x["PatientName"], x["StudyInstanceUID"]) for x in rows] == \
        [("Müller^Jürgen", b.study_uid)]
    rows, _ = _find_status(port, "STUDY", {"StudyInstanceUID": "", "PatientName": "Ελλ*",
                                           "SpecificCharacterSet": "ISO_IR 192",
                                           "StudyDescription": ""}, out)
    assert [(x["PatientName"], x["StudyDescription"]) for x in rows] == \
        [("Ελληνικά^Δοκιμή", "Ünïcödé study")]
    # a Latin-1 query is answered in Latin-1 when the values fit, else in UTF-8
    rows, _ = _find_status(port, "STUDY", {"StudyInstanceUID": "", "PatientID": "PB",
                                           "SpecificCharacterSet": "ISO_IR 100",
                                           "PatientName": ""}, out)
    assert [(x["SpecificCharacterSet"], x["PatientName"]) for x in rows] == \
        [("ISO_IR 100", "Müller^Jürgen")]
    rows, _ = _find_status(port, "STUDY", {"StudyInstanceUID": "", "PatientID": "PC",
                                           "SpecificCharacterSet": "ISO_IR 100",
                                           "PatientName": ""}, out)
    assert [(x["SpecificCharacterSet"], x["PatientName"]) for x in rows] == \
        [("ISO_IR 192", "Ελληνικά^Δοκιμή")]
    rows, _ = _find_status(port, "STUDY", {"StudyInstanceUID": "", "PatientName": "*山田*",
                                           "SpecificCharacterSet": "ISO_IR 192"}, out)
    assert [(x["PatientName"], x["StudyInstanceUID"]) for x in rows] == \
        [("Yamada^Tarou=山田^太郎=やまだ^たろう", d.study_uid)]
    # PATIENT level (Patient Root): the patient's values and counts
    pats = _find(port, "PATIENT", {"PatientID": "PA", "PatientName": "",
                                   "PatientBirthDate": "",
                                   "NumberOfPatientRelatedStudies": ""}, out, model="-P")
    assert [(p["PatientName"], p["PatientBirthDate"], p["NumberOfPatientRelatedStudies"])
            for p in pats] == [("SYNTH^PATIENT08", "19600203", "1")]


def test_import_from_orthanc(tmp_path: Path, orthancs: Callable[..., kit.Orthanc]) -> None:
    node = LocalNode.init(tmp_path / "n")
    port = kit.free_port()
    pacs = orthancs("pacs", modalities={"syncnode": ("SYNCNODE", "127.0.0.1", port)})
    pacs.start()
    study = kit.make_study(tmp_path / "s", 7, seed="import", rows=64, cols=64)
    for f in study.files:
        pacs.upload(f)
    settings = node.settings(dicom_port=port, dicom_host="127.0.0.1",
                             import_from=[pacs.address])
    br = DicomBridge(node, settings, import_poll=0.5)
    br.start()
    try:
        deadline = 60
        asyncio.run(wait_for(lambda: len(node.catalog.instances()) == 7
                             and br.retriever.sources[0].moved_studies == 1, deadline,
                             "the study to be retrieved"))
        moved = br.retriever.sources[0].moved_studies
        assert moved == 1
        # it is remembered: later polls do not fetch it again
        asyncio.run(asyncio.sleep(2))
        assert br.retriever.sources[0].moved_studies == 1
        assert br.server.stats.duplicates == 0
    finally:
        br.stop()
        node.close()
    assert sorted(i.sop_instance_uid for i in LocalNode(tmp_path / "n").catalog.instances()) \
        == sorted(study.sop_uids)


def test_import_from_a_pacs_that_does_not_know_our_ae_says_so_at_once(
        tmp_path: Path, orthancs: Callable[..., kit.Orthanc]) -> None:
    """Orthanc refuses C-FIND from an AE it does not list: the source's state is an error
    within seconds (it took 30 s: the release after the refusal waited for the ACSE
    timeout), naming what the PACS administrator must add."""
    import time

    node = LocalNode.init(tmp_path / "n")
    pacs = orthancs("pacs", extra_config={"DicomAlwaysAllowFind": False,
                                          "DicomAlwaysAllowMove": False})
    pacs.start()
    settings = node.settings(dicom_port=0, dicom_host="127.0.0.1",
                             import_from=[pacs.address])
    br = DicomBridge(node, settings, import_poll=60)
    t0 = time.monotonic()
    br.start()
    try:
        source = br.retriever.sources[0]
        asyncio.run(wait_for(lambda: source.errors > 0, 20, "the refused C-FIND"))
        assert time.monotonic() - t0 < 10
        shown = br.status()["import_from"][pacs.address]
        assert shown["state"] == "error" and shown["runs"] == 1
        assert "AE title 'SYNCNODE'" in shown["last_error"]
        assert "modality" in shown["last_error"]
    finally:
        br.stop()
        node.close()


def test_node_killed_during_storescu_keeps_every_acknowledged_instance(tmp_path: Path
                                                                       ) -> None:
    """SIGKILL of ``syncnode run`` in the middle of a C-STORE stream: after a restart, every
    instance storescu was told "Success" for is in the catalog, intact."""
    import os
    import signal
    import subprocess
    import time

    from syncsupport import SYNCNODE

    data = tmp_path / "n"
    LocalNode.init(data).close()
    port = kit.free_port()
    # the kill lands after 50 acknowledged; storescu can run ~160 files ahead of a starved
    # reader (64 KiB of -v lines in the pipe)
    IMAGES = 300
    study = kit.make_study(tmp_path / "s", IMAGES, seed="crash", rows=256, cols=256)

    def run_node() -> subprocess.Popen[bytes]:
        (data / "ports.json").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [*SYNCNODE, "run", "--data", str(data), "--dicom-port", str(port),
             "--peer-host", "127.0.0.1", "--peer-port", "0", "--api-port", "0",
             "--no-discovery"], env=kit.tool_env({"SYNCNODE_DICOM_HOST": "127.0.0.1"}),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not (data / "ports.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "node did not start"
            time.sleep(0.05)
        kit.wait_port(port)
        return proc

    node = run_node()
    try:
        scu = subprocess.Popen([kit.dcmtk("storescu"), "-v", "-aec", "SYNCNODE", "127.0.0.1",
                                str(port), "+sd", str(tmp_path / "s")], env=kit.tool_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert scu.stderr is not None
        acknowledged: list[Path] = []
        current = None
        for line in scu.stderr:  # kill the node once 50 instances were acknowledged
            if "Sending file:" in line:
                current = line.split("Sending file:", 1)[1].strip()
            elif "Received Store Response (Success)" in line and current:
                acknowledged.append(Path(current))
                if len(acknowledged) == 50 and node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)
        scu.wait(60)
        node.wait(10)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(10)
    assert 50 <= len(acknowledged) < IMAGES, "the kill should land in the middle of the stream"

    node = run_node()  # replays the ingest journal
    try:
        listed = {r["sop_instance_uid"]: r for r in json.loads(
            cli("ls", "--json", data=data).stdout)}
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(20)
    by_file = dict(zip(study.files, study.sop_uids, strict=True))
    missing = [f.name for f in acknowledged if by_file[f] not in listed]
    assert missing == [], f"acknowledged but lost: {missing[:5]}"
    assert LocalNode(data).verify().ok
