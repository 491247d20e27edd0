"""The peer protocol: endpoints, message shapes and their validation (pure).

All endpoints live under ``/peer/v1`` on the peer port, over mutual TLS 1.3. JSON in and
out, except blob bytes. Errors are ``{"error": reason}`` with a 4xx/5xx status.

=======  ==================================  ===========================================
method   path                                answer
=======  ==================================  ===========================================
GET      /peer/v1/hello                      ``{node_id, version, root, count}``
GET      /peer/v1/merkle?prefix=P            ``{prefix, digest, count, children?, ids?}``
POST     /peer/v1/events  ``{ids: [...]}``   ``{events: [{id, body}]}`` (bodies as text)
GET      /peer/v1/blobs/H/chunks             ``{size, chunks}`` (hex of the digests)
GET      /peer/v1/blobs/H   (Range)          the bytes, each chunk verified before sending
POST     /peer/v1/push/offer ``{blobs}``     ``{want: [{hash, offset}]}``
PUT      /peer/v1/push/blobs/H?offset=N      ``{offset}`` (bytes verified so far)
POST     /peer/v1/push/events ``{events}``   ``{applied, rejected}``
POST     /peer/v1/notify                     ``{ok}``: "my catalog changed, sync now"
POST     /peer/v1/introduce (a certificate)  ``204``; the only request served without a
                                             client certificate (:mod:`syncnode.introduction`)
=======  ==================================  ===========================================

``children`` (16 ``[digest, count]`` pairs) is present below the leaf level; ``ids`` is
present when the node holds at most ``INLINE_IDS`` events, so a diff stops descending as
soon as the lists are short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import merkle
from .ids import check_hash, is_hash

PREFIX = "/peer/v1"
VERSION = 1
INLINE_IDS = 256
MAX_IDS = 1000  # event ids per /events request
MAX_OFFER = 1000  # blobs per /push/offer
MAX_JSON_BODY = 4 << 20


class ProtocolError(Exception):
    """A peer answered something that breaks the protocol."""


@dataclass(frozen=True, slots=True)
class RemoteNode:
    prefix: str
    digest: bytes
    count: int
    children: list[merkle.NodeDigest] | None
    ids: list[str] | None


def merkle_response(prefix: str, node: merkle.NodeDigest,
                    children: list[merkle.NodeDigest] | None,
                    ids: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"prefix": prefix, "digest": node.digest.hex(), "count": node.count}
    if children is not None:
        out["children"] = [[c.digest.hex(), c.count] for c in children]
    if ids is not None:
        out["ids"] = ids
    return out


def _digest(value: Any) -> bytes:
    if not is_hash(value):
        raise ProtocolError(f"bad digest {str(value)[:80]!r}")
    return bytes.fromhex(value)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"bad count {str(value)[:80]!r}")
    return value


def parse_merkle(obj: Any, prefix: str) -> RemoteNode:
    if not isinstance(obj, dict) or obj.get("prefix") != prefix:
        raise ProtocolError(f"Merkle answer is not for prefix {prefix!r}")
    children = None
    if "children" in obj:
        raw = obj["children"]
        if not isinstance(raw, list) or len(raw) != merkle.FANOUT:
            raise ProtocolError("Merkle answer needs 16 children")
        children = []
        for c in raw:
            if not isinstance(c, list) or len(c) != 2:
                raise ProtocolError("a Merkle child is [digest, count]")
            children.append(merkle.NodeDigest(_digest(c[0]), _count(c[1])))
    ids = None
    if "ids" in obj:
        raw_ids = obj["ids"]
        if not isinstance(raw_ids, list) or len(raw_ids) > max(INLINE_IDS, 100_000):
            raise ProtocolError("bad id list")
        ids = [check_hash(i, "event id") for i in raw_ids]
    node = RemoteNode(prefix, _digest(obj.get("digest")), _count(obj.get("count")), children, ids)
    if ids is not None and len(ids) != node.count:
        raise ProtocolError(f"Merkle answer lists {len(ids)} ids but counts {node.count}")
    if children is None and ids is None:
        raise ProtocolError("Merkle answer has neither children nor ids")
    return node


def check_hash_value(value: Any) -> str:
    try:
        return check_hash(value, "blob hash")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


class RangeError(ValueError):
    """A Range header this server cannot satisfy (HTTP 416) for a blob of ``size`` bytes."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def parse_range(header: str | None, size: int) -> tuple[int, int]:
    """``bytes=a-b`` / ``bytes=a-`` -> [start, end) within a blob of ``size`` bytes.
    Raises RangeError."""
    if not header:
        return 0, size
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise RangeError("only a single 'bytes=' range is supported", size)
    first, _, last = spec.strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        raise RangeError(f"bad range {header!r}", size)
    start = int(first)
    end = int(last) + 1 if last else size
    if (start >= size and size > 0) or start > end or end > size:
        raise RangeError(f"range {header!r} is outside a blob of {size} bytes", size)
    return start, end
