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

This module only reads (pure apart from reading the note's bytes): it never deletes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
