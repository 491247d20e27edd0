"""The sync engine: one loop per trusted peer — diff, fetch events, pull blobs, apply, push.

Per round with a peer:

1. ``hello``: equal Merkle roots mean nothing to do (one request). It sends our root's
   Merkle answer, so that the answer carries the events we lack as far as the two roots
   tell, followed by a first pack of their small blobs (see :mod:`syncnode.protocol`):
   the first blob bytes come one round trip after the TLS handshake.
2. Walk the Merkle tree from the root, descending only where digests differ, until the
   id lists are short; each step yields the ids the peer has and we lack, and those we
   have and it lacks. Memory stays bounded by one node's id list.
3. Fetch the missing events (those hello did not bring), verify each body against its
   id. Deletes, and puts already tombstoned, apply at once; other puts wait for their
   blob.
4. Pull missing blobs, several at once through :class:`PartialBlob`: every chunk verified
   on arrival, resumable, whole hash checked, renamed into the store; only then are the
   puts applied (a put is never live without its whole blob). How many at once is the
   peer's adaptive window (:mod:`syncnode.flow`); each blob is claimed first
   (:mod:`syncnode.sources`), so peers holding the same blobs share the pulls and a pull
   stuck on a slow peer is taken over; bytes pass the bandwidth caps
   (:mod:`syncnode.ratelimit`) as they are read.
5. If the peer does not dial us (no request from it for a while) or is configured to,
   push what it lacks the same way in the other direction.

Failures (unreachable, refused, a chunk that does not verify) are recorded in the peer's
state and retried with capped exponential backoff with jitter; one bad blob from a peer
does not stop the rest, and any other peer that has it can supply it. A failure is named
by its kind (``error_kind``): ``network`` (the peer could not be reached: state
``unreachable``), ``peer`` (it answered something that breaks the protocol or does not
verify: ``error``), ``local`` (this node's own disk or catalog failed: ``store_full`` or
``local_error``) or ``internal`` (a bug, logged with its traceback).

Threads: the loop never touches SQLite, fsync or hashing itself; those calls go through
:func:`syncnode.local.offload` (worker threads), and peer states are written by one
writer thread, newest state last. The diff walk's decisions are
:class:`syncnode.protocol.DiffWalk`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from . import events as ev
from . import protocol, renewal, wire
from .audit import AuditLog, Tally
from .blobstore import (
    CHUNK_SIZE,
    BlobHashMismatch,
    BlobStore,
    LocalStoreError,
    RoomPromise,
    StagedBlob,
    StoreFull,
)
from .catalog import Catalog, PutMismatch
from .damage import DamageChecks
from .flow import FlowGate, Ticket
from .introduction import introduce, refused_our_certificate
from .local import LocalNode, local_errors, offload
from .nodeid import NodeId
from .protocol import PeerError, ProtocolError, RemoteNode
from .ratelimit import Limiter
from .retry import backoff
from .sources import Claim, Sources
from .tls.contexts import client_ssl_context
from .tls.errors import NodeTLSError
from .tls.peercert import fetch_peer_certificate
from .tls.successor import Successor, SuccessorRejected
from .transfer import ChunkMismatch, PartialBlob, TransferError, stage_whole

log = logging.getLogger("syncnode.sync")
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=60)
EVENT_BATCH = 500
APPLY_BATCH = 64  # pulled blobs made live in one transaction
APPLY_DELAY = 0.25  # seconds a pulled blob may wait for others before it is made live
NOTIFY_DELAY = 0.1  # seconds a change waits for others before peers are told
PUSH_AFTER_SILENCE = 3  # sync intervals without a request from the peer before we push
PULL_BASE_DEADLINE = 60.0  # seconds a pull may take beyond its size at the minimum rate
MIN_PULL_RATE = 64 * 1024  # bytes/s a pull must average (see PullTooSlow)
MAX_BLOB_SIZE = 64 << 30  # default bound on one blob (the max_blob_size setting)
STORE_FULL_RETRY = 10.0  # seconds between retries while our disk is full
JSON_DEADLINE = 120.0  # seconds for a whole JSON request and its answer
MAX_ANSWER = 64 << 20  # bytes of one JSON answer from a peer (an /events batch at most)
MAX_HELLO = 1 << 20  # bytes of a /hello answer (with the root's Merkle answer)
# bytes of a hello answer with events (their bodies escaped in JSON, certificates in base64)
MAX_HELLO_EVENTS_ANSWER = MAX_HELLO + 3 * protocol.HELLO_EVENT_BYTES
ERROR_BODY = 300  # bytes of a peer's error answer kept for the message
OFFLOAD_JSON = 256 << 10  # answers larger than this are parsed in a worker thread
REPORT_TIMEOUT = 10.0  # seconds for telling a peer that a blob it sent does not match
MAX_REPORTS = 8  # damage reports to one peer in flight at once (more are dropped)
MAX_WINDOW = 32  # default ceiling of the adaptive window (the max_window setting)
SCHEDULE_TICK = 0.5  # seconds between looks at other peers' claims while waiting


class HelloAnswer:
    """The open rest of a hello answer that carries a pack: its frames, for the blobs its
    JSON listed (``expected``, set once that list has been checked). Read by one
    :meth:`PeerClient.fetch_pack`; closed (the connection dropped if unread) otherwise."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.expected: list[tuple[str, int]] = []

    def close(self) -> None:
        if not self.resp.closed:
            _hang_up(self.resp)


@dataclass
class PeerState:
    """What `syncnode status` shows for one peer.

    ``in_sync`` means this node holds every event (and blob) the peer held at the end of
    the last round; ``peer_lacks`` counts what the peer still lacks from us (zero once it
    has pulled, or once we pushed it, or once the roots are equal).

    Byte counters are of this run. ``bytes_received`` and ``bytes_sent`` here are what our
    own loop pulled and pushed; the state recorded (:meth:`PeerSync.snapshot`) adds what
    the peer server served to or took from the peer, so the status and ``/metrics`` show
    one total each way. ``round_blobs``/``round_bytes`` are what this round set out to pull
    (the progress bar: done = round - needed); ``throughput`` holds the bytes/s each way
    over the last minutes, one sample every :data:`SAMPLE_SECONDS`. ``equal_since`` is
    when the roots were last found equal after differing (0 while they differ).
    """

    node_id: str
    url: str
    # idle, connecting, syncing, in_sync, unreachable, error, store_full, local_error
    state: str = "idle"
    error_kind: str = ""  # of last_error: network, peer, local, internal (see module doc)
    in_sync: bool = False
    remote_root: str = ""
    local_root: str = ""
    events_needed: int = 0
    blobs_needed: int = 0
    bytes_needed: int = 0
    # per study being pulled: [instances, bytes] still needed (the largest STUDIES_SHOWN)
    studies_needed: dict[str, list[int]] = field(default_factory=dict)
    bytes_received: int = 0
    wire_bytes_received: int = 0  # what crossed the wire for them (less when compressed)
    bytes_sent: int = 0
    events_received: int = 0
    events_sent: int = 0
    bytes_resumed: int = 0  # bytes already held in .part files when a pull (re)started
    bytes_discarded: int = 0  # received for blobs that then failed verification: no progress
    integrity_errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    last_success: float = 0.0
    next_attempt: float = 0.0
    pushing: bool = False
    peer_lacks: int = 0  # events we have that the peer had not pulled at the last round
    round_started: float = 0.0
    window: int = 0  # blobs pulled at once from the peer now (the adaptive window)
    round_blobs: int = 0  # blobs this round set out to pull (0 when nothing to pull)
    round_bytes: int = 0
    equal_since: float = 0.0
    # bytes/s received and sent, oldest first, one sample every SAMPLE_SECONDS
    throughput: dict[str, Any] = field(default_factory=lambda: {
        "interval": SAMPLE_SECONDS, "in": [], "out": []})


SAMPLE_SECONDS = 2.0  # between throughput samples
SAMPLES_KEPT = 150  # 5 minutes of them


STUDIES_SHOWN = 20  # studies listed per peer in its state (the ones with most bytes to go)


def _failure(task: asyncio.Task[Any]) -> Exception | None:
    """A finished task's failure, or None if it succeeded. Its cancellation, or a
    BaseException that is not an Exception (e.g. KeyboardInterrupt), is raised here."""
    if task.cancelled():
        raise asyncio.CancelledError
    exc = task.exception()
    if exc is not None and not isinstance(exc, Exception):
        raise exc
    return exc


def _put_of(items: list[ev.Checked]) -> ev.PutEvent:
    """The first put waiting for a blob (only puts wait for blobs)."""
    put = items[0].event
    assert isinstance(put, ev.PutEvent), put
    return put


def _studies_needed(waiting: Iterable[list[ev.Checked]],
                    before: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """[instances, bytes] still to pull per study, one blob counted once (by its first
    put), added to ``before`` (what earlier batches still need), the STUDIES_SHOWN studies
    with the most bytes to go."""
    per: dict[str, list[int]] = {k: list(v) for k, v in (before or {}).items()}
    for items in waiting:
        put = _put_of(items)
        left = per.setdefault(put.study_instance_uid, [0, 0])
        left[0] += 1
        left[1] += put.size
    return dict(sorted(per.items(), key=lambda kv: -kv[1][1])[:STUDIES_SHOWN])


def _rejection(rejected: dict[str, str], refused: Collection[str] = ()
               ) -> ProtocolError | PutMismatch:
    """The error for events the catalog refused (id -> reason); :class:`PutMismatch` when
    some are puts their blob contradicts (``refused``: ApplyResult.refused)."""
    untrue = [e for e in rejected if e in refused]
    eid = untrue[0] if untrue else next(iter(rejected))
    message = f"{len(rejected)} events rejected, e.g. {eid}: {rejected[eid]}"
    return PutMismatch(message) if untrue else ProtocolError(message)


class PullTooSlow(ProtocolError):
    """A pull did not finish by its deadline (a base time plus the blob's size at the
    minimum rate): the blob's lock is released so another peer can serve it."""


class BlobTooLarge(ProtocolError):
    """An event announces a blob larger than this node accepts (``max_blob_size``)."""


class WithheldEvents(ProtocolError):
    """The peer listed events in its Merkle tree and then did not serve them."""


class NotServed(ProtocolError):
    """The peer does not serve this request (an older version): ask the older way."""


class PeerLacksBlob(ProtocolError):
    """The peer answered 404 for a blob: it does not hold it (any more)."""


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next(self) -> float:
        self.failures += 1
        return backoff(self.failures, self.base, self.cap)

    def reset(self) -> None:
        self.failures = 0


class PeerClient:
    """HTTP client for one peer over mutual TLS, checking the peer's node id."""

    def __init__(self, node: LocalNode, peer_id: NodeId, url: str) -> None:
        self.node, self.peer_id = node, peer_id
        self.base = url.rstrip("/") + protocol.PREFIX
        self._session: aiohttp.ClientSession | None = None
        self._trust_version: Any = None
        self._trust_checked = 0.0
        self.min_rate = MIN_PULL_RATE
        self.base_deadline = PULL_BASE_DEADLINE
        self.json_deadline = JSON_DEADLINE
        self.connections = 16  # at least the window's ceiling (set by the sync engine)
        # whether the peer takes POST /hello (its events come with hello): None until known
        self.hello_events: bool | None = None
        # awaited with the bytes of every blob piece read: the bandwidth caps
        self.throttle: Callable[[int], Awaitable[None]] | None = None

    def pull_deadline(self, size: int) -> float:
        """Seconds one pull of ``size`` bytes may take in all."""
        return self.base_deadline + size / self.min_rate

    def session(self) -> aiohttp.ClientSession:
        """The session, renewed when the trust list changed (checked at most once a
        second: a listdir per request would cost more than the request)."""
        now = time.monotonic()
        if self._session is not None and not self._session.closed \
                and now - self._trust_checked < 1.0:
            return self._session
        self._trust_checked = now
        version = self.node.trust.version()
        if self._session is None or version != self._trust_version or self._session.closed:
            if self._session is not None and not self._session.closed:
                asyncio.get_running_loop().create_task(self._session.close())
            ctx: ssl.SSLContext = client_ssl_context(self.node.identity, self.node.trust,
                                                     expected=self.peer_id)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, limit=self.connections,
                                               force_close=False),
                timeout=REQUEST_TIMEOUT, raise_for_status=False, auto_decompress=False)
            self._trust_version = version
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _json(self, method: str, path: str, *, limit: int = MAX_ANSWER,
                    unknown: Collection[int] = (), **kw: Any) -> Any:
        """A JSON answer, read with a size cap (a peer cannot make us hold more than
        ``limit`` bytes) by a deadline. Raises ProtocolError (or PeerLacksBlob for a 404
        blob, NotServed for a status in ``unknown``)."""
        deadline = asyncio.timeout(self.json_deadline)
        try:
            async with deadline, self.session().request(method, self.base + path,
                                                         **kw) as resp:
                if resp.status in unknown:
                    await read_capped(resp, ERROR_BODY, f"{method} {path}")
                    raise NotServed(f"{method} {path}: HTTP {resp.status}")
                if resp.status >= 400:
                    kind = PeerLacksBlob if resp.status == 404 \
                        and path.startswith("/blobs/") else ProtocolError
                    raise kind(f"{method} {path}: HTTP {resp.status}: "
                               f"{await _error_text(resp)}")
                body = await read_capped(resp, limit, f"{method} {path}")
        except TimeoutError as exc:
            if not deadline.expired():
                raise  # another timeout (connecting, a read): the network's
            raise PullTooSlow(f"{method} {path}: no whole answer within "
                              f"{self.json_deadline:.0f} s") from exc
        try:
            if len(body) > OFFLOAD_JSON:
                return await asyncio.get_running_loop().run_in_executor(None, json.loads, body)
            return json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"{method} {path}: answer is not JSON: {exc}") from exc

    async def hello(self, mine: RemoteNode | None = None,
                    pack: protocol.HelloPackAsk | None = None
                    ) -> tuple[dict[str, Any], HelloAnswer | None]:
        """The peer's hello. With ``mine`` (our root's Merkle answer), asked by POST so that
        the events we lack come with it (``events``, ``certs``: see
        :func:`protocol.parse_hello_events`), and with ``pack`` the frames of a first pack
        after it (returned open, as a :class:`HelloAnswer`: the caller reads or closes
        it). A peer that does not take the POST (an older one: 405) is asked by GET, now
        and from then on."""
        obj: Any = None
        answer: HelloAnswer | None = None
        if mine is not None and self.hello_events is not False:
            try:
                obj, answer = await self._hello_post(protocol.hello_request(mine, pack))
                self.hello_events = True
            except NotServed as exc:
                log.debug("%s: %s; asking with GET from now on", self.peer_id.short, exc)
                self.hello_events = False
        if obj is None:
            obj = await self._json("GET", "/hello", limit=MAX_HELLO)
        if not isinstance(obj, dict):
            if answer is not None:
                answer.close()
            raise ProtocolError("/hello answer is not an object")
        return obj, answer

    async def _hello_post(self, body: dict[str, Any]) -> tuple[Any, HelloAnswer | None]:
        """``POST /hello``: a JSON answer, or (when a pack was asked for and the peer
        serves it) the JSON answer's length, the answer, and the open rest (the frames)."""
        if "pack" not in body:
            return await self._json("POST", "/hello", limit=MAX_HELLO_EVENTS_ANSWER,
                                    unknown=(404, 405), json=body), None
        deadline = asyncio.timeout(self.json_deadline)
        resp: aiohttp.ClientResponse | None = None
        try:
            async with deadline:
                resp = await self.session().post(self.base + "/hello", json=body)
                if resp.status in (404, 405):  # an older peer: its connection is kept
                    await read_capped(resp, ERROR_BODY, "POST /hello")
                    status = resp.status
                    resp.release()
                    resp = None
                    raise NotServed(f"POST /hello: HTTP {status}")
                if resp.status >= 400:
                    raise ProtocolError(f"POST /hello: HTTP {resp.status}: "
                                        f"{await _error_text(resp)}")
                if resp.content_type != protocol.HELLO_CONTENT_TYPE:  # no pack: plain JSON
                    raw = await read_capped(resp, MAX_HELLO_EVENTS_ANSWER, "POST /hello")
                    resp.release()
                    resp = None
                else:
                    try:
                        head = await resp.content.readexactly(protocol.HELLO_LENGTH.size)
                        (length,) = protocol.HELLO_LENGTH.unpack(head)
                        if length > MAX_HELLO_EVENTS_ANSWER:
                            raise ProtocolError(f"POST /hello: answer of {length} bytes, "
                                                f"more than {MAX_HELLO_EVENTS_ANSWER}")
                        raw = await resp.content.readexactly(length)
                        obj = json.loads(raw)
                        if not isinstance(obj, dict) or not obj.get("pack"):
                            # no frames follow: the connection is kept for the next request
                            if await resp.content.read(1):
                                raise ProtocolError("POST /hello: bytes after an answer "
                                                    "that lists no pack")
                            resp.release()
                            resp = None
                            return obj, None
                    except asyncio.IncompleteReadError as exc:
                        raise ProtocolError("POST /hello: answer ended early") from exc
                    except ValueError as exc:
                        raise ProtocolError(f"POST /hello: answer is not JSON: {exc}") from exc
        except TimeoutError as exc:
            if resp is not None:
                _hang_up(resp)
            if not deadline.expired():
                raise
            raise PullTooSlow(f"POST /hello: no whole answer within "
                              f"{self.json_deadline:.0f} s") from exc
        except BaseException:
            if resp is not None:
                _hang_up(resp)
            raise
        if resp is not None:
            return obj, HelloAnswer(resp)
        try:
            return json.loads(raw), None
        except ValueError as exc:
            raise ProtocolError(f"POST /hello: answer is not JSON: {exc}") from exc

    def warm(self, n: int) -> list[asyncio.Task[None]]:
        """Open ``n`` more connections now, each with a small request (the root's Merkle
        answer), so that the TLS handshakes of a round's first parallel pulls happen
        alongside its first requests instead of costing each pull a round trip more.
        Best effort: a failure is logged (debug) and changes nothing."""
        async def one() -> None:
            try:
                await self._json("GET", "/merkle", params={"prefix": ""}, limit=MAX_HELLO)
            except (aiohttp.ClientError, OSError, TimeoutError, NodeTLSError,
                    ProtocolError) as exc:
                log.debug("warming a connection to %s: %s", self.peer_id.short, exc)
        loop = asyncio.get_running_loop()
        return [loop.create_task(one()) for _ in range(max(0, n))]

    async def merkle(self, prefix: str) -> RemoteNode:
        return protocol.parse_merkle(
            await self._json("GET", "/merkle", params={"prefix": prefix}), prefix)

    async def events(self, ids: list[str]) -> tuple[list[tuple[str, bytes]], list[bytes]]:
        """The events with these ids that the peer holds, and the certificates of their
        origins."""
        obj = await self._json("POST", "/events", json=protocol.events_request(ids))
        return protocol.parse_events(obj), protocol.parse_certs(
            obj.get("certs") if isinstance(obj, dict) else None)

    async def chunks(self, blob: str) -> tuple[int, bytes]:
        obj = await self._json("GET", f"/blobs/{blob}/chunks")
        try:
            size, digests = obj["size"], bytes.fromhex(obj["chunks"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ProtocolError(f"bad chunk list answer for blob {blob}") from exc
        if not isinstance(size, int) or size < 0:
            raise ProtocolError(f"bad size in the chunk list answer for blob {blob}")
        return size, digests

    async def report_damage(self, blob: str) -> bool:
        """Tell the peer that what it sent of ``blob`` did not match its hash, so that it
        re-hashes its copy (:mod:`syncnode.damage`). Best effort: False if it could not
        be told (or refused the report: its budget for us is spent)."""
        try:
            async with asyncio.timeout(REPORT_TIMEOUT), self.session().post(
                    f"{self.base}/blobs/{blob}/damaged", json={}) as resp:
                await read_capped(resp, ERROR_BODY, "POST /blobs/H/damaged")
                return resp.status == 202
        except (aiohttp.ClientError, OSError, TimeoutError, NodeTLSError,
                ProtocolError) as exc:
            log.debug("could not report blob %s to %s: %s", blob, self.peer_id.short, exc)
            return False

    async def fetch_blob(self, store: BlobStore, blob: str, size: int, chunks_root: str,
                         on_bytes: Callable[[int], None] | None = None, *,
                         compress: bool = False) -> int:
        """Pull one blob into the store (verified, resumable, durable before it is there).
        Returns how many bytes were already held from an earlier attempt."""
        staged, resumed = await self.fetch_staged(store, blob, size, chunks_root, on_bytes,
                                                  compress=compress)
        await offload(store.install_staged, [staged])
        await offload(store.drop_cached, [blob])  # a peer's bytes (syncnode.blobstore)
        return resumed

    async def fetch_staged(self, store: BlobStore, blob: str, size: int, chunks_root: str,
                           on_bytes: Callable[[int], None] | None = None, *,
                           compress: bool = False,
                           on_wire: Callable[[int], None] | None = None
                           ) -> tuple[StagedBlob, int]:
        """Pull one blob into its verified ``.part`` file, ready for a group install
        (:meth:`BlobStore.install_staged`). Returns it and how many bytes were already held
        from an earlier attempt. ``compress`` asks for zstd on the wire (:mod:`.wire`);
        ``on_bytes`` counts blob bytes received, ``on_wire`` the bytes that crossed the wire.

        Raises TransferError (a chunk or the whole hash does not match: nothing is kept) or
        ProtocolError / aiohttp errors (the verified prefix is kept for the next attempt).
        A blob of one chunk comes in one piece and is verified and written in one step.
        The whole pull has a deadline (:meth:`pull_deadline`): past it, PullTooSlow.
        """
        seconds = self.pull_deadline(size)
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await self._fetch_staged(store, blob, size, chunks_root, on_bytes,
                                                compress, on_wire)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise PullTooSlow(f"blob {blob} ({size} bytes) not received within "
                              f"{seconds:.0f} s (at least {self.min_rate} bytes/s)") from exc

    async def _fetch_staged(self, store: BlobStore, blob: str, size: int, chunks_root: str,
                            on_bytes: Callable[[int], None] | None, compress: bool,
                            on_wire: Callable[[int], None] | None
                            ) -> tuple[StagedBlob, int]:
        headers = {"Accept-Encoding": wire.ENCODING if compress else "identity"}
        if size <= CHUNK_SIZE:
            data, encoded = await self._get_whole(blob, size, headers)
            if on_wire:
                on_wire(sum(map(len, data)))
            if on_bytes:
                on_bytes(size)
            staged = await offload(
                _stage_whole, store, blob, size, data, encoded, chunks_root)
            return staged, 0
        listing = asyncio.ensure_future(self.chunks(blob))
        try:
            if await offload(_held, store, blob) == 0:
                # nothing to resume: the chunk list and the bytes are asked for at once (one
                # round trip before the first byte, not two); the bytes wait in the socket
                # until the list that verifies them is in
                headers["Range"] = "bytes=0-"
                async with self._get_blob(blob, headers) as resp:
                    part = await self._open_part(store, blob, size, chunks_root, listing)
                    try:
                        if part.offset:  # the blob lock makes this a local fault
                            raise LocalStoreError(f"part file of blob {blob} was written "
                                                  "by someone else during the pull")
                        await self._receive_any(resp, part, on_bytes, on_wire)
                        staged = await offload(part.stage)
                    finally:
                        part.close(durable=False)
                resumed = 0
            else:
                part = await self._open_part(store, blob, size, chunks_root, listing)
                resumed = part.offset
                try:
                    if not part.complete:
                        headers["Range"] = f"bytes={part.offset}-"
                        async with self._get_blob(blob, headers) as resp:
                            await self._receive_any(resp, part, on_bytes, on_wire)
                    staged = await offload(part.stage)
                finally:
                    part.close(durable=False)
        finally:
            if not listing.done():
                listing.cancel()
                await asyncio.wait([listing])
        log.debug("blob %s from %s received (%d bytes, %d resumed)", blob,
                  self.peer_id.short, size, resumed)
        return staged, resumed

    async def _open_part(self, store: BlobStore, blob: str, size: int, chunks_root: str,
                         listing: Awaitable[tuple[int, bytes]]) -> PartialBlob:
        """The blob's part file, once the peer's chunk list (``listing``) is in."""
        peer_size, digests = await listing
        if peer_size != size:
            raise ProtocolError(f"peer says blob {blob} has {peer_size} bytes, the event "
                                f"says {size}")
        return await offload(lambda: PartialBlob(store, blob, size, digests, chunks_root))

    async def _receive_any(self, resp: aiohttp.ClientResponse, part: PartialBlob,
                           on_bytes: Callable[[int], None] | None,
                           on_wire: Callable[[int], None] | None) -> None:
        """Check a blob answer and receive its body into ``part`` (plain or zstd)."""
        await self._check_blob_response(resp, part.blob)
        if resp.status == 200 and part.offset:
            raise ProtocolError("peer ignored the Range header")
        if _encoding(resp) == wire.ENCODING:
            await self._receive_compressed(resp, part, on_bytes, on_wire, self.throttle)
        else:
            await self._receive(resp, part, on_bytes, on_wire, self.throttle)

    async def fetch_pack(self, store: BlobStore, blobs: list[tuple[str, int, str, bool]],
                         on_staged: Callable[[str, StagedBlob], None],
                         on_bytes: Callable[[int], None] | None = None,
                         on_wire: Callable[[int], None] | None = None,
                         on_refused: Callable[[str, Exception, int], None] | None = None,
                         answer: HelloAnswer | None = None) -> list[str]:
        """Pull several small blobs in one request (``POST /blobs/pack``, see
        :mod:`syncnode.protocol`). ``blobs``: (hash, size, chunks root, zstd wanted), each of
        at most one chunk, at most PACK_MAX_BLOBS and PACK_MAX_BYTES in all. With
        ``answer``, the frames are those after a hello answer (no request; HELLO_PACK_BYTES
        in all): frames of blobs it lists that are not in ``blobs`` are read and dropped.

        Each blob is verified against its hash and written to its ``.part`` file in a worker
        thread as the next one is read, then handed to ``on_staged`` at once: a blob that
        arrived whole is kept even if the answer breaks off later. Returns the blobs to
        fetch one by one: those the peer did not pack (larger, absent, damaged there) and
        those refused alone (``on_refused`` is told: a short payload, bytes that do not
        verify). Raises ProtocolError for an answer that breaks the framing, network errors
        for a broken connection and PullTooSlow past the deadline (base time plus the
        bytes at the minimum rate); the blobs not staged by then are the caller's to retry.
        """
        total = sum(size for _, size, _, _ in blobs)
        cap = protocol.PACK_MAX_BYTES if answer is None else protocol.HELLO_PACK_BYTES
        if len(blobs) > protocol.PACK_MAX_BLOBS or total > cap \
                or any(size > CHUNK_SIZE for _, size, _, _ in blobs):
            raise ValueError("a pack holds at most PACK_MAX_BLOBS blobs of at most one "
                             "chunk, PACK_MAX_BYTES in all")
        seconds = self.pull_deadline(total)
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await self._fetch_pack(store, blobs, on_staged, on_bytes, on_wire,
                                              on_refused, answer)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise PullTooSlow(f"pack of {len(blobs)} blobs ({total} bytes) not received "
                              f"within {seconds:.0f} s (at least {self.min_rate} bytes/s)"
                              ) from exc

    async def _fetch_pack(self, store: BlobStore, blobs: list[tuple[str, int, str, bool]],
                          on_staged: Callable[[str, StagedBlob], None],
                          on_bytes: Callable[[int], None] | None,
                          on_wire: Callable[[int], None] | None,
                          on_refused: Callable[[str, Exception, int], None] | None,
                          answer: HelloAnswer | None = None) -> list[str]:
        roots = {h: root for h, _, root, _ in blobs}
        if answer is None:
            reader = protocol.PackReader([(h, size) for h, size, _, _ in blobs])
        else:
            reader = protocol.PackReader(answer.expected)
        request = protocol.pack_request([protocol.PackItem(h, z) for h, _, _, z in blobs])
        singly: list[str] = []
        loop = asyncio.get_running_loop()
        writing: tuple[str, asyncio.Future[StagedBlob | Exception]] | None = None

        def stage(frame: protocol.PackFrame) -> StagedBlob | Exception:
            """Verify and write one blob (worker thread); a blob that does not verify is
            returned as its error: refused alone, not the whole pack."""
            try:
                return _stage_whole(store, frame.blob, frame.size, [frame.payload],
                                    frame.status == protocol.ZSTD, roots[frame.blob])
            except (TransferError, BlobHashMismatch) as exc:
                return exc

        def refuse(blob: str, exc: Exception, size: int) -> None:
            singly.append(blob)
            if on_refused is not None:
                on_refused(blob, exc, size)

        sizes = {h: size for h, size, _, _ in blobs}

        async def settle() -> None:
            """Wait for the blob being written; hand it over (or refuse it)."""
            nonlocal writing
            if writing is None:
                return
            (blob, job), writing = writing, None
            outcome = await job
            if isinstance(outcome, Exception):
                refuse(blob, outcome, sizes[blob])
            else:
                on_staged(blob, outcome)

        try:
            async with self._pack_answer(request, answer) as resp:
                try:
                    if resp.status != 200:
                        raise ProtocolError(f"POST /blobs/pack: HTTP {resp.status}: "
                                            f"{await _error_text(resp)}")
                    while n := reader.need():
                        payload = not reader.at_header
                        try:
                            data = await resp.content.readexactly(n)
                        except asyncio.IncompleteReadError as exc:
                            raise ProtocolError(
                                f"pack answer ended early ({len(reader.missing())} blobs "
                                "still due)") from exc
                        if on_wire and payload:  # blob bytes as sent, as for one blob
                            on_wire(len(data))
                        if self.throttle is not None:  # bandwidth caps (syncnode.ratelimit)
                            await self.throttle(len(data))
                        frame = reader.feed(data)
                        if frame is None:
                            continue
                        if frame.blob not in roots:  # listed after hello, not ours to take
                            continue
                        if frame.status not in (protocol.RAW, protocol.ZSTD):
                            singly.append(frame.blob)  # absent, damaged or not packed there
                            continue
                        if on_bytes:
                            on_bytes(frame.size)
                        if frame.problem:
                            refuse(frame.blob, TransferError(
                                f"blob {frame.blob} in a pack: {frame.problem}"), frame.size)
                            continue
                        await settle()
                        writing = (frame.blob,
                                   loop.run_in_executor(None, local_errors, stage, frame))
                    await settle()
                    if await resp.content.read(1):
                        raise ProtocolError("pack answer goes on after its last frame")
                except BaseException:
                    _hang_up(resp)
                    raise
        finally:
            if writing is not None:  # the blob being written when the answer broke off
                job = writing[1]
                await asyncio.wait([job])  # the worker is done with its file
                if not job.cancelled() and job.exception() is None:
                    await settle()  # it arrived whole: kept
        return singly

    @contextlib.asynccontextmanager
    async def _pack_answer(self, request: dict[str, Any], answer: HelloAnswer | None
                           ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer whose frames a pack pull reads: asked for now, or after hello."""
        if answer is None:
            async with self.session().post(f"{self.base}/blobs/pack", json=request) as resp:
                yield resp
            return
        try:
            yield answer.resp
        finally:
            answer.resp.release()

    @contextlib.asynccontextmanager
    async def _get_blob(self, blob: str, headers: dict[str, str]
                        ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET /blobs/H``; an answer abandoned part-way (bad bytes, too slow, too long)
        hangs up the connection instead of draining it."""
        async with self.session().get(f"{self.base}/blobs/{blob}", headers=headers) as resp:
            try:
                yield resp
            except BaseException:
                _hang_up(resp)
                raise

    @staticmethod
    async def _check_blob_response(resp: aiohttp.ClientResponse, blob: str) -> None:
        if resp.status not in (200, 206):
            kind = PeerLacksBlob if resp.status == 404 else ProtocolError
            raise kind(f"GET blob {blob}: HTTP {resp.status}: {await _error_text(resp)}")
        if _encoding(resp) not in ("", "identity", wire.ENCODING):
            raise ProtocolError(f"GET blob {blob}: unexpected Content-Encoding "
                                f"{resp.headers.get('Content-Encoding')!r}")

    async def _get_whole(self, blob: str, size: int, headers: dict[str, str]
                         ) -> tuple[list[bytes], bool]:
        """The body of a one-chunk blob as it came off the socket (pieces, not joined: one
        copy fewer), and whether it is zstd-encoded (then bounded by what one compressed
        chunk can take)."""
        async with self._get_blob(blob, headers) as resp:
            await self._check_blob_response(resp, blob)
            encoded = _encoding(resp) == wire.ENCODING
            if not encoded:
                if resp.content_length != size:
                    raise ProtocolError(f"GET blob {blob}: {resp.content_length} bytes "
                                        f"announced, the event says {size}")
                pieces, got = [], 0
                async for piece in resp.content.iter_any():
                    if self.throttle is not None:
                        await self.throttle(len(piece))
                    got += len(piece)
                    if got > size:
                        raise ProtocolError(f"GET blob {blob}: more than {size} bytes")
                    pieces.append(piece)
                if got != size:
                    raise ProtocolError(f"blob {blob} ended early at {got} bytes")
                return pieces, False
            limit = wire.max_frame_size(size)
            if resp.content_length is not None and resp.content_length > limit:
                raise ProtocolError(f"GET blob {blob}: compressed body of "
                                    f"{resp.content_length} bytes for {size}")
            body = bytearray()
            while piece := await resp.content.read(limit + 1 - len(body)):
                if self.throttle is not None:
                    await self.throttle(len(piece))
                body += piece
                if len(body) > limit:
                    raise ProtocolError(f"GET blob {blob}: compressed body longer than "
                                        f"{limit} bytes for {size}")
            return [bytes(body)], True

    @staticmethod
    async def _receive(resp: aiohttp.ClientResponse, part: PartialBlob,
                       on_bytes: Callable[[int], None] | None,
                       on_wire: Callable[[int], None] | None = None,
                       throttle: Callable[[int], Awaitable[None]] | None = None) -> None:
        """Read whole chunks off the socket while the previous one is verified and written
        in a worker thread: the event loop never hashes or writes, and at most two chunks
        are held in memory."""
        loop = asyncio.get_running_loop()
        writing: asyncio.Future[None] | None = None
        offset = part.offset
        try:
            while offset < part.size:
                n = min(CHUNK_SIZE, part.size - offset)
                try:
                    data = await resp.content.readexactly(n)
                except asyncio.IncompleteReadError as exc:
                    raise ProtocolError(f"blob {part.blob} ended early at "
                                        f"{offset + len(exc.partial)} bytes") from exc
                if throttle is not None:
                    await throttle(n)
                if writing is not None:
                    await writing
                writing = loop.run_in_executor(None, local_errors, part.write_chunk, data)
                offset += n
                if on_bytes:
                    on_bytes(n)
                if on_wire:
                    on_wire(n)
            if writing is not None:
                await writing
                writing = None
        finally:
            if writing is not None and not writing.done():
                # let the worker finish with the file before the caller closes it; its own
                # error (if any) is secondary to the one already propagating
                await asyncio.wait([writing])

    @staticmethod
    async def _receive_compressed(resp: aiohttp.ClientResponse, part: PartialBlob,
                                  on_bytes: Callable[[int], None] | None,
                                  on_wire: Callable[[int], None] | None,
                                  throttle: Callable[[int], Awaitable[None]] | None = None
                                  ) -> None:
        """Like :meth:`_receive` for a zstd body: compressed pieces are decoded (each frame
        checked to carry exactly its chunk), verified and written in a worker thread, one
        job at a time, while the next piece is read."""
        loop = asyncio.get_running_loop()
        frames = wire.ChunkFrames(wire.chunk_sizes(part.offset, part.size, CHUNK_SIZE))

        def consume(data: bytes) -> int:
            written = 0
            with _frame_errors(part.blob):
                chunks = frames.feed(data)
            for chunk in chunks:
                part.write_chunk(chunk)
                written += len(chunk)
            return written

        writing: asyncio.Future[int] | None = None
        try:
            while True:
                data = await resp.content.read(CHUNK_SIZE)
                if writing is not None:
                    n = await writing
                    writing = None
                    if on_bytes and n:
                        on_bytes(n)
                if not data:
                    break
                if throttle is not None:
                    await throttle(len(data))
                if on_wire:
                    on_wire(len(data))
                writing = loop.run_in_executor(None, local_errors, consume, data)
            if not part.complete:
                raise ProtocolError(f"blob {part.blob} ended early at {part.offset} bytes")
            with _frame_errors(part.blob):
                frames.finish()
        finally:
            if writing is not None:  # let the worker finish; count what it wrote
                await asyncio.wait([writing])
                if not writing.cancelled() and writing.exception() is None and on_bytes:
                    on_bytes(writing.result())


def _encoding(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Content-Encoding", "").strip().lower()


async def read_capped(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body, refused (ProtocolError) as soon as it is longer than ``limit``:
    memory never holds more than ``limit`` plus one read of a peer's answer. A refused
    answer closes the connection (the rest is never read, not even to reuse it)."""
    if resp.content_length is not None and resp.content_length > limit:
        _hang_up(resp)
        raise ProtocolError(f"{what}: answer of {resp.content_length} bytes, more than "
                            f"the {limit} allowed")
    body = bytearray()
    while piece := await resp.content.read(min(1 << 16, limit + 1 - len(body))):
        body += piece
        if len(body) > limit:
            _hang_up(resp)
            raise ProtocolError(f"{what}: answer longer than the {limit} bytes allowed")
    return bytes(body)


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    """The start of a peer's error answer, for a message (never the whole body)."""
    try:
        head = await resp.content.read(ERROR_BODY)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return "(no readable body)"
    finally:
        _hang_up(resp)  # the rest of an error answer is never read
    return head.decode("utf-8", "replace")


def _hang_up(resp: aiohttp.ClientResponse) -> None:
    """Drop the connection of an answer we stop reading, at once. A plain close would
    start a TLS shutdown, during which the rest of the answer is still received (and
    discarded) for up to 30 s: a peer could push a gigabyte through it."""
    conn = resp.connection
    if conn is not None and conn.transport is not None:
        conn.transport.abort()
    resp.close()


def _stage_whole(store: BlobStore, blob: str, size: int, data: list[bytes], encoded: bool,
                 chunks_root: str) -> StagedBlob:
    if encoded:
        frames = wire.ChunkFrames(wire.chunk_sizes(0, size, CHUNK_SIZE))
        with _frame_errors(blob):
            data = frames.feed(b"".join(data))
            frames.finish()
    return stage_whole(store, blob, data, chunks_root)


@contextlib.contextmanager
def _frame_errors(blob: str) -> Iterator[None]:
    """A compressed body that does not decode to the blob's chunks is the sender's fault,
    like a chunk that does not match its hash: a TransferError."""
    try:
        yield
    except wire.FrameError as exc:
        raise TransferError(f"blob {blob}: {exc}") from exc


def _read_merkle(catalog: Catalog, prefix: str) -> RemoteNode:
    with catalog.snapshot():  # digest, children and ids from one instant
        return protocol.read_merkle(catalog, prefix)


async def walk_diff(local: LocalNode, fetch: Callable[[str], Any],
                    first: RemoteNode | None = None
                    ) -> AsyncIterator[tuple[list[str], list[str]]]:
    """Yield (ids only the peer has, ids only we have), a Merkle node at a time.

    The decisions are :class:`protocol.DiffWalk`'s; this drives it with the peer's answers
    (``fetch``; ``first``: the root's answer when it came with ``hello``) and ours, read
    in a worker thread with the server's own :func:`protocol.read_merkle`."""
    catalog = local.catalog
    walk = protocol.DiffWalk()
    while (prefix := walk.next_prefix()) is not None:
        if prefix == "" and first is not None:
            remote = first
        else:
            remote = await fetch(prefix)
        mine = await offload(_read_merkle, catalog, prefix)
        step = walk.feed(remote, mine)
        if step.theirs or step.ours:
            yield step.theirs, step.ours
        for child in step.ours_under:
            yield [], await offload(catalog.ids_under, child)


class PeerSync:
    """The sync loop with one peer."""

    def __init__(self, node: LocalNode, engine: SyncEngine, peer_id: NodeId, url: str,
                 push: str = "auto") -> None:
        self.node, self.engine = node, engine
        self.peer_id = peer_id
        self.client = PeerClient(node, peer_id, url)
        self.state = PeerState(node_id=str(peer_id), url=url)
        self.push = push
        self.wake = asyncio.Event()
        self.backoff = Backoff()
        self.rounds = 0  # rounds run since the loop started
        self._last_saved = 0.0
        self._skipped: list[ev.Checked] = []  # puts whose blob the peer lacked
        self._pulled, self._pushed = Tally(), Tally()  # this round's, for the audit trail
        self._notifying: asyncio.Task[None] | None = None
        # adaptive windows (syncnode.flow): max_pulls is where they start, max_window caps
        self.pull_gate = FlowGate(engine.max_pulls, engine.max_window)
        self.push_gate = FlowGate(engine.max_pulls, engine.max_window)
        self.client.connections = max(16, engine.max_window)
        self.client.throttle = self._throttle_in
        self.packs = False  # the peer serves packs of small blobs (its hello says so)
        self.takes_reports = False  # the peer re-hashes a blob we report (its hello says so)
        self.push_packs = False  # the peer takes pushed packs of small blobs (its hello)
        self._reports: dict[str, asyncio.Task[bool]] = {}  # blob -> its report in flight
        self._singly: set[str] = set()  # blobs a pack did not bring: pulled alone next
        self._last_totals = (0, 0)  # the totals count from 0 in each run
        self._cold = True  # no round has succeeded since the loop started or last failed
        self._feed: _PullFeed | None = None  # this round's blobs to pull (pull_events)
        self._warming: list[asyncio.Task[None]] = []  # connections being opened
        self._first_pack: asyncio.Task[list[Exception]] | None = None  # after hello

    async def _throttle_in(self, n: int) -> None:
        limiter = self.engine.limiter
        if limiter is not None and limiter.active:
            await limiter.consume(self.peer_id.compact, "in", n)

    def configure_window(self) -> None:
        """Take new max_pulls / max_window settings."""
        for gate in (self.pull_gate, self.push_gate):
            gate.configure(self.engine.max_pulls, self.engine.max_window)

    def save_state(self, force: bool = False) -> None:
        """Record the state (at most every 0.5 s unless ``force``) through the engine's
        state writer thread. Never raises: a state that cannot be written is logged."""
        now = time.time()
        self.state.window = self.pull_gate.window.limit
        if force or now - self._last_saved > 0.5:
            self._last_saved = now
            self.engine.states.write(self.peer_id.compact, self.snapshot())
            if self.engine.on_state is not None:
                try:
                    self.engine.on_state(self.state)
                except Exception:
                    log.exception("publishing the state of peer %s failed", self.peer_id.short)

    def served(self) -> tuple[int, int]:
        """Blob bytes the peer server took from this peer (pushes) and served to it."""
        s = self.engine.served.get(self.peer_id.compact, {})
        return s.get("bytes_in", 0), s.get("bytes_out", 0)

    def totals(self) -> tuple[int, int]:
        """All blob bytes received from and sent to this peer in this run, both ways of
        transfer (our pulls and pushes, its pulls and pushes)."""
        pushed_in, served_out = self.served()
        return self.state.bytes_received + pushed_in, self.state.bytes_sent + served_out

    def snapshot(self) -> dict[str, Any]:
        """The state as recorded: ``bytes_received``/``bytes_sent`` are the totals of
        :meth:`totals`, with their parts beside them."""
        row = asdict(self.state)
        pushed_in, served_out = self.served()
        row["bytes_pulled"], row["bytes_pushed"] = row["bytes_received"], row["bytes_sent"]
        row["bytes_pushed_in"], row["bytes_served"] = pushed_in, served_out
        row["bytes_received"], row["bytes_sent"] = self.totals()
        return row

    def sample(self, interval: float) -> None:
        """Add one throughput sample (bytes/s each way since the previous one)."""
        now_in, now_out = self.totals()
        last_in, last_out = self._last_totals
        self._last_totals = (now_in, now_out)
        tp = self.state.throughput
        tp["interval"] = interval
        moved = any(tp[k][-1:] != [0] for k in ("in", "out"))  # the previous sample
        for key, rate in (("in", (now_in - last_in) / interval),
                          ("out", (now_out - last_out) / interval)):
            tp[key] = [*tp[key][-(SAMPLES_KEPT - 1):], max(0, round(rate))]
        if moved or tp["in"][-1] or tp["out"][-1]:
            self.save_state()  # an idle peer is not written (nor published) every sample

    def error(self, exc: BaseException, state: str = "error", kind: str = "peer") -> None:
        log.warning("sync with %s: %s: %s", self.peer_id.short, type(exc).__name__, exc)
        self._cold = True  # the connections may be gone: warm them next round
        self.state.state = state
        self.state.error_kind = kind
        self.state.in_sync = False
        self.state.equal_since = 0.0
        self.state.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.state.last_error_at = time.time()
        self.save_state(force=True)

    def _progress(self) -> tuple[int, int, int, int]:
        """What counts as progress: bytes kept (not those of blobs that failed their
        check), events applied, and what we sent."""
        st = self.state
        return (st.bytes_received - st.bytes_discarded, st.bytes_sent, st.events_received,
                st.events_sent)

    def _retry_delay(self, before: tuple[int, int, int, int]) -> float:
        """A round that moved data before it failed (a link drop mid-transfer) retries at
        the first step of the backoff: only a peer that makes no progress backs off further,
        so a flaky link costs about a second per drop, not minutes."""
        if self._progress() != before:
            self.backoff.reset()
        return self.backoff.next()

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until ``stop``. No exception ends the loop: each round's failure is
        recorded (which itself cannot raise) and retried after a backoff."""
        while not stop.is_set():
            try:
                delay = await self._round()
            except Exception:  # the loop's last line of defence: log it, go on
                log.exception("sync loop with %s: unexpected failure", self.peer_id.short)
                delay = self.backoff.next()
            try:
                async with asyncio.timeout(delay):
                    await self._wait(stop)
            except TimeoutError:
                pass

    async def _round(self) -> float:
        """One round and its outcome in the state; returns the delay before the next."""
        before = self._progress()
        self.rounds += 1
        self.wake.clear()  # a wake-up during the round (e.g. "look again") is kept
        delay = self.engine.interval
        try:
            await self.sync_once()
            self.backoff.reset()
            self._cold = False
        except StoreFull as exc:
            # our disk: retried soon, so that pulls resume shortly after space returns
            self.error(exc, "store_full", "local")
            delay = min(self._retry_delay(before), STORE_FULL_RETRY)
        except LocalStoreError as exc:
            self.error(exc, "local_error", "local")
            delay = self._retry_delay(before)
        except (PeerError, TransferError, BlobHashMismatch, NodeTLSError) as exc:
            self.error(exc, "error", "peer")
            delay = self._retry_delay(before)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # everything on our disk goes through offload (LocalStoreError): an OSError
            # here is the socket's
            self.error(exc, "unreachable", "network")
            delay = self._retry_delay(before)
        except Exception as exc:  # a bug must not end this peer's loop: log it loudly
            log.exception("sync with %s failed unexpectedly", self.peer_id.short)
            self.error(exc, "error", "internal")
            delay = self._retry_delay(before)
        self.state.next_attempt = time.time() + delay
        self.save_state(force=True)
        return delay

    async def _wait(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def notify_soon(self) -> None:
        """Tell the peer we changed (at most one notice in flight; best effort: the peer's
        own rounds catch up anyway)."""
        if self._notifying is None or self._notifying.done():
            self._notifying = asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        await asyncio.sleep(NOTIFY_DELAY)  # coalesce a burst of changes into one notice
        try:
            async with self.client.session().post(
                    f"{self.client.base}/notify",
                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await read_capped(resp, ERROR_BODY, "POST /notify")
        except (aiohttp.ClientError, OSError, TimeoutError, NodeTLSError,
                ProtocolError) as exc:
            log.debug("could not notify %s: %s", self.peer_id.short, exc)

    def report_damage(self, blob: str, exc: BaseException) -> None:
        """Bytes of ``blob`` from the peer did not match their hash (``exc``): tell it, so
        that it re-hashes its copy (its disk may be damaged; the link was not: TLS would
        have refused the record). At most MAX_REPORTS in flight; best effort."""
        if not self.takes_reports or not isinstance(exc, ChunkMismatch | BlobHashMismatch):
            return
        if blob in self._reports or len(self._reports) >= MAX_REPORTS:
            return
        task = asyncio.get_running_loop().create_task(self.client.report_damage(blob))
        self._reports[blob] = task
        task.add_done_callback(lambda _t: self._reports.pop(blob, None))

    def should_push(self) -> bool:
        if self.push == "always":
            return True
        if self.push == "never":
            return False
        seen = self.engine.last_seen(self.peer_id.compact)
        return time.time() - seen > PUSH_AFTER_SILENCE * self.engine.interval

    async def ensure_pinned(self) -> None:
        """Pin the peer's certificate on first contact if the operator gave only its id."""
        trust = self.node.trust
        if await offload(lambda: trust.certificate(self.peer_id) is not None
                         or trust.ca_certificate() is not None):
            return
        host_port = self.client.base.removesuffix(protocol.PREFIX)
        der = await fetch_peer_certificate(host_port, self.node.identity, self.peer_id)
        await offload(trust.pin, der, self.peer_id)
        log.info("pinned certificate of peer %s", self.peer_id.short)

    async def hello(self) -> tuple[dict[str, Any], HelloAnswer | None]:
        """The peer's hello (with the events we lack, and the first pack's frames when
        asked for: :meth:`PeerClient.hello`); if it refused our certificate (it trusts our
        id but has not pinned it: it cannot dial us), introduce ourselves and ask once
        more."""
        mine = await offload(_read_merkle, self.node.catalog, "")  # the events we lack come
        pack = self._hello_pack_ask()
        try:
            return await self.client.hello(mine, pack)
        except aiohttp.ClientError as exc:
            if not refused_our_certificate(exc):
                raise
        successor = await offload(renewal.statement, self.node.data)  # we renewed: say so
        await introduce(self.client.base.removesuffix(protocol.PREFIX), self.node.identity,
                        self.peer_id, successor=successor)
        return await self.client.hello(mine, pack)

    def _hello_pack_ask(self) -> protocol.HelloPackAsk | None:
        """The first pack asked for with hello: only while no other peer's loop is in a
        round (each would send the same blobs; one pull of each is kept), compressed as
        our pulls would ask (:func:`wire.want_compression`)."""
        if not self.engine.sole_source(self):
            return None
        mode, url = self.engine.compression, self.state.url
        zstd = ("all" if mode == "on" else "none" if mode == "off"
                else "none" if wire.is_local_url(url) else "native")
        return protocol.HelloPackAsk(protocol.HELLO_PACK_BYTES, zstd)

    async def learn_successor(self, hello: dict[str, Any]) -> None:
        """The peer renewed its certificate (its hello carries the statement its old key
        signed): trust the new one, and let the engine move this loop to the new id."""
        try:
            statement = Successor.from_dict(hello["successor"])
            if statement.old != self.peer_id:
                return  # about another node, or we already dial the new id
            learned = await offload(renewal.learn_successor, self.node, statement)
        except SuccessorRejected as exc:
            log.warning("peer %s announced a successor certificate that is refused: %s",
                        self.peer_id.short, exc)
            return
        if learned and self.engine.on_trust_changed is not None:
            self.engine.on_trust_changed()

    async def sync_once(self) -> None:
        """One round; what it pulled and pushed is one audit entry each (not one per
        instance)."""
        self._pulled, self._pushed = Tally(), Tally()
        bytes_in, bytes_out = self.state.bytes_received, self.state.bytes_sent
        outcome = "failure"
        try:
            await self._sync_once()
            outcome = "success"
        finally:
            self._pulled.bytes = self.state.bytes_received - bytes_in
            self._pushed.bytes = self.state.bytes_sent - bytes_out
            peer = self.peer_id.compact
            self._pulled.record(self.engine.audit, "peer-received", peer, outcome)
            self._pushed.record(self.engine.audit, "peer-sent", peer, outcome)

    async def _sync_once(self) -> None:
        st = self.state
        st.state, st.round_started = "connecting", time.time()
        t0 = time.monotonic()
        await self.ensure_pinned()
        # The first round, or the first after a failure other than an unreachable peer (a
        # peer that refuses connections gets one attempt per round, not several): no
        # connection to reuse, so the parallel pulls' TLS handshakes start with hello's.
        if self._cold and st.error_kind != "network":
            self._warming = self.client.warm(
                min(self.pull_gate.window.limit, self.client.connections) - 1)
        hello, answer = await self.hello()
        try:
            await self._sync_from(hello, answer, t0)
        finally:
            if answer is not None:
                answer.close()  # not handed to the first pack's pull (which closes it)

    async def _sync_from(self, hello: dict[str, Any], answer: HelloAnswer | None,
                         t0: float) -> None:
        """The round after hello; ``answer``: the frames of a first pack after it."""
        st = self.state
        log.debug("round with %s: hello in %.3f s", self.peer_id.short, time.monotonic() - t0)
        if hello.get("version") != protocol.VERSION:
            raise ProtocolError(f"peer speaks protocol {hello.get('version')!r}")
        if "successor" in hello:
            await self.learn_successor(hello)
        features = hello.get("features")
        self.packs = isinstance(features, list) and "pack" in features
        self.takes_reports = isinstance(features, list) and "damage-report" in features
        self.push_packs = isinstance(features, list) and "push-pack" in features
        mine = await offload(self.node.catalog.merkle_root)
        st.remote_root, st.local_root = str(hello.get("root", "")), mine.digest.hex()
        if st.remote_root == st.local_root:
            st.peer_lacks = 0  # equal roots: it holds everything we hold
            st.equal_since = st.equal_since or time.time()
            self._in_sync()
            return
        st.state, st.in_sync, st.equal_since = "syncing", False, 0.0
        # what this round needs is counted afresh (a failed round left its counts behind)
        st.blobs_needed = st.bytes_needed = st.round_blobs = st.round_bytes = 0
        st.studies_needed = {}
        st.pushing = self.should_push()
        self.save_state(force=True)
        to_push: list[str] = []
        pulled = lacking = 0
        self._skipped = []
        wanted: list[str] = []  # gathered across Merkle nodes so pulls run in big batches
        # the root's answer came with hello (older peers: asked for by the walk)
        first = (protocol.parse_merkle(hello["merkle"], "") if "merkle" in hello else None)
        came: set[str] = set()  # events that came with hello: not asked for again
        try:
            if "events" in hello:
                received, certs = protocol.parse_hello_events(hello)
                came = {e for e, _ in received}
                held = await self._take_events(
                    received, certs, unasked=True,
                    pack=(answer, hello.get("pack")) if answer is not None else None)
                pulled += len(received)
                if answer is not None:
                    self._first_pack_pull(answer, held)
                log.debug("round with %s: %d events with hello, pulls fed at %.3f s",
                          self.peer_id.short, len(received), time.monotonic() - t0)
            async for theirs, ours in walk_diff(self.node, self.client.merkle, first):
                wanted.extend(e for e in theirs if e not in came)
                if len(wanted) >= EVENT_BATCH:
                    await self.pull_events(wanted)
                    pulled += len(wanted)
                    wanted = []
                lacking += len(ours)
                if st.pushing:
                    to_push.extend(ours)
                    if len(to_push) >= EVENT_BATCH:
                        await self.push_events(to_push)
                        to_push = []
            log.debug("round with %s: diff walked at %.3f s", self.peer_id.short,
                      time.monotonic() - t0)
            if wanted:
                await self.pull_events(wanted)
                pulled += len(wanted)
            if to_push:
                await self.push_events(to_push)
        except asyncio.CancelledError:
            await self.finish_pulls(cancel=True)
            raise
        except BaseException:
            await self.finish_pulls()  # the blobs of good events are kept, then it fails
            raise
        failures = await self.finish_pulls()
        if failures:
            raise failures[0]
        await self._settle_skipped()
        # We now hold everything the peer held when the walk passed it: up to date with it.
        # What it lacks from us is its own loop's job (or was pushed just now).
        st.peer_lacks = 0 if st.pushing else lacking
        st.local_root = (await offload(self.node.catalog.merkle_root)).digest.hex()
        self._in_sync()
        if pulled or (st.pushing and lacking):
            log.info("sync round with %s: %d events pulled, %d pushed, root %s, %.3f s",
                     self.peer_id.short, pulled, lacking if st.pushing else 0,
                     st.local_root[:16], time.monotonic() - t0)
        if pulled:
            self.wake.set()  # look again at once: the peer may have changed meanwhile

    def _in_sync(self) -> None:
        st = self.state
        st.state, st.in_sync = "in_sync", True
        st.events_needed = st.blobs_needed = st.bytes_needed = 0
        st.round_blobs = st.round_bytes = 0
        st.studies_needed = {}
        st.last_success = time.time()
        st.last_error = st.error_kind = ""
        # written with the next attempt at the round's end (_round): one commit a round

    # -- pulling -------------------------------------------------------------------------
    async def pull_events(self, ids: list[str]) -> None:
        """Fetch these events, apply those that need no blob, and hand the puts that wait
        for a blob to the round's pull scheduler (:class:`_PullFeed`); it runs on while the
        next batches are fetched (:meth:`finish_pulls` waits for it at the round's end).
        At most about two batches of blobs wait unstarted at any time."""
        st = self.state
        done = 0
        for batch in protocol.batched(ids, EVENT_BATCH):
            await self._feed_room()
            st.events_needed = len(ids) - done
            done += len(batch)
            t0 = time.monotonic()
            received, certs = await self.client.events(batch)
            log.debug("%d events from %s in %.3f s", len(received), self.peer_id.short,
                      time.monotonic() - t0)
            await self._take_events(received, certs)
            served = {e for e, _ in received}
            withheld = [e for e in batch if e not in served]
            if withheld:
                raise WithheldEvents(f"peer listed {len(withheld)} events it did not serve, "
                                     f"e.g. {withheld[0]}")

    async def _take_events(self, received: list[tuple[str, bytes]], certs: list[bytes],
                           *, unasked: bool = False,
                           pack: tuple[HelloAnswer, Any] | None = None
                           ) -> dict[str, list[ev.Checked]]:
        """Events from the peer (asked for, or ``unasked``: they came with its hello):
        each body checked against its id, the signatures against their origins'
        certificates (``certs``); those that need no blob applied, the puts that wait for
        one handed to the round's pull scheduler. An invalid event fails the round (after
        the good ones were applied; an unasked batch is refused whole, nothing applied).

        ``pack``: the frames after a hello answer and the list of their blobs, checked
        against these events before anything is applied (:func:`protocol.parse_hello_pack`;
        its ``expected`` is set); the puts waiting for those blobs are returned, not
        handed to the scheduler."""
        st = self.state
        self._pulled.events += len(received)
        await offload(self.node.catalog.offer_certificates, certs)  # to verify them
        plan = await offload(_plan_pull, self.node, received)
        if plan.invalid:
            st.integrity_errors += len(plan.invalid)
            if unasked:
                eid, why = plan.invalid[0]
                raise ProtocolError(f"peer's hello carried {len(plan.invalid)} invalid "
                                    f"events, e.g. {eid}: {why}; none of its {len(received)} "
                                    "events applied")
        held: dict[str, list[ev.Checked]] = {}
        if pack is not None:
            answer, listed = pack
            sizes = {c.event.blob: c.event.size
                     for c in itertools.chain(plan.ready, *plan.waiting.values())
                     if isinstance(c.event, ev.PutEvent)}
            answer.expected = protocol.parse_hello_pack(listed, sizes)
        if plan.ready:
            await self._apply(plan.ready)
        waiting = plan.waiting
        # puts whose tombstone we now hold need no blob
        dead_blobs = await offload(_dead_blobs, self.node.catalog, waiting)
        for blob in dead_blobs:
            await self._apply(waiting.pop(blob))
        size = sum(_put_of(v).size for v in waiting.values())
        st.blobs_needed += len(waiting)  # earlier batches' blobs may still be pulling
        st.bytes_needed += size
        st.round_blobs += len(waiting)
        st.round_bytes += size
        st.studies_needed = _studies_needed(waiting.values(), st.studies_needed)
        self.save_state()
        if pack is not None:
            held = {b: waiting.pop(b) for b, _ in pack[0].expected if b in waiting}
        self._feed_blobs(waiting)
        st.events_received += len(received) - len(plan.invalid)
        # Checked after applying what was good: a peer that lists events and then
        # withholds them, or serves invalid ones, fails the round (backoff), never
        # ends it "in sync" to be asked again at once.
        if plan.invalid:
            eid, why = plan.invalid[0]
            raise ProtocolError(f"peer sent {len(plan.invalid)} invalid events, e.g. "
                                f"{eid}: {why}")
        return held

    def _first_pack_pull(self, answer: HelloAnswer, held: dict[str, list[ev.Checked]]
                         ) -> None:
        """Pull the blobs whose frames follow hello's answer (``held``: their puts) as a
        pack, alongside the scheduler's pulls of the rest: the link carries blob bytes
        while the first pulls are asked for. A blob another peer's loop has claimed is
        pulled the usual way (its frame is dropped); so are those the pack did not bring,
        once it ended (:meth:`finish_pulls` waits for it)."""
        sources, gate = self.engine.sources, self.pull_gate
        group: list[tuple[Claim, list[ev.Checked]]] = []
        for blob, size in answer.expected:
            if blob not in held:
                continue
            claim = None
            if blob not in sources.claims:  # never taken over from another loop here
                claim = sources.pick(self.peer_id.compact, [(blob, size)],
                                     gate.window.rate(), 0.0)
            if claim is None:
                self._feed_blobs({blob: held.pop(blob)})
                continue
            group.append((claim, held.pop(blob)))
        if not group:
            answer.close()
            return
        ticket = gate.ticket(sum(c.size for c, _ in group))
        ticket.rtt_sample = False  # its bytes were under way before it started

        async def pull() -> list[Exception]:
            later = await self._pull_pack_and_apply(group, ticket, answer)
            self._feed_blobs({c.blob: items for c, items in group if c.blob in later})
            return []

        self._first_pack = asyncio.get_running_loop().create_task(
            pull(), name=f"first-pack-{self.peer_id.short}")

    def _feed_blobs(self, waiting: dict[str, list[ev.Checked]]) -> None:
        """Hand blobs to the round's pull scheduler (started with the first of them)."""
        if not waiting:
            return
        feed = self._feed
        if feed is None or feed.closed:
            feed = self._feed = _PullFeed()
        for blob, items in waiting.items():
            feed.todo.setdefault(blob, []).extend(items)
        if feed.task is None:
            feed.task = asyncio.get_running_loop().create_task(
                self._pull_waiting(feed.todo, feed), name=f"pulls-{self.peer_id.short}")
        self.pull_gate.wake.set()

    async def _feed_room(self) -> None:
        """Wait while a batch of blobs or more waits unstarted (bounds the events held)."""
        feed = self._feed
        while feed is not None and len(feed.todo) >= EVENT_BATCH and feed.task is not None \
                and not feed.task.done():
            feed.taken.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SCHEDULE_TICK):
                    await feed.taken.wait()

    async def finish_pulls(self, *, cancel: bool = False) -> list[Exception]:
        """No more blobs this round: wait until the scheduler has pulled (or failed) every
        blob it was given, or, with ``cancel``, stop it. Returns the pulls' failures.
        The first pack's pull (after hello) ends first: the blobs it did not bring go to
        the scheduler before it is told that no more come."""
        failures: list[Exception] = []
        first, self._first_pack = self._first_pack, None
        if first is not None:
            if cancel:
                first.cancel()
            (outcome,) = await asyncio.gather(first, return_exceptions=True)
            if isinstance(outcome, Exception):
                failures.append(outcome)
            elif isinstance(outcome, BaseException) and not isinstance(
                    outcome, asyncio.CancelledError):
                raise outcome
        feed, self._feed = self._feed, None
        if feed is None or feed.task is None:
            return failures
        feed.closed = True
        self.pull_gate.wake.set()
        if cancel:
            feed.task.cancel()
        (outcome,) = await asyncio.gather(feed.task, return_exceptions=True)
        if isinstance(outcome, asyncio.CancelledError):
            return failures
        if isinstance(outcome, BaseException):  # a bug in the scheduler fails the round
            if not isinstance(outcome, Exception):
                raise outcome
            return [*failures, outcome]
        return [*failures, *outcome]

    async def _apply(self, checked: list[ev.Checked]) -> None:
        result = await offload(self.node.apply, checked)
        if result.rejected:
            self.state.integrity_errors += len(result.rejected)
            raise _rejection(result.rejected, result.refused)
        if result.inserted:
            self.engine.changed(exclude={self})

    async def _pull_waiting(self, waiting: dict[str, list[ev.Checked]],
                            feed: _PullFeed | None = None) -> list[Exception]:
        """Pull the waiting blobs, as many at once as this peer's window allows, each
        claimed first (:mod:`syncnode.sources`): a blob another peer's loop is pulling is
        left to it (its puts are applied once it is installed) unless that pull is stuck,
        when it is taken over. Returns the failures; one does not stop the others.

        With a ``feed``, ``waiting`` is its ``todo``: more blobs may be added to it while
        this runs, and it returns only once the feed is closed and everything is done."""
        sources, gate = self.engine.sources, self.pull_gate
        todo = waiting if feed is not None else dict(waiting)
        running: dict[asyncio.Task[bool],
                      tuple[Claim, Ticket, list[ev.Checked]]] = {}
        packs: dict[asyncio.Task[list[str]],
                    tuple[list[tuple[Claim, list[ev.Checked]]], Ticket]] = {}
        failures: list[Exception] = []
        sources.subscribe(gate.wake)
        shown = -1
        try:
            while todo or running or packs or (feed is not None and not feed.closed):
                gate.wake.clear()
                if feed is not None:
                    feed.taken.set()
                if gate.window.limit != shown and log.isEnabledFor(logging.DEBUG):
                    w, shown = gate.window, gate.window.limit
                    log.debug("pulls from %s: window %d, %d in flight (%d bytes), %.1f MB/s, "
                              "rtt %.3f s", self.peer_id.short, w.limit, w.inflight,
                              w.outstanding, w.rate() / 1e6, w.min_rtt)
                while todo:
                    if not gate.has_room(_put_of(todo[next(iter(todo))]).size):
                        break
                    w = gate.window
                    rate = w.rate()
                    claim = sources.pick(self.peer_id.compact,
                                         ((b, _put_of(v).size) for b, v in todo.items()),
                                         rate, rate / max(1, w.limit))
                    if claim is None:
                        break
                    items = todo.pop(claim.blob)
                    if pack := self._fill_pack(claim, todo):  # small blobs: one request
                        group = [(claim, items), *pack]
                        ticket = gate.ticket(sum(c.size for c, _ in group))
                        packed = asyncio.get_running_loop().create_task(
                            self._pull_pack_and_apply(group, ticket))
                        packed.add_done_callback(lambda _t: gate.wake.set())
                        packs[packed] = (group, ticket)
                        continue
                    ticket = gate.ticket(claim.size)
                    task = asyncio.get_running_loop().create_task(
                        self._pull_and_apply(claim.blob, items, claim, ticket))
                    task.add_done_callback(lambda _t: gate.wake.set())
                    running[task] = (claim, ticket, items)
                finished = [t for t in packs if t.done()]
                for packed in finished:
                    group, _ticket = packs.pop(packed)
                    if (exc := _failure(packed)) is not None:
                        failures.append(exc)
                        continue
                    again = set(packed.result())  # to pull one by one now
                    for claim, items in group:
                        if claim.blob in again:
                            todo[claim.blob] = items
                done = [t for t in running if t.done()]
                if not done and not finished:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SCHEDULE_TICK):
                            await gate.wake.wait()
                    continue
                for task in done:
                    claim, _ticket, items = running.pop(task)
                    if (exc := _failure(task)) is not None:
                        failures.append(exc)
                    elif not task.result():  # taken over by another peer: its puts wait
                        todo[claim.blob] = items
        finally:
            sources.unsubscribe(gate.wake)
            for task in [*running, *packs]:
                task.cancel()
            if running or packs:  # a cancelled pack releases its own claims and ticket
                await asyncio.gather(*running, *packs, return_exceptions=True)
            for claim, ticket, _items in running.values():  # a task cancelled before it ran
                ticket.finish()
                sources.release(claim)
            for group, ticket in packs.values():
                ticket.finish()
                for claim, _items in group:
                    sources.release(claim)
        return failures

    async def _pull_and_apply(self, blob: str, items: list[ev.Checked],
                              claim: Claim, ticket: Ticket) -> bool:
        """Pull the blob (unless present) and have its puts applied with others'. False
        if another peer's loop took the pull over (the puts are then applied later, once
        it installed the blob).

        The blob's lock is held until it is installed, so no other pull or push writes
        the same part file meanwhile; the claim (:mod:`syncnode.sources`) is released
        after that, and the window's ticket when the transfer ends."""
        put = _put_of(items)
        installer = self.engine.installer
        try:
            async with self.engine.blob_lock(blob):
                staged = None
                if claim.stolen_by is not None:
                    return False
                if not await offload(self.node.store.has, blob):
                    async with installer.pulling():
                        fetch = asyncio.ensure_future(self.pull_blob(put, ticket, claim))
                        claim.fetch = fetch
                        try:
                            staged = await fetch
                        except PeerLacksBlob:
                            # Usually the peer deleted the instance and freed the blob; the
                            # tombstone comes later in this walk. Settled at its end.
                            ticket.error_exempt = True
                            self._skipped.extend(items)
                            return True
                        except asyncio.CancelledError:
                            task = asyncio.current_task()
                            if claim.stolen_by is None or (task and task.cancelling()):
                                raise
                            log.info("blob %s from %s taken over by %s (too slow)", blob,
                                     self.peer_id.short, claim.stolen_by[:7])
                            ticket.finish(error=True)  # slow: the window shrinks
                            return False
                        except BaseException:
                            ticket.finish(error=not ticket.error_exempt)
                            raise
                ticket.finish()
                await installer.submit(self, staged, items)
        finally:
            ticket.finish()
            self.engine.sources.release(claim)
        self._count_pulled(items)
        return True

    def _count_pulled(self, items: list[ev.Checked]) -> None:
        """A blob and its puts are in: progress and the round's tally."""
        put = _put_of(items)
        self._pulled.instances += len(items)
        self._pulled.studies.add(put.study_instance_uid)
        st = self.state
        st.blobs_needed = max(0, st.blobs_needed - 1)
        st.bytes_needed = max(0, st.bytes_needed - put.size)
        left = st.studies_needed.get(put.study_instance_uid)
        if left is not None:
            left[0] -= 1
            left[1] -= put.size
            if left[0] <= 0:
                del st.studies_needed[put.study_instance_uid]
        self.save_state()

    def _fill_pack(self, first: Claim, todo: dict[str, list[ev.Checked]]
                   ) -> list[tuple[Claim, list[ev.Checked]]]:
        """More small, unclaimed blobs from ``todo`` (claimed and removed from it) to go in
        one pack with ``first`` (already claimed and removed): up to PACK_MAX_BLOBS and
        :meth:`pack_target` bytes, never past what the window lets start. Empty when
        ``first`` is not for a pack (large, stolen, or one a pack did not bring)."""
        if (not self.packs or first.size > CHUNK_SIZE or first.stolen_from
                or first.blob in self._singly):
            return []
        sources, w = self.engine.sources, self.pull_gate.window
        rate = w.rate()
        # Before the first throughput sample, a loop that has no other peer to share the
        # blobs with fills the window's byte budget in its first round trip (eight small
        # packs would leave a long path idle for seconds); with several, claims stay small
        # so that each peer gets its share (syncnode.sources).
        alone = w.epochs == 0 and self.engine.sole_source(self)
        target = pack_target(rate, w.share() if alone else 0)
        group: list[tuple[Claim, list[ev.Checked]]] = []
        total = first.size
        for blob in list(todo):
            if len(group) + 1 >= protocol.PACK_MAX_BLOBS:
                break
            size = _put_of(todo[blob]).size
            if size > CHUNK_SIZE or blob in self._singly or blob in sources.claims:
                continue
            if total + size > target or not w.may_start(total + size):
                break
            claim = sources.pick(self.peer_id.compact, [(blob, size)], rate, 0.0)
            if claim is None:
                continue
            group.append((claim, todo.pop(blob)))
            total += size
        return group

    async def _pull_pack_and_apply(self, group: list[tuple[Claim, list[ev.Checked]]],
                                   ticket: Ticket, answer: HelloAnswer | None = None
                                   ) -> list[str]:
        """Pull a group of small blobs (each claimed) in one pack and have their puts
        applied. Returns the blobs to pull one by one afterwards (not packed by the peer,
        refused alone, or locked by another pull right now); blobs that arrived before a
        failure are installed all the same, then the failure is raised.

        Locks are taken without waiting (a pack never waits for one lock while holding
        others). A blob in a pack is not taken over by another peer mid-pack (the pack's
        own deadline bounds it); its claim is released once it is installed. ``answer``:
        the frames come after hello's answer (closed here whatever happens)."""
        store, installer, sources = self.node.store, self.engine.installer, self.engine.sources
        mine: dict[str, list[ev.Checked]] = {}
        claims: dict[str, Claim] = {}
        held: list[asyncio.Lock] = []
        later: list[str] = []
        failure: Exception | None = None
        installs: list[asyncio.Task[None]] = []

        async def install(blob: str, staged: StagedBlob | None) -> None:
            try:
                await installer.submit(self, staged, mine[blob])
                self._count_pulled(mine[blob])
            finally:
                if (claim := claims.pop(blob, None)) is not None:
                    sources.release(claim)

        def arrived(blob: str, staged: StagedBlob | None) -> None:
            if staged is not None:
                claims[blob].got = staged.size  # its progress, as the steal rule sees it
            installs.append(asyncio.ensure_future(install(blob, staged)))

        try:
            for claim, items in group:
                lock = self.engine.blob_lock(claim.blob)
                claims[claim.blob] = claim
                if lock.locked():
                    later.append(claim.blob)
                    continue
                await lock.acquire()  # free: returns at once
                held.append(lock)
                mine[claim.blob] = items
            present = await offload(lambda: {b for b in mine if store.has(b)})
            for b in present:
                arrived(b, None)
            wanted = [_put_of(mine[b]) for b in mine if b not in present]
            if wanted:
                async with installer.pulling():
                    try:
                        singly = await self.pull_pack(wanted, arrived, ticket, claims, answer)
                        later.extend(singly)
                    except Exception as exc:  # what arrived is installed, then reported
                        failure = exc
            # the bytes are in: the window's slot is free now, not after the group commit
            # that installs them (up to APPLY_DELAY while other pulls run), as for one blob
            ticket.finish(error=failure is not None and not isinstance(failure, PeerLacksBlob))
            for r in await asyncio.gather(*installs, return_exceptions=True):
                if isinstance(r, BaseException):
                    if not isinstance(r, Exception):
                        raise r
                    failure = failure or r
        finally:
            if answer is not None:
                answer.close()
            for lock in held:
                lock.release()
            for blob in list(claims):  # not installed (yet): free for the next pick
                sources.release(claims.pop(blob))
            ticket.finish(error=failure is not None and not isinstance(failure, PeerLacksBlob))
        if failure is not None:
            raise failure
        self._singly.update(later)
        return later

    async def pull_pack(self, puts: list[ev.PutEvent],
                        arrived: Callable[[str, StagedBlob], None],
                        ticket: Ticket | None = None,
                        claims: dict[str, Claim] | None = None,
                        answer: HelloAnswer | None = None) -> list[str]:
        """Pull the blobs of ``puts`` (each of at most one chunk) in one pack; each blob is
        handed to ``arrived`` with its verified part file as soon as it is written. Returns
        the blobs to pull one by one. Free space is checked before anything is written."""
        st = self.state
        store = self.node.store
        # counted as taken until the pack is written (the other pulls see it gone)
        room = await _promise_room(store, lambda: sum(p.size for p in puts))

        def received(n: int) -> None:
            st.bytes_received += n
            self.engine.count_bytes(self.peer_id.compact, "in", n)
            if ticket is not None:
                ticket.progress(n)

        def crossed(n: int) -> None:
            st.wire_bytes_received += n

        def refused(blob: str, exc: Exception, size: int) -> None:
            log.warning("blob %s in a pack from %s refused, fetched alone next: %s", blob,
                        self.peer_id.short, exc)
            st.integrity_errors += 1
            st.bytes_discarded += size
            self.report_damage(blob, exc)

        self.client.min_rate = self.engine.min_pull_rate
        self.client.base_deadline = self.engine.pull_base_deadline
        mode, url = self.engine.compression, self.state.url
        try:
            return await self.client.fetch_pack(
                store, [(p.blob, p.size, p.chunks,
                         wire.want_compression(mode, url, p.transfer_syntax_uid))
                        for p in puts],
                arrived, received, crossed, refused, answer)
        finally:
            room.release()

    async def _settle_skipped(self) -> None:
        """Apply the skipped puts that a tombstone received since has removed (they need no
        blob); any other is a live put the peer cannot serve: an error of this round."""
        skipped, self._skipped = self._skipped, []
        catalog = self.node.catalog
        gone = await offload(lambda: {c.eid for c in skipped
                                          if catalog.is_tombstoned(c.eid, c.event.origin)})
        removed = [c for c in skipped if c.eid in gone]
        if removed:
            await self._apply(removed)
        if len(removed) < len(skipped):
            lost = next(c.eid for c in skipped if c.eid not in gone)
            raise PeerLacksBlob(f"peer lacks the blobs of {len(skipped) - len(removed)} live "
                                f"put events, e.g. {lost}")

    async def pull_blob(self, put: ev.PutEvent, ticket: Ticket | None = None,
                        claim: Claim | None = None) -> StagedBlob:
        """Pull the blob of ``put``, after checking its announced size against
        ``max_blob_size`` (BlobTooLarge) and the free space (StoreFull) before anything
        is written."""
        st = self.state
        if put.size > self.engine.max_blob_size:
            st.integrity_errors += 1
            raise BlobTooLarge(f"blob {put.blob} announced at {put.size} bytes, more than "
                               f"the {self.engine.max_blob_size} this node accepts")
        store = self.node.store
        # counted as taken until the blob is written (the other pulls see it gone)
        room = await _promise_room(store, lambda: put.size - _held(store, put.blob))
        got = 0

        def received(n: int) -> None:
            nonlocal got
            got += n
            st.bytes_received += n
            self.engine.count_bytes(self.peer_id.compact, "in", n)
            if ticket is not None:
                ticket.progress(n)
            if claim is not None:
                claim.got += n

        def crossed(n: int) -> None:
            st.wire_bytes_received += n

        compress = wire.want_compression(self.engine.compression, self.state.url,
                                         put.transfer_syntax_uid)
        self.client.min_rate = self.engine.min_pull_rate
        self.client.base_deadline = self.engine.pull_base_deadline
        try:
            staged, resumed = await self.client.fetch_staged(
                self.node.store, put.blob, put.size, put.chunks, received,
                compress=compress, on_wire=crossed)
        except (TransferError, BlobHashMismatch) as exc:
            st.integrity_errors += 1
            st.bytes_discarded += got  # this attempt's bytes did not verify: no progress
            self.report_damage(put.blob, exc)
            raise
        finally:
            room.release()
        st.bytes_resumed += resumed
        return staged

    # -- pushing -------------------------------------------------------------------------
    async def push_events(self, ids: list[str]) -> None:
        catalog = self.node.catalog
        for batch in protocol.batched(ids, EVENT_BATCH):
            pairs, offer, put_of = await offload(_plan_push, self.node, batch)
            answer = (await self.client._json("POST", "/push/offer", json={"blobs": offer})
                      if offer else {})
            sizes = {o["hash"]: int(o["size"]) for o in offer}
            want = answer.get("want", [])
            packs, singly = self._plan_push_packs(want, sizes)
            url, mode = self.state.url, self.engine.compression
            zstd = {p.blob: wire.want_compression(mode, url, p.transfer_syntax_uid)
                    for p in put_of.values()}
            results = await asyncio.gather(*(self._push_one(w, sizes) for w in singly),
                                           *(self._push_pack(g, zstd) for g in packs),
                                           return_exceptions=True)
            not_taken: set[str] = set()  # refused from a pack: pushed again next round
            for r in results:
                if isinstance(r, BaseException):
                    raise r
                if isinstance(r, set):
                    not_taken |= r
            # blobs the peer is fetching itself right now: their puts go in a later round
            busy = set(answer.get("busy", [])) | not_taken
            pairs = [(e, b) for e, b in pairs if e not in put_of or put_of[e].blob not in busy]
            if not pairs and not not_taken:
                continue
            result = {}
            if pairs:
                certs = await offload(catalog.certificates_for, [e for e, _ in pairs])
                result = await self.client._json("POST", "/push/events",
                                                 json=protocol.events_response(pairs, certs))
            applied = result.get("applied", [])
            self.state.events_sent += len(applied)
            self._pushed.events += len(applied)
            took = set(applied)
            puts = [put_of[e] for e, _ in pairs if e in took and e in put_of]
            self._pushed.instances += len(puts)
            self._pushed.studies.update(p.study_instance_uid for p in puts)
            # A put we hold only as removed (no blob to send) is refused until the peer holds
            # its tombstone, which may be in a later batch: it goes again next round.
            refused = list((result.get("rejected") or {}).items())
            rejected = await offload(lambda r=refused: [(e, why) for e, why in r
                                                        if not catalog.is_tombstoned(e)])
            if rejected:
                raise ProtocolError(f"peer rejected pushed events: {rejected[:1]}")
            if not_taken:
                raise ProtocolError(f"peer refused {len(not_taken)} blobs of a pushed pack, "
                                    f"e.g. {min(not_taken)}: pushed again next round")

    def _plan_push_packs(self, want: list[dict[str, Any]], sizes: dict[str, int]
                         ) -> tuple[list[list[tuple[str, int]]], list[dict[str, Any]]]:
        """The wanted blobs that go in pushed packs (small, from offset 0, to a peer that
        takes them), grouped up to PACK_MAX_BLOBS and about :func:`pack_target` bytes;
        and the rest, pushed one by one."""
        packs: list[list[tuple[str, int]]] = []
        singly: list[dict[str, Any]] = []
        target = pack_target(self.push_gate.window.rate())
        group: list[tuple[str, int]] = []
        total = 0
        for w in want:
            blob, offset = protocol.check_hash_value(w.get("hash")), w.get("offset")
            size = sizes.get(blob, CHUNK_SIZE + 1)
            if not self.push_packs or offset != 0 or size > CHUNK_SIZE:
                singly.append(w)
                continue
            if group and (len(group) >= protocol.PACK_MAX_BLOBS or total + size > target):
                packs.append(group)
                group, total = [], 0
            group.append((blob, size))
            total += size
        if group:
            packs.append(group)
        return packs, singly

    async def _push_pack(self, group: list[tuple[str, int]], zstd: dict[str, bool]
                         ) -> set[str]:
        """Push a group of small offered blobs in one request (``POST /push/pack``): each
        frame is read (as stored: the peer verifies it) and compressed if wanted in a worker
        thread while the one before is sent. Returns the blobs the peer refused; those it
        found not matching their hash make this node re-hash its own copy."""
        store = self.node.store
        limiter = self.engine.limiter

        def frame(blob: str, size: int) -> tuple[bytes, bytes]:
            data = b"".join(store.read_range(blob, 0, size))
            status = protocol.RAW
            if zstd.get(blob) and data:
                packed = wire.compress_chunk(data)
                if len(packed) < len(data):
                    data, status = packed, protocol.ZSTD
            return protocol.pack_frame_header(blob, status, size, len(data)), data

        async with self.push_gate.slot(sum(size for _, size in group)) as ticket:
            async def body() -> AsyncIterator[bytes]:
                ahead = asyncio.ensure_future(offload(frame, *group[0]))
                try:
                    for i, (_blob, size) in enumerate(group):
                        head, data = await ahead
                        if i + 1 < len(group):
                            ahead = asyncio.ensure_future(offload(frame, *group[i + 1]))
                        if limiter is not None and limiter.active:
                            await limiter.consume(self.peer_id.compact, "out", len(data))
                        self.state.bytes_sent += size
                        self.engine.count_bytes(self.peer_id.compact, "out", size)
                        ticket.progress(size)
                        yield head
                        yield data
                finally:
                    if not ahead.done():
                        ahead.cancel()
                        await asyncio.wait([ahead])

            async with asyncio.timeout(self.client.pull_deadline(ticket.size)), \
                    self.client.session().post(f"{self.client.base}/push/pack", data=body(),
                                               headers={"Content-Type":
                                                        protocol.PACK_CONTENT_TYPE}) as resp:
                raw = await read_capped(resp, MAX_HELLO, "POST /push/pack")
        try:
            answer = json.loads(raw)
            refused = dict(answer.get("refused") or {})
            mismatched = set(answer.get("mismatched") or [])
        except (ValueError, AttributeError, TypeError) as exc:
            raise ProtocolError(f"POST /push/pack: HTTP {resp.status}, answer is not the "
                                f"expected JSON: {exc}") from exc
        sizes = dict(group)
        for blob in mismatched & sizes.keys():
            log.warning("peer %s refused pushed blob %s as not matching its hash: "
                        "re-hashing our copy", self.peer_id.short, blob)
            if self.engine.damage is not None:
                self.engine.damage.report(None, blob, sizes[blob])
        if resp.status != 200:
            raise ProtocolError(f"POST /push/pack: HTTP {resp.status}: "
                                f"{answer.get('error', '')}")
        return set(refused) & sizes.keys()

    async def _push_one(self, want: dict[str, Any], sizes: dict[str, int]) -> None:
        blob, offset = protocol.check_hash_value(want["hash"]), int(want["offset"])
        async with self.push_gate.slot(max(0, sizes.get(blob, 0) - offset)) as ticket:
            await self.push_blob(blob, offset, ticket)

    async def push_blob(self, blob: str, offset: int, ticket: Ticket | None = None) -> None:
        store = self.node.store
        size = await offload(store.size, blob)
        # as stored: the peer verifies every chunk (a 422 makes us re-hash our copy)
        pieces = store.read_range(blob, offset, size)  # a generator: reads in next()

        async def body() -> AsyncIterator[bytes]:
            limiter = self.engine.limiter
            while (piece := await offload(next, pieces, None)) is not None:
                if limiter is not None and limiter.active:
                    await limiter.consume(self.peer_id.compact, "out", len(piece))
                self.state.bytes_sent += len(piece)
                self.engine.count_bytes(self.peer_id.compact, "out", len(piece))
                if ticket is not None:
                    ticket.progress(len(piece))
                yield piece

        async with self.client.session().put(
                f"{self.client.base}/push/blobs/{blob}", params={"offset": str(offset)},
                data=body(), headers={"Content-Length": str(size - offset)}) as resp:
            if resp.status >= 400:
                if resp.status == 422 and self.engine.damage is not None:
                    # the peer found our bytes do not match: our disk may be at fault
                    self.engine.damage.report(None, blob, size)
                raise ProtocolError(f"push of blob {blob}: HTTP {resp.status}: "
                                    f"{await _error_text(resp)}")


@dataclass
class _PullPlan:
    """One batch of received events sorted: applicable now, waiting for their blob
    (by blob), and invalid ((id, reason))."""

    ready: list[ev.Checked] = field(default_factory=list)
    waiting: dict[str, list[ev.Checked]] = field(default_factory=dict)  # blob -> its puts
    invalid: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _PullFeed:
    """The blobs of one round still to pull (by blob: their puts), filled batch by batch
    while the blobs of earlier batches are being pulled by one scheduler task, so that the
    window never drains between two batches of events (nor waits for the next batch's
    round trip). ``closed``: no batch will come any more."""

    todo: dict[str, list[ev.Checked]] = field(default_factory=dict)
    closed: bool = False
    task: asyncio.Task[list[Exception]] | None = None
    taken: asyncio.Event = field(default_factory=asyncio.Event)  # set when todo shrinks


PACK_SECONDS = 0.25  # a pack holds about this long of the peer's measured throughput
MIN_PACK = 256 << 10  # bytes of a pack before the peer's throughput is measured


def pack_target(rate: float, floor: int = 0) -> int:
    """Blob bytes to put in one pack: about PACK_SECONDS of what the peer delivers, so that
    a loop claims no more than its peer will soon bring and other peers holding the same
    blobs still get their share (:mod:`syncnode.sources`); MIN_PACK before anything was
    measured, at least ``floor`` (the window's share of its byte budget, when no other
    peer competes) and at most PACK_MAX_BYTES."""
    return max(MIN_PACK, min(protocol.PACK_MAX_BYTES, max(int(rate * PACK_SECONDS), floor)))


async def _promise_room(store: BlobStore, size: Callable[[], int]) -> RoomPromise:
    """:meth:`BlobStore.promise_room` off the event loop; a promise made after the caller
    was cancelled is released, never leaked (it would hold the room for good)."""
    made = asyncio.ensure_future(offload(lambda: store.promise_room(size())))
    try:
        return await asyncio.shield(made)
    except asyncio.CancelledError:
        made.add_done_callback(_release_late)
        raise


def _release_late(made: asyncio.Future[RoomPromise]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().release()


def _held(store: BlobStore, blob: str) -> int:
    """Bytes of the blob already in its part file (not needed again)."""
    try:
        return store.part_path(blob).stat().st_size
    except FileNotFoundError:
        return 0


def _plan_pull(node: LocalNode, received: list[tuple[str, bytes]]) -> _PullPlan:
    """Check each body against its id, once, and sort the events (blocking: hashing,
    stat)."""
    plan = _PullPlan()
    checked, invalid = ev.check_all(received)
    plan.invalid.extend(invalid.items())
    for c in checked:
        if isinstance(c.event, ev.PutEvent) and not node.store.has(c.event.blob):
            plan.waiting.setdefault(c.event.blob, []).append(c)
        else:
            plan.ready.append(c)
    return plan


def _dead_blobs(catalog: Catalog,
                waiting: dict[str, list[ev.Checked]]) -> list[str]:
    """Blobs all of whose waiting puts are already held or tombstoned: no pull needed."""
    return [blob for blob, items in waiting.items()
            if all(not catalog.missing_events([e]) or catalog.is_tombstoned(e, x.origin)
                   for e, _, x in items)]


def _plan_push(node: LocalNode, ids: list[str]
               ) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]], dict[str, ev.PutEvent]]:
    """The events to push, the offer of their blobs we hold, and the put events by id
    (decoded once, here)."""
    store = node.store
    pairs = node.catalog.get_events(ids)
    held: dict[str, ev.PutEvent] = {}  # blob -> a put of it
    put_of: dict[str, ev.PutEvent] = {}
    for eid, body in pairs:
        x = ev.decode(body)
        if isinstance(x, ev.PutEvent):
            put_of[eid] = x
            if store.has(x.blob):
                held[x.blob] = x
    offer = [{"hash": h, "size": p.size, "chunks": store.chunk_digests(h).hex()}
             for h, p in held.items()]
    return pairs, offer, put_of


class StateWriter:
    """Writes peer states to the catalog from one thread, off the event loop. States of a
    peer are written in order and coalesced (only the newest one waiting is written). A
    write that fails is logged, never raised: recording an error must not be able to end
    the loop that records it (e.g. on a full disk)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-state")
        self._scheduled = False
        self.writes = 0  # states written to the catalog so far

    def write(self, peer: str, state: dict[str, Any]) -> None:
        with self._lock:
            self._pending[peer] = state
            if self._scheduled:
                return
            self._scheduled = True
        self._pool.submit(self._drain)

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._scheduled = False
        for peer, state in pending.items():
            try:
                self.catalog.set_peer_state(peer, state)
            except Exception as exc:  # the catalog's disk is full or failing: say so, go on
                log.error("could not record the state of peer %s: %s: %s", peer[:7],
                          type(exc).__name__, exc)
                continue
            self.writes += 1

    def close(self) -> None:
        """Write what waits, then stop the thread."""
        self._pool.shutdown(wait=True)


@dataclass
class _Arrival:
    peer: PeerSync
    staged: StagedBlob | None  # None: the blob was already present
    checked: list[ev.Checked]
    done: asyncio.Future[None]


class Installer:
    """Makes pulled blobs durable and their puts live in groups, for all peers at once.

    A group costs two filesystem syncs (:meth:`BlobStore.install_staged`: part files on disk
    before any rename, renames on disk before the catalog names them) and one catalog
    transaction, instead of several fsyncs and a transaction per blob. A group is installed
    when APPLY_BATCH blobs wait, when no pull is in flight any more (so the last blob of a
    round is never held back), or APPLY_DELAY after the first of them arrived.
    """

    def __init__(self, engine: SyncEngine) -> None:
        self.engine = engine
        self.pending: list[_Arrival] = []
        self.active = 0  # pulls transferring right now
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def pulling(self) -> AsyncIterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0 and self.pending:
                self._flush_soon()

    async def submit(self, peer: PeerSync, staged: StagedBlob | None,
                     checked: list[ev.Checked]) -> None:
        """Queue a pulled blob (or, with ``staged=None``, puts whose blob is present) and
        wait until it is installed and its puts applied. Raises what that raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(_Arrival(peer, staged, checked, done))
        if len(self.pending) >= APPLY_BATCH or self.active == 0:
            self._flush_soon()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(APPLY_DELAY, self._flush_soon)
        await done

    def _flush_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        async with self._lock:
            batch, self.pending = self.pending, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not batch:
                return
            try:
                await self._install(batch)
            except Exception as exc:  # each waiting pull reports it in its own peer's state
                log.warning("installing %d pulled blobs failed: %s: %s", len(batch),
                            type(exc).__name__, exc)
                for a in batch:
                    if not a.done.done():
                        a.done.set_exception(exc)
                return
            for a in batch:
                if not a.done.done():
                    a.done.set_result(None)

    async def _install(self, batch: list[_Arrival]) -> None:
        node = self.engine.node
        staged = [a.staged for a in batch if a.staged is not None]
        if staged:
            await offload(node.store.install_staged, staged)
        result = await offload(node.apply, [c for a in batch for c in a.checked])
        for a in batch:
            bad = {c.eid: result.rejected[c.eid] for c in a.checked if c.eid in result.rejected}
            if bad and not a.done.done():
                a.peer.state.integrity_errors += len(bad)
                a.done.set_exception(_rejection(bad, result.refused))
        if result.inserted:
            self.engine.changed(exclude={a.peer for a in batch})
        if staged:
            await offload(node.settle_received, [s.digest for s in staged])

    async def close(self) -> None:
        await self.flush()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class SyncEngine:
    """All peer loops of one node, sharing blob locks and counters."""

    node: LocalNode
    interval: float = 5.0
    max_pulls: int = 4  # where each peer's adaptive window starts (syncnode.flow)
    max_window: int = MAX_WINDOW  # the most transfers at once per peer and direction
    max_blob_size: int = MAX_BLOB_SIZE  # bytes: larger announced blobs are refused
    min_pull_rate: int = MIN_PULL_RATE  # bytes/s a pull must average (PullTooSlow)
    pull_base_deadline: float = PULL_BASE_DEADLINE  # seconds on top of size / rate
    compression: str = "auto"  # zstd on the wire for pulls: auto, on, off (see .wire)
    last_seen_fn: Callable[[str], float] | None = None
    peers: dict[str, PeerSync] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    blob_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    sources: Sources = field(default_factory=Sources)  # which peer pulls which blob
    limiter: Limiter | None = None  # bandwidth caps (syncnode.ratelimit)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    installer: Installer = field(init=False)
    states: StateWriter = field(init=False)
    started: float = field(default_factory=time.time)
    on_state: Callable[[PeerState], None] | None = None
    audit: AuditLog | None = None  # one entry per round and peer for what moved
    on_trust_changed: Callable[[], None] | None = None  # a peer renewed its certificate
    # re-hashes a blob of ours a peer refused as not matching (syncnode.damage)
    damage: DamageChecks | None = None
    # per peer (compact id): blob bytes the peer server received ("bytes_in") and served
    # ("bytes_out"); the running node passes its peer server's live counters
    served: dict[str, dict[str, int]] = field(default_factory=dict)
    sample_seconds: float = SAMPLE_SECONDS
    _sampler: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.installer = Installer(self)
        self.states = StateWriter(self.node.catalog)

    def configure_windows(self) -> None:
        """max_pulls / max_window changed: every peer's windows take the new bounds."""
        for p in self.peers.values():
            p.configure_window()

    def sole_source(self, peer: PeerSync) -> bool:
        """Whether ``peer``'s loop is the only one in a round now (no other peer's loop
        could be pulling the same blobs)."""
        return all(p is peer or p.state.state not in ("connecting", "syncing")
                   for p in self.peers.values())

    def blob_lock(self, blob: str) -> asyncio.Lock:
        return self.blob_locks.setdefault(blob, asyncio.Lock())

    def last_seen(self, peer: str) -> float:
        """When the peer last dialled us (or when we started: give it time to do so)."""
        seen = self.last_seen_fn(peer) if self.last_seen_fn else 0.0
        return max(seen, self.started)

    def count_bytes(self, peer: str, direction: str, n: int) -> None:
        d = self.bytes.setdefault(peer, {"in": 0, "out": 0})
        d[direction] += n

    def peer_seen(self, peer: str) -> None:
        """The peer just talked to us: if we were backing off from it, try again now."""
        ps = self.peers.get(peer)
        if ps is not None and ps.state.state == "unreachable":
            ps.backoff.reset()
            ps.wake.set()

    def changed(self, exclude: Collection[PeerSync] = ()) -> None:
        """Local catalog changed: let the other peers' loops run now, and tell the peers
        so that theirs do too (they would otherwise notice at their next round)."""
        for p in self.peers.values():
            if p not in exclude:
                p.wake.set()
                p.notify_soon()

    def notified(self, peer: str) -> None:
        """The peer says it has something new: run our round with it now."""
        ps = self.peers.get(peer)
        if ps is not None:
            ps.wake.set()

    def refresh(self, peers: list[dict[str, Any]] | None = None) -> None:
        """Start loops for new trusted peers, stop loops of removed ones. ``peers``: the
        trust list as read (off the loop) by the caller; read here when not given."""
        wanted = {p["node_id"]: p for p in
                  (self.node.catalog.peers() if peers is None else peers)}
        for nid in list(self.peers):
            if nid not in wanted or self.peers[nid].client.base.removesuffix(protocol.PREFIX) \
                    != wanted[nid]["url"].rstrip("/"):
                self.tasks.pop(nid).cancel()
                asyncio.get_running_loop().create_task(self.peers.pop(nid).client.close())
        for nid, p in wanted.items():
            if nid not in self.peers:
                ps = PeerSync(self.node, self, NodeId.parse(nid), p["url"], p["push"])
                self.peers[nid] = ps
                self.tasks[nid] = asyncio.get_running_loop().create_task(
                    ps.run(self._stop), name=f"sync-{nid[:7]}")
        if self._sampler is None and not self._stop.is_set():
            self._sampler = asyncio.get_running_loop().create_task(self._sample(),
                                                                   name="sync-sampler")

    async def _sample(self) -> None:
        """Every ``sample_seconds``, one throughput sample per peer (cheap: counters only;
        the state is written by the state writer thread)."""
        while not self._stop.is_set():
            await asyncio.sleep(self.sample_seconds)
            for ps in list(self.peers.values()):
                try:
                    ps.sample(self.sample_seconds)
                except Exception:  # a bug here must not end the sampling of every peer
                    log.exception("throughput sample of peer %s failed", ps.peer_id.short)

    async def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        for t in self.tasks.values():
            t.cancel()
        notices = [p._notifying for p in self.peers.values() if p._notifying is not None]
        notices += [t for p in self.peers.values() for t in p._reports.values()]
        notices += [t for p in self.peers.values() for t in p._warming]
        for n in notices:
            n.cancel()
        await asyncio.gather(*notices, return_exceptions=True)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        try:  # blobs already received are installed, not received again after a restart
            await self.installer.close()
        except Exception:
            log.exception("installing the last pulled blobs at shutdown failed")
        for p in self.peers.values():
            await p.client.close()
        await asyncio.get_running_loop().run_in_executor(None, self.states.close)
