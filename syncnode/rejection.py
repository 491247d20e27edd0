"""IOCM rejection notes (IHE Imaging Object Change Management; DICOM PS3.16 CID 7011).

A rejection note is a Key Object Selection Document (SOP Class 1.2.840.10008.5.1.4.1.1.88.59)
whose Concept Name is one of the codes below (scheme ``DCM``); the instances it rejects are
listed in its Current Requested Procedure Evidence Sequence (study -> series -> SOP). The
node stores the note like any instance (it syncs to peers and is exported) and turns it
into deletes of the instances it names, through the node's one delete path (tombstones
signed by this node; a peer applies them under its own delete authority policy).

A rejected instance that arrives again (C-STORE or ``import``) is refused when the reason
says the instance must not come back (:data:`REFUSE_AGAIN`: quality, patient safety,
wrong worklist entry) and accepted again for an expired retention period (113039), as
IOCM specifies. The node remembers rejections in the catalog's ``rejected`` table.

The other direction: when instances this node exported to a PACS are deleted here, the
exporter tells that PACS with a rejection note of its own, made by :func:`make_note` from
what the catalog still knows of them. Such a note is deterministic: the same inputs give
the same bytes, and its SOP Instance UID is derived from the deletes it reports
(:func:`note_uid`), so a note sent again after a crash is a duplicate to the PACS, never
a second object. A note references at most :data:`NOTE_REFERENCES` instances, all of one
study.

This module only reads and makes bytes (pure apart from reading a note's file): it never
deletes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import blake3

from .ids import is_uid

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
REASONS = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
REFUSE_AGAIN = frozenset({"113001", "113037", "113038"})
MAX_REFERENCES = 100_000
# a peer's Key Object Selection larger than this is not read as a note (about 40 times a
# note of MAX_REFERENCES references): parsing must not cost a peer unbounded memory
MAX_NOTE_BYTES = 256 << 20
# ``rm --reason NAME`` (and the admin API's ``reason``): the names of the codes
REASON_NAMES = {"quality": "113001", "safety": "113037", "worklist": "113038",
                "retention": "113039"}
DEFAULT_REASON = "quality"
NOTE_REFERENCES = 1000  # instances one note made here references at most
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


class InvalidRejectionNote(ValueError):
    """A Key Object Selection with a rejection code that cannot be applied (no evidence,
    a malformed UID); the message says what, with UIDs only."""


@dataclass(frozen=True)
class RejectionNote:
    """A rejection note: its own SOP Instance UID, the code, the rejected instances."""

    sop_instance_uid: str
    code: str
    rejected: tuple[str, ...]

    @property
    def reason(self) -> str:
        return REASONS[self.code]


def rejection_code(ds: object) -> str | None:
    """The rejection code of a data set's Concept Name, if it is one of CID 7011."""
    seq = getattr(ds, "ConceptNameCodeSequence", None) or []
    if len(seq) != 1:
        return None
    item = seq[0]
    value = str(getattr(item, "CodeValue", "") or "").strip()
    scheme = str(getattr(item, "CodingSchemeDesignator", "") or "").strip()
    return value if scheme == "DCM" and value in REASONS else None


def read_note(path: Path) -> RejectionNote | None:
    """The rejection note in a stored Part-10 file, or None if it is not one (any other
    instance, or a Key Object Selection with another title). Raises
    :class:`InvalidRejectionNote` for a rejection note that names nothing usable."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if str(ds.get("SOPClassUID", "")) != KEY_OBJECT_SELECTION:
        return None
    code = rejection_code(ds)
    if code is None:
        return None
    rejected: list[str] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", None) or []:
        for series in study.get("ReferencedSeriesSequence", None) or []:
            for ref in series.get("ReferencedSOPSequence", None) or []:
                uid = str(ref.get("ReferencedSOPInstanceUID", "") or "").strip().rstrip("\0")
                if not is_uid(uid):
                    raise InvalidRejectionNote("a referenced SOP Instance UID is not valid")
                rejected.append(uid)
    if not rejected:
        raise InvalidRejectionNote("the rejection note references no instance")
    if len(rejected) > MAX_REFERENCES:
        raise InvalidRejectionNote(f"the rejection note references {len(rejected)} "
                                   f"instances (at most {MAX_REFERENCES})")
    own = str(ds.get("SOPInstanceUID", "") or "").strip()
    return RejectionNote(own, code, tuple(dict.fromkeys(rejected)))


def reason_code(reason: str) -> str:
    """The CID 7011 code of a reason given by name (``quality``, ``safety``, ``worklist``,
    ``retention``) or as the code itself. Raises ValueError naming the choices."""
    key = reason.strip().lower()
    if key in REASON_NAMES:
        return REASON_NAMES[key]
    if key in REASONS:
        return key
    raise ValueError(f"unknown rejection reason {reason!r}: one of "
                     f"{', '.join(REASON_NAMES)} (or a code: {', '.join(REASONS)})")


@dataclass(frozen=True, slots=True)
class Rejected:
    """One instance a note made here rejects: its UIDs as the catalog knows them."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True, slots=True)
class NoteSubject:
    """The patient and study the rejected instances belong to, copied into the note (the
    catalog's values: the put events', and those read from the blobs while they were
    held; ``""`` for what it never knew). Text is Unicode."""

    study_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    referring_physician_name: str = ""


def note_uid(key: bytes, what: str = "note") -> str:
    """A UID (``2.25.<128-bit integer>``) derived from ``key``: the same key, the same UID."""
    digest = blake3.blake3(f"syncnode rejection {what}\0".encode() + key).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def make_note(key: bytes, code: str, subject: NoteSubject, rejected: Sequence[Rejected],
              made: datetime, *, manufacturer: str = "syncnode") -> bytes:
    """A Key Object Selection rejection note (IHE IOCM), as a Part-10 file in Explicit VR
    Little Endian: title ``code`` (scheme DCM), the rejected instances in the Current
    Requested Procedure Evidence Sequence (one study, grouped by series) and as
    composite references in the content (TID 2010), patient and study attributes from
    ``subject``. Deterministic: the same arguments give the same bytes; the note's SOP
    Instance UID and Series Instance UID are derived from ``key``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import UID

    if code not in REASONS:
        raise ValueError(f"{code!r} is not a rejection code of CID 7011")
    if not rejected or len(rejected) > NOTE_REFERENCES:
        raise ValueError(f"a note references 1 to {NOTE_REFERENCES} instances, "
                         f"not {len(rejected)}")
    uid = note_uid(key)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(KEY_OBJECT_SELECTION)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LE)
    ds = Dataset()
    ds.file_meta = meta
    texts = [subject.patient_name, subject.referring_physician_name, subject.study_id,
             subject.accession_number, subject.patient_id]
    if any(not t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = uid
    day = made.astimezone(UTC)
    ds.StudyDate = subject.study_date
    ds.ContentDate = day.strftime("%Y%m%d")
    ds.StudyTime = subject.study_time
    ds.ContentTime = day.strftime("%H%M%S")
    ds.AccessionNumber = subject.accession_number
    ds.Modality = "KO"
    ds.Manufacturer = manufacturer
    ds.ReferringPhysicianName = subject.referring_physician_name
    ds.ReferencedPerformedProcedureStepSequence = Seq([])
    ds.PatientName = subject.patient_name
    ds.PatientID = subject.patient_id
    ds.PatientBirthDate = subject.patient_birth_date
    ds.PatientSex = subject.patient_sex
    ds.StudyInstanceUID = subject.study_instance_uid
    ds.SeriesInstanceUID = note_uid(key, "series")
    ds.StudyID = subject.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue = code
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = REASONS[code]
    ds.ConceptNameCodeSequence = Seq([title])
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = Seq([template])
    ds.ContinuityOfContent = "SEPARATE"
    by_series: dict[str, list[Rejected]] = {}
    for r in rejected:
        by_series.setdefault(r.series_instance_uid, []).append(r)
    series_items = []
    for series_uid in sorted(by_series):
        refs = []
        for r in sorted(by_series[series_uid], key=lambda r: r.sop_instance_uid):
            ref = Dataset()
            ref.ReferencedSOPClassUID = r.sop_class_uid
            ref.ReferencedSOPInstanceUID = r.sop_instance_uid
            refs.append(ref)
        item = Dataset()
        item.ReferencedSOPSequence = Seq(refs)
        item.SeriesInstanceUID = series_uid
        series_items.append(item)
    evidence = Dataset()
    evidence.ReferencedSeriesSequence = Seq(series_items)
    evidence.StudyInstanceUID = subject.study_instance_uid
    ds.CurrentRequestedProcedureEvidenceSequence = Seq([evidence])
    content = []
    for r in sorted(rejected, key=lambda r: (r.series_instance_uid, r.sop_instance_uid)):
        ref = Dataset()
        ref.ReferencedSOPClassUID = r.sop_class_uid
        ref.ReferencedSOPInstanceUID = r.sop_instance_uid
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "COMPOSITE"
        item.ReferencedSOPSequence = Seq([ref])
        content.append(item)
    ds.ContentSequence = Seq(content)
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()
