"""syncnode: a peer-to-peer sync engine for DICOM studies.

Every node keeps the same studies, intact, with no central server. The vocabulary:

- **blob**: the exact bytes of one DICOM Part-10 file, named by its BLAKE3-256 hash.
- **chunk**: a 1 MiB slice of a blob; each blob has the list of its chunk hashes so a
  receiver can verify a transfer piece by piece.
- **event**: an immutable catalog record named by the BLAKE3 hash of its canonical
  encoding: ``put`` (a blob entered the catalog as an instance) or ``delete`` (a
  tombstone naming the put events it removes). Events form a grow-only set.
- **origin**: the node that made an event; it signs the event with its key, and its node
  id is the SHA-256 of the certificate that verifies the signature.
- **delete authority**: who may remove whose puts (the put's origin, nodes listed in
  ``may_delete``); a node enforces it on the deletes it receives.
- **catalog**: the SQLite database holding events and what is derived from them: the
  live instances, the Merkle index, peers, the outbox.
- **Merkle index**: a fixed-shape 16-ary tree over event ids that lets two nodes find
  their differences in about k·log(N) digests.
- **node id**: the SHA-256 of a node's TLS certificate, formatted for humans.
"""

import os as _os

__version__ = "0.2.0"

# syncnode does no linear algebra: numpy arrives only with pydicom. Left alone, its
# OpenBLAS starts a thread per CPU at import, and those threads spin for a while (about
# 0.1 s of CPU per import, and around 1% of a receiving node's CPU during a sync here).
# An operator's own setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
