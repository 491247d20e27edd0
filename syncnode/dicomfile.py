"""Inspect a DICOM Part-10 file before the node accepts it, without altering or fully loading it.

The node stores the exact bytes of DICOM Part-10 files, content-addressed by BLAKE3.  Before a
file is accepted (``syncnode import``, or the C-STORE SCP after writing the received bytes to a
temporary file) :func:`inspect_file` reads it once, streaming, and either returns the attributes
the catalog indexes (:class:`InstanceInfo`) or raises :class:`InvalidDicom` whose ``reason`` tells
a PACS administrator what is wrong.  The module only reads; it never repairs or rewrites.

Vocabulary
----------
preamble
    The first 128 bytes of a Part-10 file; content is not checked (it may hold a TIFF header).
prefix
    The 4 bytes ``DICM`` at offset 128.
file meta
    Group 0002 elements after the prefix, always Explicit VR Little Endian.  It names the
    Transfer Syntax of the data set and repeats the SOP Class / Instance UIDs
    (Media Storage SOP Class UID (0002,0002), Media Storage SOP Instance UID (0002,0003)).
data set
    Everything after the file meta, encoded as the Transfer Syntax says (implicit or explicit
    VR, little or big endian; for the deflated syntaxes a raw deflate stream of explicit VR
    little endian).
top-level element
    An element of the data set itself, not inside a sequence item.
native / encapsulated Pixel Data
    Native: a defined-length (7FE0,0010) holding the uncompressed frames.  Encapsulated: an
    undefined-length (7FE0,0010) holding items (Basic Offset Table, then fragments) closed by
    a Sequence Delimitation Item; used by every compressed Transfer Syntax.
truncated
    The file ends before a structure it declares: an element value, an item, a sequence
    delimiter, the deflate stream, or the Pixel Data implied by the image attributes.
corrupt
    The bytes are inconsistent in a way a cut cannot explain (bad VR, an item where an element
    must be, an item overrunning its sequence ...).

Acceptance rules (checked in this order; the first failure is the reason)
------------------------------------------------------------------------
1. The path is a readable regular file that is not empty ("empty file").  I/O errors become
   ``InvalidDicom("cannot read file: <strerror>")``; the path itself is never put in a reason
   (paths may carry patient names).
2. Part-10 framing: 128-byte preamble followed by ``DICM``.  Files without it are rejected
   ("not a DICOM Part-10 file: no 'DICM' prefix at offset 128"), with a hint when the file is a
   bare data set ("no_meta" files) or gzip data.  Storing a bare data set as-is would not be a
   valid Part-10 file, and adding a header would alter the bytes, so the sender must re-export.
3. File meta: group 0002 parses as explicit VR little endian.  (0002,0000) Group Length may be
   absent (tolerated: the end of group 0002 is unambiguous, and pydicom and DCMTK read such
   files); if present it must equal the size of the group.  Transfer Syntax UID (0002,0010)
   must be present, a valid UID and a transfer syntax known to pydicom: an unknown (e.g.
   private) syntax is rejected because the data set cannot be walked and so cannot be verified.
   All standard syntaxes are accepted as stored, without decoding: implicit/explicit little
   endian, explicit big endian (retired), deflated, and every encapsulated (JPEG, JPEG-LS,
   JPEG 2000, HTJ2K, RLE, MPEG, JPEG XL, ...) syntax.  A DICOMDIR (Media Storage Directory
   Storage in the file meta) is rejected: it is an index of other files, not an instance.
4. Structure: every element of the data set is walked, top level and nested.  Values are never
   read except the handful of small top-level attributes below; everything else is skipped by
   seeking (or, for deflated data sets, by inflating into a fixed-size buffer and discarding).
   Any element, item or fragment whose declared length runs past the end of the file, an
   undefined-length sequence or item without its delimiter, encapsulated Pixel Data without
   its Sequence Delimitation Item, an element header cut short, or a deflate stream that does
   not reach its end marker is *truncated*.  Invalid VRs, unexpected item tags, items
   overrunning a defined-length sequence, undefined length on a VR that cannot have it,
   sequences nested deeper than 64 levels, encapsulated Pixel Data under a native Transfer
   Syntax (or the reverse), encapsulated Pixel Data with no fragments, and bytes after the end
   of a deflate stream are *corrupt*.  Tolerated after a deflate stream: one NUL pad byte, and
   an 8-byte gzip-style trailer (CRC-32 and size of the inflated data) that some encoders
   write - it is then verified.  A data set whose first element has no valid VR under an
   explicit VR Transfer Syntax (i.e. it was written in implicit VR) is rejected: pydicom
   silently switches to implicit VR, but other toolkits misparse such files.
   Implicit VR: an undefined-length element is a sequence (except Pixel Data); a defined-length
   element is descended into only if the data dictionary says it is SQ.  An explicit-VR ``UN``
   element of undefined length holds an implicit VR little endian sequence (PS3.5 6.2.2).
5. Pixel Data: native (7FE0,0010) - and Float / Double Float Pixel Data (7FE0,0008/0009) - must
   hold at least Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated / 8
   bytes (rounded up for Bits Allocated 1, two thirds of that for YBR_FULL_422).  One extra
   pad byte to even length is normal; a longer value (excess padding) is accepted, since it is
   not a sign of truncation.  If that length cannot be computed (Rows, Columns, Bits Allocated
   or Samples per Pixel missing or malformed, Number of Frames not a positive integer) the file
   is rejected: completeness cannot be verified and viewers could not decode it either.
   A data set with Rows or Columns, or whose SOP Class is an "... Image Storage" class, but
   with no Pixel Data (and no Pixel Data Provider URL, as used by JPIP) is rejected as probably
   truncated before its Pixel Data.
6. Identity: SOP Class UID (0008,0016), SOP Instance UID (0008,0018), Study Instance UID
   (0020,000D) and Series Instance UID (0020,000E) must be present at top level and valid UIDs
   (see :func:`is_valid_uid`; trailing NUL/space padding is stripped).  The file meta must
   carry Media Storage SOP Class / Instance UIDs equal to them: a mismatch means the file was
   edited inconsistently (often a partial de-identification), and the catalog would index an
   identity the file meta contradicts, so it is rejected rather than guessed at.

What cannot be detected: a cut that falls exactly on a top-level element boundary *after* all
the required attributes and the Pixel Data (typically losing only trailing elements such as
Data Set Trailing Padding, or trailing elements of a non-image object such as an SR) leaves a
structurally complete data set; it is indistinguishable from a shorter original and is accepted.
The same holds, for SOP Classes whose Pixel Data is optional (e.g. RT Dose), for a boundary cut
after the UIDs but before Rows/Columns; and for a deflated file, for a cut that removes exactly
its optional CRC-32/size trailer.  Cuts at arbitrary byte offsets are always detected.
End-to-end integrity of transferred bytes is guaranteed by the BLAKE3 content address, not here.

Indexed values: ``patient_id`` is decoded with the Specific Character Set and stripped of
padding; ``modality`` is stripped; ``study_date`` is ``YYYYMMDD`` if it is a valid date (the
ACR-NEMA form ``YYYY.MM.DD`` is normalised), otherwise ``""`` - a malformed Study Date is not a
reason to refuse an image.  Reasons never contain patient names or IDs; they may contain UIDs,
tags, attribute names, offsets and lengths.

Decisions for pydicom's bundled broken files (``pydicom/data/test_files``)
-------------------------------------------------------------------------
- ``no_meta.dcm``, ``ExplVR_LitEndNoMeta.dcm``, ``ExplVR_BigEndNoMeta.dcm``, ``rtstruct.dcm``:
  bare data sets without preamble/``DICM`` -> rejected (rule 2; ``no_meta.dcm`` starts with a
  stray byte, so it gets no "bare data set" hint).  The non-DICOM files (``README.txt``,
  ``*.json``, ``*.dump``, ``crayons.icc``, ``zipMR.gz``) are rejected the same way.
- ``no_meta_group_length.dcm``: has preamble, ``DICM`` and a file meta lacking only the group
  length (tolerated); its data set has no SOP Class UID -> rejected "missing SOP Class UID".
- ``meta_missing_tsyntax.dcm``: file meta lacks Transfer Syntax UID -> rejected.
- ``MR_truncated.dcm``: Pixel Data declares 8192 bytes, the file holds 8130 -> truncated.
- ``rtplan_truncated.dcm``: Beam Sequence cut short -> truncated.
- ``badVR.dcm``: an explicit VR copy of ``rtdose.dcm`` whose Number of Frames is ``'1A'``
  instead of ``'15'``.  Nothing is cut, but the Pixel Data length cannot be verified and no
  viewer can tell how many frames it holds -> rejected "invalid Number of Frames '1A'" (it
  would also fail the SOP Instance UID check below).
- ``rtdose*.dcm`` (except the RLE variants), ``rtplan.dcm``: SOP Instance UID ``1.9.999...`` /
  ``1.2.777...`` but Media Storage SOP Instance UID ``1.2.999...`` -> rejected (rule 6).
- ``JPEGLSNearLossless_*.dcm``, ``SC_rgb_jls_lossy_*.dcm``: no Study/Series Instance UID ->
  rejected "missing Study Instance UID".
- ``UN_sequence.dcm``, ``empty_charset_LEI.dcm``, ``nested_priv_SQ.dcm``, ``priv_SQ.dcm``:
  structurally fine fragments without SOP Class UID -> rejected "missing SOP Class UID".
- ``nested_priv_SQ.dcm``: Pixel Data without Rows -> rejected "Pixel Data present but Rows
  (0028,0010) is missing" (it also lacks the SOP Class UID).
- ``SC_rgb_jpeg.dcm``: file meta says JPEG Baseline (explicit VR) but the data set is written
  in implicit VR -> rejected "corrupt: the data set is not encoded with explicit VR ...".
- ``image_dfl.dcm``: deflated, followed by a gzip-style CRC-32/size trailer that matches ->
  accepted.  ``ExplVR_BigEnd.dcm`` has Study Date ``1997.04.24`` -> accepted, indexed
  ``19970424``.
- ``JPEG2000-embedded-sequence-delimiter.dcm``: the delimiter bytes lie inside a fragment and
  are skipped by its length, so the structure is valid -> accepted.
- ``dicomdirtests/``: the DICOMDIRs are rejected (rule 3); the ``TINY_ALPHA`` CT "images" were
  stripped of their Image Pixel module -> rejected "no Pixel Data in a CT Image Storage
  instance"; the other images are accepted.
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import re
import stat
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import BinaryIO, Final, Protocol

__all__ = ["InstanceInfo", "InvalidDicom", "InvalidIdentity", "dataset_offset", "inspect_bytes",
           "inspect_file", "is_valid_uid", "read_plain_text", "same_dataset"]


class InvalidDicom(ValueError):
    """A file that is not an acceptable DICOM Part-10 instance.

    `reason` is a short human message (also ``str(exc)``), free of patient data.
    """

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidIdentity(InvalidDicom):
    """The instance's identity is missing, invalid or contradicts itself: a SOP Class/
    Instance, Study or Series UID, or the file meta's Media Storage UIDs (a C-STORE answers
    0xA900 "data set does not match SOP class" for these, 0xC000 for other reasons)."""


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """The attributes of an accepted instance that the catalog indexes."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str  # may be "" if absent
    modality: str  # may be ""
    study_date: str  # "YYYYMMDD" or ""
    transfer_syntax_uid: str

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.__slots__}  # asdict deep-copies


_UID_RE: Final = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(s: str) -> bool:
    """DICOM UID: 1..64 chars, digits and dots, no empty component, no leading zeros except "0"."""
    return isinstance(s, str) and 0 < len(s) <= 64 and _UID_RE.fullmatch(s) is not None


# --------------------------------------------------------------------------------------------
# Constants

_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_DELIM: Final = 0xFFFEE00D
_SEQ_DELIM: Final = 0xFFFEE0DD

_PIXEL_DATA: Final = 0x7FE00010
_FLOAT_PIXEL_DATA: Final = 0x7FE00008
_DOUBLE_PIXEL_DATA: Final = 0x7FE00009
_PIXEL_TAGS: Final = frozenset({_PIXEL_DATA, _FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA})
_PIXEL_NAMES: Final = {
    _PIXEL_DATA: "Pixel Data",
    _FLOAT_PIXEL_DATA: "Float Pixel Data",
    _DOUBLE_PIXEL_DATA: "Double Float Pixel Data",
}
_PIXEL_DATA_PROVIDER_URL: Final = 0x00287FE0

_SPECIFIC_CHARSET: Final = 0x00080005
_SOP_CLASS: Final = 0x00080016
_SOP_INSTANCE: Final = 0x00080018
_STUDY_DATE: Final = 0x00080020
_MODALITY: Final = 0x00080060
_PATIENT_ID: Final = 0x00100020
_STUDY_UID: Final = 0x0020000D
_SERIES_UID: Final = 0x0020000E
_SAMPLES: Final = 0x00280002
_PHOTOMETRIC: Final = 0x00280004
_FRAMES: Final = 0x00280008
_ROWS: Final = 0x00280010
_COLUMNS: Final = 0x00280011
_BITS_ALLOCATED: Final = 0x00280100

# Top-level attributes whose (small) values are read; everything else is skipped.
_COLLECTED: Final = frozenset(
    {
        _SPECIFIC_CHARSET,
        _SOP_CLASS,
        _SOP_INSTANCE,
        _STUDY_DATE,
        _MODALITY,
        _PATIENT_ID,
        _STUDY_UID,
        _SERIES_UID,
        _SAMPLES,
        _PHOTOMETRIC,
        _FRAMES,
        _ROWS,
        _COLUMNS,
        _BITS_ALLOCATED,
    }
)
_MAX_COLLECTED_VALUE: Final = 4096  # bytes; far above any legitimate value of those attributes
_PRESENT_ONLY: Final = frozenset({_PIXEL_DATA_PROVIDER_URL})

_META_SOP_CLASS: Final = 0x00020002
_META_SOP_INSTANCE: Final = 0x00020003
_META_TSYNTAX: Final = 0x00020010
_META_COLLECTED: Final = frozenset({_META_SOP_CLASS, _META_SOP_INSTANCE, _META_TSYNTAX})

_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS: Final = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)

_IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"
_MEDIA_STORAGE_DIRECTORY: Final = "1.2.840.10008.1.3.10"
# pydicom 3.0 does not flag JPIP Referenced Deflate as deflated; PS3.5 A.7 says it is.
_DEFLATED_SYNTAXES: Final = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})

_MAX_DEPTH: Final = 64
_INFLATE_CHUNK: Final = 64 * 1024  # compressed bytes read, inflated bytes buffered, at a time
_SKIP_CHUNK: Final = 1024 * 1024  # inflated bytes discarded at a time when skipping a value
_TEXT_DELIMS: Final = {0x0D, 0x0A, 0x09, 0x0C}
_ESC: Final = 0x1B
# Character sets under which pydicom decodes bytes 0x00-0x7F (no ESC) as ASCII.
_ASCII_CHARSETS: Final = frozenset(
    {"ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126"}
    | {"ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192"}
    | {"GB18030", "GBK"}
)


@functools.cache
def _pydicom() -> SimpleNamespace:
    """pydicom, imported on first need: importing it costs ~0.3 s (numpy and more), and the
    common files (explicit VR, a standard transfer syntax, an ASCII Patient ID) need none
    of it."""
    from pydicom.charset import convert_encodings, decode_bytes
    from pydicom.datadict import dictionary_description, dictionary_VR
    from pydicom.uid import UID

    return SimpleNamespace(convert_encodings=convert_encodings, decode_bytes=decode_bytes,
                           dictionary_description=dictionary_description,
                           dictionary_VR=dictionary_VR, UID=UID)


# What pydicom says of the most common transfer syntaxes, (little endian, encapsulated),
# so that they need no pydicom; any other UID is asked of pydicom. Checked by the tests.
_COMMON_SYNTAXES: Final = {
    "1.2.840.10008.1.2": (True, False),  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": (True, False),  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99": (True, False),  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2": (False, False),  # Explicit VR Big Endian
    "1.2.840.10008.1.2.4.50": (True, True),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": (True, True),  # JPEG Extended
    "1.2.840.10008.1.2.4.57": (True, True),  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": (True, True),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": (True, True),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": (True, True),  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": (True, True),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": (True, True),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": (True, True),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": (True, True),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": (True, True),  # HTJ2K
    "1.2.840.10008.1.2.5": (True, True),  # RLE Lossless
}


def _transfer_syntax(ts: str) -> tuple[bool, bool] | None:
    """(little endian, encapsulated) of a transfer syntax known to pydicom, else None."""
    known = _COMMON_SYNTAXES.get(ts)
    if known is not None:
        return known
    uid = _pydicom().UID(ts)
    if not uid.is_transfer_syntax:
        return None
    return bool(uid.is_little_endian), bool(uid.is_encapsulated)


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _tag_name(tag: int) -> str:
    """'Beam Sequence (300A,00B0)', 'Pixel Data', or just the tag for private/unknown elements."""
    if tag in _PIXEL_TAGS:
        return _PIXEL_NAMES[tag]
    try:
        return f"{_pydicom().dictionary_description(tag)} {_tag_str(tag)}"
    except KeyError:  # private or unknown tag
        return f"element {_tag_str(tag)}"


def _show(value: str, limit: int = 80) -> str:
    """Quote a (non-PHI) value for a reason, shortened."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return repr(value)


# --------------------------------------------------------------------------------------------
# Byte sources: a seekable file, or an inflating stream for the deflated transfer syntaxes.


class _BadVR(InvalidDicom):
    """Internal: an explicit-VR element header whose VR is not a DICOM VR."""

    def __init__(self, reason: str, tag: int, vr: bytes) -> None:
        super().__init__(reason)
        self.tag = tag
        self.vr = vr


class _EndOfData(Exception):
    """Internal: the data ended `available` bytes into a read or skip that needed more."""

    def __init__(self, available: int) -> None:
        super().__init__(available)
        self.available = available


class _Source(Protocol):
    pos: int
    deflated: bool

    def read(self, n: int) -> bytes: ...
    def skip(self, n: int) -> None: ...
    def remaining(self) -> int | None: ...
    def at_end(self) -> bool: ...


class _FileSource:
    """Reads from a file of known size; skips by seeking, never by reading."""

    deflated = False

    def __init__(self, f: BinaryIO, pos: int, size: int) -> None:
        self._f = f
        self.pos = pos
        self._size = size
        f.seek(pos)

    def read(self, n: int) -> bytes:
        avail = self._size - self.pos
        if n > avail:
            raise _EndOfData(max(avail, 0))
        data = self._f.read(n)
        if len(data) != n:  # the file shrank while we were reading it
            raise _EndOfData(len(data))
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        avail = self._size - self.pos
        if n > avail:
            raise _EndOfData(max(avail, 0))
        self._f.seek(n, os.SEEK_CUR)
        self.pos += n

    def peek(self, n: int) -> bytes:
        data = self.read(n)
        self._f.seek(-n, os.SEEK_CUR)
        self.pos -= n
        return data

    def remaining(self) -> int | None:
        return self._size - self.pos

    def at_end(self) -> bool:
        return self.pos >= self._size


class _InflateSource:
    """Raw-deflate stream after the file meta, inflated in bounded chunks.

    ``pos`` counts inflated bytes.  Memory use is bounded by a few times ``_INFLATE_CHUNK``
    whatever the compression ratio, because output is requested with ``max_length``.
    """

    deflated = True

    def __init__(self, f: BinaryIO, pos: int, size: int) -> None:
        self._f = f
        self._size = size
        f.seek(pos)
        self._d = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._off = 0
        self.pos = 0
        self._input_done = False
        self._crc = 0  # CRC-32 and size of the inflated data, for a gzip-style trailer
        self._total = 0

    def _inflate(self, max_length: int) -> bytes:
        """The next piece (at most `max_length` bytes) of inflated data; b"" at the end."""
        while not self._d.eof:
            data = self._d.unconsumed_tail
            if not data and not self._input_done:
                data = self._f.read(_INFLATE_CHUNK)
                self._input_done = not data
            try:
                # With no input left this still drains output that zlib holds for input it
                # has already consumed (possible when the previous call hit max_length).
                out = self._d.decompress(data, max_length)
            except zlib.error as exc:
                raise InvalidDicom(
                    f"corrupt: deflated data set cannot be inflated ({exc})"
                ) from exc
            if out:
                self._crc = zlib.crc32(out, self._crc)
                self._total += len(out)
                return out
            if self._input_done:
                return b""
        return b""

    def _fill(self) -> bool:
        """Append inflated data to the buffer; False when there is no more."""
        out = self._inflate(_INFLATE_CHUNK)
        if not out:
            return False
        if self._off:
            del self._buf[: self._off]
            self._off = 0
        self._buf += out
        return True

    def _available(self) -> int:
        return len(self._buf) - self._off

    def read(self, n: int) -> bytes:
        while self._available() < n:
            if not self._fill():
                raise _EndOfData(self._available())
        data = bytes(self._buf[self._off : self._off + n])
        self._off += n
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        done = min(n, self._available())
        self._off += done
        while done < n:  # inflate and discard, without buffering
            out = self._inflate(min(n - done, _SKIP_CHUNK))
            if not out:
                self.pos += done
                raise _EndOfData(done)
            done += len(out)
        self.pos += n

    def remaining(self) -> int | None:
        return None

    def at_end(self) -> bool:
        return self._available() == 0 and not self._fill()

    def finish(self) -> None:
        """After the last element: the deflate stream must be complete, with nothing after it.

        Tolerated after the end of the stream: one NUL pad byte to even length, and an 8-byte
        gzip-style trailer (CRC-32 and size of the inflated data, as some encoders write; e.g.
        pydicom's ``image_dfl.dcm``), which is then verified.
        """
        if not self._d.eof:
            raise InvalidDicom(
                "truncated: deflated data set ends before the end of its deflate stream"
            )
        count = len(self._d.unused_data) + max(self._size - self._f.tell(), 0)
        if count == 0:
            return
        if count > 9:
            raise InvalidDicom(
                f"corrupt: {count} unexpected bytes after the end of the deflate stream"
            )
        tail = (self._d.unused_data + self._f.read(9))[:count]
        if tail == b"\x00":
            return
        if count in (8, 9) and tail[8:] in (b"", b"\x00"):
            crc, isize = struct.unpack("<II", tail[:8])
            if crc == self._crc and isize == self._total & 0xFFFFFFFF:
                return
            raise InvalidDicom(
                "corrupt: the CRC-32/size trailer after the deflate stream does not match the "
                "inflated data set"
            )
        raise InvalidDicom(
            f"corrupt: {count} unexpected byte(s) after the end of the deflate stream"
        )


# --------------------------------------------------------------------------------------------
# Data set walker


@dataclass(frozen=True, slots=True)
class _Encoding:
    implicit: bool
    little: bool
    header: struct.Struct  # tag group, tag element, 32-bit length
    u16: struct.Struct
    u32: struct.Struct

    @classmethod
    def of(cls, implicit: bool, little: bool) -> _Encoding:
        e = "<" if little else ">"
        return cls(
            implicit,
            little,
            struct.Struct(e + "HHI"),
            struct.Struct(e + "H"),
            struct.Struct(e + "I"),
        )


_IMPLICIT_LE: Final = _Encoding.of(implicit=True, little=True)
_EXPLICIT_LE: Final = _Encoding.of(implicit=False, little=True)


@dataclass(slots=True)
class _PixelInfo:
    tag: int
    length: int  # declared; _UNDEFINED for encapsulated


@dataclass(slots=True)
class _TopLevel:
    values: dict[int, bytes]
    too_long: dict[int, int]
    present: set[int]
    pixel: _PixelInfo | None = None
    element_count: int = 0
    vrs: dict[int, bytes | None] = field(default_factory=dict)  # of the values read


def _where(src: _Source, offset: int) -> str:
    return f"inflated offset {offset}" if src.deflated else f"offset {offset}"


def _read_header(src: _Source, enc: _Encoding) -> tuple[int, bytes | None, int]:
    """Read one element/item header: (tag, VR or None, length).  Raises _EndOfData."""
    start = src.pos
    hdr = src.read(8)
    group, elem, length = enc.header.unpack(hdr)
    tag = (group << 16) | elem
    if group == 0xFFFE or enc.implicit:
        return tag, None, length
    vr = hdr[4:6]
    if vr in _SHORT_VRS:
        return tag, vr, enc.u16.unpack(hdr[6:8])[0]
    if vr in _LONG_VRS:
        return tag, vr, enc.u32.unpack(src.read(4))[0]
    shown = _show(vr.decode("latin-1"))
    raise _BadVR(
        f"corrupt: element {_tag_str(tag)} at {_where(src, start)} has invalid VR {shown}",
        tag,
        vr,
    )


def _is_sequence(tag: int, vr: bytes | None) -> bool:
    if vr is not None:
        return vr == b"SQ"
    try:
        return _pydicom().dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown tag: opaque bytes
        return False


def _walk_fragments(src: _Source, enc: _Encoding, tag: int) -> None:
    """Encapsulated value: items with defined lengths up to a Sequence Delimitation Item.

    Only the 8-byte item headers are read; fragment contents are skipped.
    """
    fragments = 0
    while True:
        start = src.pos
        group, elem, length = enc.header.unpack(src.read(8))
        item_tag = (group << 16) | elem
        if item_tag == _SEQ_DELIM:
            break
        if item_tag != _ITEM:
            raise InvalidDicom(
                f"corrupt: unexpected tag {_tag_str(item_tag)} at {_where(src, start)} "
                f"in encapsulated {_tag_name(tag)}"
            )
        if length == _UNDEFINED:
            raise InvalidDicom(
                f"corrupt: fragment of undefined length at {_where(src, start)} "
                f"in encapsulated {_tag_name(tag)}"
            )
        src.skip(length)
        fragments += 1
    if fragments < 2 and tag == _PIXEL_DATA:
        raise InvalidDicom("corrupt: encapsulated Pixel Data contains no fragments")


def _walk_sequence(src: _Source, enc: _Encoding, tag: int, length: int, depth: int) -> None:
    """Items of a sequence of defined or undefined length."""
    if depth >= _MAX_DEPTH:
        raise InvalidDicom(f"corrupt: sequences nested deeper than {_MAX_DEPTH} levels")
    end = None if length == _UNDEFINED else src.pos + length
    while True:
        if end is not None:
            if src.pos == end:
                return
            if src.pos > end:
                raise InvalidDicom(f"corrupt: an item overruns the length of {_tag_name(tag)}")
        start = src.pos
        item_tag, _, item_len = _read_header(src, enc)
        if item_tag == _SEQ_DELIM and end is None:
            return
        if item_tag != _ITEM:
            raise InvalidDicom(
                f"corrupt: unexpected tag {_tag_str(item_tag)} at {_where(src, start)} "
                f"in {_tag_name(tag)} (expected an item)"
            )
        if item_len == _UNDEFINED:
            _walk_dataset(src, enc, None, depth + 1)
        else:
            if end is not None and src.pos + item_len > end:
                raise InvalidDicom(
                    f"corrupt: item at {_where(src, start)} overruns the length of {_tag_name(tag)}"
                )
            _walk_dataset(src, enc, src.pos + item_len, depth + 1)


def _walk_value(
    src: _Source, enc: _Encoding, tag: int, vr: bytes | None, length: int, depth: int
) -> None:
    """Skip or descend into one element's value (the header has been read)."""
    if length == _UNDEFINED:
        if tag == _PIXEL_DATA or (vr is not None and vr in (b"OB", b"OW")):
            _walk_fragments(src, enc, tag)
        elif vr is None or vr == b"SQ":
            _walk_sequence(src, enc, tag, length, depth)
        elif vr == b"UN":
            _walk_sequence(src, _IMPLICIT_LE, tag, length, depth)
        else:
            raise InvalidDicom(
                f"corrupt: {_tag_name(tag)} has undefined length, not allowed for VR "
                f"{vr.decode('latin-1')}"
            )
    elif _is_sequence(tag, vr):
        avail = src.remaining()
        if avail is not None and length > avail:
            raise _EndOfData(avail)
        _walk_sequence(src, enc, tag, length, depth)
    else:
        src.skip(length)


def _walk_dataset(src: _Source, enc: _Encoding, end: int | None, depth: int) -> None:
    """A nested data set (item content): up to `end`, or to an Item Delimitation Item."""
    while True:
        if end is not None:
            if src.pos == end:
                return
            if src.pos > end:
                raise InvalidDicom(
                    f"corrupt: an element overruns its item ending at {_where(src, end)}"
                )
        start = src.pos
        tag, vr, length = _read_header(src, enc)
        if tag == _ITEM_DELIM and end is None:
            return
        if tag >> 16 == 0xFFFE:
            raise InvalidDicom(
                f"corrupt: unexpected item tag {_tag_str(tag)} at {_where(src, start)} "
                "inside an item"
            )
        if end is not None and length != _UNDEFINED and src.pos + length > end:
            raise InvalidDicom(
                f"corrupt: {_tag_name(tag)} at {_where(src, start)} overruns its item"
            )
        _walk_value(src, enc, tag, vr, length, depth)


def _walk_top_level(src: _Source, enc: _Encoding, encapsulated_ts: bool,
                    collect: frozenset[int] = _COLLECTED) -> _TopLevel:
    top = _TopLevel(values={}, too_long={}, present=set())
    while not src.at_end():
        start = src.pos
        try:
            tag, vr, length = _read_header(src, enc)
        except _EndOfData as exc:
            raise InvalidDicom(
                f"truncated: file ends inside the header of an element at {_where(src, start)}"
            ) from exc
        except _BadVR as exc:
            if top.element_count == 0:
                # pydicom silently falls back to implicit VR here; other toolkits do not.
                raise InvalidDicom(
                    "corrupt: the data set is not encoded with explicit VR as its Transfer "
                    f"Syntax requires (first element {_tag_str(exc.tag)} has invalid VR "
                    f"{_show(exc.vr.decode('latin-1'))}; implicit VR encoding?)"
                ) from exc
            raise
        top.element_count += 1
        if tag >> 16 == 0xFFFE:
            raise InvalidDicom(
                f"corrupt: unexpected item tag {_tag_str(tag)} at {_where(src, start)} "
                "at the top level of the data set"
            )
        if tag in _PIXEL_TAGS:
            if tag == _PIXEL_DATA and (length == _UNDEFINED) != encapsulated_ts:
                if encapsulated_ts:
                    raise InvalidDicom(
                        "corrupt: Pixel Data has a defined length but the Transfer Syntax is "
                        "encapsulated (compressed)"
                    )
                raise InvalidDicom(
                    "corrupt: Pixel Data is encapsulated (undefined length) but the Transfer "
                    "Syntax is native (uncompressed)"
                )
            top.pixel = _PixelInfo(tag, length)
        if tag in _PRESENT_ONLY:
            top.present.add(tag)

        if length == _UNDEFINED:
            try:
                _walk_value(src, enc, tag, vr, length, 0)
            except _EndOfData as exc:
                what = "encapsulated " if tag == _PIXEL_DATA else ""
                raise InvalidDicom(
                    f"truncated: file ends inside {what}{_tag_name(tag)} "
                    "(before its Sequence Delimitation Item)"
                ) from exc
            continue

        # Defined length: first the cheap bound check against the file size (not known for a
        # deflated data set, where the skip/read itself reports how much was there).
        avail = src.remaining()
        if avail is not None and length > avail:
            raise InvalidDicom(f"truncated: {_tag_name(tag)} has {avail} of {length} bytes")
        if _is_sequence(tag, vr):
            try:
                _walk_sequence(src, enc, tag, length, 0)
            except _EndOfData as exc:
                raise InvalidDicom(f"truncated: file ends inside {_tag_name(tag)}") from exc
            continue
        try:
            if tag in collect:
                if length > _MAX_COLLECTED_VALUE:
                    top.too_long[tag] = length
                    src.skip(length)
                else:
                    top.values[tag] = src.read(length)
                    top.vrs[tag] = vr
            else:
                src.skip(length)
        except _EndOfData as exc:
            raise InvalidDicom(
                f"truncated: {_tag_name(tag)} has {exc.available} of {length} bytes"
            ) from exc
    return top


# --------------------------------------------------------------------------------------------
# File meta


@dataclass(slots=True)
class _Meta:
    end: int
    values: dict[int, bytes]


def _read_meta(f: BinaryIO, size: int) -> _Meta:
    src = _FileSource(f, 132, size)
    le = _EXPLICIT_LE
    values: dict[int, bytes] = {}
    group_length: int | None = None
    group_length_end = 0
    try:
        while not src.at_end():
            if struct.unpack("<H", src.peek(2))[0] != 0x0002:
                break
            start = src.pos
            tag, vr, length = _read_header(src, le)
            if length == _UNDEFINED or vr == b"SQ":
                raise InvalidDicom(
                    f"corrupt: file meta element {_tag_str(tag)} at offset {start} is a sequence "
                    "or has undefined length"
                )
            if tag == 0x00020000 and length == 4 and start == 132:
                group_length = struct.unpack("<I", src.read(4))[0]
                group_length_end = src.pos
            elif tag in _META_COLLECTED and length <= _MAX_COLLECTED_VALUE:
                values[tag] = src.read(length)
            else:
                src.skip(length)
    except _EndOfData as exc:
        raise InvalidDicom("truncated: file ends inside the file meta information") from exc
    end = src.pos
    if end == 132:
        raise InvalidDicom("not a DICOM Part-10 file: no file meta information after 'DICM'")
    if group_length is not None and group_length_end + group_length != end:
        raise InvalidDicom(
            f"corrupt: file meta group length (0002,0000) says {group_length} bytes but the "
            f"group 0002 elements occupy {end - group_length_end} bytes"
        )
    return _Meta(end=end, values=values)


def _not_part10_reason(head: bytes) -> str:
    reason = "not a DICOM Part-10 file: no 'DICM' prefix at offset 128"
    if head[:2] == b"\x1f\x8b":
        return reason + " (the file is gzip-compressed)"
    if len(head) >= 4:
        le = struct.unpack("<H", head[:2])[0]
        be = struct.unpack(">H", head[:2])[0]
        if 0x0008 in (le, be) or 0x0002 in (le, be):
            return reason + (
                " (it looks like a bare DICOM data set without preamble and file meta "
                "information; re-export it as a Part-10 file)"
            )
    return reason


# --------------------------------------------------------------------------------------------
# Attribute interpretation


def _uid_text(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip("\x00 ")


def _required_uid(top: _TopLevel, tag: int, name: str) -> str:
    if tag in top.too_long:
        raise InvalidIdentity(f"invalid {name}: value is {top.too_long[tag]} bytes long")
    raw = top.values.get(tag)
    if raw is None:
        raise InvalidIdentity(f"missing {name}")
    value = _uid_text(raw)
    if not value:
        raise InvalidIdentity(f"missing {name} (the element is empty)")
    if not is_valid_uid(value):
        raise InvalidIdentity(f"invalid {name} {_show(value)}")
    return value


def _us_value(top: _TopLevel, enc: _Encoding, tag: int, name: str) -> int:
    raw = top.values.get(tag)
    if raw is None:
        raise InvalidDicom(
            f"Pixel Data present but {name} {_tag_str(tag)} is missing: cannot verify its length"
        )
    if len(raw) != 2:
        raise InvalidDicom(f"invalid {name}: value is {len(raw)} bytes long, expected 2")
    return int(enc.u16.unpack(raw)[0])


def _number_of_frames(top: _TopLevel) -> int:
    if _FRAMES in top.too_long:
        raise InvalidDicom(f"invalid Number of Frames: value is {top.too_long[_FRAMES]} bytes long")
    raw = top.values.get(_FRAMES)
    if raw is None:
        return 1
    text = raw.decode("latin-1").strip("\x00 ")
    if not text:
        return 1
    if not re.fullmatch(r"[+]?[0-9]{1,12}", text) or int(text) < 1:
        raise InvalidDicom(f"invalid Number of Frames {_show(text, 20)}")
    return int(text)


def _check_native_pixels(top: _TopLevel, enc: _Encoding, pixel: _PixelInfo) -> None:
    rows = _us_value(top, enc, _ROWS, "Rows")
    columns = _us_value(top, enc, _COLUMNS, "Columns")
    bits = _us_value(top, enc, _BITS_ALLOCATED, "Bits Allocated")
    samples = _us_value(top, enc, _SAMPLES, "Samples per Pixel")
    frames = _number_of_frames(top)
    if bits != 1 and (bits == 0 or bits % 8):
        raise InvalidDicom(f"invalid Bits Allocated {bits}")
    if bits == 1:
        expected = (rows * columns * frames * samples + 7) // 8
    else:
        expected = rows * columns * frames * samples * (bits // 8)
    photometric = top.values.get(_PHOTOMETRIC, b"").decode("latin-1").strip("\x00 ")
    if photometric == "YBR_FULL_422" and bits != 1:
        expected = expected // 3 * 2
    if pixel.length < expected:
        raise InvalidDicom(
            f"truncated: {_PIXEL_NAMES[pixel.tag]} has {pixel.length} of {expected} bytes "
            f"({rows} rows x {columns} columns x {frames} frame(s) x {samples} sample(s) x "
            f"{bits} bits)"
        )


def _check_pixels(top: _TopLevel, enc: _Encoding, sop_class: str | None) -> None:
    if top.pixel is not None:
        if top.pixel.length != _UNDEFINED:
            _check_native_pixels(top, enc, top.pixel)
        return
    if _PIXEL_DATA_PROVIDER_URL in top.present:
        return
    if _ROWS in top.values or _COLUMNS in top.values:
        raise InvalidDicom(
            "truncated: Rows/Columns present but no Pixel Data "
            "(file probably cut before its Pixel Data)"
        )
    if sop_class is not None and is_valid_uid(sop_class):
        name = _pydicom().UID(sop_class).name
        if "Image Storage" in name:
            raise InvalidDicom(
                f"truncated: no Pixel Data in a {name} instance "
                "(file probably cut before its Pixel Data)"
            )


def _text_value(top: _TopLevel, tag: int, name: str) -> str | None:
    if tag in top.too_long:
        raise InvalidDicom(
            f"invalid {name} {_tag_str(tag)}: value is {top.too_long[tag]} bytes long"
        )
    raw = top.values.get(tag)
    return None if raw is None else raw.decode("latin-1")


def _patient_id(top: _TopLevel) -> str:
    raw = top.values.get(_PATIENT_ID)
    if _PATIENT_ID in top.too_long:
        # Never show the value: it is PHI.
        raise InvalidDicom(
            f"invalid Patient ID (0010,0020): value is {top.too_long[_PATIENT_ID]} bytes long"
        )
    if not raw:
        return ""
    charset = _text_value(top, _SPECIFIC_CHARSET, "Specific Character Set") or ""
    terms = [t.strip("\x00 ") for t in charset.split("\\")]
    terms = [t for t in terms if t] or ["ISO_IR 6"]
    if raw.isascii() and _ESC not in raw and _ASCII_CHARSETS.issuperset(terms):
        return raw.decode("ascii").strip("\x00 ")  # what pydicom decodes it to, sooner
    try:
        pydicom = _pydicom()
        encodings = pydicom.convert_encodings(terms)
        text = pydicom.decode_bytes(raw, encodings, _TEXT_DELIMS)
    except (LookupError, UnicodeError):
        # Only raised when pydicom's reading_validation_mode is RAISE.  A badly encoded
        # Patient ID is not a reason to refuse an image: index it as Latin-1.
        text = raw.decode("latin-1")
    return text.strip("\x00 ")


def _study_date(top: _TopLevel) -> str:
    text = (_text_value(top, _STUDY_DATE, "Study Date") or "").strip("\x00 ")
    if re.fullmatch(r"[0-9]{4}\.[0-9]{2}\.[0-9]{2}", text):  # ACR-NEMA 2.0 form
        text = text.replace(".", "")
    if not re.fullmatch(r"[0-9]{8}", text):
        return ""
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return ""
    return text


# --------------------------------------------------------------------------------------------
# Entry point


def inspect_file(path: str | os.PathLike[str]) -> InstanceInfo:
    """Inspect the DICOM Part-10 file at `path`; return its indexed attributes.

    Raises :class:`InvalidDicom` (with a specific, PHI-free ``reason``) if the file is not an
    acceptable instance.  Reads only headers and small values; memory use does not depend on
    the file size.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before open(): a FIFO would block it
            raise InvalidDicom("not a regular file")
        with open(path, "rb") as f:
            return _inspect(f, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise InvalidDicom(f"cannot read file: {exc.strerror or type(exc).__name__}") from exc


def inspect_bytes(data: bytes) -> InstanceInfo:
    """:func:`inspect_file` for the whole content of a file already read into memory: the
    same rules, the same reasons."""
    return _inspect(io.BytesIO(data), len(data))  # a BytesIO of bytes shares, not copies


@dataclass(slots=True)
class _Opened:
    """A Part-10 file past its preamble and file meta: how and where its data set reads."""

    meta: _Meta
    ts: str  # the Transfer Syntax UID
    encapsulated: bool
    enc: _Encoding
    src: _FileSource | _InflateSource


def _open_data_set(f: BinaryIO, size: int) -> _Opened:
    """Check the preamble, the file meta and its transfer syntax; the data set's reader.
    Raises InvalidDicom with the reason."""
    if size == 0:
        raise InvalidDicom("empty file")
    head = f.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise InvalidDicom(_not_part10_reason(head))
    meta = _read_meta(f, size)
    ts_raw = meta.values.get(_META_TSYNTAX)
    ts = _uid_text(ts_raw) if ts_raw is not None else ""
    if not ts:
        raise InvalidDicom("file meta lacks Transfer Syntax UID (0002,0010)")
    if not is_valid_uid(ts):
        raise InvalidDicom(f"invalid Transfer Syntax UID {_show(ts)}")
    syntax = _transfer_syntax(ts)
    if syntax is None:
        raise InvalidDicom(f"unsupported Transfer Syntax UID {_show(ts)} (not a standard one)")
    little, encapsulated = syntax
    enc = _Encoding.of(implicit=ts == _IMPLICIT_VR_LE, little=little)
    src: _FileSource | _InflateSource
    src = (_InflateSource(f, meta.end, size) if ts in _DEFLATED_SYNTAXES
           else _FileSource(f, meta.end, size))
    return _Opened(meta, ts, encapsulated, enc, src)


def _inspect(f: BinaryIO, size: int) -> InstanceInfo:
    opened = _open_data_set(f, size)
    meta, ts, enc, src = opened.meta, opened.ts, opened.enc, opened.src
    meta_class_raw = meta.values.get(_META_SOP_CLASS)
    if meta_class_raw is not None and _uid_text(meta_class_raw) == _MEDIA_STORAGE_DIRECTORY:
        raise InvalidDicom(
            "a DICOMDIR (Media Storage Directory) is not an instance: import the files it "
            "references instead"
        )

    top = _walk_top_level(src, enc, opened.encapsulated)
    if isinstance(src, _InflateSource):
        src.finish()
    if top.element_count == 0:
        raise InvalidDicom("truncated: no data set after the file meta information")

    sop_class_text = top.values.get(_SOP_CLASS)
    _check_pixels(top, enc, _uid_text(sop_class_text) if sop_class_text is not None else None)

    sop_class = _required_uid(top, _SOP_CLASS, "SOP Class UID")
    sop_instance = _required_uid(top, _SOP_INSTANCE, "SOP Instance UID")
    study = _required_uid(top, _STUDY_UID, "Study Instance UID")
    series = _required_uid(top, _SERIES_UID, "Series Instance UID")

    meta_class = _uid_text(meta_class_raw) if meta_class_raw is not None else ""
    if not meta_class:
        raise InvalidIdentity("file meta lacks Media Storage SOP Class UID (0002,0002)")
    if meta_class != sop_class:
        raise InvalidIdentity(
            f"SOP Class UID {sop_class} does not match Media Storage SOP Class UID "
            f"{_show(meta_class)} in the file meta"
        )
    meta_inst_raw = meta.values.get(_META_SOP_INSTANCE)
    meta_inst = _uid_text(meta_inst_raw) if meta_inst_raw is not None else ""
    if not meta_inst:
        raise InvalidIdentity("file meta lacks Media Storage SOP Instance UID (0002,0003)")
    if meta_inst != sop_instance:
        raise InvalidIdentity(
            f"SOP Instance UID {sop_instance} does not match Media Storage SOP Instance UID "
            f"{_show(meta_inst)} in the file meta"
        )

    modality = (_text_value(top, _MODALITY, "Modality") or "").strip("\x00 ")
    return InstanceInfo(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        series_instance_uid=series,
        study_instance_uid=study,
        patient_id=_patient_id(top),
        modality=modality,
        study_date=_study_date(top),
        transfer_syntax_uid=ts,
    )


def read_plain_text(path: str | os.PathLike[str], wanted: Mapping[int, bytes]
                    ) -> dict[int, str] | None:
    """The values of the top-level text elements ``wanted`` (tag -> its VR) of a stored
    Part-10 file as pydicom decodes them, when that needs no character set handling:
    every value plain ASCII (no escape sequences), one value each (no backslash; Specific
    Character Set excepted), written with the expected VR, integer strings for ``IS``, and
    a Specific Character Set that reads ASCII as ASCII. Absent elements are ``""``. None
    when any of that does not hold (the caller then asks pydicom); raises InvalidDicom for
    a file :func:`inspect_file` would refuse. About 5x cheaper than pydicom's reader: the
    same streaming walk as :func:`inspect_file`, values read only for ``wanted``."""
    with open(path, "rb") as f:
        opened = _open_data_set(f, os.fstat(f.fileno()).st_size)
        top = _walk_top_level(opened.src, opened.enc, opened.encapsulated,
                              collect=frozenset(wanted))
    if top.too_long:
        return None
    charset = top.values.get(_SPECIFIC_CHARSET, b"")
    if not charset.isascii():
        return None
    terms = [t.strip("\x00 ") for t in charset.decode("ascii").split("\\")]
    if not _ASCII_CHARSETS.issuperset(t for t in terms if t):
        return None
    out: dict[int, str] = {}
    for tag, vr in wanted.items():
        raw = top.values.get(tag, b"")
        written = top.vrs.get(tag)
        if not raw.isascii() or _ESC in raw or (written is not None and written != vr):
            return None
        if tag != _SPECIFIC_CHARSET and b"\\" in raw:
            return None
        text = raw.decode("ascii").strip("\x00 ")
        if vr == b"IS" and text and not re.fullmatch(r"[+-]?[0-9]+", text):
            return None
        out[tag] = text
    return out


# --------------------------------------------------------------------------------------------
# The data set of a Part-10 file


def dataset_offset(head: bytes) -> int:
    """Offset of the data set in a Part-10 file, from its first bytes (group 0002 is
    explicit VR little endian; ``head`` must cover the file meta)."""
    if head[128:132] != b"DICM":
        raise ValueError("not a Part-10 file")
    pos = 132
    while pos + 8 <= len(head):
        group = struct.unpack_from("<H", head, pos)[0]
        if group != 0x0002:
            return pos
        vr = head[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL",
                  b"OV"):
            pos += 12 + struct.unpack_from("<I", head, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", head, pos + 6)[0]
    raise ValueError("file meta longer than expected")


_HEAD = 65536
_COMPARE_BLOCK = 1 << 20


def same_dataset(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two Part-10 files hold the same data set bytes, whatever their file meta
    (the SCP writes its own; an imported file keeps the sender's). False when either
    cannot be read as a Part-10 file."""
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            off_a = dataset_offset(fa.read(_HEAD))
            off_b = dataset_offset(fb.read(_HEAD))
            if os.fstat(fa.fileno()).st_size - off_a != os.fstat(fb.fileno()).st_size - off_b:
                return False
            fa.seek(off_a)
            fb.seek(off_b)
            while True:
                block = fa.read(_COMPARE_BLOCK)
                if block != fb.read(_COMPARE_BLOCK):
                    return False
                if not block:
                    return True
    except (OSError, ValueError, struct.error):
        return False
