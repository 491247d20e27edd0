"""The peer protocol: endpoints, message shapes and their validation (pure).

All endpoints live under ``/peer/v1`` on the peer port, over mutual TLS 1.3. JSON in and
out, except blob bytes. Errors are ``{"error": reason}`` with a 4xx/5xx status.

=======  ==================================  ===========================================
method   path                                answer
=======  ==================================  ===========================================
GET      /peer/v1/hello                      ``{node_id, version, root, count,
                                             successor?}`` (a renewed node's successor
                                             statement, :mod:`syncnode.tls.successor`)
POST     /peer/v1/hello ``{merkle}``         the same, plus ``events`` and ``certs``: events
                                             the asker lacks (below, "Hello with events")
GET      /peer/v1/merkle?prefix=P            ``{prefix, digest, count, children?, ids?}``
POST     /peer/v1/events  ``{ids: [...]}``   ``{events: [{id, body}], certs: [...]}``
GET      /peer/v1/blobs/H/chunks             ``{size, chunks}`` (hex of the digests)
GET      /peer/v1/blobs/H   (Range)          the bytes, each chunk verified before sending
POST     /peer/v1/blobs/pack ``{blobs}``     several small blobs in one framed answer (below)
POST     /peer/v1/blobs/H/damaged            ``202 {check}``: "what you sent me of H did not
                                             match its hash"; the sender re-hashes H itself
                                             (:mod:`syncnode.damage`); 429 past the budget
POST     /peer/v1/push/offer ``{blobs}``     ``{want: [{hash, offset}]}``
PUT      /peer/v1/push/blobs/H?offset=N      ``{offset}`` (bytes verified so far)
POST     /peer/v1/push/pack  (frames)        ``{installed, refused}``: several offered small
                                             blobs pushed in one request (below)
POST     /peer/v1/push/events ``{events, certs}``  ``{applied, rejected}``
POST     /peer/v1/notify                     ``{ok}``: "my catalog changed, sync now"
POST     /peer/v1/introduce (a certificate)  ``204``; the only request served without a
                                             client certificate (:mod:`syncnode.introduction`);
                                             may carry a successor statement
=======  ==================================  ===========================================

``certs`` (base64 DER) are the certificates of the origins of the events sent, so that
the receiver can verify their signatures without knowing those origins beforehand (each
certificate proves the origin id it hashes to; see :mod:`syncnode.signing`).

**Packs.** Most instances (a CT or MR slice) are smaller than one chunk, and one request
per blob makes round trips, not bytes, set the pace of a WAN link. ``POST
/peer/v1/blobs/pack`` with ``{"blobs": [{"hash": H, "zstd": bool}, ...]}`` (at most
``PACK_MAX_BLOBS`` blobs, no hash twice) answers ``application/x-syncnode-pack``: for each
requested blob, in the order asked, one frame: a fixed ``PACK_HEADER_SIZE``-byte header
(the blob's 32-byte hash, a status byte, the blob's size as 8 bytes and the payload's
length as 4 bytes, big-endian) then the payload. Status ``RAW``: the payload is the blob's
bytes; ``ZSTD``: one zstd frame declaring the blob's size (only where asked, and only when
it came out smaller); ``ABSENT`` (not held), ``DAMAGED`` (fails its check here) and
``NOT_PACKED`` (larger than a chunk, or beyond ``PACK_MAX_BYTES`` in all) carry no payload:
the puller fetches those blobs one by one as before. Nothing follows the last frame. A
pack holds only blobs of at most one chunk, so a payload is bounded (:func:`pack_payload_limit`)
before it is read; the puller verifies each blob against its hash on its own, keeps every
blob that verified when the answer breaks off, refuses a blob that does not verify alone
(it is fetched singly), and refuses the rest of an answer that breaks the framing (an
unexpected hash, a payload over its bound, an unknown status, bytes after the last frame).
:class:`PackReader` is that decoder, sans-IO. ``hello`` lists ``"pack"`` in ``features``:
a puller sends packs only to peers that do.

**Pushed packs.** The push direction has the same shape: after ``/push/offer``, a pusher
sends the small blobs the peer wants from offset 0 as one ``POST /peer/v1/push/pack`` whose
body is pack frames (status ``RAW`` or ``ZSTD`` only; at most ``PACK_MAX_BLOBS`` blobs of
at most one chunk and ``PACK_MAX_BYTES`` in all, each offered before and sent once). The
receiver checks each header before reading its payload (:func:`parse_push_frame_header`),
verifies each blob against its hash on its own, installs those that verified (durably,
before it answers) and answers ``{"installed": [...], "refused": {hash: reason}}``: a blob
that does not verify is refused alone. A body that breaks the framing (an unknown status,
a blob not offered or sent twice, a payload over its bound, a cap exceeded) is refused
with 400; blobs before it are installed still. ``hello`` lists ``"push-pack"``.

``children`` (16 ``[digest, count]`` pairs) is present below the leaf level; ``ids`` is
present when the node holds at most ``INLINE_IDS`` events, so a diff stops descending as
soon as the lists are short. ``hello`` also carries the root's Merkle answer
(``merkle``), so a round that finds the roots differ starts its walk without asking for
the root again.

**Hello with events.** A round that finds the roots differ would spend a round trip on
``POST /events`` before its first pull. ``POST /peer/v1/hello`` with ``{"merkle": A}``,
``A`` the asker's own root Merkle answer (as :func:`read_merkle` builds it), answers the
hello and, when the roots differ, ``events`` and ``certs`` as ``/events`` would: the
events under the root's children where the asker holds nothing, or, when the asker lists
its ids (it holds at most ``INLINE_IDS``), every event it does not list
(:func:`lacking_ids`). At most ``MAX_HELLO_EVENTS`` events, and ``HELLO_EVENT_BYTES`` of
event bodies and certificates together (:func:`parse_hello_events` checks both on the
asker's side). The asker checks each body against its id and its signature as for
``/events``, refuses the whole answer if one does not verify (nothing applied), and then
walks the tree as before, leaving out what arrived. ``hello`` lists ``"hello-events"``; a
peer without it answers the POST with 405 and the asker says hello with GET from then on.

**The first pack with hello.** Even then the first blob byte waits for a pull asked after
hello's answer: a round trip with the link idle. A hello body may also carry ``"pack":
{"bytes": N, "zstd": Z}`` (``Z``: ``"none"``, ``"native"`` for the uncompressed transfer
syntaxes, ``"all"``); a peer that lists ``"hello-pack"`` then answers
``application/x-syncnode-hello``: the JSON answer's length as 4 bytes (big-endian), the
JSON answer, whose ``pack`` lists ``[hash, size]`` of some blobs of its put events (each
of at most one chunk, at most ``PACK_MAX_BLOBS`` and ``min(N, HELLO_PACK_BYTES)`` bytes in
all, no hash twice), then exactly one pack frame for each of them, in that order, as a
``/blobs/pack`` answer has (:class:`PackReader`). The asker checks the list against the
events (:func:`parse_hello_pack`) before it reads a frame, and each blob against its hash.

This module is sans-IO (in h11's manner): the Merkle answer a node gives
(:func:`read_merkle`), the decision of one step of the diff walk (:class:`DiffWalk`) and
the batching of event ids are pure functions of their inputs, shared by the peer server,
the sync client and the tests. Sockets, threads and SQLite live in the callers.

Errors by type: :class:`BadRequest` is a request that breaks this protocol (the server
answers 400); :class:`ProtocolError` is a peer answer that breaks it (the client backs
off from that peer). Both are :class:`PeerError`: the peer's fault, not our disk's and
not the network's.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from . import merkle
from .blobstore import CHUNK_SIZE
from .ids import check_hash, is_hash

PREFIX = "/peer/v1"
VERSION = 1
INLINE_IDS = 256
MAX_IDS = 1000  # event ids per /events request
MAX_OFFER = 1000  # blobs per /push/offer
MAX_JSON_BODY = 4 << 20
MAX_CERT_BYTES = 16 << 10  # one origin certificate (DER)
# what this node's peer server offers beyond version 1's endpoints
FEATURES = ("pack", "damage-report", "push-pack", "hello-events", "hello-pack")
MAX_HELLO_EVENTS = 500  # events carried by a hello answer
HELLO_EVENT_BYTES = 1 << 20  # bytes of event bodies and certificates in a hello answer
HELLO_PACK_BYTES = 8 << 20  # blob bytes of the pack that follows a hello answer
HELLO_CONTENT_TYPE = "application/x-syncnode-hello"
HELLO_LENGTH = struct.Struct(">I")  # the JSON answer's length before the pack's frames
HELLO_ZSTD = ("none", "native", "all")  # which blobs of a hello pack may come compressed
PACK_MAX_BLOBS = 64  # blobs per /blobs/pack request
PACK_MAX_BYTES = 4 << 20  # blob bytes per pack answer (sender and receiver both enforce)
PACK_CONTENT_TYPE = "application/x-syncnode-pack"


class PeerError(Exception):
    """What a peer did wrong (as opposed to our own disk, or the network between us)."""


class ProtocolError(PeerError):
    """A peer answered something that breaks the protocol."""


class BadRequest(PeerError):
    """A request that breaks the protocol: the server answers 400 with this message.
    Only this type (and invalid hashes/prefixes) is a client's fault; anything else that
    goes wrong while serving is the server's (500, logged with its traceback)."""


class InvalidPeerURL(ValueError):
    """An operator gave a peer address that is not ``https://HOST:PORT``."""


@dataclass(frozen=True, slots=True)
class PeerURL:
    """A peer's address, validated: ``url`` is the one normal form stored and dialled."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_peer_url(text: str, *, allow_path: bool = False) -> PeerURL:
    """The one check of a peer address, for the CLI, the admin API and the TLS layer.

    Accepted: ``https://HOST:PORT`` (a trailing ``/`` is fine) and ``HOST:PORT``; an IPv6
    host in brackets. Refused with a message saying what to type: any other scheme
    (``http://`` included: peers speak only mutual TLS), user info, a path, query or
    fragment, a missing host, and a missing or out-of-range port (the peer port is 8443 by
    default, so nothing is guessed). ``allow_path`` lets a path through for callers that
    only dial HOST:PORT (fetching a certificate); a stored peer URL never has one.
    """
    if not isinstance(text, str):
        raise InvalidPeerURL(f"a peer URL is text, got {type(text).__name__}")
    raw = text.strip()
    shown = raw if len(raw) <= 100 else raw[:97] + "..."
    expected = "expected https://HOST:PORT, e.g. https://pacs-gw.example.org:8443"
    if not raw or any(c.isspace() or ord(c) < 0x20 for c in raw):
        raise InvalidPeerURL(f"{shown!r} is not a peer URL; {expected}")
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    if scheme.lower() not in ("", "https"):
        raise InvalidPeerURL(f"{shown!r}: peers speak only mutual TLS, so the URL must start "
                             f"with https:// (not {scheme}://); {expected}")
    try:
        parts = urlsplit(f"//{rest}")
    except ValueError as exc:  # e.g. brackets around something that is not IPv6
        raise InvalidPeerURL(f"{shown!r}: {exc}; {expected}") from None
    if parts.username is not None or parts.password is not None:
        raise InvalidPeerURL(f"{shown!r}: a peer URL has no user name or password; {expected}")
    if (parts.path not in ("", "/") and not allow_path) or parts.query or parts.fragment \
            or "://" in rest:
        raise InvalidPeerURL(f"{shown!r}: a peer URL is only scheme, host and port; {expected}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidPeerURL(f"{shown!r}: the port must be a number 1-65535; {expected}"
                             ) from None
    host = parts.hostname
    if not host:
        raise InvalidPeerURL(f"{shown!r}: no host name; {expected}")
    if port is None or port == 0:
        raise InvalidPeerURL(f"{shown!r}: no port; {expected} (the peer port, 8443 unless "
                             f"its operator changed it)")
    if "[" in parts.netloc:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidPeerURL(f"{shown!r}: {host!r} in brackets is not an IPv6 address"
                                 ) from None
    elif not all(c.isalnum() or c in "-._" for c in host):
        raise InvalidPeerURL(f"{shown!r}: {host!r} is not a host name or address; {expected}")
    return PeerURL(host, port)


@dataclass(frozen=True, slots=True)
class RemoteNode:
    prefix: str
    digest: bytes
    count: int
    children: list[merkle.NodeDigest] | None
    ids: list[str] | None


class MerkleSource(Protocol):
    """What a Merkle answer is read from (the catalog, inside one snapshot)."""

    def merkle_node(self, prefix: str = "") -> merkle.NodeDigest: ...
    def merkle_children(self, prefix: str) -> list[merkle.NodeDigest]: ...
    def ids_under(self, prefix: str, limit: int | None = None) -> list[str]: ...


def read_merkle(source: MerkleSource, prefix: str) -> RemoteNode:
    """The answer a node gives for ``prefix``: its digest and count, the 16 children below
    the leaf level, the ids when it is a leaf or holds at most INLINE_IDS events. The one
    rule for what an answer holds, used by the server for its peers and by the walk for
    this node's own side. Reads only (blocking: call it off the event loop)."""
    node = source.merkle_node(prefix)
    leaf = len(prefix) == merkle.LEAF_LEVEL
    children = None if leaf else source.merkle_children(prefix)
    ids = source.ids_under(prefix) if leaf or node.count <= INLINE_IDS else None
    return RemoteNode(prefix, node.digest, node.count, children, ids)


def merkle_response(prefix: str, node: merkle.NodeDigest | RemoteNode,
                    children: list[merkle.NodeDigest] | None = None,
                    ids: list[str] | None = None) -> dict[str, Any]:
    """The JSON of a Merkle answer (a :class:`RemoteNode`, or its parts)."""
    if isinstance(node, RemoteNode):
        children, ids = node.children, node.ids
    out: dict[str, Any] = {"prefix": prefix, "digest": node.digest.hex(), "count": node.count}
    if children is not None:
        out["children"] = [[c.digest.hex(), c.count] for c in children]
    if ids is not None:
        out["ids"] = ids
    return out


@dataclass(slots=True)
class DiffStep:
    """What one compared Merkle node tells: ids only the peer has (``theirs``), ids only
    we have (``ours``), and prefixes under which only we hold events (``ours_under``:
    the caller lists our ids there)."""

    theirs: list[str] = field(default_factory=list)
    ours: list[str] = field(default_factory=list)
    ours_under: list[str] = field(default_factory=list)


class DiffWalk:
    """The Merkle diff walk as a state machine: no I/O, no clock.

    Ask :meth:`next_prefix` which node to compare, read both sides' answers for it (the
    peer's over the network, ours from the catalog: both built by :func:`read_merkle`),
    and :meth:`feed` them; repeat until ``next_prefix`` is None. Descends only where the
    digests differ, depth first, children in ascending order; memory stays bounded by
    one node's id list and the stack of pending prefixes. Prefixes only we hold are
    listed in descending order, as the stack pops the others.
    """

    def __init__(self) -> None:
        self._stack = [""]

    def next_prefix(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def feed(self, remote: RemoteNode, mine: RemoteNode) -> DiffStep:
        """Compare the two answers for the current prefix. Raises ProtocolError when the
        peer's answer cannot be walked (no children where the digests differ)."""
        prefix = self._stack.pop()
        if remote.prefix != prefix or mine.prefix != prefix:
            raise ProtocolError(f"Merkle answers for {remote.prefix!r}/{mine.prefix!r}, "
                                f"expected {prefix!r}")
        step = DiffStep()
        if remote.digest == mine.digest:
            return step
        if remote.ids is not None and mine.ids is not None:
            theirs, ours = set(remote.ids), set(mine.ids)
            step.theirs, step.ours = sorted(theirs - ours), sorted(ours - theirs)
            return step
        if remote.children is None or mine.children is None:
            raise ProtocolError(f"peer gave no children for differing prefix {prefix!r}")
        for i in reversed(range(merkle.FANOUT)):
            r, m = remote.children[i], mine.children[i]
            if r.digest == m.digest:
                continue
            child = prefix + format(i, "x")
            if r.count == 0:  # only we have events there
                step.ours_under.append(child)
            else:
                self._stack.append(child)
        return step


@dataclass(frozen=True, slots=True)
class HelloPackAsk:
    """What a hello asks to come after its answer: up to ``bytes`` of small blobs of the
    events it carries, compressed as ``zstd`` says (one of HELLO_ZSTD)."""

    bytes: int
    zstd: str = "none"


def hello_request(mine: RemoteNode, pack: HelloPackAsk | None = None) -> dict[str, Any]:
    """The body of ``POST /hello``: the asker's root Merkle answer (and the pack it
    would like to follow the answer)."""
    if mine.prefix != "":
        raise ValueError("a hello carries the root's Merkle answer")
    body: dict[str, Any] = {"merkle": merkle_response("", mine)}
    if pack is not None:
        body["pack"] = {"bytes": pack.bytes, "zstd": pack.zstd}
    return body


def parse_hello_request(obj: Any) -> tuple[RemoteNode, HelloPackAsk | None]:
    """The asker's root answer from a ``POST /hello`` body, and the pack it asks for
    (its bytes capped at HELLO_PACK_BYTES). Raises BadRequest."""
    if not isinstance(obj, dict) or "merkle" not in obj:
        raise BadRequest("a hello body is {merkle: the root's Merkle answer}")
    try:
        node = parse_merkle(obj["merkle"], "")
    except (ProtocolError, ValueError) as exc:
        raise BadRequest(f"hello: {exc}") from exc
    if node.children is None:
        raise BadRequest("hello: the root's Merkle answer needs its 16 children")
    if sum(c.count for c in node.children) != node.count:
        raise BadRequest("hello: the root's count is not the sum of its children's")
    ask = obj.get("pack")
    if ask is None:
        return node, None
    size = ask.get("bytes") if isinstance(ask, dict) else None
    zstd = ask.get("zstd", "none") if isinstance(ask, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
            or zstd not in HELLO_ZSTD:
        raise BadRequest(f"hello: 'pack' is {{bytes: a count, zstd: one of {HELLO_ZSTD}}}")
    return node, HelloPackAsk(min(size, HELLO_PACK_BYTES), zstd)


def parse_hello_pack(raw: Any, sizes: dict[str, int]) -> list[tuple[str, int]]:
    """The blobs (hash, size) whose frames follow a hello answer (``raw``: its ``pack``
    member), in order, checked as hostile input before a frame is read: each the blob of
    a put event the answer carries (``sizes``: blob -> the size its event gives) with that
    size and at most one chunk, no hash twice, at most PACK_MAX_BLOBS and HELLO_PACK_BYTES
    in all. Raises ProtocolError."""
    if not isinstance(raw, list) or len(raw) > PACK_MAX_BLOBS:
        raise ProtocolError(f"hello answer: 'pack' must list at most {PACK_MAX_BLOBS} blobs")
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    total = 0
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError("hello answer: each blob of its pack is [hash, size]")
        blob, size = check_hash_value(item[0]), item[1]
        if blob in seen or not isinstance(size, int) or isinstance(size, bool) \
                or sizes.get(blob) != size or size > CHUNK_SIZE:
            raise ProtocolError(f"hello answer: blob {blob} of its pack is not that of a put "
                                "it carries, has another size, is over a chunk or twice")
        seen.add(blob)
        total += size
        out.append((blob, size))
    if total > HELLO_PACK_BYTES:
        raise ProtocolError(f"hello answer: its pack has {total} bytes, at most "
                            f"{HELLO_PACK_BYTES}")
    return out


def lacking_ids(server: RemoteNode, asker: RemoteNode,
                ids_under: Callable[[str, int], list[str]], limit: int) -> list[str]:
    """Ids of events the server holds and the asker lacks, as far as the two root answers
    tell without a walk: all of them when both list their ids, else those under the root's
    children where the asker holds nothing (or, when the asker lists its ids, those under
    any differing child that it does not list). At most ``limit``, in id order; the rest
    is found by the usual walk. ``ids_under(prefix, n)``: the server's first n ids there."""
    if server.digest == asker.digest or limit <= 0:
        return []
    held = set(asker.ids) if asker.ids is not None else None
    if server.ids is not None and held is not None:
        return sorted(set(server.ids) - held)[:limit]
    if server.children is None or asker.children is None:
        return []
    out: list[str] = []
    for i, (s, a) in enumerate(zip(server.children, asker.children, strict=True)):
        room = limit - len(out)
        if room <= 0:
            break
        if s.count == 0 or s.digest == a.digest:
            continue
        prefix = format(i, "x")
        if held is not None:
            # the asker lists all its ids: those under this child are skipped, whatever
            # count it claims there (a claim of none would have them sent back to it)
            skip = sum(1 for e in held if e.startswith(prefix))
            out.extend([e for e in ids_under(prefix, room + skip) if e not in held][:room])
        elif a.count == 0:
            out.extend(ids_under(prefix, room))
    return out


def parse_hello_events(obj: dict[str, Any]) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """The events (and their origins' certificates) a hello answer carries, checked as
    hostile input: at most MAX_HELLO_EVENTS, no id twice, at most HELLO_EVENT_BYTES of
    bodies and certificates. Whether each body hashes to its id and its signature verifies
    is checked by the caller, as for ``/events``. Raises ProtocolError."""
    items = obj.get("events")
    if not isinstance(items, list) or len(items) > MAX_HELLO_EVENTS:
        raise ProtocolError(f"hello answer: 'events' must be a list of at most "
                            f"{MAX_HELLO_EVENTS} events")
    try:
        events = parse_events(obj)
        certs = parse_certs(obj.get("certs"))
    except ProtocolError as exc:
        raise ProtocolError(f"hello answer: {exc}") from exc
    if len({e for e, _ in events}) != len(events):
        raise ProtocolError("hello answer carries an event twice")
    size = sum(len(b) for _, b in events) + sum(len(c) for c in certs)
    if size > HELLO_EVENT_BYTES:
        raise ProtocolError(f"hello answer carries {size} bytes of events and certificates, "
                            f"at most {HELLO_EVENT_BYTES}")
    return events, certs


def batched(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    """``ids`` in lists of at most ``size``, in order (one request each)."""
    for i in range(0, len(ids), size):
        yield list(ids[i:i + size])


def events_request(ids: Sequence[str]) -> dict[str, Any]:
    if len(ids) > MAX_IDS:
        raise ValueError(f"at most {MAX_IDS} event ids per request")
    return {"ids": list(ids)}


def parse_events_request(obj: Any) -> list[str]:
    """The ids of a ``POST /events`` body. Raises BadRequest."""
    ids = obj.get("ids") if isinstance(obj, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_IDS:
        raise BadRequest(f"'ids' must be a list of at most {MAX_IDS} event ids")
    return [check_hash(i, "event id") for i in ids]


def events_response(found: Sequence[tuple[str, bytes]],
                    certs: Sequence[bytes] = ()) -> dict[str, Any]:
    """Events and the certificates of their origins (see :func:`parse_certs`)."""
    return {"events": [{"id": i, "body": b.decode()} for i, b in found],
            "certs": encode_certs(certs)}


def parse_events(obj: Any, key: str = "events") -> list[tuple[str, bytes]]:
    """``[{id, body}]`` under ``key`` -> (id, body bytes) pairs. Shapes only: whether a
    body hashes to its id is the catalog's check. Raises ProtocolError."""
    items = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(items, list) or len(items) > MAX_IDS:
        raise ProtocolError(f"'{key}' must be a list of at most {MAX_IDS} events")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("body"), str) \
                or not is_hash(item.get("id")):
            raise ProtocolError("each event is {id, body}")
        out.append((item["id"], item["body"].encode()))
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


@dataclass(frozen=True, slots=True)
class Offer:
    """One blob offered by a pushing peer: its hash, size and chunk list (raw digests)."""

    hash: str
    size: int
    digests: bytes


def parse_offer(obj: Any, max_size: int) -> list[Offer]:
    """The blobs of a ``POST /push/offer`` body, checked before anything is written:
    hashes, sizes (at most ``max_size``), chunk lists of exactly one digest per chunk.
    Raises BadRequest."""
    offered = obj.get("blobs") if isinstance(obj, dict) else None
    if not isinstance(offered, list) or len(offered) > MAX_OFFER:
        raise BadRequest(f"'blobs' must be a list of at most {MAX_OFFER}")
    out = []
    for item in offered:
        if not isinstance(item, dict):
            raise BadRequest("each offered blob is {hash, size, chunks}")
        h = check_hash(item.get("hash"), "blob hash")
        size, chunks = item.get("size"), item.get("chunks")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 \
                or not isinstance(chunks, str):
            raise BadRequest(f"offer of {h} needs 'size' and 'chunks'")
        if size > max_size:
            raise BadRequest(f"offer of {h}: {size} bytes is more than the {max_size} bytes "
                             "this node accepts for one blob")
        if len(chunks) != 64 * -(-size // CHUNK_SIZE):
            raise BadRequest(f"offer of {h}: a blob of {size} bytes has "
                             f"{-(-size // CHUNK_SIZE)} chunk digests")
        try:
            digests = bytes.fromhex(chunks)
        except ValueError as exc:
            raise BadRequest(f"offer of {h}: 'chunks' is not hex") from exc
        out.append(Offer(h, size, digests))
    return out


# -- packs of small blobs (see the module docstring) -------------------------------------

PACK_HEADER = struct.Struct(">32sBQI")  # hash, status, blob size, payload length
PACK_HEADER_SIZE = PACK_HEADER.size
RAW, ZSTD, ABSENT, DAMAGED, NOT_PACKED = 0, 1, 2, 3, 4
PACK_STATUSES = frozenset({RAW, ZSTD, ABSENT, DAMAGED, NOT_PACKED})


@dataclass(frozen=True, slots=True)
class PackItem:
    """One blob asked for in a pack: its hash and whether zstd is welcome."""

    hash: str
    zstd: bool = False


def pack_request(items: Sequence[PackItem]) -> dict[str, Any]:
    if not 0 < len(items) <= PACK_MAX_BLOBS:
        raise ValueError(f"a pack holds 1 to {PACK_MAX_BLOBS} blobs")
    return {"blobs": [{"hash": i.hash, "zstd": i.zstd} for i in items]}


def parse_pack_request(obj: Any) -> list[PackItem]:
    """The blobs of a ``POST /blobs/pack`` body. Raises BadRequest."""
    raw = obj.get("blobs") if isinstance(obj, dict) else None
    if not isinstance(raw, list) or not 0 < len(raw) <= PACK_MAX_BLOBS:
        raise BadRequest(f"'blobs' must be a list of 1 to {PACK_MAX_BLOBS} blobs")
    items: list[PackItem] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("zstd", False), bool):
            raise BadRequest("each blob of a pack is {hash, zstd}")
        h = check_hash(item.get("hash"), "blob hash")
        if h in seen:
            raise BadRequest(f"blob {h} asked twice in one pack")
        seen.add(h)
        items.append(PackItem(h, item.get("zstd", False)))
    return items


def pack_payload_limit(size: int) -> int:
    """The largest payload a frame for a blob of ``size`` bytes may carry: the blob itself,
    or its zstd frame (compress bound); never more than one chunk's worth."""
    return min(size, CHUNK_SIZE) + (min(size, CHUNK_SIZE) >> 8) + 512


def pack_frame_header(blob: str, status: int, size: int, payload: int) -> bytes:
    return PACK_HEADER.pack(bytes.fromhex(blob), status, size, payload)


@dataclass(frozen=True, slots=True)
class PackFrame:
    """One decoded frame: the blob, its status, its size and its payload (empty unless
    RAW or ZSTD). ``problem`` names what is wrong with this blob alone (a payload whose
    length does not fit its size and status): the blob is refused, the pack goes on."""

    blob: str
    status: int
    size: int
    payload: bytes
    problem: str = ""


class PackReader:
    """Decodes a pack answer, sans-IO: :meth:`need` says how many bytes to read next,
    :meth:`feed` takes exactly those and returns a frame when one is complete.

    ``expected`` lists (hash, size) of the blobs asked for, in order: a frame for any other
    hash, a size other than expected, a payload over :func:`pack_payload_limit` or an
    unknown status raises ProtocolError (the rest of the answer is refused); so do bytes
    after the last frame (:meth:`finish`). Memory: one frame's payload at most.
    """

    def __init__(self, expected: Sequence[tuple[str, int]]) -> None:
        self._expected = list(expected)
        self._next = 0
        self._header: tuple[str, int, int, int] | None = None

    @property
    def done(self) -> bool:
        return self._next >= len(self._expected) and self._header is None

    @property
    def at_header(self) -> bool:
        """The next bytes to read are a frame header (protocol, not blob bytes)."""
        return self._header is None

    def need(self) -> int:
        """Bytes to read next (0 when every frame arrived)."""
        if self._header is not None:
            return self._header[3]
        return 0 if self.done else PACK_HEADER_SIZE

    def feed(self, data: bytes) -> PackFrame | None:
        if self._header is None:
            if len(data) != PACK_HEADER_SIZE or self.done:
                raise ProtocolError("pack answer: a frame header was expected")
            raw, status, size, length = PACK_HEADER.unpack(data)
            blob, want = self._expected[self._next]
            if raw.hex() != blob:
                raise ProtocolError(f"pack answer: frame {self._next} is for blob "
                                    f"{raw.hex()}, expected {blob}")
            if status not in PACK_STATUSES:
                raise ProtocolError(f"pack answer: unknown status {status} for blob {blob}")
            if size != want and status != ABSENT:
                raise ProtocolError(f"pack answer: blob {blob} has {size} bytes, its put "
                                    f"event says {want}")
            limit = pack_payload_limit(size) if status in (RAW, ZSTD) else 0
            if length > limit:
                raise ProtocolError(f"pack answer: payload of {length} bytes for blob {blob} "
                                    f"of {size} bytes (status {status}), at most {limit}")
            self._header = (blob, status, size, length)
            if length:
                return None
            data = b""
        blob, status, size, length = self._header
        if len(data) != length:
            raise ProtocolError(f"pack answer: {len(data)} payload bytes fed, {length} due")
        self._header = None
        self._next += 1
        problem = ""
        if status == RAW and length != size:
            problem = f"{length} bytes sent for a blob of {size}"
        return PackFrame(blob, status, size, data, problem)

    def missing(self) -> list[str]:
        """The blobs whose frames did not (all) arrive."""
        start = self._next
        return [h for h, _ in self._expected[start:]]


def parse_push_frame_header(data: bytes, seen: set[str], total: int
                            ) -> tuple[str, int, int, int]:
    """One frame header of a pushed pack: (blob, status, size, payload length), checked
    against the caps given what came before (``seen``: the blobs already in this pack,
    ``total``: their bytes). Raises BadRequest."""
    raw, status, size, length = PACK_HEADER.unpack(data)
    blob = raw.hex()
    if status not in (RAW, ZSTD):
        raise BadRequest(f"pushed pack: status {status} for blob {blob} (RAW or ZSTD only)")
    if blob in seen:
        raise BadRequest(f"pushed pack: blob {blob} sent twice")
    if len(seen) >= PACK_MAX_BLOBS:
        raise BadRequest(f"pushed pack: more than {PACK_MAX_BLOBS} blobs")
    if size > CHUNK_SIZE or total + size > PACK_MAX_BYTES:
        raise BadRequest(f"pushed pack: blob {blob} of {size} bytes is over one chunk or "
                         f"past the {PACK_MAX_BYTES} bytes of a pack")
    limit = pack_payload_limit(size)
    if length > limit or (status == RAW and length != size):
        raise BadRequest(f"pushed pack: payload of {length} bytes for blob {blob} of {size} "
                         f"bytes (status {status})")
    return blob, status, size, length


def encode_certs(ders: Sequence[bytes]) -> list[str]:
    return [base64.b64encode(d).decode("ascii") for d in ders]


def parse_certs(value: Any) -> list[bytes]:
    """The ``certs`` member sent with events: at most ``MAX_IDS`` base64 DER certificates
    of at most ``MAX_CERT_BYTES`` each (absent: none)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_IDS:
        raise ProtocolError(f"'certs' must be a list of at most {MAX_IDS} certificates")
    out = []
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_CERT_BYTES * 4 // 3 + 4:
            raise ProtocolError("a certificate in 'certs' is not a base64 string or too long")
        try:
            der = base64.b64decode(item, validate=True)
        except binascii.Error as exc:
            raise ProtocolError(f"a certificate in 'certs' is not base64: {exc}") from exc
        if not der:
            raise ProtocolError("empty certificate in 'certs'")
        out.append(der)
    return out


def check_hash_value(value: Any) -> str:
    try:
        return check_hash(value, "blob hash")
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


class RangeError(BadRequest):
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
