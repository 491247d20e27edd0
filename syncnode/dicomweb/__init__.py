"""DICOMweb (PS3.18) on the admin API's listener, under ``/dicom-web/``.

Vocabulary: QIDO-RS searches (:mod:`.qido`), WADO-RS retrieves (:mod:`.wado`: stored bytes,
metadata, frames, rendered images), STOW-RS stores (:mod:`.stow`); :mod:`.multipart`
writes and reads ``multipart/related`` bodies, :mod:`.json` renders DICOM JSON, and
:mod:`.routes` is the aiohttp adapter that the admin API mounts.

Invariants: one matching engine serves C-FIND and QIDO-RS
(:func:`syncnode.dicom.query.match`); stored bytes leave unchanged and verified against
their hashes; STOW goes through the same inspection and commit as ``import``; nothing is
lossy-transcoded; no patient data in logs or audit entries (UIDs and hashes only).
"""
