"""Tests of tools/gen_dataset.py, the synthetic DICOM data-set generator."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zstandard
from pydicom.uid import ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools import gen_dataset as gd  # noqa: E402 (after the sys.path set-up)

SCALE = 0.005
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
FILE_RE = re.compile(r"^s\d{2}/se\d{2}/im\d{4}\.dcm$")


def _dcm_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != gd.MANIFEST_NAME)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gd.Manifest]:
    out = tmp_path_factory.mktemp("small") / "ds"
    manifest = gd.generate(out, scale=SCALE, seed=7)
    return out, manifest


# ---------------------------------------------------------------------------- the table


def test_table_reproduces_the_reference_set() -> None:
    studies = gd.STUDIES
    assert len(studies) == 13
    assert {s.modality for s in studies} == {"CT", "MR"}
    images = [s.images for s in studies]
    assert sum(images) == 7767
    assert min(images) == 23 and max(images) == 3582
    pixel_bytes = [s.rows * s.cols * 2 * s.images for s in studies]
    smallest, largest = pixel_bytes[images.index(23)], pixel_bytes[images.index(3582)]
    assert 39e6 < smallest < 41e6  # "23 images / 40 MB"
    assert 1.85e9 < largest < 1.95e9  # "3,582 images / 1.9 GB"
    assert 5.9e9 < sum(pixel_bytes) < 6.0e9  # headers add the last ~0.01 GB: "about 6 GB"
    for spec in studies:
        assert spec.bits_stored in (12, 16) and spec.series
        assert spec.rows >= 256 and spec.cols >= 256


def test_docstring_table_matches_studies() -> None:
    rows = re.findall(r"^\s+s(\d\d) (CT|MR) .*?(\d+) x\s*(\d+)\s+(\d+)([us])\s+(\d+)\s+([\d,]+)\s",
                      gd.__doc__ or "", flags=re.MULTILINE)
    assert len(rows) == 13
    for (idx, mod, r, c, bits, sign, n_series, n_images), spec in zip(rows, gd.STUDIES,
                                                                      strict=True):
        assert int(idx) == gd.STUDIES.index(spec) + 1
        assert (mod, int(r), int(c), int(bits)) == (spec.modality, spec.rows, spec.cols,
                                                    spec.bits_stored)
        assert (sign == "s") == spec.signed
        assert (int(n_series), int(n_images.replace(",", ""))) == (len(spec.series), spec.images)


def test_plan_scales_every_series_with_at_least_one_image() -> None:
    planned = gd.plan(SCALE)
    assert len(planned) == 13
    for spec, counts in planned:
        assert len(counts) == len(spec.series)
        for series, n in zip(spec.series, counts, strict=True):
            assert n >= 1
            if series.images * SCALE >= 1:
                assert abs(n - series.images * SCALE) <= 0.5
    assert [c for _, c in gd.plan(1.0)] == [[s.images for s in spec.series]
                                            for spec in gd.STUDIES]
    assert len(gd.plan(0.5, studies=3)) == 3


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": -1.0}, {"scale": float("nan")},
                                    {"studies": 0}, {"studies": 14},
                                    {"multiframe_gb": -1.0}, {"multiframe_gb": 4.3}])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        gd.generate(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_output_directory_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError):
        gd.generate(tmp_path, scale=0.001, studies=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stray.txt"]


def test_uid_is_valid_and_deterministic() -> None:
    uids = {gd.uid(s, "instance", i) for s in range(3) for i in range(200)}
    assert len(uids) == 600
    for u in uids:
        assert UID_RE.match(u) and len(u) <= 64 and u.startswith("2.25.")
    assert gd.uid(1, "study", 1) == gd.uid(1, "study", 1) != gd.uid(2, "study", 1)


# ---------------------------------------------------------------------------- small set


def test_layout_counts_and_manifest(small: tuple[Path, gd.Manifest]) -> None:
    out, manifest = small
    assert len(manifest.studies) == 13
    files = _dcm_files(out)
    rel = [p.relative_to(out).as_posix() for p in files]
    assert all(FILE_RE.match(r) for r in rel), rel
    assert {p.name for p in out.iterdir()} == {f"s{i:02d}" for i in range(1, 14)} | {
        gd.MANIFEST_NAME}
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    for (_spec, counts), st in zip(gd.plan(SCALE), manifest.studies, strict=True):
        assert [se.images for se in st.series] == counts
        for se in st.series:
            on_disk = sorted((out / se.path).iterdir())
            assert [p.name for p in on_disk] == [f"im{i:04d}.dcm" for i in range(1, se.images + 1)]
    assert manifest.files == len(files)
    assert manifest.bytes == sum(p.stat().st_size for p in files)
    assert sorted(str(p) for p in manifest.paths(out)) == sorted(str(p) for p in files)
    doc = json.loads((out / gd.MANIFEST_NAME).read_text())
    assert doc["files"] == manifest.files and doc["bytes"] == manifest.bytes
    reloaded = gd.Manifest.load(out)
    assert reloaded.to_json() == manifest.to_json()
    for st in manifest.studies:
        for se in st.series:
            for path, _sop, size in se.instances:
                assert (out / str(path)).stat().st_size == size


def test_every_file_has_valid_headers_and_hierarchy(small: tuple[Path, gd.Manifest]) -> None:
    out, manifest = small
    by_study: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    sop_uids: set[str] = set()
    for st in manifest.studies:
        for se in st.series:
            positions = []
            for number, (path, sop_uid, size) in enumerate(se.instances, start=1):
                raw = (out / str(path)).read_bytes()
                assert raw[128:132] == b"DICM" and len(raw) == size
                ds = pydicom.dcmread(out / str(path))
                meta = ds.file_meta
                assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
                assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == sop_uid
                assert meta.ImplementationClassUID == gd.IMPLEMENTATION_CLASS_UID
                assert ds.SOPClassUID == {"CT": gd.CT_IMAGE_STORAGE,
                                          "MR": gd.MR_IMAGE_STORAGE}[st.modality]
                assert ds.Modality == st.modality
                for u in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID,
                          ds.FrameOfReferenceUID):
                    assert UID_RE.match(u) and len(u) <= 64
                assert ds.StudyInstanceUID == st.study_uid
                assert ds.SeriesInstanceUID == se.series_uid
                assert ds.PatientID == st.patient_id
                assert re.fullmatch(r"SYNTH\^PATIENT\d{2}", str(ds.PatientName))
                assert re.fullmatch(r"\d{8}", ds.StudyDate)
                assert ds.InstanceNumber == number
                assert (ds.Rows, ds.Columns) == (st.rows, st.cols)
                assert ds.BitsAllocated == 16 and ds.BitsStored == st.bits_stored
                assert ds.HighBit == ds.BitsStored - 1
                assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
                assert ds.PixelRepresentation in (0, 1)
                assert float(ds.WindowWidth) > 0 and "WindowCenter" in ds
                if st.modality == "CT":
                    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
                assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
                positions.append(float(ds.SliceLocation))
                n_pixel = ds.Rows * ds.Columns * 2
                # PixelData is the last element: OW with an explicit length.
                assert raw[-n_pixel - 12:-n_pixel] == (b"\xe0\x7f\x10\x00OW\x00\x00"
                                                       + n_pixel.to_bytes(4, "little"))
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
                by_study[st.study_uid].add((ds.PatientID, str(ds.PatientName), ds.StudyDate,
                                            ds.FrameOfReferenceUID, ds.AccessionNumber))
                assert sop_uid not in sop_uids
                sop_uids.add(sop_uid)
            assert positions == sorted(positions, reverse=True)  # head first, evenly spaced
            if len(positions) > 2:
                steps = np.diff(positions)
                assert np.allclose(steps, steps[0], atol=2e-3)
    assert all(len(v) == 1 for v in by_study.values())  # study-level attributes agree
    assert len({st.study_uid for st in manifest.studies}) == 13
    # Patients with two studies (s06 + s12, s08 + s10) keep their ID; the others differ.
    pid = {st.path: st.patient_id for st in manifest.studies}
    assert pid["s06"] == pid["s12"] and pid["s08"] == pid["s10"]
    assert len(set(pid.values())) == 11


def test_pixels_are_realistic_and_compress_like_ct(small: tuple[Path, gd.Manifest]) -> None:
    out, manifest = small
    cctx = zstandard.ZstdCompressor(level=3)
    raw_total = packed_total = 0
    for st in manifest.studies:
        path = out / str(st.series[0].instances[len(st.series[0].instances) // 2][0])
        ds = pydicom.dcmread(path)
        px = ds.pixel_array
        assert px.std() > 50 and len(np.unique(px)) > 200, st.path
        assert px.min() >= (-(1 << 15) if ds.PixelRepresentation else 0)
        if not ds.PixelRepresentation:
            assert px.max() < 1 << ds.BitsStored
        if st.modality == "CT":
            hu = px.astype(np.float64) + float(ds.RescaleIntercept)
            inside = hu > -2500  # not the padding outside the reconstruction circle
            assert ((hu > -1100) & (hu < -900)).mean() > 0.05, st.path  # air / lung
            assert ((hu > -150) & (hu < 150)).mean() > 0.05, st.path  # soft tissue
            assert (hu[inside] > 300).mean() > 0.001, st.path  # bone
        data = path.read_bytes()
        packed = len(cctx.compress(data))
        assert 1.3 < len(data) / packed < 5, (st.path, len(data) / packed)
        raw_total += len(data)
        packed_total += packed
    assert 1.5 < raw_total / packed_total < 3.0


def test_anatomy_varies_smoothly_between_slices(tmp_path: Path) -> None:
    manifest = gd.generate(tmp_path / "ds", scale=1.0, seed=3, studies=1)  # 23 images, 40 MB
    (st,) = manifest.studies
    assert st.images == 23 and 39e6 < st.bytes < 41e6
    paths = manifest.paths(tmp_path / "ds")
    px = [pydicom.dcmread(p).pixel_array.astype(np.float64) for p in paths]
    near = np.mean([np.abs(a - b).mean() for a, b in itertools.pairwise(px)])
    far = np.abs(px[0] - px[-1]).mean()
    assert far > 3 * near
    # Fresh noise in every slice: no two slices share their low bits.
    assert all((a.astype(np.int64) & 7 != b.astype(np.int64) & 7).mean() > 0.5
               for a, b in itertools.pairwise(px))


# ---------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_content(tmp_path: Path) -> None:
    a = gd.generate(tmp_path / "a", scale=0.002, seed=11)
    b = gd.generate(tmp_path / "b", scale=0.002, seed=11)
    c = gd.generate(tmp_path / "c", scale=0.002, seed=12)
    tree_a, tree_b, tree_c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert len(tree_a) == a.files + 1 > 40
    assert tree_a == tree_b
    assert a.to_json() == b.to_json()
    assert tree_a.keys() == tree_c.keys()
    assert all(tree_a[k] != tree_c[k] for k in tree_a)
    uids_a = {i[1] for st in a.studies for se in st.series for i in se.instances}
    uids_c = {i[1] for st in c.studies for se in st.series for i in se.instances}
    assert not uids_a & uids_c
    px_a = pydicom.dcmread(tmp_path / "a/s07/se01/im0001.dcm").pixel_array
    px_c = pydicom.dcmread(tmp_path / "c/s07/se01/im0001.dcm").pixel_array
    assert (px_a != px_c).mean() > 0.5


def test_studies_keeps_the_first_k(tmp_path: Path) -> None:
    manifest = gd.generate(tmp_path, scale=0.01, seed=1, studies=2)
    assert [st.path for st in manifest.studies] == ["s01", "s02"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "s01", "s02"]
    assert [st.modality for st in manifest.studies] == ["MR", "CT"]


# ---------------------------------------------------------------------------- interruption


def test_interrupted_run_leaves_no_partial_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real_slice = gd._SliceSource.slice
    calls = {"n": 0}

    def failing_slice(self: gd._SliceSource, i: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return real_slice(self, i)

    monkeypatch.setattr(gd._SliceSource, "slice", failing_slice)
    with pytest.raises(KeyboardInterrupt):
        gd.generate(tmp_path, scale=0.01, seed=5)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in leftovers if not p.name.endswith(".dcm")]  # no .partial, no manifest
    assert 0 < len(leftovers) <= 25
    for p in leftovers:
        ds = pydicom.dcmread(p)
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_writer_error_propagates_and_cleans_up(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = gd._write_atomic

    def failing_write(path: Path, header: bytes, frames: Iterator[np.ndarray],
                      pixel_bytes: int) -> int:
        if path.name == "im0003.dcm":
            frames = iter([next(frames)[: 10]])  # a short write: must be detected and removed
        return real_write(path, header, frames, pixel_bytes)

    monkeypatch.setattr(gd, "_write_atomic", failing_write)
    with pytest.raises(RuntimeError, match="declared"):
        gd.generate(tmp_path, scale=0.05, seed=5, studies=2)
    assert list(tmp_path.rglob("im0002.dcm"))
    assert not list(tmp_path.rglob("im0003.dcm"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------- multi-frame


def test_small_multiframe_is_readable_and_its_length_matches(tmp_path: Path) -> None:
    manifest = gd.generate(tmp_path, scale=0.001, seed=2, studies=1, multiframe_gb=0.01)
    st = manifest.studies[-1]
    assert st.multiframe and st.path == "s02" and st.images == 1
    path = tmp_path / str(st.series[0].instances[0][0])
    assert path.relative_to(tmp_path).as_posix() == "s02/se01/im0001.dcm"
    head = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(head.NumberOfFrames)
    assert frames == st.frames == round(0.01e9 / (512 * 512 * 2))
    assert (head.SOPClassUID == gd.ENHANCED_CT_IMAGE_STORAGE
            == head.file_meta.MediaStorageSOPClassUID)
    assert head.file_meta.MediaStorageSOPInstanceUID == head.SOPInstanceUID
    assert len(head.PerFrameFunctionalGroupsSequence) == frames
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
         for f in head.PerFrameFunctionalGroupsSequence]
    assert z == sorted(z, reverse=True)
    deferred = pydicom.dcmread(path, defer_size="1 KB")
    elem = deferred.get_item("PixelData", keep_deferred=True)
    declared = head.Rows * head.Columns * frames * 2
    assert elem.length == declared and declared % 2 == 0
    assert elem.value_tell + declared == path.stat().st_size == st.bytes
    px = pydicom.dcmread(path).pixel_array
    assert px.shape == (frames, head.Rows, head.Columns)
    assert all(px[i].std() > 50 for i in range(frames))
    assert not np.array_equal(px[0], px[1])


def test_multiframe_is_streamed_with_bounded_memory(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        sys.path.insert(0, sys.argv[1])
        from tools.gen_dataset import generate
        out = Path(sys.argv[2])
        generate(out / "warm", scale=0.001, studies=1, multiframe_gb=0.001)  # load everything
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = generate(out / "big", scale=0.001, studies=1, multiframe_gb=0.2)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(m.studies[-1].bytes, (after - before) * 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True)
    size, growth = map(int, res.stdout.split())
    assert size > 0.19e9
    print(f"multi-frame of {size / 1e6:.0f} MB: peak RSS grew by {growth / 1e6:.1f} MB")
    assert growth < 100e6, f"peak RSS grew by {growth / 1e6:.0f} MB writing {size / 1e6:.0f} MB"
    mf = tmp_path / "big" / "s02" / "se01" / "im0001.dcm"
    assert mf.stat().st_size == size


# ---------------------------------------------------------------------------- CLI


def test_cli_help_and_run_match_the_function(tmp_path: Path) -> None:
    script = REPO / "tools" / "gen_dataset.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         check=True, env=env, cwd=tmp_path)
    for flag in ("--out", "--scale", "--seed", "--studies", "--multiframe-gb"):
        assert flag in res.stdout
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "cli"),
                          "--scale", "0.01", "--seed", "4", "--studies", "3"],
                         capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    manifest = gd.generate(tmp_path / "api", scale=0.01, seed=4, studies=3)
    assert f"{manifest.files} files" in res.stdout and "MB/s" in res.stdout
    assert _tree(tmp_path / "cli") == _tree(tmp_path / "api")
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "cli")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert res.returncode == 2 and "not empty" in res.stderr
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=False)
    assert res.returncode == 2 and "--out" in res.stderr
