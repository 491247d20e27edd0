"""syncnode.importer in-process: the bytes kept, the copy paths, what a rejected file leaves."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import blake3
import pytest
from syncsupport import make_dicom, uid

from syncnode import importer
from syncnode.blobstore import CHUNK_SIZE
from syncnode.importer import import_paths
from syncnode.local import LocalNode

SIZES = [100, CHUNK_SIZE - 400, 3 * CHUNK_SIZE + 7]  # one chunk, exactly about one, several


@pytest.fixture
def node(tmp_path: Path) -> LocalNode:
    return LocalNode.init(tmp_path / "node")


def write_study(folder: Path, sizes: list[int] = SIZES, study: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_dicom(folder / f"{i}.dcm", sop=uid(study, 1, i), study=uid(study),
                       series=uid(study, 1), pixel_bytes=size, seed=i)
            for i, size in enumerate(sizes)]


def assert_stored(node: LocalNode, files: list[Path]) -> None:
    for f in files:
        data = f.read_bytes()
        h = blake3.blake3(data).hexdigest()
        path = node.store.path(h)
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert node.store.verify(h) is None  # whole hash and chunk list
    assert list(node.store.tmp_dir.iterdir()) == []


def test_import_keeps_the_exact_bytes(node: LocalNode, tmp_path: Path) -> None:
    files = write_study(tmp_path / "in")
    report = import_paths(node, [tmp_path / "in"])
    assert (report.imported, report.unchanged, report.failed) == (3, 0, [])
    assert report.bytes == sum(f.stat().st_size for f in files)
    assert_stored(node, files)


def test_large_files_are_inspected_and_hashed_from_the_copy_on_disk(
        node: LocalNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "WHOLE_FILE_MAX", 1000)  # all but the smallest streamed
    files = write_study(tmp_path / "in")
    assert import_paths(node, [tmp_path / "in"]).imported == 3
    assert_stored(node, files)


@pytest.mark.parametrize("how", ["refused", "says 0", "absent"])
def test_copy_without_copy_file_range(node: LocalNode, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Other file systems (a CD, a network share): read/write instead, same result."""
    def refused(*_: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    if how == "absent":
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", refused if how == "refused" else
                            (lambda *_: 0))
    files = write_study(tmp_path / "in")
    assert import_paths(node, [tmp_path / "in"]).imported == 3
    assert_stored(node, files)


def test_rejected_files_leave_nothing(node: LocalNode, tmp_path: Path) -> None:
    write_study(tmp_path / "in", [])
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    good = write_study(tmp_path / "in", [100])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # named on the command line: refused, and must not hang the import
    report = import_paths(node, [tmp_path / "in", fifo])
    assert report.imported == 1
    assert sorted(reason for _, reason in report.failed) == [
        "empty file", "not a DICOM Part-10 file: no 'DICM' prefix at offset 128",
        "not a regular file"]
    assert_stored(node, good)


def test_same_bytes_twice_across_and_within_batches(
        node: LocalNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_study(tmp_path / "a", [100, 5000])
    (tmp_path / "b").mkdir()
    for f in files:
        (tmp_path / "b" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(importer, "BATCH_FILES", 3)  # batches of 3: both cases happen
    report = import_paths(node, [tmp_path / "a", tmp_path / "b", tmp_path / "a"])
    assert (report.files, report.imported, report.unchanged) == (6, 2, 4)
    assert_stored(node, files)
    assert len(node.catalog.instances()) == 2
