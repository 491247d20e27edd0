"""syncnode: a peer-to-peer sync engine for DICOM studies.

Every node keeps the same studies, intact, with no central server. The vocabulary:

- **blob**: the exact bytes of one DICOM Part-10 file, named by its BLAKE3-256 hash.
- **chunk**: a 1 MiB slice of a blob; each blob has the list of its chunk hashes so a
  receiver can verify a transfer piece by piece.
- **event**: an immutable catalog record named by the BLAKE3 hash of its canonical
  encoding: ``put`` (a blob entered the catalog as an instance) or ``delete`` (a
  tombstone naming the put events it removes). Events form a grow-only set.
- **catalog**: the SQLite database holding events and what is derived from them: the
  live instances, the Merkle index, peers, the outbox.
- **Merkle index**: a fixed-shape 16-ary tree over event ids that lets two nodes find
  their differences in about k·log(N) digests.
- **node id**: the SHA-256 of a node's TLS certificate, formatted for humans.
"""

__version__ = "0.1.0"
