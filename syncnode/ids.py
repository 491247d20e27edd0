"""Hashes and DICOM UIDs: parsing and validation (pure).

Anything that becomes a file name, an SQL parameter or a log field passes through here
first. A blob or event hash is exactly 64 lowercase hex characters (BLAKE3-256); a DICOM
UID is 1-64 characters of digits and dots with no empty component and no leading zero
in a component (except the component "0").
"""

from __future__ import annotations

import re
from typing import TypeGuard

import blake3

HASH_HEX_LEN = 64
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidHash(ValueError):
    """A string that is not a 64-character lowercase hex BLAKE3 hash."""


class InvalidUID(ValueError):
    """A string that is not a valid DICOM UID."""


def is_hash(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


def check_hash(value: object, what: str = "hash") -> str:
    """Return ``value`` if it is a well-formed hash, else raise InvalidHash."""
    if not is_hash(value):
        shown = repr(value)[:80]
        raise InvalidHash(f"invalid {what} {shown}: expected 64 lowercase hex characters")
    return value


def is_uid(value: object) -> TypeGuard[str]:
    return (
        isinstance(value, str)
        and 0 < len(value) <= 64
        and _UID_RE.fullmatch(value) is not None
    )


def check_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid DICOM UID, else raise InvalidUID."""
    if not is_uid(value):
        shown = repr(value)[:80]
        raise InvalidUID(f"invalid {what} {shown}: expected 1-64 digits and dots")
    return value


def blake3_hex(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()
