"""Catalog events: canonical encoding, ids, the hybrid logical clock, the live-view rule (pure).

An event is an immutable fact named by the BLAKE3-256 hash of its canonical encoding:

- ``put``: a blob entered the catalog as one DICOM instance. It carries the blob hash,
  size, the BLAKE3 of the blob's chunk list (so a receiver can trust the chunk list it
  is sent), the instance's UIDs and a few indexed attributes.
- ``delete``: a tombstone naming the put events it removes.

Authenticity: every event made since format version 2 carries ``sig``, the ECDSA P-256
signature by its origin's key (the node whose certificate's SHA-256 is ``origin``, see
:mod:`syncnode.nodeid`) over :func:`signing_payload`: a fixed prefix and the canonical
encoding of every other field. ``sig`` is the 64-byte ``r || s`` in hex, with ``s`` in
its low half (``s <= n/2``), so a valid signature has exactly one encoding and a relay
cannot make a second id for the same signed content. The event id (the hash of the whole
body) covers the signature. Checking it needs the origin's public key and lives in
:mod:`syncnode.signing`; this module only fixes the format. Version 1 bodies (no ``sig``)
are the unsigned events of catalogs made before signing; they still decode, and the
catalog decides whether to take them (see :mod:`syncnode.authority`).

Canonical encoding: UTF-8 JSON, keys sorted, no insignificant whitespace, non-ASCII
escaped, integers only. Decoding re-encodes and refuses anything that is not already
canonical, so an event id is a function of the event's content alone.

Live-view rule (deterministic, independent of arrival order): a put is *removed* when
any delete event names it. For each SOP Instance UID, the live version is the put that
is not removed with the greatest ``(hlc, origin, id)``. A delete names only the puts its
node had seen, so a put made concurrently with (or after) a delete survives it: a re-put
after a delete wins. Older versions that are not removed stay in the catalog (and their
blobs are kept), so every version ever acknowledged can be recovered.

Hybrid logical clock (HLC): a 64-bit integer, wall-clock milliseconds in the high 48 bits,
a counter in the low 16. It never goes backwards and moves past every clock it observes.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar

import blake3

from .ids import InvalidHash, check_hash, check_uid, is_hash, is_uid

EVENT_VERSION = 2  # signed events; version 1 is the unsigned legacy form
LEGACY_VERSION = 1
SIGNING_PREFIX = b"syncnode event signature v2\n"  # domain separation for the node key
# Order of the P-256 group: a canonical signature has 0 < r < n and 0 < s <= n // 2.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SIG_HEX_LEN = 128
MAX_EVENT_BYTES = 64 * 1024
MAX_REMOVES = 10_000
REMOVES_PER_DELETE = 500  # a local delete naming more versions is split (stays < 64 KiB)
_ATTR_MAX = 64  # longest allowed patient id / modality / date / TS string
_BAD_CHARS = re.compile("[\x00-\x1f\ud800-\udfff]")  # control characters, lone surrogates
_DATE = re.compile("[0-9]{8}")


class InvalidEvent(ValueError):
    """An event body that is malformed, not canonical, or violates the schema."""


@dataclass(frozen=True, slots=True)
class PutEvent:
    origin: str
    hlc: int
    blob: str
    size: int
    chunks: str  # BLAKE3 of the concatenated chunk digests
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str = ""
    modality: str = ""
    study_date: str = ""
    transfer_syntax_uid: str = ""
    sig: str = ""  # hex r || s by the origin's key; "" only for legacy (version 1) events
    kind: Literal["put"] = field(default="put")


@dataclass(frozen=True, slots=True)
class DeleteEvent:
    origin: str
    hlc: int
    sop_instance_uid: str
    removes: tuple[str, ...]
    sig: str = ""
    kind: Literal["delete"] = field(default="delete")


Event = PutEvent | DeleteEvent
AnyEvent = TypeVar("AnyEvent", PutEvent, DeleteEvent)  # one kind, kept: e.g. sign(put) is a put


def _canonical(event: Event, *, with_sig: bool, version: int) -> bytes:
    obj: dict[str, Any] = {k: getattr(event, k) for k in event.__slots__}
    if not with_sig:
        del obj["sig"]
    if isinstance(event, DeleteEvent):
        obj["removes"] = sorted(set(event.removes))
    obj["v"] = version
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def encode(event: Event) -> bytes:
    """The canonical bytes of an event: version 2 with ``sig`` when it is signed, the
    legacy version 1 form (no ``sig``) when it is not."""
    if event.sig:
        return _canonical(event, with_sig=True, version=EVENT_VERSION)
    return _canonical(event, with_sig=False, version=LEGACY_VERSION)


def signing_payload(event: Event) -> bytes:
    """The bytes an origin signs: a fixed prefix, then the canonical version-2 encoding of
    every field but ``sig``."""
    return SIGNING_PREFIX + _canonical(event, with_sig=False, version=EVENT_VERSION)


def is_signed(event: Event) -> bool:
    return bool(event.sig)


def split_sig(sig: str) -> tuple[int, int]:
    """``(r, s)`` of a signature in the canonical form; raises InvalidEvent otherwise."""
    if (not isinstance(sig, str) or len(sig) != SIG_HEX_LEN
            or sig.strip("0123456789abcdef")):
        raise InvalidEvent(f"'sig' must be {SIG_HEX_LEN} lowercase hex characters")
    r, s = int(sig[:64], 16), int(sig[64:], 16)
    if not 0 < r < P256_ORDER or not 0 < s <= P256_ORDER // 2:
        raise InvalidEvent("'sig' is not a canonical (low-s) P-256 signature")
    return r, s


def join_sig(r: int, s: int) -> str:
    """The canonical hex form of a signature ``(r, s)`` (``s`` folded into its low half)."""
    if s > P256_ORDER // 2:
        s = P256_ORDER - s
    return f"{r:064x}{s:064x}"


def event_id(body: bytes) -> str:
    return blake3.blake3(body).hexdigest()


def _str(obj: dict[str, Any], key: str, *, max_len: int = _ATTR_MAX) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > max_len:
        raise InvalidEvent(f"field {key!r} must be a string of at most {max_len} characters")
    bad = _BAD_CHARS.search(value)
    if bad is not None:
        if ord(bad.group()) < 0x20:
            raise InvalidEvent(f"field {key!r} contains control characters")
        raise InvalidEvent(f"field {key!r} contains an unpaired surrogate")  # not UTF-8
    return value


def _optional(obj: dict[str, Any], key: str, valid: Callable[[str], bool], what: str) -> str:
    """A string field that is empty or passes ``valid`` (``what`` names the form)."""
    value = _str(obj, key)
    if value and not valid(value):
        raise InvalidEvent(f"field {key!r} must be empty or {what}")
    return value


def _is_date(text: str) -> bool:
    if not _DATE.fullmatch(text):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise InvalidEvent(f"field {key!r} must be a non-negative 63-bit integer")
    return value


def decode(body: bytes) -> Event:
    """Parse and validate an event body. Raises InvalidEvent for anything off-schema."""
    if len(body) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event of {len(body)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"event is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidEvent("event is not a JSON object")
    version = obj.get("v")
    if version not in (EVENT_VERSION, LEGACY_VERSION) or isinstance(version, bool):
        raise InvalidEvent(f"unsupported event version {obj.get('v')!r}")
    sig = ""
    if version == EVENT_VERSION:
        sig = obj.get("sig", "")
        split_sig(sig)
    kind = obj.get("kind")
    try:
        origin = _str(obj, "origin", max_len=80)
        if not origin:
            raise InvalidEvent("event has no origin")
        hlc = _int(obj, "hlc")
        event: Event
        if kind == "put":
            expected = set(PutEvent.__slots__) | {"v"}
            blob = obj.get("blob")
            chunks = obj.get("chunks")
            if not is_hash(blob) or not is_hash(chunks):
                raise InvalidEvent("put event needs 'blob' and 'chunks' hashes")
            event = PutEvent(
                origin=origin, hlc=hlc, blob=blob, size=_int(obj, "size"), chunks=chunks,
                sop_class_uid=check_uid(obj.get("sop_class_uid"), "SOP Class UID"),
                sop_instance_uid=check_uid(obj.get("sop_instance_uid"), "SOP Instance UID"),
                series_instance_uid=check_uid(obj.get("series_instance_uid"),
                                              "Series Instance UID"),
                study_instance_uid=check_uid(obj.get("study_instance_uid"),
                                             "Study Instance UID"),
                patient_id=_str(obj, "patient_id"), modality=_str(obj, "modality"),
                study_date=_optional(obj, "study_date", _is_date, "a date YYYYMMDD"),
                transfer_syntax_uid=_optional(obj, "transfer_syntax_uid", is_uid, "a UID"),
                sig=sig,
            )
        elif kind == "delete":
            expected = set(DeleteEvent.__slots__) | {"v"}
            removes = obj.get("removes")
            if (not isinstance(removes, list) or not removes or len(removes) > MAX_REMOVES
                    or not all(is_hash(r) for r in removes)):
                raise InvalidEvent("delete event needs 'removes': a list of event ids")
            event = DeleteEvent(
                origin=origin, hlc=hlc,
                sop_instance_uid=check_uid(obj.get("sop_instance_uid"), "SOP Instance UID"),
                removes=tuple(removes), sig=sig,
            )
        else:
            raise InvalidEvent(f"unknown event kind {kind!r}")
    except ValueError as exc:  # InvalidUID from check_uid
        if isinstance(exc, InvalidEvent):
            raise
        raise InvalidEvent(str(exc)) from exc
    if version == LEGACY_VERSION:
        expected.discard("sig")
    if set(obj) != expected:
        raise InvalidEvent(f"unexpected fields {sorted(set(obj) ^ expected)}")
    if encode(event) != body:
        raise InvalidEvent("event is not in canonical form")
    return event


def decode_checked(eid: str, body: bytes) -> Event:
    """Decode a body received under id ``eid``; the id must be the hash of the body."""
    check_hash(eid, "event id")
    actual = event_id(body)
    if actual != eid:
        raise InvalidEvent(f"event body hashes to {actual}, not {eid}")
    return decode(body)


class Checked(NamedTuple):
    """An event received under ``eid`` whose body hashes to it and decodes to ``event``.

    Made once, where events arrive (:func:`check_all`); every later step (pull planning,
    the put-truth check, the catalog's admission) reads ``event`` instead of decoding the
    body again."""

    eid: str
    body: bytes
    event: Event


def check_all(received: Iterable[tuple[str, bytes] | Checked]
              ) -> tuple[list[Checked], dict[str, str]]:
    """Check each (id, body) pair once: the good ones, in order, and id -> reason for the
    rest. Items already :class:`Checked` pass through unchanged."""
    good: list[Checked] = []
    bad: dict[str, str] = {}
    for item in received:
        if isinstance(item, Checked):
            good.append(item)
            continue
        eid, body = item
        try:
            good.append(Checked(eid, body, decode_checked(eid, body)))
        except (InvalidEvent, InvalidHash) as exc:
            bad[eid] = str(exc)
    return good, bad


def live_key(hlc: int, origin: str, eid: str) -> tuple[int, str, str]:
    """Order of precedence among versions of one instance: the greatest key is live."""
    return (hlc, origin, eid)


# -- hybrid logical clock -----------------------------------------------------------------
HLC_COUNTER_BITS = 16


def hlc_tick(last: int, now_ms: int | None = None) -> int:
    """The next local timestamp after ``last``."""
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    physical = now_ms << HLC_COUNTER_BITS
    return physical if physical > last else last + 1


# Our clock follows observed clocks up to 2**62 (wall time around the year 2200): a peer
# with a clock beyond that is broken, and following it could exhaust our 63-bit clock.
MAX_OBSERVED_HLC = 2**62


def hlc_now(now_ms: int | None = None) -> int:
    """The HLC value of a wall-clock instant (counter zero)."""
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    return now_ms << HLC_COUNTER_BITS


def hlc_limit(max_skew_ms: int, now_ms: int | None = None) -> int:
    """The greatest HLC a node accepts or adopts now: ``now + max_skew`` (any counter)."""
    return min(hlc_now(now_ms) + (max_skew_ms << HLC_COUNTER_BITS)
               + (1 << HLC_COUNTER_BITS) - 1, MAX_OBSERVED_HLC)


def hlc_observe(last: int, remote: int, limit: int = MAX_OBSERVED_HLC) -> int:
    """The clock after seeing a remote timestamp: never behind anything observed, never
    beyond ``limit`` (see :func:`hlc_limit`)."""
    return max(last, min(remote, limit, MAX_OBSERVED_HLC))
