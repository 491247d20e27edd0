"""Generate a synthetic but realistic DICOM data set for syncnode benchmarks and tests.

Purpose
-------
The predecessor product was measured on a real set of **13 studies, CT and MR, from 23 images /
40 MB up to 3,582 images / 1.9 GB, about 6 GB and 7,767 files in all**.  This module writes a
synthetic set with the same shape, so benchmarks see the same file-size mix and tests can get a
small, proportional version of it in a fraction of a second.

Study table (``STUDIES``; MB = 10**6 bytes, sizes at ``--scale 1`` incl. headers)::

    idx mod body part          rows x cols bits  series  images     MB  patient
    s01 MR  PELVIS (prostate)  1024 x  848  12u      1       23     40  P01
    s02 CT  HEAD                512 x  512  16s      3      396    208  P02
    s03 MR  KNEE                384 x  384  12u      5      146     43  P03
    s04 MR  LSPINE              512 x  512  12u      4      110     58  P04
    s05 CT  NECK                512 x  512  12u      2      400    210  P05
    s06 MR  BRAIN               512 x  512  12u      5      288    151  P06
    s07 CT  CHEST/ABD/PELVIS    512 x  512  16s      4    3,582  1,883  P07
    s08 MR  ABDOMEN (liver)     256 x  256  12u      6      392     52  P08
    s09 CT  CHEST (HRCT)       1024 x 1024  12u      2      600  1,259  P09
    s10 CT  ABDOMEN (3-phase)   512 x  512  16s      4      833    438  P08 (as s08)
    s11 MR  BREAST              512 x  512  12u      3      277    146  P10
    s12 CT  HEAD (temporal b.) 1024 x 1024  12u      2      320    672  P06 (as s06)
    s13 CT  WRIST              1024 x 1024  12u      2      400    839  P11
    total                                          43    7,767  6,000  (6.00 GB, 5.59 GiB)

``bits``: BitsStored, ``u`` unsigned (Siemens-like, CT stored value = HU + 1024, clipped to
0..4095) or ``s`` signed (GE-like, RescaleIntercept -1024, PixelPaddingValue -2000 outside the
reconstruction circle).  BitsAllocated is always 16.  The 23-image / 40 MB study is a
high-resolution (1024 x 848, rectangular FOV) prostate T2 series: 1.74 MB per image; the
1024 x 1024 CTs (ultra-high-resolution lung, temporal bones, wrist) are 2.1 MB per image.

Invariants
----------
* Layout: ``OUT/sNN/seMM/imKKKK.dcm`` (1-based, zero-padded) plus ``OUT/manifest.json``; nothing
  else.  Each file is written to a hidden ``.imKKKK.dcm.partial`` name and renamed; the partial
  file is removed if writing fails or is interrupted (an exception or Ctrl-C; only SIGKILL can
  leave one), so no truncated ``.dcm`` is ever left behind.  manifest.json is written last: its
  presence means the run completed.
  ``OUT`` must be absent or empty.
* Every file is a Part-10 file (128-byte preamble, ``DICM``, file meta with
  MediaStorageSOPClassUID == SOPClassUID, MediaStorageSOPInstanceUID == SOPInstanceUID,
  TransferSyntaxUID Explicit VR Little Endian, our ImplementationClassUID) of CT Image Storage or
  MR Image Storage (the optional multi-frame file is Enhanced CT Image Storage); all of them pass
  dicom3tools' ``dciodvfy`` without errors.  PixelData is the last element, OW, with an explicit
  even length Rows x Columns x Frames x 2 (< 4 GiB).
* UIDs are ``2.25.<decimal of the first 128 bits of SHA-256(seed, place in the hierarchy)>``:
  digits and dots only, at most 44 characters.  Same seed => byte-identical files (and
  manifest.json); another seed => other UIDs, IDs, dates, anatomy jitter and pixel noise.
* ``--scale S`` keeps all 13 studies and every series; a series of n images gets
  ``max(1, round(n * S))`` images spread over the same anatomical extent (thicker slices).
* Pixel content: a 3-D anatomical phantom (body outline, subcutaneous fat, muscle, ribs, lungs
  with vessels, heart, aorta, liver, spleen, kidneys, bowel gas, spine, pelvis, skull, brain,
  knee and wrist bones...) rasterised as Hounsfield units for CT (with contrast phases) or as
  T1/T2/PD/FLAIR/DWI-like intensities for MR, plus smooth texture, partial-volume blur, an MR
  bias field and white noise (std ~13 HU for soft kernels, ~26 HU for bone/lung kernels).
  Anatomy is rasterised at "anchor" slices about 4 mm apart and interpolated linearly in
  between, so it varies smoothly from slice to slice; noise is fresh in every slice (no
  repeated blocks for deduplication to find).  Patients with two studies keep their anatomy.
* Measured on the full set (shared 2-core machine): zstd level 3 compresses files 1.9x overall
  (CT 2.0x, 1.8x-2.4x by study; MR 1.8x, 1.8x-2.0x by study); 6.0 GB written in 39-47 s, i.e.
  127-153 MB/s (one generating thread plus one writing thread).  The ``--multiframe-gb``
  file (512 x 512 frames, 1,907 frames per GB) is streamed to disk frame by frame: 2 GB took
  9-10 s with a peak RSS of 118 MB for the whole process (header included).

Usage::

    python tools/gen_dataset.py --out /tmp/ds --scale 0.01 --seed 1
    python tools/gen_dataset.py --out /tmp/big --multiframe-gb 2

or, from Python (with the repository root on ``sys.path``)::

    from tools.gen_dataset import generate
    manifest = generate(tmp_path / "ds", scale=0.005, seed=3)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import math
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

__all__ = [
    "STUDIES",
    "Manifest",
    "SeriesRecord",
    "SeriesSpec",
    "StudyRecord",
    "StudySpec",
    "generate",
    "main",
    "plan",
    "uid",
]

GENERATOR_VERSION = "1"
UID_ROOT = "2.25."
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLEMENTATION_VERSION_NAME = "SYNCNODE_GEN_1"
MANIFEST_NAME = "manifest.json"
MAX_PIXEL_BYTES = 0xFFFFFFFE  # an explicit 32-bit length; 0xFFFFFFFF means "undefined"
MB = 1_000_000

# Tag (7FE0,0010), VR OW, two reserved bytes: the 32-bit length follows.
_PIXEL_DATA_HEADER = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00"


# --------------------------------------------------------------------------------------------
# The study table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    """One series of the table: ``recon`` is the CT kernel or the MR weighting."""

    description: str
    images: int
    recon: str
    phase: str = "NONE"  # CT contrast phase: NONE, ARTERIAL, VENOUS, DELAYED


@dataclass(frozen=True)
class StudySpec:
    """One study of the table; ``z_mm`` is the covered range along the phantom's axis."""

    modality: str
    body_part: str
    description: str
    anatomy: str  # "body", "knee" or "wrist"
    z_mm: tuple[float, float]
    rows: int
    cols: int
    bits_stored: int
    signed: bool
    fov_mm: float
    patient: int
    sex: str
    age: int
    series: tuple[SeriesSpec, ...]

    @property
    def images(self) -> int:
        return sum(s.images for s in self.series)


def _s(description: str, images: int, recon: str, phase: str = "NONE") -> SeriesSpec:
    return SeriesSpec(description, images, recon, phase)


STUDIES: tuple[StudySpec, ...] = (
    StudySpec("MR", "PELVIS", "MR PROSTATE HIGH-RES", "body", (812.0, 881.0), 1024, 848, 12,
              False, 240.0, 1, "M", 67, (_s("T2 TSE AX HIGH-RES", 23, "T2"),)),
    StudySpec("CT", "HEAD", "CT HEAD WO CONTRAST", "body", (8.0, 196.0), 512, 512, 16, True,
              250.0, 2, "F", 72,
              (_s("HEAD 5MM", 36, "BRAIN"), _s("HEAD 1MM BONE", 180, "BONE"),
               _s("HEAD 1MM BRAIN", 180, "BRAIN"))),
    StudySpec("MR", "KNEE", "MR KNEE RIGHT", "knee", (-60.0, 60.0), 384, 384, 12, False, 160.0,
              3, "M", 34,
              (_s("PD FS AX", 30, "PDFS"), _s("T1 TSE AX", 30, "T1"), _s("T2 FS AX", 30, "T2FS"),
               _s("PD TSE AX", 28, "PD"), _s("DESS 3D AX", 28, "T2"))),
    StudySpec("MR", "LSPINE", "MR LUMBAR SPINE", "body", (660.0, 860.0), 512, 512, 12, False,
              300.0, 4, "F", 51,
              (_s("T2 TSE AX", 40, "T2"), _s("T1 TSE AX", 40, "T1"),
               _s("T2 TSE AX L4-S1", 15, "T2"), _s("STIR AX", 15, "T2FS"))),
    StudySpec("CT", "NECK", "CT NECK WITH CONTRAST", "body", (200.0, 360.0), 512, 512, 12, False,
              250.0, 5, "M", 58,
              (_s("NECK 0.6MM SOFT", 300, "SOFT", "VENOUS"),
               _s("NECK 2MM SOFT", 100, "SOFT", "VENOUS"))),
    StudySpec("MR", "BRAIN", "MR BRAIN WWO CONTRAST", "body", (10.0, 200.0), 512, 512, 12, False,
              240.0, 6, "F", 44,
              (_s("T1 SE AX", 28, "T1"), _s("T2 TSE AX", 28, "T2"), _s("FLAIR AX", 28, "FLAIR"),
               _s("T1 MPRAGE 3D", 176, "T1"), _s("DWI B1000 AX", 28, "DWI"))),
    StudySpec("CT", "CHESTABDPELVIS", "CT TRAUMA CHEST ABDOMEN PELVIS", "body",
              (330.0, 920.0), 512, 512, 16, True, 440.0, 7, "M", 29,
              (_s("CAP 0.5MM SOFT", 1194, "SOFT", "VENOUS"),
               _s("CAP 0.5MM BONE", 1194, "BONE", "VENOUS"),
               _s("CAP 1MM LUNG", 597, "LUNG", "VENOUS"),
               _s("CAP 1MM SOFT", 597, "SOFT", "VENOUS"))),
    StudySpec("MR", "ABDOMEN", "MR LIVER", "body", (560.0, 760.0), 256, 256, 12, False, 400.0, 8,
              "F", 63,
              (_s("T2 HASTE AX", 40, "T2"), _s("T2 FS AX", 40, "T2FS"),
               _s("T1 IN-PHASE AX", 80, "T1"), _s("T1 OPP-PHASE AX", 80, "T1"),
               _s("T1 FS PRE AX", 80, "T1FS"), _s("DWI B800 AX", 72, "DWI"))),
    StudySpec("CT", "CHEST", "CT CHEST HIGH RESOLUTION", "body", (360.0, 640.0), 1024, 1024, 12,
              False, 380.0, 9, "M", 71,
              (_s("HRCT 1MM LUNG", 300, "LUNG"), _s("CHEST 1MM MEDIASTINUM", 300, "SOFT"))),
    StudySpec("CT", "ABDOMEN", "CT ABDOMEN 3-PHASE LIVER", "body", (560.0, 860.0), 512, 512, 16,
              True, 400.0, 8, "F", 63,
              (_s("NON CONTRAST 3.6MM", 83, "SOFT"),
               _s("ARTERIAL 1.2MM", 250, "SOFT", "ARTERIAL"),
               _s("PORTAL VENOUS 1.2MM", 250, "SOFT", "VENOUS"),
               _s("DELAYED 1.2MM", 250, "SOFT", "DELAYED"))),
    StudySpec("MR", "BREAST", "MR BREAST BILATERAL", "body", (440.0, 580.0), 512, 512, 12, False,
              340.0, 10, "F", 49,
              (_s("T2 TSE AX", 45, "T2"), _s("T1 3D AX PRE", 116, "T1"),
               _s("T1 3D FS AX POST", 116, "T1FS"))),
    StudySpec("CT", "HEAD", "CT TEMPORAL BONES", "body", (118.0, 178.0), 1024, 1024, 12,
              False, 200.0, 6, "F", 44,
              (_s("TEMPORAL 0.4MM BONE", 160, "BONE"), _s("TEMPORAL 0.4MM SOFT", 160, "SOFT"))),
    StudySpec("CT", "WRIST", "CT WRIST RIGHT", "wrist", (-50.0, 50.0), 1024, 1024, 12, False,
              120.0, 11, "M", 23,
              (_s("WRIST 0.25MM BONE", 200, "BONE"), _s("WRIST 0.25MM SOFT", 200, "SOFT"))),
)

# Where the optional multi-frame file comes from: whole body, 512 x 512, Enhanced CT.
MULTIFRAME_STUDY = StudySpec("CT", "WHOLEBODY", "CT WHOLE BODY ENHANCED MULTI-FRAME", "body",
                             (0.0, 950.0), 512, 512, 16, True, 500.0, 12, "M", 55,
                             (_s("WHOLE BODY ENHANCED", 1, "SOFT"),))


def series_counts(spec: StudySpec, scale: float) -> list[int]:
    """Number of images of each series of ``spec`` at ``scale`` (at least 1 per series)."""
    return [max(1, round(s.images * scale)) for s in spec.series]


# --------------------------------------------------------------------------------------------
# Deterministic identifiers
# --------------------------------------------------------------------------------------------


def _digest(seed: int, *parts: object) -> bytes:
    return hashlib.sha256(repr(("syncnode-gen-dataset", seed, *parts)).encode()).digest()


def uid(seed: int, *parts: object) -> str:
    """A valid UID (``2.25.`` + 128-bit integer, <= 44 chars) derived from seed and parts."""
    return UID_ROOT + str(int.from_bytes(_digest(seed, *parts)[:16], "big") or 1)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(_digest(seed, *parts)[:16], "big"))


IMPLEMENTATION_CLASS_UID = uid(0, "implementation-class", GENERATOR_VERSION)


# --------------------------------------------------------------------------------------------
# The anatomical phantom: painted, in order, elliptic cross-sections of "tubes" whose centre and
# radii are piecewise linear in z (mm along the body axis, 0 = vertex, growing towards the feet).
# --------------------------------------------------------------------------------------------

(AIR, FAT, MUSCLE, SOFT, LUNG, VESSEL, HEART, LIVER, SPLEEN, KIDNEY, BOWEL, GAS, BONE, MARROW,
 WM, GM, CSF, FLUID, GLAND, CARTILAGE) = range(20)
N_LABELS = 20


_LABEL_NAMES = ("AIR", "FAT", "MUSCLE", "SOFT", "LUNG", "VESSEL", "HEART", "LIVER", "SPLEEN",
                "KIDNEY", "BOWEL", "GAS", "BONE", "MARROW", "WM", "GM", "CSF", "FLUID", "GLAND",
                "CARTILAGE")


def _lut(base: float, **values: float) -> np.ndarray:
    """A float32 table indexed by label: ``base`` except for the labels named in ``values``."""
    table = np.full(N_LABELS, base, dtype=np.float32)
    for name, value in values.items():
        table[_LABEL_NAMES.index(name)] = value
    return table


_CT_HU = _lut(40.0, AIR=-1000, FAT=-100, MUSCLE=50, SOFT=35, LUNG=-860, VESSEL=45, HEART=45,
              LIVER=60, SPLEEN=50, KIDNEY=32, BOWEL=25, GAS=-980, BONE=1250, MARROW=260, WM=28,
              GM=40, CSF=6, FLUID=8, GLAND=90, CARTILAGE=95)
_CT_PHASE = {
    "NONE": {},
    "ARTERIAL": {VESSEL: 320, HEART: 250, LIVER: 75, SPLEEN: 120, KIDNEY: 180},
    "VENOUS": {VESSEL: 170, HEART: 150, LIVER: 110, SPLEEN: 115, KIDNEY: 160},
    "DELAYED": {VESSEL: 90, HEART: 85, LIVER: 80, SPLEEN: 80, KIDNEY: 100, FLUID: 30},
}
# Texture amplitude (HU) per label for CT; MR uses 8 % of the tissue value.
_CT_TEXTURE = _lut(6.0, AIR=0, LUNG=45, BONE=90, MARROW=70, FAT=8, GAS=10, BOWEL=20)
_MR_LUT = {
    "T1": _lut(700, AIR=0, FAT=1800, MUSCLE=600, LUNG=40, VESSEL=150, HEART=600, LIVER=900,
               SPLEEN=650, KIDNEY=700, BOWEL=600, GAS=0, BONE=30, MARROW=1400, WM=1100, GM=800,
               CSF=220, FLUID=200, GLAND=750, CARTILAGE=650),
    "T2": _lut(600, AIR=0, FAT=1400, MUSCLE=350, LUNG=30, VESSEL=90, HEART=500, LIVER=400,
               SPLEEN=900, KIDNEY=1000, BOWEL=900, GAS=0, BONE=20, MARROW=1000, WM=600, GM=900,
               CSF=2200, FLUID=2300, GLAND=900, CARTILAGE=700),
    "PD": _lut(1100, AIR=0, FAT=1700, MUSCLE=800, LUNG=60, VESSEL=200, HEART=900, LIVER=1000,
               SPLEEN=1200, KIDNEY=1200, BOWEL=1100, GAS=0, BONE=40, MARROW=1500, WM=1000,
               GM=1200, CSF=1500, FLUID=1600, GLAND=1200, CARTILAGE=1300),
    "FLAIR": _lut(600, AIR=0, FAT=1300, MUSCLE=350, LUNG=30, VESSEL=90, BONE=20, GAS=0,
                  MARROW=900, WM=650, GM=950, CSF=120, FLUID=150),
    "DWI": _lut(260, AIR=0, FAT=60, MUSCLE=200, LUNG=10, VESSEL=20, LIVER=220, SPLEEN=450,
                KIDNEY=380, BOWEL=300, GAS=0, BONE=10, MARROW=120, WM=420, GM=480, CSF=40,
                FLUID=60, GLAND=350),
}
_MR_LUT["T1FS"] = _MR_LUT["T1"].copy()
_MR_LUT["T1FS"][[FAT, MARROW]] = [160, 200]
_MR_LUT["T2FS"] = _MR_LUT["T2"].copy()
_MR_LUT["T2FS"][[FAT, MARROW]] = [120, 160]
_MR_LUT["PDFS"] = _MR_LUT["PD"].copy()
_MR_LUT["PDFS"][[FAT, MARROW]] = [200, 260]

# CT kernel -> (noise mask: noise is the sum of two uniform integers in [0, mask]; WC; WW)
_CT_KERNELS = {"SOFT": (31, 40, 400), "BRAIN": (31, 40, 80), "BONE": (63, 500, 2000),
               "LUNG": (63, -600, 1500)}
# MR weighting -> (scanning sequence, TR ms, TE ms, TI ms or None)
_MR_SEQUENCES = {"T1": ("SE", 550, 12, None), "T1FS": ("GR", 5, 2.4, None),
                 "T2": ("SE", 4500, 95, None), "T2FS": ("SE\\IR", 4000, 60, 160),
                 "PD": ("SE", 3000, 30, None), "PDFS": ("SE", 3200, 33, None),
                 "FLAIR": ("SE\\IR", 9000, 120, 2500), "DWI": ("EP", 5200, 80, None)}


@dataclass(frozen=True)
class _Tube:
    label: int
    knots: np.ndarray  # shape (5, n): z, cx, cy, rx, ry; z strictly increasing
    inside: int = -1  # paint only over this label (-1: over anything)

    def section(self, z: float) -> tuple[float, float, float, float] | None:
        zs = self.knots[0]
        if z < zs[0] or z > zs[-1]:
            return None
        cx, cy, rx, ry = (float(np.interp(z, zs, row)) for row in self.knots[1:])
        return cx, cy, rx, ry


def _tube(label: int, z: Sequence[float], cx: Sequence[float] | float,
          cy: Sequence[float] | float, rx: Sequence[float] | float,
          ry: Sequence[float] | float, inside: int = -1) -> _Tube:
    n = len(z)
    rows = [np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in (z, cx, cy, rx, ry)]
    return _Tube(label, np.stack(rows), inside)


def _ellipsoid(label: int, cx: float, cy: float, cz: float, rx: float, ry: float, rz: float,
               inside: int = -1) -> _Tube:
    theta = np.linspace(np.pi, 0.0, 13)
    k = np.sin(theta)
    return _tube(label, cz + rz * np.cos(theta), cx, cy, rx * k, ry * k, inside)


def _body_model(rng: np.random.Generator, sex: str) -> list[_Tube]:
    """Head to mid-thigh, supine; x = patient left, y = posterior (DICOM LPS), mm."""
    s = float(rng.uniform(0.9, 1.1))  # body habitus

    def j(v: float, amp: float = 4.0) -> float:
        return v + float(rng.uniform(-amp, amp))

    t: list[_Tube] = []
    # Head: scalp, skull, brain (grey then white matter), ventricles, orbits, sinuses, jaw.
    t.append(_tube(SOFT, [0, 8, 30, 70, 110, 150, 190, 215, 240],
                   0, [0, 0, 0, 0, 0, -3, -8, -10, -5],
                   [0, 45, 66, 78, 80, 78, 70, 62, 55], [0, 50, 80, 96, 100, 98, 92, 85, 70]))
    t.append(_ellipsoid(BONE, 0, 0, 105, 74, 94, 100))
    t.append(_ellipsoid(GM, 0, 2, 106, 67, 86, 92))
    t.append(_ellipsoid(WM, 0, 4, 100, j(52), j(70), 70))
    for side in (-1, 1):
        t.append(_ellipsoid(CSF, side * j(9, 2), -5, 88, 6, j(28), 22))
        t.append(_ellipsoid(FAT, side * 32, -78, 132, 18, 20, 18))
        t.append(_ellipsoid(FLUID, side * 32, -83, 132, 12, 12, 12))
        t.append(_ellipsoid(GAS, side * 24, -52, j(168), 13, 17, 20))
        t.append(_ellipsoid(BONE, side * 52, 10, 150, 12, 14, 10))  # petrous bone
        t.append(_ellipsoid(GAS, side * 52, 8, 150, 4, 5, 4, inside=BONE))  # middle ear
    t.append(_ellipsoid(GAS, 0, -68, 165, 5, 16, 24))
    t.append(_tube(BONE, [196, 236], 0, -30, [44, 40], [48, 42]))
    t.append(_tube(SOFT, [196, 236], 0, -26, [37, 33], [41, 35]))
    # Body outline (subcutaneous fat), breasts, muscle wall.
    zb = [215, 240, 265, 300, 335, 360, 380, 420, 500, 600, 700, 780, 850, 900]
    rxb = np.array([50, 58, 60, 62, 95, 150, 170, 172, 168, 160, 158, 166, 176, 170]) * s
    ryb = np.array([60, 62, 58, 60, 75, 100, 110, 118, 120, 118, 115, 112, 110, 100]) * s
    cyb = [5, 5, 5, 5, 8, 10, 10, 8, 5, 5, 5, 5, 5, 8]
    t.append(_tube(FAT, zb, 0, cyb, rxb, ryb))
    for side in (-1, 1):
        t.append(_tube(FAT, [880, 950], side * 95 * s, 5, 80 * s, 78 * s))  # thighs
    if sex == "F":
        for side in (-1, 1):
            t.append(_ellipsoid(FAT, side * j(75), -118 * s - 15, j(505), 62, 58, 55))
            t.append(_ellipsoid(GLAND, side * 75, -120 * s - 25, 505, j(40), 30, 35, inside=FAT))
    fat = np.clip(np.linspace(6, 22, len(zb)) * s, 4, None)
    t.append(_tube(MUSCLE, zb, 0, cyb, rxb - fat, ryb - fat))
    for side in (-1, 1):
        t.append(_tube(MUSCLE, [885, 950], side * 95 * s, 5, 62 * s, 60 * s))
    # Ribs (a bone ring every 24 mm) and the chest / abdominal cavity.
    zc = [365, 400, 500, 600, 700, 800, 860]
    rxc = np.array([110, 140, 140, 130, 128, 130, 110]) * s
    ryc = np.array([60, 80, 85, 82, 78, 72, 55]) * s
    cyc = [0, -5, -5, -8, -12, -15, -20]
    for k in range(12):
        z0 = 372 + 24 * k
        zz = [z0, z0 + 9]
        t.append(_tube(BONE, zz, 0, np.interp(zz, zc, cyc), np.interp(zz, zc, rxc) + 9,
                       np.interp(zz, zc, ryc) + 9))
    t.append(_tube(FAT, zc, 0, cyc, rxc, ryc))
    # Neck: vessels, thyroid, airway.
    for side in (-1, 1):
        t.append(_tube(VESSEL, [215, 400], side * 24, -5, 4.5, 4.5))
        t.append(_tube(VESSEL, [215, 380], side * 36, 2, 7, 5.5))
        t.append(_ellipsoid(GLAND, side * 17, -18, j(292), 10, 11, 20))
    t.append(_tube(GAS, [240, 330, 420, 470], 0, [-18, -20, -10, 0], 9, 8))
    t.append(_tube(SOFT, [250, 470], 0, [-4, 10], 6, 5))  # oesophagus
    for side in (-1, 1):
        t.append(_tube(GAS, [470, 520], [0, side * 42], 0, [6, 4], [6, 4]))  # main bronchi
    # Lungs with vessels, heart, great vessels.
    for side in (-1, 1):
        t.append(_ellipsoid(LUNG, side * 78 * s, 10, j(480), 66 * s, 84 * s, 125))
    for _ in range(48):
        side = 1 if rng.random() < 0.5 else -1
        x0, y0 = side * 78 * s + rng.uniform(-45, 45) * s, 10 + rng.uniform(-60, 60) * s
        z0 = float(rng.uniform(360, 590))
        length = float(rng.uniform(40, 140))
        dx, dy = rng.uniform(-25, 25, size=2)
        r = float(rng.uniform(1.5, 5.0))
        t.append(_tube(VESSEL, [z0, z0 + length], [x0, x0 + dx], [y0, y0 + dy], r, r,
                       inside=LUNG))
    t.append(_ellipsoid(HEART, j(22), -28, j(530), 62 * s, 52 * s, 60))
    t.append(_ellipsoid(FLUID, 30, -30, 535, 28, 22, 30, inside=HEART))  # ventricle blood
    t.append(_tube(VESSEL, [425, 440, 520], [5, 15, 18], [30, -10, -22], 14, 14))  # asc. aorta
    t.append(_tube(VESSEL, [425, 520, 650, 760, 820], [5, 12, 12, 8, 0], [35, 45, 40, 30, 20],
                   12, 12))
    t.append(_tube(VESSEL, [560, 820], -22, [25, 20], 11, 10))  # IVC
    # Abdomen: liver, gallbladder, spleen, stomach, kidneys, pancreas, bowel, bladder.
    t.append(_ellipsoid(LIVER, -62 * s, -5, j(640), 95 * s, 82 * s, 85))
    t.append(_ellipsoid(VESSEL, -55 * s, 5, 640, 6, 6, 50, inside=LIVER))
    t.append(_ellipsoid(FLUID, -52 * s, -58, 690, 14, 18, 28))
    t.append(_ellipsoid(SPLEEN, 88 * s, 38, j(620), 34, 46, 50))
    t.append(_ellipsoid(BOWEL, 58, -42, 612, 46, 40, 50))
    t.append(_ellipsoid(GAS, 58, -62, 595, 30, 16, 22, inside=BOWEL))
    for side in (-1, 1):
        zk = j(700, 8)
        t.append(_ellipsoid(KIDNEY, side * 70 * s, 45, zk, 30, 27, 55))
        t.append(_ellipsoid(FLUID, side * 62 * s, 40, zk, 8, 8, 22, inside=KIDNEY))
        t.append(_ellipsoid(MUSCLE, side * 42, 50, 770, 22, 22, 95))  # psoas
    t.append(_ellipsoid(SOFT, 12, 2, 672, 60, 14, 18))
    t.append(_ellipsoid(BOWEL, 0, -28 * s, 772, 122 * s, 74 * s, 92))
    for _ in range(30):
        r = float(rng.uniform(4, 15))
        t.append(_ellipsoid(GAS, rng.uniform(-95, 95) * s, rng.uniform(-80, 10) * s,
                            float(rng.uniform(690, 850)), r, r * 0.8, r, inside=BOWEL))
    t.append(_ellipsoid(FLUID, 0, -40, 862, j(46), 40, 38))
    # Skeleton: spine with discs and canal, pelvis, femora.
    zs = [220, 300, 380, 500, 650, 800, 880]
    cys = np.array([22, 25, 55, 68, 55, 60, 80])
    rs = np.array([12, 13, 15, 17, 20, 22, 20])
    t.append(_tube(BONE, zs, 0, cys, rs, rs * 0.85))
    t.append(_tube(MARROW, zs, 0, cys, rs - 3, rs * 0.85 - 3))
    for k in range(22):
        z0 = 240 + 28.5 * k
        zz = [z0, z0 + 6]
        r = np.interp(zz, zs, rs) - 1
        t.append(_tube(CARTILAGE, zz, 0, np.interp(zz, zs, cys), r, r * 0.8))
    t.append(_tube(CSF, zs, 0, cys + rs + 8, 7, 6))
    t.append(_tube(BONE, zs, 0, cys + rs + 24, 4, 9))  # spinous processes
    for side in (-1, 1):
        t.append(_tube(BONE, [775, 800, 840, 872], side * 98 * s, [30, 25, 15, 5],
                       [9, 18, 20, 12], [38, 55, 45, 28]))
        t.append(_tube(MARROW, [780, 800, 840, 868], side * 98 * s, [30, 25, 15, 5],
                       [5, 13, 15, 8], [32, 48, 38, 22]))
        t.append(_ellipsoid(BONE, side * 90 * s, 2, 890, 25, 25, 25))
        t.append(_ellipsoid(MARROW, side * 90 * s, 2, 890, 20, 20, 20))
        t.append(_tube(BONE, [905, 950], side * 95 * s, 10, 15, 15))
        t.append(_tube(MARROW, [905, 950], side * 95 * s, 10, 10, 10))
    t.append(_tube(BONE, [795, 840, 885], 0, [78, 85, 95], [45, 38, 18], [20, 18, 12]))
    return t


def _limb_model(rng: np.random.Generator, kind: str) -> list[_Tube]:
    """A knee (joint line at z = 0) or a wrist (radiocarpal joint at z = 0), mm."""
    k = float(rng.uniform(0.93, 1.07))
    t: list[_Tube] = []
    if kind == "knee":
        t.append(_tube(FAT, [-110, 0, 110], 0, 0, np.array([62, 60, 55]) * k,
                       np.array([60, 56, 52]) * k))
        t.append(_tube(MUSCLE, [-110, 0, 110], 0, 4, np.array([54, 50, 47]) * k,
                       np.array([51, 46, 44]) * k))
        t.append(_tube(BONE, [-110, -40], 0, 8, 15, 15))
        t.append(_tube(MARROW, [-110, -40], 0, 8, 10, 10))
        for side in (-1, 1):
            t.append(_ellipsoid(BONE, side * 21, 10, -20, 22, 28, 24))
            t.append(_ellipsoid(MARROW, side * 21, 10, -20, 19, 25, 21))
        t.append(_ellipsoid(CARTILAGE, 0, 10, 0, 44, 30, 4))
        t.append(_tube(BONE, [4, 30, 110], 0, 12, [38, 28, 17], [30, 24, 15]))
        t.append(_tube(MARROW, [6, 30, 110], 0, 12, [35, 25, 12], [27, 21, 10]))
        t.append(_ellipsoid(BONE, 0, -42, -32, 21, 10, 22))
        t.append(_ellipsoid(MARROW, 0, -41, -32, 17, 7, 18))
        t.append(_tube(SOFT, [-10, 35], 0, [-44, -30], 12, 4))  # patellar tendon
        t.append(_tube(BONE, [15, 110], 33, 22, 9, 9))  # fibula
        t.append(_tube(VESSEL, [-110, 110], 2, 42, 4, 4))
        t.append(_tube(FLUID, [-60, -35], 0, -20, 25, 4))  # suprapatellar recess
    else:
        t.append(_tube(FAT, [-70, 0, 70], 0, 0, [31 * k, 34 * k, 40 * k], [20 * k, 18 * k, 14 * k]))
        t.append(_tube(SOFT, [-70, 0, 70], 0, 0, [28 * k, 31 * k, 37 * k],
                       [17 * k, 15 * k, 11 * k]))
        t.append(_tube(BONE, [-70, -5, 0], -11, 1, [9, 15, 16], [6, 9, 9]))  # radius
        t.append(_tube(MARROW, [-70, -7], -11, 1, [6, 12], [3.5, 6.5]))
        t.append(_tube(BONE, [-70, -6], 15, 3, [5.5, 6.5], [5.5, 6]))  # ulna
        t.append(_tube(MARROW, [-70, -8], 15, 3, [3.5, 4], [3.5, 4]))
        for row, zc in enumerate((8.0, 22.0)):  # carpal bones, two rows of four
            for i in range(4):
                cx = -18 + 12 * i + (3 if row else 0)
                t.append(_ellipsoid(BONE, cx, 0, zc, 6.5, 7, 6.5))
                t.append(_ellipsoid(MARROW, cx, 0, zc, 5, 5.5, 5))
        for i in range(5):  # metacarpals
            cx = -22 + 11 * i
            t.append(_tube(BONE, [31, 70], [cx, cx * 1.3], -1, 4.5, 4.5))
            t.append(_tube(MARROW, [33, 70], [cx, cx * 1.3], -1, 2.5, 2.5))
        for i in range(6):  # flexor tendons
            t.append(_tube(CARTILAGE, [-70, 70], -15 + 6 * i, -9, 2.2, 2.2))
    return t


def _anatomy(spec: StudySpec, rng: np.random.Generator) -> list[_Tube]:
    if spec.anatomy == "body":
        return _body_model(rng, spec.sex)
    return _limb_model(rng, spec.anatomy)


def _rasterize(tubes: Sequence[_Tube], z: float, xs: np.ndarray, ys: np.ndarray,
               labels: np.ndarray | None = None) -> np.ndarray:
    """Label image (uint8, rows x cols) of the section at ``z``; pixel centres xs, ys (mm)."""
    if labels is None:
        labels = np.empty((ys.size, xs.size), dtype=np.uint8)
    labels.fill(AIR)
    d = float(xs[1] - xs[0])
    for tube in tubes:
        sec = tube.section(z)
        if sec is None:
            continue
        cx, cy, rx, ry = sec
        if rx < 0.5 * d or ry < 0.5 * d:
            continue
        j0 = max(0, int((cx - rx - xs[0]) / d))
        j1 = min(xs.size, int((cx + rx - xs[0]) / d) + 2)
        i0 = max(0, int((cy - ry - ys[0]) / d))
        i1 = min(ys.size, int((cy + ry - ys[0]) / d) + 2)
        if j0 >= j1 or i0 >= i1:
            continue
        ex = ((xs[j0:j1] - cx) / rx) ** 2
        ey = ((ys[i0:i1] - cy) / ry) ** 2
        mask = (ey[:, None] + ex[None, :]) <= 1.0
        sub = labels[i0:i1, j0:j1]
        if tube.inside >= 0:
            mask &= sub == tube.inside
        sub[mask] = tube.label
    return labels


def _interp_weights(n_out: int, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the lower neighbour and its weight, to interpolate a grid to n_out samples."""
    pos = np.linspace(0.0, n_grid - 1.0, n_out)
    lo = np.minimum(pos.astype(np.intp), n_grid - 2)
    return lo, (pos - lo).astype(np.float32)


def _upsample(grid: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
              cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Bilinear interpolation of a coarse float32 grid (no BLAS: it is slow when threaded)."""
    lo, w = rows
    g = grid[lo] * (1 - w)[:, None] + grid[lo + 1] * w[:, None]
    lo, w = cols
    return g[:, lo] * (1 - w) + g[:, lo + 1] * w


class _SliceSource:
    """Produces the pixel data of one series, slice by slice, in a reused buffer.

    Anatomy is rasterised only at anchor slices (every ``step`` slices, about 4 mm apart) and
    linearly interpolated in between; the noise is new for every slice.
    """

    def __init__(self, spec: StudySpec, tubes: list[_Tube], recon: str, phase: str,
                 z_positions: np.ndarray, tex_rng: np.random.Generator,
                 noise_rng: np.random.Generator) -> None:
        self.spec = spec
        self.tubes = tubes
        self.z_positions = z_positions  # mm along the model axis, one per slice
        self.tex_rng = tex_rng
        self.noise_rng = noise_rng
        self.pixel_mm = spec.fov_mm / max(spec.rows, spec.cols)
        self.xs = (np.arange(spec.cols) - (spec.cols - 1) / 2) * self.pixel_mm
        self.ys = (np.arange(spec.rows) - (spec.rows - 1) / 2) * self.pixel_mm
        n = z_positions.size
        spacing = abs(float(z_positions[1] - z_positions[0])) if n > 1 else 1.0
        self.step = max(1, min(16, round(4.0 / spacing)))
        self.lut: np.ndarray
        if spec.modality == "CT":
            lut = _CT_HU.copy()
            for label, value in _CT_PHASE[phase].items():
                lut[label] = value
            self.mask = _CT_KERNELS[recon][0]
            self.lut = lut + np.float32(1024.0)  # stored = HU + 1024 (RescaleIntercept -1024)
            self.tex_amp = _CT_TEXTURE
        else:
            self.lut = _MR_LUT[recon]
            self.mask = 31
            self.tex_amp = self.lut * np.float32(0.08)
        self.lo, self.hi = (-32768, 32767) if spec.signed else (0, (1 << spec.bits_stored) - 1)
        self.outside: np.ndarray | None = None
        if spec.modality == "CT" and spec.signed:  # reconstruction circle, padding outside
            r2 = self.ys[:, None] ** 2 + self.xs[None, :] ** 2
            self.outside = r2 > (spec.fov_mm / 2) ** 2
        # Texture: a fine random grid (one node per ~5 mm) plus a coarse one (9 x 9), both
        # interpolated bilinearly to the image.
        self.g_fine = max(9, int(spec.fov_mm / 5))
        self.coarse_to_fine = (_interp_weights(self.g_fine, 9),) * 2
        self.fine_to_image = (_interp_weights(spec.rows, self.g_fine),
                              _interp_weights(spec.cols, self.g_fine))
        self.bias: np.ndarray | None = None
        if spec.modality == "MR":  # smooth coil-sensitivity field, fixed for the series
            grid = self.tex_rng.uniform(-1, 1, size=(4, 4)).astype(np.float32)
            field = _upsample(grid, _interp_weights(spec.rows, 4), _interp_weights(spec.cols, 4))
            self.bias = 1.0 + np.float32(0.15) * field
        shape = (spec.rows, spec.cols)
        self._anchors: dict[int, np.ndarray] = {}
        self._spare: list[np.ndarray] = []
        self._labels = np.empty(shape, dtype=np.uint8)
        self._t1 = np.empty(shape, dtype=np.float32)
        self._t2 = np.empty(shape, dtype=np.float32)
        self._pair = (-1, -1)
        self._diff = np.empty(shape, dtype=np.float32)
        self._out = np.empty(shape, dtype="<i2" if spec.signed else "<u2")
        # Slices are computed in blocks of rows that fit in the CPU cache.
        self._block = max(1, (1 << 16) // spec.cols)
        self._fbuf = np.empty((self._block, spec.cols), dtype=np.float32)
        self._noise = np.empty((self._block, spec.cols), dtype="<u2")
        # Noise = sum of the two bytes of a random uint16, each masked to [0, mask].
        self._mask2 = np.uint16(self.mask | (self.mask << 8))

    def _upsample_into(self, grid: np.ndarray, out: np.ndarray) -> None:
        """Bilinear interpolation of the fine texture grid to the image, into ``out``."""
        (rlo, rw), (clo, cw) = self.fine_to_image
        g = grid[:, clo] * (1 - cw) + grid[:, clo + 1] * cw  # g_fine x cols
        np.take(g, rlo, axis=0, out=out, mode="clip")  # whole rows: cheap gathers
        out *= (1 - rw)[:, None]
        np.take(g, rlo + 1, axis=0, out=self._t2, mode="clip")
        self._t2 *= rw[:, None]
        out += self._t2

    def _blur_inplace(self, a: np.ndarray) -> None:
        """Separable [1, 2, 1] / 4 blur (partial-volume look) of ``a``, edges kept."""
        t1, t2 = self._t1, self._t2
        quarter, half = np.float32(0.25), np.float32(0.5)
        np.add(a[:-2], a[2:], out=t1[1:-1])
        t1[1:-1] *= quarter
        np.multiply(a[1:-1], half, out=t2[1:-1])
        t1[1:-1] += t2[1:-1]
        t1[0], t1[-1] = a[0], a[-1]
        np.add(t1[:, :-2], t1[:, 2:], out=a[:, 1:-1])
        a[:, 1:-1] *= quarter
        np.multiply(t1[:, 1:-1], half, out=t2[:, 1:-1])
        a[:, 1:-1] += t2[:, 1:-1]
        a[:, 0], a[:, -1] = t1[:, 0], t1[:, -1]

    def _anchor(self, index: int) -> np.ndarray:
        """Noise-free stored values at slice ``index`` (float32)."""
        cached = self._anchors.get(index)
        if cached is not None:
            return cached
        vals = self._spare.pop() if self._spare else np.empty_like(self._t1)
        labels = _rasterize(self.tubes, float(self.z_positions[index]), self.xs, self.ys,
                            self._labels)
        np.take(self.lut, labels, out=vals, mode="clip")
        coarse = self.tex_rng.uniform(-1, 1, size=(9, 9)).astype(np.float32)
        grid = self.tex_rng.uniform(-1, 1, size=(self.g_fine, self.g_fine)).astype(np.float32)
        grid += np.float32(0.5) * _upsample(coarse, *self.coarse_to_fine)
        tex = self._t1
        self._upsample_into(grid, tex)
        np.take(self.tex_amp, labels, out=self._t2, mode="clip")
        tex *= self._t2
        vals += tex
        self._blur_inplace(vals)
        if self.bias is not None:
            vals *= self.bias
        # Centre the noise (sum of two uniforms in [0, mask]) on the anatomy.
        vals -= np.float32(self.mask)
        self._anchors[index] = vals
        self._pair = (-1, -1)  # self._diff is stale
        return vals

    def __len__(self) -> int:
        return int(self.z_positions.size)

    def slice(self, i: int) -> np.ndarray:
        """Pixel data of slice ``i`` (rows x cols, little-endian 16-bit); buffer is reused."""
        n = len(self)
        a = (i // self.step) * self.step
        b = min(a + self.step, n - 1)
        for k in [k for k in self._anchors if k not in (a, b)]:  # keep only the current pair
            self._spare.append(self._anchors.pop(k))
        base = self._anchor(a)
        weight = np.float32(0.0)
        if b > a and i > a:
            anchor_b = self._anchor(b)
            if self._pair != (a, b):
                np.subtract(anchor_b, base, out=self._diff)
                self._pair = (a, b)
            weight = np.float32((i - a) / (b - a))
        mr = self.spec.modality == "MR"
        rows, cols = self.spec.rows, self.spec.cols
        for r0 in range(0, rows, self._block):
            r1 = min(rows, r0 + self._block)
            f = self._fbuf[: r1 - r0]
            if weight:
                np.multiply(self._diff[r0:r1], weight, out=f)
                f += base[r0:r1]
            else:
                np.copyto(f, base[r0:r1])
            raw = np.frombuffer(self.noise_rng.bytes(2 * f.size), dtype="<u2")
            noise = self._noise[: r1 - r0]
            np.bitwise_and(raw.reshape(f.shape), self._mask2, out=noise)
            pairs = noise.view(np.uint8).reshape(r1 - r0, cols, 2)
            f += pairs[..., 0]
            f += pairs[..., 1]
            if mr:  # magnitude image: Rician-like background
                np.abs(f, out=f)
            np.clip(f, self.lo, self.hi, out=f)
            np.copyto(self._out[r0:r1], f, casting="unsafe")
        if self.outside is not None:
            np.copyto(self._out, np.int16(-2000), where=self.outside)
        return self._out


# --------------------------------------------------------------------------------------------
# DICOM headers and file writing
# --------------------------------------------------------------------------------------------


def _ds_str(value: float) -> str:
    """A DS value of at most 16 characters (6 decimals: sub-micrometre, |value| < 1e8)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _study_datetime(seed: int, study_index: int) -> _dt.datetime:
    h = int.from_bytes(_digest(seed, "date", study_index)[:8], "big")
    day = _dt.date(2016, 1, 4) + _dt.timedelta(days=h % 2900)
    minutes = 7 * 60 + (h >> 16) % (11 * 60)
    return _dt.datetime.combine(day, _dt.time()) + _dt.timedelta(minutes=minutes)


def _patient_id(seed: int, patient: int) -> str:
    return f"SYN{int.from_bytes(_digest(seed, 'pid', patient)[:5], 'big') % 10**10:010d}"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _base_dataset(seed: int, spec: StudySpec, study_index: int, series_index: int,
                  series: SeriesSpec, spacing: float, src: _SliceSource,
                  sop_class: str) -> Dataset:
    """Everything of an instance that does not change from one instance of the series to the
    next (those are set by the caller)."""
    when = _study_datetime(seed, study_index)
    series_time = when + _dt.timedelta(minutes=4 * series_index)
    birth = _dt.date(when.year - spec.age, 1, 1) + _dt.timedelta(
        days=int.from_bytes(_digest(seed, "birth", spec.patient)[:4], "big") % 365)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, "2.25.1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    if spec.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "2.25.1"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time.strftime("%H%M%S")
    ds.AccessionNumber = f"A{int.from_bytes(_digest(seed, 'acc', study_index)[:4], 'big'):010d}"
    ds.Modality = spec.modality
    ds.Manufacturer = "SYNTHETIC"
    ds.InstitutionName = "SYNCNODE TEST HOSPITAL"
    ds.ReferringPhysicianName = ""
    ds.StationName = f"{spec.modality}SCAN01"
    ds.StudyDescription = spec.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = "gen_dataset"
    ds.PatientName = f"SYNTH^PATIENT{spec.patient:02d}"
    ds.PatientID = _patient_id(seed, spec.patient)
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age:03d}Y"
    ds.BodyPartExamined = spec.body_part
    ds.SliceThickness = _ds_str(spacing)
    if spec.modality == "CT":
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds_str(spec.fov_mm)
        ds.ConvolutionKernel = series.recon
        ds.XRayTubeCurrent = 250
        if series.phase != "NONE":
            ds.ContrastBolusAgent = "IOHEXOL"
    else:
        seq, tr, te, ti = _MR_SEQUENCES[series.recon]
        ds.ScanningSequence = seq.split("\\")
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = "FS" if series.recon.endswith("FS") else ""
        ds.MRAcquisitionType = "3D" if "3D" in series.description else "2D"
        ds.SpacingBetweenSlices = _ds_str(spacing)
        ds.RepetitionTime = _ds_str(tr)
        ds.EchoTime = _ds_str(te)
        if ti is not None:
            ds.InversionTime = _ds_str(ti)
        ds.MagneticFieldStrength = "3"
        ds.ImagingFrequency = "123.2"
        ds.EchoTrainLength = 16
    ds.PatientPosition = "FFS" if spec.anatomy == "knee" else (
        "HFP" if spec.body_part == "BREAST" else "HFS")
    ds.StudyInstanceUID = uid(seed, "study", study_index)
    ds.SeriesInstanceUID = uid(seed, "series", study_index, series_index)
    ds.StudyID = f"{study_index}"
    ds.SeriesNumber = series_index
    if spec.anatomy in ("knee", "wrist"):  # paired body parts: right side
        ds.Laterality = "R"
    elif spec.body_part == "BREAST":  # both breasts: B is allowed in ImageLaterality only
        ds.ImageLaterality = "B"
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uid(seed, "frame-of-reference", study_index)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.PixelSpacing = [_ds_str(src.pixel_mm), _ds_str(src.pixel_mm)]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    if spec.modality == "CT" and spec.signed:
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue
    if spec.modality == "CT":
        _, center, width = _CT_KERNELS[series.recon]
        ds.WindowCenter = _ds_str(center)
        ds.WindowWidth = _ds_str(width)
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        top = float(np.percentile(src.lut[1:], 90))
        ds.WindowCenter = _ds_str(round(top / 2))
        ds.WindowWidth = _ds_str(round(top))
    return ds


def _header_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _write_atomic(path: Path, header: bytes, frames: Iterator[np.ndarray], pixel_bytes: int) -> int:
    """Write ``header`` + PixelData (OW, explicit length) + frames via a temporary name.

    Returns the file size.  The temporary file is removed if anything goes wrong (including
    KeyboardInterrupt), and the exception propagates.
    """
    if pixel_bytes % 2 or pixel_bytes > MAX_PIXEL_BYTES:
        raise ValueError(f"pixel data length {pixel_bytes} must be even and < 4 GiB")
    tmp = path.with_name(f".{path.name}.partial")
    written = 0
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(_PIXEL_DATA_HEADER + struct.pack("<I", pixel_bytes))
            for frame in frames:
                f.write(frame.data)
                written += frame.nbytes
        if written != pixel_bytes:
            raise RuntimeError(f"{path}: wrote {written} pixel bytes, declared {pixel_bytes}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(header) + len(_PIXEL_DATA_HEADER) + 4 + pixel_bytes


class _Writer:
    """Writes single-frame files on one background thread (file I/O releases the GIL, so writing
    overlaps with generating the next slices); at most ``depth`` files are pending."""

    def __init__(self, depth: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gen_dataset-writer")
        self._pending: deque[Future[int]] = deque()
        self._depth = depth

    def submit(self, path: Path, header: bytes, pixels: np.ndarray) -> int:
        """Queue ``path`` for writing (``pixels`` is copied); return the size it will have."""
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()  # re-raises an error of the writer thread
        frame = pixels.copy()
        self._pending.append(self._pool.submit(_write_atomic, path, header, iter((frame,)),
                                               frame.nbytes))
        return len(header) + len(_PIXEL_DATA_HEADER) + 4 + frame.nbytes

    def close(self) -> None:
        """Wait for every queued file; re-raise the first error of the writer thread."""
        self._pool.shutdown(wait=True)
        while self._pending:
            self._pending.popleft().result()

    def abort(self) -> None:
        """Drop the queued files not yet started and wait for the one being written, if any."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass
class SeriesRecord:
    index: int
    path: str  # relative to OUT, e.g. "s01/se02"
    series_uid: str
    description: str
    images: int
    bytes: int = 0
    # One entry per file: [relative path, SOPInstanceUID, size in bytes].
    instances: list[list[str | int]] = field(default_factory=list)


@dataclass
class StudyRecord:
    index: int
    path: str  # relative to OUT, e.g. "s01"
    study_uid: str
    patient_id: str
    patient_name: str
    modality: str
    description: str
    rows: int
    cols: int
    bits_stored: int
    multiframe: bool = False
    frames: int = 1
    series: list[SeriesRecord] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.series)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.series)


@dataclass
class Manifest:
    """What was generated.  ``seconds`` and ``mb_per_s`` are not stored in manifest.json (which
    must be identical for identical seeds)."""

    seed: int
    scale: float
    studies: list[StudyRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def files(self) -> int:
        return sum(st.images for st in self.studies)

    @property
    def bytes(self) -> int:
        return sum(st.bytes for st in self.studies)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else float("nan")

    def paths(self, root: Path) -> list[Path]:
        """Absolute paths of every generated file, in generation order."""
        return [root / str(inst[0]) for st in self.studies for se in st.series
                for inst in se.instances]

    def to_json(self) -> str:
        doc = {
            "generator": f"tools/gen_dataset.py v{GENERATOR_VERSION}",
            "seed": self.seed,
            "scale": self.scale,
            "files": self.files,
            "bytes": self.bytes,
            "studies": [asdict(st) | {"images": st.images, "bytes": st.bytes}
                        for st in self.studies],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def load(cls, out: Path) -> Manifest:
        doc = json.loads((Path(out) / MANIFEST_NAME).read_text())
        studies = []
        for st in doc["studies"]:
            series = [SeriesRecord(**se) for se in st.pop("series")]
            st.pop("images")
            st.pop("bytes")
            studies.append(StudyRecord(**st, series=series))
        return cls(seed=doc["seed"], scale=doc["scale"], studies=studies)

    def summary(self) -> str:
        head = (f"{'idx':4}{'mod':4}{'description':36}{'size':>12}{'bits':>5}{'series':>7}"
                f"{'images':>8}{'MB':>9}")
        lines = [head]
        for st in self.studies:
            size = f"{st.rows}x{st.cols}" + (f"x{st.frames}" if st.multiframe else "")
            lines.append(f"{st.path:4}{st.modality:4}{st.description[:35]:36}{size:>12}"
                         f"{st.bits_stored:>5}{len(st.series):>7}{st.images:>8}"
                         f"{st.bytes / MB:>9.1f}")
        lines.append(f"total: {len(self.studies)} studies, {self.files} files, "
                     f"{self.bytes / 1e9:.3f} GB ({self.bytes / 2**30:.3f} GiB)")
        if self.seconds > 0:
            lines.append(f"time: {self.seconds:.1f} s, throughput {self.mb_per_s:.0f} MB/s")
        return "\n".join(lines)


def plan(scale: float = 1.0, studies: int | None = None) -> list[tuple[StudySpec, list[int]]]:
    """The studies that ``generate`` would write and the image count of each of their series."""
    _check_args(scale, studies, 0.0)
    chosen = STUDIES if studies is None else STUDIES[:studies]
    return [(spec, series_counts(spec, scale)) for spec in chosen]


def _check_args(scale: float, studies: int | None, multiframe_gb: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, not {scale!r}")
    if studies is not None and not 1 <= studies <= len(STUDIES):
        raise ValueError(f"studies must be between 1 and {len(STUDIES)}, not {studies!r}")
    if not (math.isfinite(multiframe_gb) and multiframe_gb >= 0):
        raise ValueError(f"multiframe_gb must be >= 0, not {multiframe_gb!r}")
    spec = MULTIFRAME_STUDY
    if multiframe_gb > 0 and _multiframe_frames(multiframe_gb) * spec.rows * spec.cols * 2 > \
            MAX_PIXEL_BYTES:
        raise ValueError(f"multiframe_gb={multiframe_gb} exceeds the 4 GiB PixelData limit")


def _multiframe_frames(gb: float) -> int:
    spec = MULTIFRAME_STUDY
    return max(1, round(gb * 1e9 / (spec.rows * spec.cols * 2)))


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _z_positions(spec: StudySpec, n: int) -> np.ndarray:
    z0, z1 = spec.z_mm
    spacing = (z1 - z0) / n
    return z0 + (np.arange(n) + 0.5) * spacing


def _ipp(src: _SliceSource, z: float) -> list[str]:
    # DICOM +z points to the head; the model's z grows towards the feet.
    return [_ds_str(float(src.xs[0])), _ds_str(float(src.ys[0])), _ds_str(-z)]


def _write_series(writer: _Writer, out: Path, seed: int, study_index: int, spec: StudySpec,
                  tubes: list[_Tube], series_index: int, series: SeriesSpec, n: int,
                  record: StudyRecord) -> None:
    z = _z_positions(spec, n)
    spacing = (spec.z_mm[1] - spec.z_mm[0]) / n
    src = _SliceSource(spec, tubes, series.recon, series.phase, z,
                       _rng(seed, "texture", study_index, series_index),
                       _rng(seed, "noise", study_index, series_index))
    sop_class = CT_IMAGE_STORAGE if spec.modality == "CT" else MR_IMAGE_STORAGE
    ds = _base_dataset(seed, spec, study_index, series_index, series, spacing, src, sop_class)
    rel_dir = f"{record.path}/se{series_index:02d}"
    (out / rel_dir).mkdir(parents=True, exist_ok=True)
    srec = SeriesRecord(series_index, rel_dir, ds.SeriesInstanceUID, series.description, n)
    for i in range(n):
        sop_uid = uid(seed, "instance", study_index, series_index, i + 1)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = _ipp(src, float(z[i]))
        ds.SliceLocation = _ds_str(-float(z[i]))
        rel = f"{rel_dir}/im{i + 1:04d}.dcm"
        size = writer.submit(out / rel, _header_bytes(ds), src.slice(i))
        srec.instances.append([rel, sop_uid, size])
        srec.bytes += size
    record.series.append(srec)


def _item(**attributes: object) -> Dataset:
    """A sequence item with the given keyword attributes (numbers given as text are converted
    to float for the binary VRs FD / FL)."""
    item = Dataset()
    for keyword, given in attributes.items():
        value = given
        if dictionary_VR(keyword) in ("FD", "FL"):
            value = [float(v) for v in given] if isinstance(given, list) else float(given)
        setattr(item, keyword, value)
    return item


def _seq(**attributes: object) -> DicomSequence:
    """A one-item sequence."""
    return DicomSequence([_item(**attributes)])


def _enhanced_ct_dataset(seed: int, study_index: int, src: _SliceSource, frames: int,
                         spacing: float) -> Dataset:
    """Header of the Enhanced CT multi-frame instance (everything but PixelData)."""
    spec = MULTIFRAME_STUDY
    series = spec.series[0]
    ds = _base_dataset(seed, spec, study_index, 1, series, spacing, src, ENHANCED_CT_IMAGE_STORAGE)
    sop_uid = uid(seed, "instance", study_index, 1, 1)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    acquisition = f"{ds.AcquisitionDate}{ds.AcquisitionTime}"
    # Enhanced CT keeps these in functional groups or sub-sequences.
    for keyword in ("ImageOrientationPatient", "PixelSpacing", "SliceThickness", "WindowCenter",
                    "WindowWidth", "RescaleIntercept", "RescaleSlope", "RescaleType",
                    "ConvolutionKernel", "KVP", "XRayTubeCurrent", "ReconstructionDiameter",
                    "DataCollectionDiameter", "AcquisitionDate", "AcquisitionTime"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.DeviceSerialNumber = "SYN0001"
    ds.SoftwareVersions = f"gen_dataset {GENERATOR_VERSION}"
    ds.AcquisitionDateTime = acquisition
    ds.AcquisitionDuration = round(0.5 * frames * spacing / 40.0, 3)
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.NumberOfFrames = frames
    ds.InstanceNumber = 1
    dim_uid = uid(seed, "dimension-organization", study_index)
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=dim_uid)
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=pointer,
              FunctionalGroupPointer=0x00209111)  # Frame Content Sequence
        for pointer in (0x00209056, 0x00209057)])  # Stack ID, In-Stack Position Number
    _, center, width = _CT_KERNELS[series.recon]
    pixel = _ds_str(src.pixel_mm)
    ds.SharedFunctionalGroupsSequence = _seq(
        PixelMeasuresSequence=_seq(PixelSpacing=[pixel, pixel], SliceThickness=_ds_str(spacing),
                                   SpacingBetweenSlices=_ds_str(spacing)),
        PlaneOrientationSequence=_seq(ImageOrientationPatient=["1", "0", "0", "0", "1", "0"]),
        PixelValueTransformationSequence=_seq(RescaleIntercept="-1024", RescaleSlope="1",
                                              RescaleType="HU"),
        FrameVOILUTSequence=_seq(WindowCenter=_ds_str(center), WindowWidth=_ds_str(width)),
        CTImageFrameTypeSequence=_seq(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
                                      PixelPresentation="MONOCHROME",
                                      VolumetricProperties="VOLUME",
                                      VolumeBasedCalculationTechnique="NONE"),
        FrameAnatomySequence=_seq(
            AnatomicRegionSequence=_seq(CodeValue="38266002", CodingSchemeDesignator="SCT",
                                        CodeMeaning="Entire body"),
            FrameLaterality="U"),
        IrradiationEventIdentificationSequence=_seq(
            IrradiationEventUID=uid(seed, "irradiation-event", study_index)),
        CTAcquisitionTypeSequence=_seq(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO",
                                       FluoroscopyFlag="NO"),
        CTAcquisitionDetailsSequence=_seq(DataCollectionDiameter="500", RevolutionTime="0.5",
                                          SingleCollimationWidth="0.625",
                                          TotalCollimationWidth="40", TableHeight="160",
                                          GantryDetectorTilt="0", RotationDirection="CW"),
        CTTableDynamicsSequence=_seq(TableSpeed="80", TableFeedPerRotation="40",
                                     SpiralPitchFactor="1"),
        CTGeometrySequence=_seq(DistanceSourceToDetector="1085.6",
                                DistanceSourceToDataCollectionCenter="595"),
        CTReconstructionSequence=_seq(ReconstructionAlgorithm="FILTER_BACK_PROJ",
                                      ConvolutionKernel=series.recon,
                                      ConvolutionKernelGroup="SOFT_TISSUE",
                                      ReconstructionDiameter=_ds_str(spec.fov_mm),
                                      ReconstructionPixelSpacing=[pixel, pixel],
                                      ReconstructionAngle="360", ImageFilter="NONE"),
        CTExposureSequence=_seq(ExposureTimeInms="500", XRayTubeCurrentInmA="250",
                                ExposureInmAs="125", ExposureModulationType="NONE",
                                CTDIvol="10.5",
                                CTDIPhantomTypeCodeSequence=_seq(
                                    CodeValue="113691", CodingSchemeDesignator="DCM",
                                    CodeMeaning="IEC Body Dosimetry Phantom")),
        CTXRayDetailsSequence=_seq(KVP="120", FocalSpots=["1.2"], FilterType="BODY",
                                   FilterMaterial=["ALUMINUM"]),
    )
    z = src.z_positions
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([
        _item(FrameContentSequence=_seq(FrameReferenceDateTime=acquisition,
                                        FrameAcquisitionDateTime=acquisition,
                                        FrameAcquisitionDuration="500", StackID="1",
                                        InStackPositionNumber=i + 1,
                                        DimensionIndexValues=[1, i + 1]),
              PlanePositionSequence=_seq(ImagePositionPatient=_ipp(src, float(z[i]))),
              CTPositionSequence=_seq(TablePosition=_ds_str(-float(z[i])),
                                      ReconstructionTargetCenterPatient=["0", "0",
                                                                         _ds_str(-float(z[i]))],
                                      DataCollectionCenterPatient=["0", "0",
                                                                   _ds_str(-float(z[i]))]))
        for i in range(frames)])
    return ds


def _write_multiframe(out: Path, seed: int, study_index: int, gb: float) -> StudyRecord:
    """One Enhanced CT instance of about ``gb`` GB, streamed to disk frame by frame: only the
    header (about 0.4 KB per frame) and one frame are ever in memory."""
    spec = MULTIFRAME_STUDY
    series = spec.series[0]
    frames = _multiframe_frames(gb)
    tubes = _anatomy(spec, _rng(seed, "anatomy", spec.patient))
    z = _z_positions(spec, frames)
    spacing = (spec.z_mm[1] - spec.z_mm[0]) / frames
    src = _SliceSource(spec, tubes, series.recon, series.phase, z,
                       _rng(seed, "texture", study_index, 1), _rng(seed, "noise", study_index, 1))
    ds = _enhanced_ct_dataset(seed, study_index, src, frames, spacing)
    sop_uid = ds.SOPInstanceUID
    record = StudyRecord(study_index, f"s{study_index:02d}", ds.StudyInstanceUID, ds.PatientID,
                         str(ds.PatientName), spec.modality, spec.description, spec.rows,
                         spec.cols, spec.bits_stored, multiframe=True, frames=frames)
    rel_dir = f"{record.path}/se01"
    (out / rel_dir).mkdir(parents=True, exist_ok=True)
    rel = f"{rel_dir}/im0001.dcm"
    header = _header_bytes(ds)
    del ds
    pixel_bytes = spec.rows * spec.cols * 2 * frames
    size = _write_atomic(out / rel, header, (src.slice(i) for i in range(frames)), pixel_bytes)
    srec = SeriesRecord(1, rel_dir, uid(seed, "series", study_index, 1), series.description, 1,
                        size, [[rel, sop_uid, size]])
    record.series.append(srec)
    return record


def generate(out: Path, scale: float = 1.0, seed: int = 0, studies: int | None = None,
             multiframe_gb: float = 0.0,
             progress: Callable[[str], None] | None = None) -> Manifest:
    """Write the data set into ``out`` (absent or empty) and return its manifest.

    ``studies`` keeps only the first K studies of ``STUDIES``; ``multiframe_gb > 0`` adds one
    Enhanced CT multi-frame instance of about that many GB as the next study.
    """
    _check_args(scale, studies, multiframe_gb)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(seed=seed, scale=scale)
    start = time.perf_counter()
    writer = _Writer()
    try:
        _write_studies(writer, out, seed, plan(scale, studies), manifest, progress)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if multiframe_gb > 0:
        t0 = time.perf_counter()
        record = _write_multiframe(out, seed, len(manifest.studies) + 1, multiframe_gb)
        manifest.studies.append(record)
        if progress is not None:
            progress(f"{record.path} multi-frame: {record.frames} frames, "
                     f"{record.bytes / MB:.1f} MB in {time.perf_counter() - t0:.1f} s")
    manifest.seconds = time.perf_counter() - start
    tmp = out / f".{MANIFEST_NAME}.partial"
    tmp.write_text(manifest.to_json())
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def _write_studies(writer: _Writer, out: Path, seed: int,
                   planned: list[tuple[StudySpec, list[int]]], manifest: Manifest,
                   progress: Callable[[str], None] | None) -> None:
    for study_index, (spec, counts) in enumerate(planned, start=1):
        t0 = time.perf_counter()
        tubes = _anatomy(spec, _rng(seed, "anatomy", spec.patient))
        record = StudyRecord(study_index, f"s{study_index:02d}", uid(seed, "study", study_index),
                             _patient_id(seed, spec.patient), f"SYNTH^PATIENT{spec.patient:02d}",
                             spec.modality, spec.description, spec.rows, spec.cols,
                             spec.bits_stored)
        for series_index, (series, n) in enumerate(zip(spec.series, counts, strict=True),
                                                   start=1):
            _write_series(writer, out, seed, study_index, spec, tubes, series_index, series, n,
                          record)
        manifest.studies.append(record)
        if progress is not None:
            dt = time.perf_counter() - t0
            progress(f"{record.path} {spec.modality} {spec.description}: {record.images} files, "
                     f"{record.bytes / MB:.1f} MB in {dt:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic, realistic DICOM data set (13 CT/MR studies, ~6 GB and "
                    "7,767 files at scale 1) as OUT/sNN/seMM/imKKKK.dcm plus manifest.json.")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (must be absent or empty)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of the images of each series to write (default 1.0; "
                             "at least 1 image per series)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed: same seed => byte-identical output (default 0)")
    parser.add_argument("--studies", type=int, default=None, metavar="K",
                        help=f"keep only the first K of the {len(STUDIES)} studies")
    parser.add_argument("--multiframe-gb", type=float, default=0.0, metavar="G",
                        help="also write one Enhanced CT multi-frame instance of about G GB, "
                             "streamed frame by frame (< 4.29)")
    parser.add_argument("--quiet", action="store_true", help="no per-study progress lines")
    args = parser.parse_args(argv)
    try:
        _check_args(args.scale, args.studies, args.multiframe_gb)
    except ValueError as exc:
        parser.error(str(exc))
    planned = plan(args.scale, args.studies)
    n_files = sum(sum(c) for _, c in planned) + (1 if args.multiframe_gb > 0 else 0)
    if not args.quiet:
        print(f"planned: {len(planned)} studies, {n_files} files -> {args.out}", file=sys.stderr)
    try:
        manifest = generate(args.out, args.scale, args.seed, args.studies, args.multiframe_gb,
                            progress=None if args.quiet else
                            (lambda line: print(line, file=sys.stderr, flush=True)))
    except FileExistsError as exc:
        parser.error(str(exc))
    print(manifest.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
