"""Tests for syncnode.dicomfile: acceptance rules, truncation, bounded memory, robustness.

pydicom's bundled test files are used from the installed package folder; nothing is downloaded
(``get_testdata_files()`` is deliberately never called).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from syncnode import dicomfile
from syncnode.dicomfile import InstanceInfo, InvalidDicom, inspect_bytes, inspect_file, is_valid_uid

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

_NO_DICM = "not a DICOM Part-10 file: no 'DICM' prefix at offset 128"
_BARE = "bare DICOM data set without preamble"
_MISMATCH = "does not match Media Storage SOP Instance UID"

# Every file directly in pydicom's test_files folder -> "ok" or a substring of the reason.
EXPECTED: dict[str, str] = {
    "693_J2KI.dcm": "ok",
    "CT_small.dcm": "ok",
    "ExplVR_BigEnd.dcm": "ok",
    "ExplVR_BigEndNoMeta.dcm": _BARE,
    "ExplVR_LitEndNoMeta.dcm": _BARE,
    "GDCMJ2K_TextGBR.dcm": "ok",
    "J2K_pixelrep_mismatch.dcm": "ok",
    "JPEG-lossy.dcm": "ok",
    # delimiter bytes inside a fragment are skipped by the fragment length: valid structure
    "JPEG2000-embedded-sequence-delimiter.dcm": "ok",
    "JPEG2000.dcm": "ok",
    "JPEGLSNearLossless_08.dcm": "missing Study Instance UID",
    "JPEGLSNearLossless_16.dcm": "missing Study Instance UID",
    "JPGExtended.dcm": "ok",
    "MR_small.dcm": "ok",
    "MR_small_RLE.dcm": "ok",
    "MR_small_bigendian.dcm": "ok",
    "MR_small_expb.dcm": "ok",
    "MR_small_implicit.dcm": "ok",
    "MR_small_jp2klossless.dcm": "ok",
    "MR_small_jpeg_ls_lossless.dcm": "ok",
    "MR_small_padded.dcm": "ok",
    "MR_truncated.dcm": "truncated: Pixel Data has 8130 of 8192 bytes",
    "README.txt": _NO_DICM,
    "SC_jpeg_no_color_transform.dcm": "ok",
    "SC_jpeg_no_color_transform_2.dcm": "ok",
    "SC_rgb_dcmtk_+eb+cr.dcm": "ok",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": "ok",
    "SC_rgb_dcmtk_+eb+cy+n2.dcm": "ok",
    "SC_rgb_dcmtk_+eb+cy+np.dcm": "ok",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm": "ok",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm": "ok",
    "SC_rgb_gdcm_KY.dcm": "ok",
    "SC_rgb_jls_lossy_line.dcm": "missing Study Instance UID",
    "SC_rgb_jls_lossy_sample.dcm": "missing Study Instance UID",
    # file meta says JPEG Baseline (explicit VR) but the data set is implicit VR
    "SC_rgb_jpeg.dcm": "corrupt: the data set is not encoded with explicit VR",
    "SC_rgb_jpeg_app14_dcmd.dcm": "ok",
    "SC_rgb_jpeg_dcmd.dcm": "ok",
    "SC_rgb_jpeg_dcmtk.dcm": "ok",
    "SC_rgb_jpeg_gdcm.dcm": "ok",
    "SC_rgb_jpeg_lossy_gdcm.dcm": "ok",
    "SC_rgb_rle.dcm": "ok",
    "SC_rgb_rle_16bit.dcm": "ok",
    "SC_rgb_rle_16bit_2frame.dcm": "ok",
    "SC_rgb_rle_2frame.dcm": "ok",
    "SC_rgb_rle_32bit.dcm": "ok",
    "SC_rgb_rle_32bit_2frame.dcm": "ok",
    "SC_rgb_small_odd.dcm": "ok",
    "SC_rgb_small_odd_big_endian.dcm": "ok",
    "SC_rgb_small_odd_jpeg.dcm": "ok",
    "SC_ybr_full_422_uncompressed.dcm": "ok",  # 2/3 length rule for YBR_FULL_422
    "UN_sequence.dcm": "missing SOP Class UID",
    "badVR.dcm": "invalid Number of Frames '1A'",
    "crayons.icc": _NO_DICM,
    "empty_charset_LEI.dcm": "missing SOP Class UID",
    "examples_jpeg2k.dcm": "ok",
    "examples_overlay.dcm": "ok",
    "examples_palette.dcm": "ok",
    "examples_rgb_color.dcm": "ok",
    "examples_ybr_color.dcm": "ok",
    "image_dfl.dcm": "ok",  # deflated, with a (verified) gzip-style CRC-32/size trailer
    "liver_1frame.dcm": "ok",
    "liver_expb_1frame.dcm": "ok",
    "meta_missing_tsyntax.dcm": "file meta lacks Transfer Syntax UID (0002,0010)",
    "nested_priv_SQ.dcm": "Pixel Data present but Rows (0028,0010) is missing",
    "no_meta.dcm": _NO_DICM,  # starts with a stray byte, so no "bare data set" hint
    "no_meta_group_length.dcm": "missing SOP Class UID",  # meta w/o group length is tolerated
    "priv_SQ.dcm": "missing SOP Class UID",
    "reportsi.dcm": "ok",
    "reportsi_with_empty_number_tags.dcm": "ok",
    "rtdose.dcm": _MISMATCH,
    "rtdose_1frame.dcm": _MISMATCH,
    "rtdose_expb.dcm": _MISMATCH,
    "rtdose_expb_1frame.dcm": _MISMATCH,
    "rtdose_rle.dcm": "ok",
    "rtdose_rle_1frame.dcm": "ok",
    "rtplan.dcm": _MISMATCH,
    "rtplan.dump": _NO_DICM,
    "rtplan_truncated.dcm": "truncated: Beam Sequence (300A,00B0) has 711 of 976 bytes",
    "rtstruct.dcm": _BARE,
    "rtstruct.dump": _NO_DICM,
    "test-SR.dcm": "ok",
    "test1.json": _NO_DICM,
    "test_PN.json": _NO_DICM,
    "waveform_ecg.dcm": "ok",
    "zipMR.gz": "gzip-compressed",
}

BUNDLED = sorted(p.name for p in TEST_FILES.iterdir() if p.is_file())


def _outcome(source: Path | bytes) -> str:
    """"ok", or the reason a file (inspect_file) or its bytes (inspect_bytes) are refused."""
    try:
        if isinstance(source, bytes):
            inspect_bytes(source)
        else:
            inspect_file(source)
    except InvalidDicom as exc:
        return exc.reason
    return "ok"


def test_expected_table_covers_every_bundled_file() -> None:
    assert set(EXPECTED) == set(BUNDLED)
    assert len(BUNDLED) >= 85


def _assert_matches_pydicom(info: InstanceInfo, path: Path) -> None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert info.sop_class_uid == ds.SOPClassUID
    assert info.sop_instance_uid == ds.SOPInstanceUID
    assert info.study_instance_uid == ds.StudyInstanceUID
    assert info.series_instance_uid == ds.SeriesInstanceUID
    assert info.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert info.modality == (ds.get("Modality") or "")
    # ExplVR_BigEnd.dcm has the ACR-NEMA form '1997.04.24', indexed as '19970424'
    assert info.study_date == str(ds.get("StudyDate") or "").replace(".", "")
    assert info.patient_id == str(ds.get("PatientID") or "").strip()


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_file(name: str) -> None:
    path = TEST_FILES / name
    expected = EXPECTED[name]
    if expected == "ok":
        info = inspect_file(path)
        _assert_matches_pydicom(info, path)
    else:
        with pytest.raises(InvalidDicom) as excinfo:
            inspect_file(path)
        assert expected in excinfo.value.reason
        if not name.endswith(".dcm"):
            assert excinfo.value.reason.startswith(_NO_DICM)


DICOMDIR_TREE = sorted(
    str(p.relative_to(TEST_FILES)) for p in (TEST_FILES / "dicomdirtests").rglob("*") if p.is_file()
)


@pytest.mark.parametrize("rel", BUNDLED + DICOMDIR_TREE)
def test_in_memory_inspection_is_the_same(rel: str) -> None:
    """inspect_bytes (the importer reads small files whole) decides as inspect_file does."""
    path = TEST_FILES / rel
    data = path.read_bytes()
    assert _outcome(data) == _outcome(path)
    if _outcome(path) == "ok":
        assert inspect_bytes(data) == inspect_file(path)


@pytest.mark.parametrize("ts", sorted(dicomfile._COMMON_SYNTAXES))
def test_common_transfer_syntaxes_as_pydicom_has_them(ts: str) -> None:
    uid = UID(ts)
    assert uid.is_transfer_syntax
    assert dicomfile._COMMON_SYNTAXES[ts] == (uid.is_little_endian, uid.is_encapsulated)


@pytest.mark.parametrize("charset", sorted(dicomfile._ASCII_CHARSETS))
def test_ascii_patient_id_decoded_as_pydicom_does(tmp_path: Path, charset: str) -> None:
    ds = _image()
    ds.SpecificCharacterSet = charset
    for value in ("PAT-0042^x", "A B", "~{}|", " 12 "):
        ds.PatientID = value
        path = _write(ds, tmp_path / "f.dcm")
        assert inspect_file(path).patient_id == str(pydicom.dcmread(path).PatientID).strip()


def test_common_files_are_inspected_without_importing_pydicom(tmp_path: Path) -> None:
    """Importing pydicom costs ~0.3 s of every ``syncnode import``: not needed for these."""
    path = _write(_image(), tmp_path / "f.dcm")
    code = textwrap.dedent(f"""
        import sys
        from syncnode.dicomfile import inspect_file
        import syncnode.importer
        inspect_file({str(path)!r})
        assert "pydicom" not in sys.modules, "pydicom imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("rel", DICOMDIR_TREE)
def test_dicomdir_tree(rel: str) -> None:
    """Files without extension in the DICOMDIR test tree: real instances, DICOMDIRs, stubs."""
    path = TEST_FILES / rel
    outcome = _outcome(path)
    if path.name.startswith("DICOMDIR"):
        assert outcome.startswith("a DICOMDIR (Media Storage Directory) is not an instance")
    elif path.name.startswith("README"):
        assert outcome == _NO_DICM
    elif "TINY_ALPHA" in rel:
        # The TINY_ALPHA CT "images" were stripped of their whole Image Pixel module.
        assert outcome.startswith("truncated: no Pixel Data in a CT Image Storage instance")
    else:
        assert outcome == "ok"
        _assert_matches_pydicom(inspect_file(path), path)


# --------------------------------------------------------------------------------------------
# is_valid_uid


@pytest.mark.parametrize(
    "uid",
    ["0", "1", "1.2", "1.2.840.10008.1.2", "1.0.2", "2.25.0", "1." + "2" * 62, "9" * 64],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        ".",
        ".1",
        "1.",
        "1..2",
        "01.2",
        "1.02",
        "00",
        "1.2a",
        "1.2.abc",
        "1.2 ",
        " 1.2",
        "1.2\x00",
        "1.2\n",
        "1,2",
        "1.2\\1.3",
        "\u0661.\u0662",  # non-ASCII digits
        "1." + "2" * 63,  # 65 characters
    ],
)
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_is_valid_uid_rejects_non_strings() -> None:
    assert not is_valid_uid(None)  # type: ignore[arg-type]
    assert not is_valid_uid(b"1.2")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Synthetic files


def _image(rows: int = 8, columns: int = 8, frames: int | None = None, bits: int = 16) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MR_IMAGE
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyDate = "20240131"
    ds.Modality = "MR"
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "SECRET-PID-4711"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(rows * columns * (frames or 1) * bits // 8)
    return ds


def _write(
    ds: Dataset,
    path: Path,
    ts: str = ExplicitVRLittleEndian,
    meta_instance: str | None = None,
    meta_class: str | None = None,
    group_length: bool = True,
) -> Path:
    """Write a Part-10 file; meta UIDs default to the data set's (pass others for mismatches).

    pydicom only writes inconsistent file meta as-is (``enforce_file_format=False``), and then
    without (0002,0000) File Meta Information Group Length, which is added here.
    """
    meta = FileMetaDataset()
    if meta_class or "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = meta_class or ds.SOPClassUID
    if meta_instance or "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = meta_instance or ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.99"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    known = UID(ts).is_transfer_syntax
    ds.save_as(
        path,
        enforce_file_format=False,
        implicit_vr=None if known else False,
        little_endian=None if known else True,
    )
    if group_length:
        data = path.read_bytes()
        pos = 132
        while data[pos : pos + 2] == b"\x02\x00":
            if data[pos + 4 : pos + 6] in (b"OB", b"UN", b"UT", b"SQ", b"OW"):
                pos += 12 + struct.unpack("<I", data[pos + 8 : pos + 12])[0]
            else:
                pos += 8 + struct.unpack("<H", data[pos + 6 : pos + 8])[0]
        element = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, pos - 132)
        path.write_bytes(data[:132] + element + data[132:])
    return path


def _patch(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    return path


def _reason(path: Path) -> str:
    with pytest.raises(InvalidDicom) as excinfo:
        inspect_file(path)
    exc = excinfo.value
    assert isinstance(exc, ValueError)
    assert exc.reason == str(exc)
    return exc.reason


def test_valid_synthetic_image(tmp_path: Path) -> None:
    info = inspect_file(_write(_image(), tmp_path / "ok.dcm"))
    assert info == InstanceInfo(
        sop_class_uid=MR_IMAGE,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.3",
        study_instance_uid="1.2.826.0.1.3680043.8.498.2",
        patient_id="SECRET-PID-4711",
        modality="MR",
        study_date="20240131",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert info.to_dict() == {
        "sop_class_uid": MR_IMAGE,
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "series_instance_uid": "1.2.826.0.1.3680043.8.498.3",
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.2",
        "patient_id": "SECRET-PID-4711",
        "modality": "MR",
        "study_date": "20240131",
        "transfer_syntax_uid": ExplicitVRLittleEndian,
    }


@pytest.mark.parametrize(
    "ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_other_native_transfer_syntaxes(tmp_path: Path, ts: str) -> None:
    info = inspect_file(_write(_image(frames=3), tmp_path / "ok.dcm", ts=ts))
    assert info.transfer_syntax_uid == ts
    assert info.sop_instance_uid == "1.2.826.0.1.3680043.8.498.1"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert _reason(path) == "empty file"


@pytest.mark.parametrize("size", [1, 131, 132, 4096])
def test_random_bytes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(size).randbytes(size))
    assert _reason(path).startswith("not a DICOM Part-10 file")


def test_random_bytes_after_dicm_prefix(tmp_path: Path) -> None:
    rng = random.Random(7)
    for i in range(50):
        path = tmp_path / f"random{i}.dcm"
        path.write_bytes(bytes(128) + b"DICM" + rng.randbytes(rng.randint(0, 2000)))
        _reason(path)  # rejected, with an InvalidDicom and nothing else


def test_unreadable_paths_do_not_leak_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "Doe^John_1970.dcm"
    reason = _reason(missing)
    assert reason.startswith("cannot read file:") and "Doe" not in reason
    assert _reason(tmp_path) == "not a regular file"  # a directory
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _reason(fifo) == "not a regular file"  # and opening it would have blocked


def test_invalid_study_uid(tmp_path: Path) -> None:
    ds = _image()
    ds.StudyInstanceUID = "1.2.777"
    path = _patch(_write(ds, tmp_path / "f.dcm"), b"1.2.777\x00", b"1.2.abc\x00")
    assert _reason(path) == "invalid Study Instance UID '1.2.abc'"


def test_uid_with_leading_zero_component(tmp_path: Path) -> None:
    ds = _image()
    ds.SeriesInstanceUID = "1.2.3.777"
    path = _patch(_write(ds, tmp_path / "f.dcm"), b"1.2.3.777", b"1.2.3.077")
    assert _reason(path) == "invalid Series Instance UID '1.2.3.077'"


def test_uid_space_padding_is_stripped(tmp_path: Path) -> None:
    ds = _image()
    ds.SeriesInstanceUID = "1.2.3.777"
    path = _patch(_write(ds, tmp_path / "f.dcm"), b"1.2.3.777\x00", b"1.2.3.777 ")
    assert inspect_file(path).series_instance_uid == "1.2.3.777"


@pytest.mark.parametrize(
    ("keyword", "reason"),
    [
        ("SOPClassUID", "missing SOP Class UID"),
        ("SOPInstanceUID", "missing SOP Instance UID"),
        ("StudyInstanceUID", "missing Study Instance UID"),
        ("SeriesInstanceUID", "missing Series Instance UID"),
    ],
)
def test_missing_required_uid(tmp_path: Path, keyword: str, reason: str) -> None:
    ds = _image()
    ds.SOPClassUID = BASIC_TEXT_SR  # no Pixel Data rules for an SR...
    for kw in ("Rows", "Columns", "PixelData"):
        delattr(ds, kw)
    meta_class, meta_instance = ds.SOPClassUID, ds.SOPInstanceUID
    delattr(ds, keyword)
    path = _write(ds, tmp_path / "f.dcm", meta_class=meta_class, meta_instance=meta_instance)
    assert _reason(path) == reason


def test_empty_required_uid(tmp_path: Path) -> None:
    ds = _image()
    ds.SeriesInstanceUID = ""
    assert _reason(_write(ds, tmp_path / "f.dcm")) == (
        "missing Series Instance UID (the element is empty)"
    )


def test_sop_instance_uid_mismatch(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm", meta_instance="1.2.826.0.1.3680043.8.498.9")
    assert _reason(path) == (
        "SOP Instance UID 1.2.826.0.1.3680043.8.498.1 does not match Media Storage SOP "
        "Instance UID '1.2.826.0.1.3680043.8.498.9' in the file meta"
    )


def test_sop_class_uid_mismatch(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm", meta_class="1.2.840.10008.5.1.4.1.1.2")
    assert "does not match Media Storage SOP Class UID" in _reason(path)


def test_meta_without_media_storage_instance_uid(tmp_path: Path) -> None:
    ds = _image()
    instance = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    path = _write(ds, tmp_path / "f.dcm")  # the meta gets no Media Storage SOP Instance UID
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = instance
    ds.save_as(path, enforce_file_format=False)
    assert _reason(path) == "file meta lacks Media Storage SOP Instance UID (0002,0003)"


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm", ts="1.2.3.4.5.6")
    assert _reason(path) == "unsupported Transfer Syntax UID '1.2.3.4.5.6' (not a standard one)"


def test_meta_group_length_must_match(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm")
    data = bytearray(path.read_bytes())
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    (length,) = struct.unpack("<I", data[140:144])
    data[140:144] = struct.pack("<I", length + 2)
    path.write_bytes(data)
    assert _reason(path).startswith("corrupt: file meta group length (0002,0000) says")


def test_meta_without_group_length_is_tolerated(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm", group_length=False)
    assert path.read_bytes()[132:136] == b"\x02\x00\x02\x00"  # (0002,0002) comes first
    assert inspect_file(path).modality == "MR"


def test_dicm_but_no_meta(tmp_path: Path) -> None:
    path = tmp_path / "f.dcm"
    path.write_bytes(bytes(128) + b"DICM" + b"\x08\x00\x05\x00CS\x00\x00")
    assert _reason(path) == "not a DICOM Part-10 file: no file meta information after 'DICM'"


def test_no_data_set_after_meta(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm")
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[140:144])
    path.write_bytes(data[: 144 + length])
    assert _reason(path) == "truncated: no data set after the file meta information"


# ---- native Pixel Data length


def test_native_pixel_data_shorter_than_image(tmp_path: Path) -> None:
    ds = _image(rows=64, columns=64, frames=2)
    ds.PixelData = bytes(8192)
    assert _reason(_write(ds, tmp_path / "f.dcm")) == (
        "truncated: Pixel Data has 8192 of 16384 bytes "
        "(64 rows x 64 columns x 2 frame(s) x 1 sample(s) x 16 bits)"
    )


def test_native_pixel_data_pad_byte_and_excess(tmp_path: Path) -> None:
    ds = _image(rows=3, columns=3, bits=8)  # 9 bytes -> stored as 10 with the pad byte
    ds.PixelData = bytes(9)
    path = _write(ds, tmp_path / "odd.dcm")
    assert inspect_file(path).modality == "MR"
    ds.PixelData = bytes(100)  # excess padding: not a truncation
    assert inspect_file(_write(ds, tmp_path / "excess.dcm")).modality == "MR"
    ds.PixelData = bytes(8)
    assert _reason(_write(ds, tmp_path / "short.dcm")).startswith(
        "truncated: Pixel Data has 8 of 9 bytes"
    )


def test_native_pixel_data_one_bit(tmp_path: Path) -> None:
    ds = _image(rows=10, columns=10, frames=3, bits=1)  # 300 bits -> 38 bytes
    ds.PixelData = bytes(38)
    assert inspect_file(_write(ds, tmp_path / "ok.dcm")).modality == "MR"
    ds.PixelData = bytes(36)
    assert _reason(_write(ds, tmp_path / "short.dcm")).startswith(
        "truncated: Pixel Data has 36 of 38 bytes"
    )


def test_native_pixel_data_ybr_full_422(tmp_path: Path) -> None:
    ds = _image(rows=4, columns=4, bits=8)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = bytes(4 * 4 * 2)  # two thirds of 4 x 4 x 3
    assert inspect_file(_write(ds, tmp_path / "ok.dcm")).modality == "MR"
    ds.PhotometricInterpretation = "YBR_FULL"
    assert _reason(_write(ds, tmp_path / "short.dcm")).startswith(
        "truncated: Pixel Data has 32 of 48 bytes"
    )


@pytest.mark.parametrize(("value", "shown"), [(b"0 ", "'0'"), (b"1A", "'1A'"), (b"-2", "'-2'")])
def test_invalid_number_of_frames(tmp_path: Path, value: bytes, shown: str) -> None:
    ds = _image(frames=7)
    path = _patch(_write(ds, tmp_path / "f.dcm"), b"IS\x02\x007 ", b"IS\x02\x00" + value)
    assert _reason(path) == f"invalid Number of Frames {shown}"


def test_pixel_data_without_rows(tmp_path: Path) -> None:
    ds = _image()
    del ds.Rows
    assert _reason(_write(ds, tmp_path / "f.dcm")) == (
        "Pixel Data present but Rows (0028,0010) is missing: cannot verify its length"
    )


def test_rows_without_pixel_data(tmp_path: Path) -> None:
    ds = _image()
    del ds.PixelData
    assert _reason(_write(ds, tmp_path / "f.dcm")).startswith(
        "truncated: Rows/Columns present but no Pixel Data"
    )


def test_image_storage_without_pixel_module(tmp_path: Path) -> None:
    ds = _image()
    for kw in ("Rows", "Columns", "PixelData"):
        delattr(ds, kw)
    assert _reason(_write(ds, tmp_path / "f.dcm")) == (
        "truncated: no Pixel Data in a MR Image Storage instance "
        "(file probably cut before its Pixel Data)"
    )
    ds.SOPClassUID = BASIC_TEXT_SR  # no Pixel Data expected
    assert inspect_file(_write(ds, tmp_path / "sr.dcm")).sop_class_uid == BASIC_TEXT_SR


# ---- encapsulated Pixel Data


def _rle_image(frames: int = 2) -> Dataset:
    ds = _image(frames=frames)
    ds.PixelData = encapsulate(
        [b"\x01\x00\x00\x00" + bytes(60) + b"frame" * i for i in range(frames)]
    )
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def test_encapsulated_ok_and_missing_delimiter(tmp_path: Path) -> None:
    path = _write(_rle_image(), tmp_path / "rle.dcm", ts=RLELossless)
    assert inspect_file(path).transfer_syntax_uid == RLELossless
    data = path.read_bytes()
    assert data[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path.write_bytes(data[:-8])
    assert _reason(path) == (
        "truncated: file ends inside encapsulated Pixel Data (before its Sequence Delimitation "
        "Item)"
    )


def test_encapsulated_without_fragments(tmp_path: Path) -> None:
    ds = _image()
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = _write(ds, tmp_path / "f.dcm", ts=RLELossless)
    assert _reason(path) == "corrupt: encapsulated Pixel Data contains no fragments"


def test_encapsulated_pixel_data_in_native_syntax(tmp_path: Path) -> None:
    path = _write(_rle_image(), tmp_path / "f.dcm", ts=RLELossless)
    # Same length UIDs: the file meta keeps its length, only the Transfer Syntax changes.
    _patch(path, b"1.2.840.10008.1.2.5\x00", b"1.2.840.10008.1.2.1\x00")
    assert _reason(path).startswith("corrupt: Pixel Data is encapsulated (undefined length)")


def test_native_pixel_data_in_encapsulated_syntax(tmp_path: Path) -> None:
    path = _write(_image(), tmp_path / "f.dcm")  # pydicom refuses to write it directly
    _patch(path, b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00")
    assert _reason(path).startswith("corrupt: Pixel Data has a defined length")


# ---- sequences


def _sr(undefined_length: bool) -> Dataset:
    ds = _image()
    for kw in ("Rows", "Columns", "PixelData"):
        delattr(ds, kw)
    ds.SOPClassUID = BASIC_TEXT_SR
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "x" * 40
    ds.ContentSequence = Sequence([item, item])
    ds["ContentSequence"].is_undefined_length = undefined_length
    for it in ds.ContentSequence:
        it.is_undefined_length_sequence_item = undefined_length
    return ds


def test_undefined_length_sequence_cut_before_delimiter(tmp_path: Path) -> None:
    path = _write(_sr(True), tmp_path / "sr.dcm")
    assert inspect_file(path).sop_class_uid == BASIC_TEXT_SR
    data = path.read_bytes()
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    path.write_bytes(data[:-8])
    assert _reason(path) == (
        "truncated: file ends inside Content Sequence (0040,A730) (before its Sequence "
        "Delimitation Item)"
    )


def test_defined_length_sequence_cut(tmp_path: Path) -> None:
    path = _write(_sr(False), tmp_path / "sr.dcm")
    assert inspect_file(path).sop_class_uid == BASIC_TEXT_SR
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert _reason(path).startswith("truncated: Content Sequence (0040,A730) has ")


def test_item_overrunning_its_sequence(tmp_path: Path) -> None:
    path = _write(_sr(False), tmp_path / "sr.dcm")
    data = bytearray(path.read_bytes())
    item = data.index(b"\xfe\xff\x00\xe0")
    (length,) = struct.unpack("<I", data[item + 4 : item + 8])
    data[item + 4 : item + 8] = struct.pack("<I", length + 2)
    path.write_bytes(data)
    assert _reason(path).startswith("corrupt:")


def test_deep_nesting_is_bounded(tmp_path: Path) -> None:
    """1000 nested undefined-length sequences: rejected cleanly, no RecursionError."""
    path = _write(_sr(True), tmp_path / "sr.dcm")
    data = path.read_bytes()
    seq_head = b"\x09\x00\x10\x10UN\x00\x00\xff\xff\xff\xff"  # private UN seq (0009,1010)
    nested_head = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x09\x00\x10\x10\xff\xff\xff\xff"
    body = seq_head + nested_head * 1000
    start = data.index(b"\x10\x00\x10\x00PN")  # insert before (0010,0010): tag order kept
    path.write_bytes(data[:start] + body + data[start:])
    assert _reason(path) == "corrupt: sequences nested deeper than 64 levels"


# ---- deflate


def _deflated(tmp_path: Path) -> Path:
    return _write(
        _image(rows=64, columns=64, frames=4),
        tmp_path / "dfl.dcm",
        ts=DeflatedExplicitVRLittleEndian,
    )


def _meta_end(data: bytes) -> int:
    (length,) = struct.unpack("<I", data[140:144])
    return 144 + length


def test_deflated_trailing_bytes(tmp_path: Path) -> None:
    path = _deflated(tmp_path)
    data = path.read_bytes()
    assert inspect_file(path).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    inflated = zlib.decompress(data[_meta_end(data) :], -zlib.MAX_WBITS)
    trailer = struct.pack("<II", zlib.crc32(inflated), len(inflated))

    path.write_bytes(data + b"\x00")  # pad byte
    assert inspect_file(path).modality == "MR"
    path.write_bytes(data + trailer)  # gzip-style trailer, verified
    assert inspect_file(path).modality == "MR"
    path.write_bytes(data + trailer[:4] + struct.pack("<I", len(inflated) + 1))
    assert _reason(path).startswith("corrupt: the CRC-32/size trailer")
    path.write_bytes(data + b"garbage")
    assert _reason(path) == "corrupt: 7 unexpected byte(s) after the end of the deflate stream"


def test_deflated_corrupt_stream(tmp_path: Path) -> None:
    path = _deflated(tmp_path)
    data = bytearray(path.read_bytes())
    data[_meta_end(data)] = 0xFF  # reserved block type 11
    path.write_bytes(data)
    assert _reason(path).startswith("corrupt: deflated data set cannot be inflated")


def test_deflated_every_truncation_rejected(tmp_path: Path) -> None:
    path = _deflated(tmp_path)
    data = path.read_bytes()
    outcomes = _prefix_outcomes(data, range(len(data)), tmp_path / "cut.dcm")
    assert [off for off, reason in outcomes.items() if reason is None] == []


# ---- indexed values


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # written on purpose
def test_patient_id_decoding_and_date_forms(tmp_path: Path) -> None:
    ds = _image()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "  Ünïcødé-42 "
    ds.StudyDate = "2003.08.05"
    path = _write(ds, tmp_path / "f.dcm")
    info = inspect_file(path)
    assert info.patient_id == "Ünïcødé-42" == pydicom.dcmread(path).PatientID.strip()
    assert info.study_date == "20030805"
    ds.StudyDate = "20031345"  # not a date: indexed as "", not a rejection
    assert inspect_file(_write(ds, tmp_path / "g.dcm")).study_date == ""
    del ds.StudyDate
    del ds.PatientID
    info = inspect_file(_write(ds, tmp_path / "h.dcm"))
    assert (info.study_date, info.patient_id) == ("", "")


# --------------------------------------------------------------------------------------------
# Truncation sweeps


def _prefix_outcomes(data: bytes, offsets: Iterable[int], path: Path) -> dict[int, str | None]:
    """Inspect data[:off] for each offset (largest first, shrinking one file in place)."""
    path.write_bytes(data)
    out: dict[int, str | None] = {}
    for off in sorted(set(offsets), reverse=True):
        os.truncate(path, off)
        reason = _outcome(path)
        out[off] = None if reason == "ok" else reason
        assert _outcome(data[:off]) == reason, off
    return out


_REQUIRED = {0x00080016, 0x00080018, 0x0020000D, 0x0020000E}
_PIXEL = {0x7FE00010, 0x7FE00008, 0x7FE00009}


def _top_level_ends(path: Path) -> list[tuple[int, int]]:
    """(tag, end offset) of every top-level element, as pydicom parses them."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = ds.file_meta.TransferSyntaxUID
    with open(path, "rb") as fp:
        fp.seek(132 + 12 + ds.file_meta.FileMetaInformationGroupLength)
        return [
            (int(elem.tag), fp.tell())
            for elem in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian)
        ]


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # explicit VR LE, native, trailing padding element
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",  # encapsulated
        "JPEG2000.dcm",
        "test-SR.dcm",  # nested undefined-length sequences, no Pixel Data
        "rtdose_rle_1frame.dcm",  # implicit-VR-like RT object with sequences, encapsulated
    ],
)
def test_truncation_sweep(tmp_path: Path, name: str) -> None:
    """Cut a valid file at every header offset and every 97th byte of the rest.

    Accepted prefixes are exactly the documented blind spot: cuts on a top-level element
    boundary that keep the four UIDs and either the whole Pixel Data (losing only trailing
    elements such as Data Set Trailing Padding or trailing SR content), or - for a SOP Class
    whose Pixel Data is optional, such as RT Dose - that fall before Rows/Columns.
    """
    path = TEST_FILES / name
    data = path.read_bytes()
    ends = _top_level_ends(path)
    assert ends[-1][1] == len(data)
    required_end = max(end for tag, end in ends if tag in _REQUIRED)
    pixel_end = max((end for tag, end in ends if tag in _PIXEL), default=0)
    rows_end = min((end for tag, end in ends if tag in (0x00280010, 0x00280011)), default=0)
    header_end = max((end for tag, end in ends if tag < 0x7FE00000), default=0)
    image_class = "Image Storage" in pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID.name
    allowed = {
        end
        for _, end in ends
        if required_end <= end < len(data)
        and (end >= pixel_end or (not image_class and end < rows_end))
    }

    offsets = set(range(header_end + 64)) | set(range(0, len(data), 97))
    offsets = {o for o in offsets if o < len(data)} | allowed
    outcomes = _prefix_outcomes(data, offsets, tmp_path / "cut.dcm")
    accepted = {off for off, reason in outcomes.items() if reason is None}
    assert accepted == allowed
    for off, reason in outcomes.items():
        assert reason is None or reason, off
    # Cuts after the file meta read as truncation (or, on an element boundary before a
    # required UID, as that UID missing), never as some unrelated defect.
    meta_end = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength
    for off, reason in outcomes.items():
        if off > meta_end and reason is not None:
            assert reason.startswith(("truncated:", "missing ")), (off, reason)


def test_truncation_sweep_padded_file_accepts_only_the_padding_cut(tmp_path: Path) -> None:
    data = (TEST_FILES / "MR_small_padded.dcm").read_bytes()
    ends = _top_level_ends(TEST_FILES / "MR_small_padded.dcm")
    pixel_end = dict(ends)[0x7FE00010]
    outcomes = _prefix_outcomes(data, range(pixel_end - 500, len(data)), tmp_path / "c.dcm")
    assert {off for off, r in outcomes.items() if r is None} == {pixel_end}
    # 8320 bytes are declared (excess padding after the 8192 the image needs)
    assert outcomes[pixel_end - 1] == "truncated: Pixel Data has 8319 of 8320 bytes"


def test_truncation_of_bundled_deflated_file(tmp_path: Path) -> None:
    data = (TEST_FILES / "image_dfl.dcm").read_bytes()
    outcomes = _prefix_outcomes(data, range(len(data)), tmp_path / "c.dcm")
    # Only dropping the whole optional 8-byte CRC/size trailer is undetectable.
    assert {off for off, r in outcomes.items() if r is None} == {len(data) - 8}


# Flipped Specific Character Set bytes make pydicom warn (naming the charset, not the value).
@pytest.mark.filterwarnings("ignore:Unknown encoding", "ignore:Incorrect value for Specific")
def test_no_phi_in_reasons(tmp_path: Path) -> None:
    """Truncations and byte flips of a file with distinctive patient data never echo it."""
    path = _write(_sr(True), tmp_path / "sr.dcm")
    data = path.read_bytes()
    reasons = [r for r in _prefix_outcomes(data, range(len(data)), tmp_path / "c").values() if r]
    rng = random.Random(3)
    flipped = tmp_path / "flip.dcm"
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(3):
            mutated[rng.randrange(132, len(data))] = rng.randrange(256)
        flipped.write_bytes(mutated)
        reasons.append(_outcome(flipped))
    assert reasons
    for reason in reasons:
        assert "SECRET" not in reason.upper() and "4711" not in reason


# --------------------------------------------------------------------------------------------
# Hypothesis: any mutation gives a result or InvalidDicom, never another exception

_FUZZ_SOURCES = [
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",
    "test-SR.dcm",
    "priv_SQ.dcm",
    "UN_sequence.dcm",
]
_FUZZ_DATA = {name: (TEST_FILES / name).read_bytes() for name in _FUZZ_SOURCES}


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.dcm"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about mangled charsets
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(_FUZZ_SOURCES),
    flips=st.lists(
        st.tuples(st.one_of(st.integers(0, 1500), st.integers(0, 1 << 20)), st.integers(0, 255)),
        max_size=6,
    ),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
)
def test_fuzz_only_invalid_dicom(
    fuzz_path: Path, name: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_FUZZ_DATA[name])
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    fuzz_path.write_bytes(data)
    try:
        info = inspect_file(fuzz_path)
    except InvalidDicom as exc:
        assert exc.reason and "\n" not in exc.reason
    else:
        assert all(isinstance(v, str) for v in info.to_dict().values())


# --------------------------------------------------------------------------------------------
# Bounded memory and time on huge files (sparse, so nothing big is written to disk)

_GIB2 = 2 * 1024**3


def _big_header(path: Path, ts: str, frames: int) -> None:
    ds = _image(rows=1024, columns=1024, frames=frames)
    del ds.PixelData
    _write(ds, path, ts=ts)


def _make_big_native(path: Path, cut: int = 0) -> None:
    _big_header(path, ExplicitVRLittleEndian, frames=1024)  # 1024 x 1 MiB x 2 bytes = 2 GiB
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, _GIB2))
        f.truncate(f.tell() + _GIB2 - cut)


def _make_big_encapsulated(path: Path, delimiter: bool = True) -> None:
    fragments, fragment = 2048, 1024 * 1024
    _big_header(path, RLELossless, frames=fragments)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        f.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        for _ in range(fragments):
            f.write(struct.pack("<HHI", 0xFFFE, 0xE000, fragment))
            f.seek(fragment, os.SEEK_CUR)  # hole
        if delimiter:
            f.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        else:
            f.truncate(f.tell())


def _make_big_deflated(path: Path) -> None:
    ds = _image(rows=1024, columns=1024, frames=64)  # 128 MiB of zeros, inflated
    _write(ds, path, ts=DeflatedExplicitVRLittleEndian)


# Peak RSS is read from VmHWM (Linux), the high-water mark of this process's own address
# space, which starts afresh at exec.  ru_maxrss is reported too, but on Linux it keeps the
# parent's RSS across fork+exec (so under a large pytest process it cannot show a growth below
# that); it is the measure only where /proc is not available.
_MEASURE = textwrap.dedent(
    """
    import json, os, resource, sys, time
    from syncnode.dicomfile import InvalidDicom, inspect_file

    def peak_kib():
        if os.path.exists("/proc/self/status"):
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    inspect_file(sys.argv[1])  # warm up imports and caches on a small file
    baseline = peak_kib()
    def read_bytes():
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))

    results = {}
    for path in sys.argv[2:]:
        t0, r0 = time.process_time(), read_bytes()
        try:
            inspect_file(path)
            outcome = "ok"
        except InvalidDicom as exc:
            outcome = exc.reason
        results[os.path.basename(path)] = [outcome, time.process_time() - t0,
                                           read_bytes() - r0]
    print(json.dumps({
        "baseline_peak_kib": baseline,
        "peak_kib": peak_kib(),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "results": results,
    }))
    """
)


def test_huge_files_bounded_time_and_memory(tmp_path: Path) -> None:
    import syncnode.dicomfile

    cases = {
        "native.dcm": (_make_big_native, {}),
        "native_cut.dcm": (_make_big_native, {"cut": 1000}),
        "encaps.dcm": (_make_big_encapsulated, {}),
        "encaps_cut.dcm": (_make_big_encapsulated, {"delimiter": False}),
    }
    paths = []
    for name, (make, kwargs) in cases.items():
        make(tmp_path / name, **kwargs)
        paths.append(str(tmp_path / name))
    _make_big_deflated(tmp_path / "deflated.dcm")
    paths.append(str(tmp_path / "deflated.dcm"))
    for p in paths[:4]:
        st_ = os.stat(p)
        assert st_.st_size > _GIB2 - 2000
        if st_.st_blocks * 512 > 256 * 1024**2:  # pragma: no cover - depends on the filesystem
            pytest.skip("filesystem does not support sparse files")

    small = _write(_image(), tmp_path / "small.dcm")
    root = Path(syncnode.dicomfile.__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(small), *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    report = json.loads(proc.stdout)
    results = report["results"]
    print("huge-file inspection:", json.dumps(report, indent=1))

    assert results["native.dcm"][0] == "ok"
    assert results["native_cut.dcm"][0] == (
        f"truncated: Pixel Data has {_GIB2 - 1000} of {_GIB2} bytes"
    )
    assert results["encaps.dcm"][0] == "ok"
    assert results["encaps_cut.dcm"][0].startswith(
        "truncated: file ends inside encapsulated Pixel Data"
    )
    assert results["deflated.dcm"][0] == "ok"
    # CPU seconds (user + system) and bytes read, not wall time: on a loaded machine the
    # clock measures the other processes; reading the 2 GiB instead of seeking shows in both.
    for name in ("native.dcm", "native_cut.dcm", "encaps.dcm", "encaps_cut.dcm"):
        assert results[name][1] < 0.5, results
        assert results[name][2] < 64 * 1024**2, results  # headers only, of 2 GiB
    assert results["deflated.dcm"][1] < 3.0, results  # inflates 128 MiB, streaming
    assert results["deflated.dcm"][2] <= 2 * os.stat(paths[4]).st_size + 2**20, results
    growth_mib = (report["peak_kib"] - report["baseline_peak_kib"]) / 1024
    assert growth_mib < 50, report
    assert report["peak_kib"] / 1024 < 150, report  # interpreter + pydicom + the inspection
