"""The record of blobs known to be good: which stored files were hashed and found intact,
and what their file looked like at that moment.

A blob is *known good* when its bytes were hashed against its name or chunk list — when
it was installed (hashed while written), by a verify or scrub, or by a whole verified
read — and its file's stat is still the one taken then: the same device, inode, size,
modification time and change time (``st_ctime_ns``, which no program can set back: a
write, ``chmod``, ``link`` or ``utime`` on the file all move it). A known-good blob is
served to DICOMweb clients, C-GET/C-MOVE requesters and export PACSs without hashing
every byte again; anything else is read verified, which records it (a damaged blob is
never sent).

What this does and does not catch, stated plainly:

- Any change made through the file system (a write in place, a truncation, a replaced
  file, a restored ``mtime``) changes the stat: the blob is verified again before it is
  served.
- Silent corruption under the file system (bit rot, a failing disk or controller) keeps
  the stat: such a blob is served unverified until the next background verify (scrub)
  finds it and drops it from the record. The scrub interval bounds that window; Orthanc
  and dcm4chee never re-hash what they serve at all. Peers still verify every chunk they
  receive (their damage report makes this node re-hash the blob: dropped if damaged).
  A link added or removed
  (the DICOM journal's keep links) also moves the change time: the next read verifies
  once.

Bounded (least recently used forgotten first) and thread-safe: reads run in worker
threads. In memory only: a restart starts empty, and the first read of each blob hashes
it again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

KNOWN_GOOD_MAX = 100_000  # blobs remembered (~290 bytes each: ~30 MB when full)

Fingerprint = tuple[int, int, int, int, int]


def fingerprint(st: os.stat_result) -> Fingerprint:
    """What must not have changed since a blob was hashed."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class KnownGood:
    """blob hash -> the :func:`fingerprint` of its file when it was last found intact."""

    def __init__(self, limit: int = KNOWN_GOOD_MAX) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, Fingerprint] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, blob_hash: str, st: os.stat_result) -> None:
        """``blob_hash``'s file, with this stat (taken before its bytes were read), was just
        hashed and found intact."""
        with self._lock:
            self._seen[blob_hash] = fingerprint(st)
            self._seen.move_to_end(blob_hash)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)

    def matches(self, blob_hash: str, st: os.stat_result) -> bool:
        """Is the file with this stat the one recorded as intact?"""
        fp = fingerprint(st)
        with self._lock:
            if self._seen.get(blob_hash) != fp:
                return False
            self._seen.move_to_end(blob_hash)
            return True

    def forget(self, blob_hash: str) -> None:
        """The blob was found damaged, or removed: verify it before serving it again."""
        with self._lock:
            self._seen.pop(blob_hash, None)

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, blob_hash: object) -> bool:
        return blob_hash in self._seen
