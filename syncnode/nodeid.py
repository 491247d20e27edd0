"""Node ids: the human-facing name of a node's TLS certificate.

Vocabulary
----------
digest
    The 32-byte SHA-256 of a certificate's DER encoding (exactly the bytes sent in the TLS
    handshake).  This is the node's identity; everything else is formatting.
compact form
    56 characters: the digest in base32 (RFC 4648 alphabet ``A-Z2-7``, no padding, 52
    characters), split into 4 blocks of 13, each followed by one Luhn mod-32 check
    character.  Used in events, log fields and file names (``trust/<compact>.pem``).
display form
    The compact form in 8 groups of 7 separated by dashes, e.g.
    ``P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2``.  This is ``str()``.
short form
    The first group of 7 characters; for humans only, never for trust decisions.

The format, including the check-character algorithm, is the one Syncthing uses for device ids,
so ids are recognisable to administrators and the published Syncthing examples are valid here.

Invariants
----------
* ``NodeId.parse(str(n)) == n`` and ``NodeId.parse(n.compact) == n`` for every id.
* Parsing is forgiving about presentation only: case, dashes, whitespace, ``=`` padding, the
  look-alikes ``0→O``, ``1→I``, ``8→B``, and the legacy 52-character form without check
  characters.  It is strict about content: a wrong check character, a bad character, a wrong
  length or non-canonical trailing bits raise :class:`InvalidNodeId` and never yield an id.
* Equality and hashing are on the digest only.

This module is pure (standard library only, no I/O).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Final

_PEM_CERT_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL)

__all__ = ["InvalidNodeId", "NodeId"]

_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_INDEX: Final = {c: i for i, c in enumerate(_ALPHABET)}
_DIGEST_LEN: Final = 32
_B32_LEN: Final = 52  # ceil(256 / 5)
_BLOCK: Final = 13  # base32 characters per check character
_COMPACT_LEN: Final = 56  # 52 + 4 check characters
_GROUP: Final = 7
_LOOKALIKES: Final = str.maketrans({"0": "O", "1": "I", "8": "B"})
_IGNORED: Final = str.maketrans("", "", "-= \t\r\n")


class InvalidNodeId(ValueError):
    """A string is not a valid node id (typo, truncation, wrong check character...)."""


def _luhn32(block: str) -> str:
    """Check character for ``block`` (characters of ``_ALPHABET``).

    This is Syncthing's variant of Luhn mod N: factors alternate 1, 2, 1, ... starting with the
    first character, and each addend is folded as ``addend // 32 + addend % 32``.
    """
    factor = 1
    total = 0
    for ch in block:
        addend = factor * _INDEX[ch]
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _ALPHABET[(32 - total % 32) % 32]


def _add_check_chars(b32: str) -> str:
    blocks = [b32[i : i + _BLOCK] for i in range(0, _B32_LEN, _BLOCK)]
    return "".join(block + _luhn32(block) for block in blocks)


class NodeId:
    """Identity of a node: SHA-256 of its certificate's DER.  Immutable and hashable."""

    __slots__ = ("_compact", "_digest")
    _digest: bytes
    _compact: str

    def __init__(self, digest: bytes) -> None:
        if not isinstance(digest, (bytes, bytearray, memoryview)):
            raise TypeError(f"NodeId needs the 32-byte digest, got {type(digest).__name__}")
        raw = bytes(digest)
        if len(raw) != _DIGEST_LEN:
            raise ValueError(f"NodeId digest must be {_DIGEST_LEN} bytes, got {len(raw)}")
        object.__setattr__(self, "_digest", raw)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("NodeId is immutable")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_certificate_der(cls, der: bytes) -> NodeId:
        """The node id of a certificate given as DER bytes (as on the wire)."""
        if not der:
            raise ValueError("empty certificate: cannot derive a node id")
        return cls(hashlib.sha256(der).digest())

    @classmethod
    def from_certificate_pem(cls, pem: bytes) -> NodeId | None:
        """The node id of the first PEM certificate in ``pem``, or None if there is none
        that decodes. Needs no X.509 library: the id is the SHA-256 of the DER bytes."""
        match = _PEM_CERT_RE.search(pem)
        if match is None:
            return None
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except binascii.Error:
            return None
        return cls.from_certificate_der(der) if der else None

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse a node id typed or pasted by a human (see the module docstring for rules)."""
        if not isinstance(text, str):
            raise TypeError(f"node id must be a str, got {type(text).__name__}")
        cleaned = text.translate(_IGNORED).upper().translate(_LOOKALIKES)
        shown = text.strip()
        if len(shown) > 80:
            shown = shown[:77] + "..."
        bad = sorted({c for c in cleaned if c not in _INDEX})
        if bad:
            raise InvalidNodeId(
                f"{shown!r} is not a node id: character(s) {''.join(bad)!r} not allowed "
                f"(node ids use A-Z and 2-7, grouped with dashes)"
            )
        if len(cleaned) == _COMPACT_LEN:
            b32 = ""
            for i in range(4):
                chunk = cleaned[i * (_BLOCK + 1) : (i + 1) * (_BLOCK + 1)]
                block, check = chunk[:_BLOCK], chunk[_BLOCK]
                if _luhn32(block) != check:
                    raise InvalidNodeId(
                        f"{shown!r} is not a valid node id: check character {i + 1} of 4 "
                        f"(character #{(i + 1) * (_BLOCK + 1)}, dashes not counted) does not "
                        f"match; "
                        f"the id was probably mistyped - copy it again from the peer"
                    )
                b32 += block
        elif len(cleaned) == _B32_LEN:
            b32 = cleaned
        else:
            raise InvalidNodeId(
                f"{shown!r} is not a node id: it has {len(cleaned)} characters once dashes and "
                f"spaces are removed; expected {_COMPACT_LEN} (or {_B32_LEN} without check "
                f"characters) - is it truncated?"
            )
        try:
            digest = base64.b32decode(b32 + "====")
        except binascii.Error as exc:  # unreachable after the alphabet check; kept explicit
            raise InvalidNodeId(f"{shown!r} is not a node id: {exc}") from exc
        node_id = cls(digest)
        if node_id._b32() != b32:
            # 52 characters carry 260 bits; the last 4 must be zero.
            raise InvalidNodeId(
                f"{shown!r} is not a valid node id: its last base32 character must be 'A' or "
                f"'Q'; the id was probably mistyped"
            )
        return node_id

    # -- presentation -------------------------------------------------------------------------

    def _b32(self) -> str:
        return base64.b32encode(self._digest).decode("ascii").rstrip("=")

    @property
    def digest(self) -> bytes:
        """The raw 32-byte SHA-256 digest."""
        return self._digest

    @property
    def compact(self) -> str:
        """56 characters with check characters and no dashes (events, file names).
        Computed once (it keys per-peer counters on every received piece)."""
        try:
            return self._compact
        except AttributeError:
            object.__setattr__(self, "_compact", _add_check_chars(self._b32()))
            return self._compact

    @property
    def short(self) -> str:
        """The first group of 7 characters (display only; not unique enough for trust)."""
        return self.compact[:_GROUP]

    def __str__(self) -> str:
        c = self.compact
        return "-".join(c[i : i + _GROUP] for i in range(0, _COMPACT_LEN, _GROUP))

    def __repr__(self) -> str:
        return f"NodeId({str(self)!r})"

    # -- comparison ---------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NodeId):
            return self._digest == other._digest
        return NotImplemented

    def __lt__(self, other: object) -> bool:
        if isinstance(other, NodeId):
            return self._digest < other._digest
        return NotImplemented

    def __hash__(self) -> int:
        return hash((NodeId, self._digest))

    def __reduce__(self) -> tuple[type[NodeId], tuple[bytes]]:
        return (NodeId, (self._digest,))
