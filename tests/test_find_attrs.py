"""The C-FIND attribute read model (syncnode.catalog.attrs) and the refusal of keys the
node cannot match.

Blobs stored before the read model existed (a catalog migrated from schema version 3)
are read before the next C-FIND answers; a blob that cannot be read matches only
universal keys (never widening); a matching value on a key the node does not match is
refused with 0xC000.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from syncnode.catalog import attrs
from syncnode.dicom import query
from syncnode.importer import import_paths
from syncnode.local import LocalNode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit


def _ident(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _studies(node: LocalNode, **keys: str) -> set[str]:
    return {str(r.StudyInstanceUID) for r in query.find(
        node.catalog, query.STUDY_ROOT, _ident("STUDY", StudyInstanceUID="", **keys),
        blob_path=node.store.path)}


def test_blobs_stored_before_the_read_model_are_indexed_before_the_next_query(
        tmp_path: Path) -> None:
    node = LocalNode.init(tmp_path / "n")
    s = kit.make_study(tmp_path / "s", 3, seed="backfill", patient_id="PX")
    import_paths(node, s.files)
    path = node.catalog.path
    node.close()
    # what a catalog of schema version 3 looks like: no read model
    db = sqlite3.connect(path)
    db.execute("DROP TABLE find_attrs")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    node = LocalNode(tmp_path / "n")
    try:
        assert sqlite3.connect(path).execute(
            "SELECT count(*) FROM find_attrs").fetchone()[0] == 0
        assert _studies(node, PatientName="test^backfill") == {s.study_uid}
        assert sqlite3.connect(path).execute(
            "SELECT count(*) FROM find_attrs").fetchone()[0] == 3
        assert node.catalog.index_find_attributes(node.store.path) == 0  # done once
    finally:
        node.close()


def test_indexing_given_blobs_reads_those_alone_and_once(tmp_path: Path) -> None:
    """What the sync installer calls for the blobs it just stored: it reads those of them
    that are live and not indexed yet, and nothing of a backlog of others (which is the
    backfill's to read, in the background), whatever else the catalog holds."""
    node = LocalNode.init(tmp_path / "n")
    try:
        s = kit.make_study(tmp_path / "s", 6, seed="given", patient_id="PG")
        import_paths(node, s.files)
        db = sqlite3.connect(node.catalog.path)
        db.execute("DELETE FROM find_attrs")  # a backlog of six
        db.commit()
        blobs = sorted(i.blob for i in node.catalog.instances())
        assert len(blobs) == 6

        def indexed() -> set[str]:
            return {r[0] for r in db.execute("SELECT blob FROM find_attrs")}

        given = [*blobs[:2], "0" * 64]  # and a blob no live put names: not read
        assert node.catalog.index_find_attributes_of(node.store.path, given) == 2
        assert indexed() == set(blobs[:2])
        assert node.catalog.index_find_attributes_of(node.store.path, blobs[:3]) == 1
        assert indexed() == set(blobs[:3])
        assert node.catalog.index_find_attributes(node.store.path) == 3  # the backlog
        assert _studies(node, PatientName="test^given") == {s.study_uid}
        db.close()
    finally:
        node.close()


def test_an_unreadable_blob_matches_only_universal_keys(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    node = LocalNode.init(tmp_path / "n")
    try:
        s = kit.make_study(tmp_path / "s", 1, seed="unreadable")
        import_paths(node, s.files)
        blob = sqlite3.connect(node.catalog.path).execute(
            "SELECT blob FROM puts WHERE live=1").fetchone()[0]
        assert node.catalog.index_find_attributes(lambda h: tmp_path / "missing") == 1
        assert "cannot be read" in caplog.text and blob in caplog.text
        assert _studies(node, PatientName="*") == {s.study_uid}  # universal: matched
        assert _studies(node, PatientName="TEST*") == set()  # narrowed, never widened
        assert _studies(node) == {s.study_uid}
    finally:
        node.close()


@pytest.mark.parametrize("keys", [{"IssuerOfPatientID": "X"}, {"Modality": "CT"},
                                  {"InstanceNumber": "1"}, {"PatientComments": "a*"}])
def test_a_key_the_node_cannot_match_is_refused(tmp_path: Path, keys: dict[str, str]
                                                ) -> None:
    node = LocalNode.init(tmp_path / "n")
    try:
        with pytest.raises(query.QueryError) as err:
            _studies(node, **keys)
        assert err.value.status == 0xC000
        # names the key, never its value
        assert str(err.value) == (f"matching on {next(iter(keys))} at STUDY level is not "
                                  "supported by this node")
    finally:
        node.close()


def test_time_bounds() -> None:
    assert attrs.norm_time("0815") == "081500.000000"
    assert attrs.norm_time("14", high=True) == "145959.999999"
    assert attrs.norm_time("101500.5") == "101500.500000"
    assert attrs.norm_time("10:15:00") == "101500.000000"
    assert attrs.norm_time("25x") == ""


def test_the_backfill_indexes_new_puts_as_they_arrive(tmp_path: Path) -> None:
    """The background backfill of ``syncnode run`` indexes what was there at start and then
    each new arrival (here: an import by another catalog object, as ``syncnode import``
    in another process), without a query asking for it."""
    node = LocalNode.init(tmp_path / "n")
    first = kit.make_study(tmp_path / "a", 2, seed="bf-a")
    import_paths(node, first.files)
    path = node.catalog.path
    backfill = attrs.Backfill(path, node.store.path, interval=0.05)
    backfill.start()
    other = LocalNode(tmp_path / "n")
    try:
        second = kit.make_study(tmp_path / "b", 3, seed="bf-b")
        import_paths(other, second.files)
        db = sqlite3.connect(path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and db.execute(
                "SELECT count(*) FROM find_attrs").fetchone()[0] < 5:
            time.sleep(0.05)
        rows = db.execute("SELECT count(*) FROM find_attrs WHERE readable=1").fetchone()[0]
        db.close()
        assert rows == 5 and backfill.indexed == 5
        assert node.catalog.index_find_attributes(node.store.path) == 0  # nothing left
    finally:
        backfill.stop()
        other.close()
        node.close()
    assert not backfill.thread.is_alive()


@pytest.mark.parametrize("change", [
    {"PatientName": "Doe^John  ", "StudyDescription": " CT  HEAD ", "InstanceNumber": " +007",
     "SeriesNumber": "", "StudyTime": "1230", "AccessionNumber": ""},  # plain: fast path
    {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "M\u00fcller^J\u00fcrgen"},
    {"SpecificCharacterSet": "ISO_IR 192", "StudyDescription": "\u00e9tude t\u00eate"},
    {"SpecificCharacterSet": ["", "ISO 2022 IR 87"],
     "PatientName": "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"},
    {"BodyPartExamined": ["CHEST", "ABDOMEN"]},  # two values
    {"InstanceNumber": "7.0"},  # not an integer string
    {"StudyDescription": ("UT", "written with another VR")},
], ids=["plain", "latin1", "utf8", "iso2022", "multivalued", "odd-is", "other-vr"])
@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # "7.0", on purpose
def test_the_fast_reader_gives_what_pydicom_gives_or_leaves_it_to_pydicom(
        tmp_path: Path, change: dict[str, object]) -> None:
    """Instances with only plain ASCII values are read by syncnode's own walk; anything
    needing pydicom's character set or value handling is left to it. Either way the row
    is what pydicom reads."""
    import pydicom
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    from syncnode.dicomfile import read_plain_text

    s = kit.make_study(tmp_path / "s", 1, seed="fast", patient_id="PF")
    ds = pydicom.dcmread(s.files[0])
    for kw, value in change.items():
        if isinstance(value, tuple):
            tag = tag_for_keyword(kw)
            assert tag is not None
            ds[tag] = DataElement(tag, value[0], value[1])
        else:
            setattr(ds, kw, value)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    fast = read_plain_text(path, attrs._VRS)
    assert (fast is not None) == (change.get("InstanceNumber") == " +007")
    assert attrs.read_attributes(path) == attrs._read_with_pydicom(path)
    if fast is not None:
        assert attrs.read_attributes(path)["instance_number"] == "7"
        assert attrs.read_attributes(path)["patient_name"] == "Doe^John"
