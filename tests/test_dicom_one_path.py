"""One path for every way in: C-STORE (DCMTK ``storescu``) and ``import`` build put events
with the catalog's one factory, so the same file gives the same outcome either way.

- A Patient ID longer than 64 characters, or with a tab, is indexed the same way (cleaned,
  cut to 64) whether the file is sent or imported; neither fails.
- A superseded version sent again stays superseded (the duplicate rule is "a version
  with these bytes that is not deleted", not "the live version").
- An instance received by C-STORE and then imported from the file it was sent from adds
  no event and no blob (the SCP writes its own file meta: the data set decides), and the
  other way round.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydicom import dcmread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.dicom.scp import DicomServer
from syncnode.importer import import_paths
from syncnode.local import LocalNode

# what differs between two nodes holding the same instance
NODE_SPECIFIC = {"event_id", "blob", "size", "chunks", "hlc", "origin"}


def storescu(port: int, *files: Path) -> None:
    """Send files with DCMTK's storescu (one association); fails on any refusal."""
    res = kit.run_tool([kit.dcmtk("storescu"), "-aec", "SYNCNODE", "127.0.0.1", str(port),
                        *map(str, files)], timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Status" not in res.stderr or "Success" in res.stderr, res.stderr


def blob_files(node: LocalNode) -> int:
    return sum(1 for p in (node.data / "blobs").rglob("*")
               if p.is_file() and not p.name.endswith(".chunks"))


def one_file(tmp_path: Path, name: str, patient_id: str = "PAT-1") -> Path:
    study = kit.make_study(tmp_path / name, 1, seed=name, patient_id=patient_id)
    return Path(study.files[0])


def attributes(node: LocalNode) -> list[dict[str, object]]:
    return [{k: v for k, v in i.to_dict().items() if k not in NODE_SPECIFIC}
            for i in node.catalog.instances()]


@pytest.mark.parametrize("patient_id", ["P" * 80, "ID\tWITH TAB"], ids=["long", "tab"])
def test_odd_patient_id_same_outcome_as_import(scp: DicomServer, node: LocalNode,
                                               tmp_path: Path, patient_id: str) -> None:
    f = one_file(tmp_path, "odd", patient_id)
    assert dcmread(f).PatientID == patient_id  # the file really carries it
    storescu(scp.port, f)
    assert scp.wait_applied()
    other = LocalNode.init(tmp_path / "other")
    try:
        report = import_paths(other, [f])
        assert (report.imported, report.failed) == (1, [])
        assert attributes(node) == attributes(other)
        [stored] = node.catalog.instances()
        assert stored.patient_id == (patient_id.replace("\t", " ") if "\t" in patient_id
                                     else patient_id[:64])
    finally:
        other.close()


def test_superseded_version_sent_again_stays_superseded(scp: DicomServer, node: LocalNode,
                                                         tmp_path: Path) -> None:
    v1 = one_file(tmp_path, "v")
    ds = dcmread(v1)
    ds.SeriesDescription = "second version"
    v2 = tmp_path / "v2.dcm"
    ds.save_as(v2)
    sop = str(ds.SOPInstanceUID)
    storescu(scp.port, v1)
    assert scp.wait_applied()
    storescu(scp.port, v2)
    assert scp.wait_applied()
    live = node.catalog.instance(sop)
    assert live is not None
    events = node.catalog.event_count()
    assert events == 2
    storescu(scp.port, v1)  # the older version again
    assert scp.wait_applied()
    assert node.catalog.event_count() == events
    assert node.catalog.instance(sop) == live
    # and import agrees
    report = import_paths(node, [v1])
    assert (report.imported, report.unchanged) == (0, 1)
    assert node.catalog.instance(sop) == live


def test_store_then_import_adds_nothing(scp: DicomServer, node: LocalNode,
                                        tmp_path: Path) -> None:
    f = one_file(tmp_path, "twice")
    storescu(scp.port, f)
    assert scp.wait_applied()
    events, root, blobs = (node.catalog.event_count(), node.catalog.merkle_root(),
                           blob_files(node))
    assert (events, blobs) == (1, 1)
    report = import_paths(node, [f])
    assert (report.imported, report.unchanged, report.failed) == (0, 1, [])
    assert node.catalog.event_count() == events
    assert node.catalog.merkle_root() == root
    assert blob_files(node) == blobs
    assert node.verify().ok


def test_import_then_store_adds_nothing(scp: DicomServer, node: LocalNode,
                                        tmp_path: Path) -> None:
    f = one_file(tmp_path, "twice")
    assert import_paths(node, [f]).imported == 1
    events, root = node.catalog.event_count(), node.catalog.merkle_root()
    storescu(scp.port, f)
    assert scp.wait_applied()
    assert scp.stats.duplicates == 1 and scp.stats.stored == 0
    assert node.catalog.event_count() == events
    assert node.catalog.merkle_root() == root
