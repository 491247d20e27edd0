"""The peer server: serves the protocol of :mod:`syncnode.protocol` over mutual TLS.

Only trusted peers reach a handler: the TLS layer refuses the rest during the handshake,
and every request re-checks the presented certificate against the current trust list (a
peer removed while its connection stays open is refused from its next request on). A
connection without a client certificate (an introduction, see :mod:`syncnode.introduction`)
reaches no handler: the guard answers only the introduction and closes it on anything else.
Blob bytes are served as stored, not re-hashed (:meth:`BlobStore.read_range`): the receiver
verifies every chunk against the digests its signed put event binds before it keeps a byte,
and reports a mismatch (``POST /blobs/H/damaged``), on which this node re-hashes the blob
itself and quarantines it only if its own hash says so (:mod:`syncnode.damage`). Bodies
are size-bounded and read with a timeout.

Handlers never block the event loop: catalog reads and writes, hashing and fsync run
through :func:`syncnode.local.offload`. Errors by type: a request that breaks the protocol
(:class:`~syncnode.protocol.BadRequest`, an invalid hash or prefix) is 400; a blob we do
not hold is 404; a full disk is 507; anything else is our fault, 500, logged with its
traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import events as ev
from . import merkle, protocol, renewal, wire
from .audit import AuditLog, Tally
from .blobstore import (
    CHUNK_SIZE,
    BlobError,
    BlobHashMismatch,
    BlobMissing,
    StagedBlob,
    StoreFull,
    implied_chunk_list,
)
from .catalog import Catalog
from .damage import DamageChecks
from .ids import InvalidHash, check_hash
from .introduction import serve_introduction
from .local import LocalNode, local_errors, offload, offload_to
from .nodeid import NodeId
from .protocol import BadRequest
from .ratelimit import Limiter
from .tls.successor import Successor
from .transfer import PartialBlob, TransferError, stage_whole

log = logging.getLogger("syncnode.peer_server")
BODY_READ_TIMEOUT = 60.0
MIN_PUSH_RATE = 64 * 1024  # bytes/s a pushed blob must average (plus BODY_READ_TIMEOUT)
SMALL_RESPONSE = CHUNK_SIZE  # blob answers up to this size are read whole, then sent
MAX_BLOB_SIZE = 1 << 40  # default bound on one pushed blob (see the max_blob_size setting)
MAX_PENDING_OFFERS = 2 * protocol.MAX_OFFER  # offered blobs not yet pushed, per peer
OFFER_TTL = 3600.0  # seconds an offer stays pending (its files: see BlobStore.clean_tmp)
SERVER_THREADS = 2  # worker threads for the handlers' blocking calls
PEER_KEY: web.RequestKey[NodeId] = web.RequestKey("peer", NodeId)


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


class PeerServer:
    """The aiohttp application of one node's peer port."""

    def __init__(self, node: LocalNode,
                 on_events: Callable[[list[str]], Awaitable[None]] | None = None,
                 blob_locks: dict[str, asyncio.Lock] | None = None,
                 on_seen: Callable[[str], None] | None = None,
                 on_notify: Callable[[str], None] | None = None) -> None:
        self.node = node
        self.catalog: Catalog = node.catalog
        self.last_seen: dict[str, float] = {}  # node id -> last time it was talking to us
        self.on_events = on_events  # called after pushed events were applied
        self.on_seen = on_seen  # called with a peer's compact id on each of its requests
        self.on_notify = on_notify  # called when a peer says it has something new
        self.on_trust_changed: Callable[[], None] | None = None  # thread-safe; after a renewal
        self.compression = "auto"  # "off": never compress answers, even when asked
        self.max_blob_size = MAX_BLOB_SIZE  # bytes of one blob a peer may push
        self.audit: AuditLog | None = None  # where introductions (trust changes) are recorded
        self.max_pending_offers = MAX_PENDING_OFFERS  # per peer
        self.limiter: Limiter | None = None  # bandwidth caps (syncnode.ratelimit)
        # where peers' damage reports go (syncnode.damage); the node sets it
        self.damage: DamageChecks | None = None
        self._offers: dict[str, dict[str, float]] = {}  # peer -> offered hash -> when
        self.stats: dict[str, dict[str, int]] = {}
        # What each peer took from us (and pushed to us) since its last round began: one
        # audit entry each per round, written when its next round starts (hello) or at close.
        self._served: dict[str, Tally] = {}
        self._pushed_in: dict[str, Tally] = {}
        # One lock per blob being written, shared with the sync engine's pulls so a pushed
        # and a pulled copy of the same blob never share a .part file.
        self.blob_locks: dict[str, asyncio.Lock] = {} if blob_locks is None else blob_locks
        self._trusted: dict[bytes, bool] = {}
        self._ids: dict[bytes, NodeId] = {}
        self._trust_version: object = None
        self._trust_checked = 0.0
        self._pool = ThreadPoolExecutor(max_workers=SERVER_THREADS,
                                        thread_name_prefix="peer-server")
        self.app = web.Application(client_max_size=protocol.MAX_JSON_BODY,
                                   middlewares=[self._guard])
        p = protocol.PREFIX
        self.app.add_routes([
            web.get(f"{p}/hello", self.hello),
            web.post(f"{p}/hello", self.hello),
            web.get(f"{p}/merkle", self.merkle),
            web.post(f"{p}/events", self.events),
            web.post(f"{p}/blobs/pack", self.pack),
            web.get(f"{p}/blobs/{{hash}}/chunks", self.chunks),
            web.post(f"{p}/blobs/{{hash}}/damaged", self.damaged),
            web.get(f"{p}/blobs/{{hash}}", self.blob),
            web.post(f"{p}/push/offer", self.push_offer),
            web.put(f"{p}/push/blobs/{{hash}}", self.push_blob),
            web.post(f"{p}/push/pack", self.push_pack),
            web.post(f"{p}/push/events", self.push_events),
            web.post(f"{p}/notify", self.notify),
        ])

    def _tally(self, table: dict[str, Tally], peer: str) -> Tally:
        tally = table.get(peer)
        if tally is None:
            tally = table[peer] = Tally()
        return tally

    def flush_audit(self, peer: str | None = None) -> None:
        """Record what moved with one peer (or all) since its round began."""
        for table, action in ((self._served, "peer-sent"), (self._pushed_in, "peer-received")):
            for p in [peer] if peer is not None else list(table):
                tally = table.pop(p, None)
                if tally is not None:
                    tally.record(self.audit, action, p)

    async def _throttle(self, peer: str, direction: str, n: int) -> None:
        """Wait until the bandwidth caps let ``n`` more blob bytes move."""
        if self.limiter is not None and self.limiter.active:
            await self.limiter.consume(peer, direction, n)

    def _stat(self, peer: str, key: str, n: int) -> None:
        s = self.stats.setdefault(peer, {})
        s[key] = s.get(key, 0) + n

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if ssl_object is None:
            return _error(403, "mutual TLS required")
        der = ssl_object.getpeercert(binary_form=True)
        if not der:  # only an introduction connects without a certificate: nothing else
            return await serve_introduction(
                request, self.node.trust, lambda: {p["node_id"] for p in self.catalog.peers()},
                self.audit, self._adopt_successor)
        if not self._is_trusted(der):
            return _error(403, "peer is not trusted (any more)")
        peer = self._ids.get(der)
        if peer is None:  # one per trusted certificate (cleared with the trust cache)
            peer = self._ids[der] = NodeId.from_certificate_der(der)
            # a peer the cluster CA admitted is recorded, so that `peer list` shows it and
            # `peer remove` can deny it
            await self._run(self._note_admitted, der, peer)
        request[PEER_KEY] = peer
        self.last_seen[peer.compact] = time.time()
        if self.on_seen is not None:
            self.on_seen(peer.compact)
        try:
            return await handler(request)
        except (InvalidHash, BadRequest) as exc:
            return _error(400, str(exc))
        except BlobMissing as exc:
            return _error(404, str(exc))
        except StoreFull as exc:
            log.error("peer %s: %s %s: %s", peer.short, request.method, request.path, exc)
            return _error(507, f"this node's disk is full: {exc}")
        except web.HTTPException:
            raise
        except Exception:
            log.exception("peer %s: %s %s failed", peer.short, request.method, request.path)
            return _error(500, "internal error on this node (see its log)")

    def _is_trusted(self, der: bytes) -> bool:
        """The trust list's verdict, cached until the list changes (checked once a second)."""
        now = time.monotonic()
        if now - self._trust_checked > 1.0:
            self._trust_checked = now
            version = self.node.trust.version()
            if version != self._trust_version:
                self._trust_version = version
                self._trusted.clear()
                self._ids.clear()
        verdict = self._trusted.get(der)
        if verdict is None:
            verdict = self._trusted[der] = self.node.trust.is_trusted(der)
        return verdict

    def _adopt_successor(self, statement: Successor) -> None:
        """A trusted peer introduced its renewed certificate (blocking: worker thread)."""
        from .renewal import learn_successor

        if learn_successor(self.node, statement) and self.on_trust_changed is not None:
            self.on_trust_changed()

    def _note_admitted(self, der: bytes, peer: NodeId) -> None:
        trust = self.node.trust
        if trust.certificate(peer) != der and trust.note_seen(der) and self.audit is not None:
            self.audit.record("trust-add", "node", subject=peer.compact,
                              reason="admitted by the cluster CA (first connection)")

    async def _json(self, request: web.Request) -> Any:
        """The request's JSON body: read (bounded in size and time) on the loop, parsed in
        a worker thread."""
        async with asyncio.timeout(BODY_READ_TIMEOUT):
            raw = await request.read()
        return await self._run(_loads, raw)

    async def _answer(self, fn: Callable[..., Any], *args: Any) -> web.Response:
        """``fn(*args)`` computed and encoded as JSON in a worker thread."""
        body = await self._run(lambda: json.dumps(fn(*args)).encode())
        return web.Response(body=body, content_type="application/json")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking call (catalog, part files, hashing) on the server's own few threads:
        a flood of requests queues there instead of crowding the event loop."""
        return await offload_to(self._pool, fn, *args)

    def close(self) -> None:
        self.flush_audit()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def notify(self, request: web.Request) -> web.Response:
        """A peer tells us its catalog changed: our loop with it runs now, not at its next
        interval. Carries no data; what changed is found by the usual diff."""
        if self.on_notify is not None:
            self.on_notify(request[PEER_KEY].compact)
        return web.json_response({"ok": True})

    # -- reading -------------------------------------------------------------------------
    def _merkle_answer(self, prefix: str) -> dict[str, Any]:
        with self.catalog.snapshot():  # digest, children and ids from one instant
            node = protocol.read_merkle(self.catalog, prefix)
        return protocol.merkle_response(prefix, node)

    async def hello(self, request: web.Request) -> web.StreamResponse:
        """Who we are, and the root's Merkle answer: a peer whose root differs starts its
        walk from it (one request fewer per round). A POST carries the asker's own root
        answer: the events it lacks come with ours, as far as the two roots tell
        (:func:`protocol.lacking_ids`; the asker need not ask ``/events`` for them), and,
        when it asks, a pack of the small blobs of those events after the answer (its
        first pull, without a round trip of its own)."""
        peer = request[PEER_KEY].compact
        self.flush_audit(peer)  # its previous round ended
        asker, ask = None, None
        if request.method == "POST":
            asker, ask = protocol.parse_hello_request(await self._json(request))
        served = 0
        packed: list[protocol.PackItem] = []

        def answer() -> dict[str, Any]:
            nonlocal served, packed
            with self.catalog.snapshot():  # the root and the events from one instant
                node = protocol.read_merkle(self.catalog, "")
                root = protocol.merkle_response("", node)
                hello = {"node_id": str(self.node.node_id), "version": protocol.VERSION,
                         "root": root["digest"], "count": root["count"], "merkle": root,
                         "features": list(protocol.FEATURES)}
                if asker is not None:
                    found, certs = self._hello_events(node, asker)
                    served = len(found)
                    hello.update(protocol.events_response(found, certs))
                    if ask is not None:
                        packed = self._hello_pack(found, ask)
                        hello["pack"] = [[i.hash, size] for i, size in packed]
            successor = renewal.statement(self.node.data)  # we renewed: tell who asks
            if successor is not None:
                hello["successor"] = successor.to_dict()
            return hello

        if ask is None:
            response: web.StreamResponse = await self._answer(answer)
        else:
            body = await self._run(lambda: json.dumps(answer()).encode())
            response = web.StreamResponse(status=200, headers={
                "Content-Type": protocol.HELLO_CONTENT_TYPE})
            await response.prepare(request)
            await response.write(protocol.HELLO_LENGTH.pack(len(body)) + body)
            if packed:
                await self._write_frames(response, [i for i, _ in packed], peer,
                                         protocol.HELLO_PACK_BYTES)
            await response.write_eof()
        if served:
            self._tally(self._served, peer).events += served
        return response

    def _hello_pack(self, found: list[tuple[str, bytes]], ask: protocol.HelloPackAsk
                    ) -> list[tuple[protocol.PackItem, int]]:
        """The small blobs of the put events a hello answer carries, in their order, that
        we hold: at most PACK_MAX_BLOBS and ``ask.bytes``; zstd as asked. Blocking."""
        out: list[tuple[protocol.PackItem, int]] = []
        total = 0
        puts = self.catalog.blobs_of_puts(eid for eid, _ in found)  # no body decoded
        for eid, _ in found:
            if len(out) >= protocol.PACK_MAX_BLOBS:
                break
            if eid not in puts:
                continue  # a delete
            blob, size, syntax = puts[eid]
            if size > CHUNK_SIZE or any(i.hash == blob for i, _ in out):
                continue
            if total + size > ask.bytes:
                break
            if not self.node.store.has(blob):
                continue
            zstd = ask.zstd == "all" or (ask.zstd == "native" and syntax in wire.NATIVE_SYNTAXES)
            out.append((protocol.PackItem(blob, zstd), size))
            total += size
        return out

    def _hello_events(self, node: protocol.RemoteNode, asker: protocol.RemoteNode
                      ) -> tuple[list[tuple[str, bytes]], list[bytes]]:
        """The events a hello answer carries for an asker whose root answer is ``asker``,
        and their origins' certificates: at most MAX_HELLO_EVENTS, and HELLO_EVENT_BYTES
        of bodies and certificates (fewer events until they fit). Blocking."""
        ids = protocol.lacking_ids(node, asker, self.catalog.ids_under,
                                   protocol.MAX_HELLO_EVENTS)
        found = self.catalog.get_events(ids)
        kept, size = [], 0
        for eid, body in found:
            size += len(body) + 32  # its JSON escapes: a cert per origin is counted below
            if size > protocol.HELLO_EVENT_BYTES:
                break
            kept.append((eid, body))
        while kept:
            certs = self.catalog.certificates_for([e for e, _ in kept])
            total = sum(len(b) for _, b in kept) + sum(len(c) for c in certs)
            if total <= protocol.HELLO_EVENT_BYTES:
                return kept, certs
            kept = kept[:len(kept) // 2]
        return [], []

    async def merkle(self, request: web.Request) -> web.Response:
        try:
            prefix = merkle.check_prefix(request.query.get("prefix", ""))
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        return await self._answer(self._merkle_answer, prefix)

    async def events(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        ids = protocol.parse_events_request(body)

        served = 0

        def answer() -> dict[str, Any]:
            nonlocal served
            found = self.catalog.get_events(ids)
            served = len(found)
            certs = self.catalog.certificates_for([i for i, _ in found])
            return protocol.events_response(found, certs)  # with the origins' certificates

        response = await self._answer(answer)
        self._tally(self._served, request[PEER_KEY].compact).events += served
        return response

    async def chunks(self, request: web.Request) -> web.Response:
        h = check_hash(request.match_info["hash"], "blob hash")
        store = self.node.store
        digests, size = await self._run(lambda: (store.chunk_digests(h), store.size(h)))
        return web.json_response({"size": size, "chunks": digests.hex()})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        h = check_hash(request.match_info["hash"], "blob hash")
        store = self.node.store
        range_header = request.headers.get("Range")
        # zstd, one frame per chunk (see .wire), when asked for and the range starts on a
        # chunk boundary; ranges always count blob bytes
        accept = self.compression != "off" and wire.accepts(request.headers.get("Accept-Encoding"))

        study: str | None = None

        def prepare() -> tuple[int, int, int, bool, bytes | None]:
            """Size, range and, for a small answer (most instances), the body itself: one
            worker job."""
            nonlocal study
            size = store.size(h)
            start, end = protocol.parse_range(range_header, size)
            if start == 0:  # the study of an instance sent, for the audit trail
                put = self.catalog.put_for_blob(h)
                study = put.study_instance_uid if put is not None else None
            compress = accept and start % CHUNK_SIZE == 0
            body = None
            if end - start <= SMALL_RESPONSE:
                body = b"".join(store.read_range(h, start, end))
                if compress and body:
                    body = wire.compress_chunk(body)
            return size, start, end, compress, body

        try:
            # blob bytes: hashing and reads release the GIL; the shared pool, as pulls do
            size, start, end, compress, body = await offload(prepare)
        except BlobMissing:
            raise
        except BlobError as exc:
            log.error("refusing to serve damaged blob %s: %s", h, exc)
            self._suspect(h)
            return _error(500, f"blob {h} is damaged on this node")
        except protocol.RangeError as exc:
            return web.json_response({"error": str(exc)}, status=416,
                                     headers={"Content-Range": f"bytes */{exc.size}"})
        tally = self._tally(self._served, request[PEER_KEY].compact)
        tally.bytes += end - start
        if start == 0:  # an instance sent (a resumed range is the same one)
            tally.instances += 1
            if study is not None:
                tally.studies.add(study)
        ranged = range_header is not None
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "Vary": "Accept-Encoding"}
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if compress:
            headers["Content-Encoding"] = wire.ENCODING
        if body is not None:
            await self._throttle(request[PEER_KEY].compact, "out", len(body))
            self._stat(request[PEER_KEY].compact, "bytes_out", len(body))
            return web.Response(status=206 if ranged else 200, body=body, headers=headers)
        if not compress:
            headers["Content-Length"] = str(end - start)
        resp = web.StreamResponse(status=206 if ranged else 200, headers=headers)
        stored = store.read_range(h, start, end)  # the receiver verifies each chunk
        pieces = (wire.compress_chunk(p) for p in stored) if compress else stored
        loop = asyncio.get_running_loop()
        first = True
        peer = request[PEER_KEY].compact
        while True:
            try:
                piece = await loop.run_in_executor(None, next, pieces, None)
            except BlobError as exc:
                log.error("refusing to serve damaged blob %s: %s", h, exc)
                self._suspect(h)
                if first:
                    return _error(500, f"blob {h} is damaged on this node")
                raise  # headers are out: abort the connection, the receiver resumes elsewhere
            if piece is None:
                break
            if first:
                await resp.prepare(request)
                first = False
            await self._throttle(peer, "out", len(piece))
            await resp.write(piece)
            self._stat(peer, "bytes_out", len(piece))
            self.last_seen[peer] = time.time()  # a long download is not silence
        if first:
            await resp.prepare(request)
        await resp.write_eof()
        return resp

    def _suspect(self, blob: str) -> None:
        """Our own read found the blob damaged (cut short): have it checked."""
        if self.damage is not None:
            self.damage.report(None, blob, 0)

    async def damaged(self, request: web.Request) -> web.Response:
        """A peer says a blob we served did not match its hash. Only a hint: the blob is
        queued for a re-hash here (:mod:`syncnode.damage`), within the peer's budget (429
        beyond it, or when too many checks wait); 404 for a blob we do not hold."""
        h = check_hash(request.match_info["hash"], "blob hash")
        peer = request[PEER_KEY]
        if self.damage is None:
            return _error(503, "this node does not take damage reports")
        size = await self._run(self.node.store.size, h)  # BlobMissing: 404
        verdict = self.damage.report(peer.compact, h, size)
        if verdict in ("limited", "full"):
            log.warning("peer %s reported blob %s damaged: not checked (%s)", peer.short, h,
                        "its report budget is spent" if verdict == "limited"
                        else "too many checks waiting")
            return _error(429, "too many damage reports: try again later")
        if verdict == "queue":
            log.warning("peer %s reported blob %s damaged: re-hashing it here", peer.short, h)
        return web.json_response({"check": verdict}, status=202)

    async def pack(self, request: web.Request) -> web.StreamResponse:
        """Several small blobs in one answer (see :mod:`syncnode.protocol`, Packs). Each
        frame is read, checked and (when asked and worth it) compressed in a worker thread
        while the previous one is written: memory holds two blobs of at most one chunk."""
        items = protocol.parse_pack_request(await self._json(request))
        peer = request[PEER_KEY].compact
        resp = web.StreamResponse(status=200, headers={
            "Content-Type": protocol.PACK_CONTENT_TYPE})
        await resp.prepare(request)
        await self._write_frames(resp, items, peer, protocol.PACK_MAX_BYTES)
        await resp.write_eof()
        return resp

    async def _write_frames(self, resp: web.StreamResponse, items: list[protocol.PackItem],
                            peer: str, budget_bytes: int) -> None:
        """One pack frame per item, in order (at most ``budget_bytes`` of blobs); each made
        in a worker thread while the previous one is written."""
        compress_ok = self.compression != "off"
        budget = [budget_bytes]
        tally = self._tally(self._served, peer)
        ahead = asyncio.ensure_future(offload(self._pack_frame, items[0], compress_ok, budget))
        try:
            for i in range(len(items)):
                header, payload, size, study = await ahead
                await self._throttle(peer, "out", len(header) + len(payload))
                if i + 1 < len(items):
                    ahead = asyncio.ensure_future(
                        offload(self._pack_frame, items[i + 1], compress_ok, budget))
                await resp.write(header + payload if len(payload) < 65536 else header)
                if len(payload) >= 65536:
                    await resp.write(payload)
                self._stat(peer, "bytes_out", len(header) + len(payload))
                if payload:
                    tally.bytes += size
                    tally.instances += 1
                    if study is not None:
                        tally.studies.add(study)
                self.last_seen[peer] = time.time()
        finally:
            if not ahead.done():
                ahead.cancel()
                await asyncio.wait([ahead])

    def _pack_frame(self, item: protocol.PackItem, compress_ok: bool, budget: list[int]
                    ) -> tuple[bytes, bytes, int, str | None]:
        """One pack frame: header, payload, the blob's size and its study (for the audit
        trail). Blocking: reads, checks and compresses. ``budget``: blob bytes this answer
        may still carry (frames are made one after another, never two at once)."""
        store = self.node.store
        h = item.hash
        try:
            size = store.size(h)
        except BlobMissing:
            return protocol.pack_frame_header(h, protocol.ABSENT, 0, 0), b"", 0, None
        if size > CHUNK_SIZE or size > budget[0]:
            return protocol.pack_frame_header(h, protocol.NOT_PACKED, size, 0), b"", size, None
        try:
            body = b"".join(store.read_range(h, 0, size))  # the receiver verifies it
        except BlobMissing:
            return protocol.pack_frame_header(h, protocol.ABSENT, 0, 0), b"", 0, None
        except BlobError as exc:
            log.error("refusing to serve damaged blob %s: %s", h, exc)
            return protocol.pack_frame_header(h, protocol.DAMAGED, size, 0), b"", size, None
        budget[0] -= size
        status = protocol.RAW
        if item.zstd and compress_ok and body:
            packed = wire.compress_chunk(body)
            if len(packed) < len(body):
                body, status = packed, protocol.ZSTD
        put = self.catalog.put_for_blob(h)
        study = put.study_instance_uid if put is not None else None
        return protocol.pack_frame_header(h, status, size, len(body)), body, size, study

    # -- receiving pushes (for peers that can reach us when we cannot reach them) ----------
    async def push_offer(self, request: web.Request) -> web.Response:
        """A peer offers blobs it will push. Checked before anything is written: shapes,
        sizes (``max_blob_size``), the peer's quota of pending offers (429) and the free
        space for all of them (507)."""
        body = await self._json(request)
        offers = await self._run(protocol.parse_offer, body, self.max_blob_size)
        peer = request[PEER_KEY].compact
        pending = self._pending_offers(peer)
        new = {o.hash for o in offers} - pending.keys()
        if len(pending) + len(new) > self.max_pending_offers:
            return _error(429, f"{len(pending)} offers of yours are pending; at most "
                               f"{self.max_pending_offers}: push those first")
        # blobs being pulled or pushed right now: offered again later
        busy = {o.hash for o in offers
                if (lock := self.blob_locks.get(o.hash)) is not None and lock.locked()}
        try:
            want = await self._run(self._accept_offers,
                                   [o for o in offers if o.hash not in busy])
        except TransferError as exc:
            raise BadRequest(str(exc)) from exc
        now = time.monotonic()
        for w in want:
            pending[w["hash"]] = now
        return await self._answer(lambda: {"want": want, "busy": sorted(busy)})

    def _pending_offers(self, peer: str) -> dict[str, float]:
        """The peer's offers not yet pushed (hash -> when), those older than OFFER_TTL
        forgotten."""
        pending = self._offers.setdefault(peer, {})
        cutoff = time.monotonic() - OFFER_TTL
        for h in [h for h, t in pending.items() if t < cutoff]:
            del pending[h]
        return pending

    def _accept_offers(self, offers: list[protocol.Offer]) -> list[dict[str, Any]]:
        """Record each offer and say from which offset to send (a part file may hold a
        verified prefix already). Raises StoreFull, before writing anything, when the
        bytes still to come do not fit. Blocking: reads and hashes part files."""
        store = self.node.store
        want = []
        for o in offers:
            if store.has(o.hash):
                continue
            offset = 0
            if store.part_path(o.hash).exists():
                part = PartialBlob(store, o.hash, o.size, o.digests)
                offset = part.offset
                part.close(durable=False)
            want.append((o, offset))
        store.ensure_room(sum(o.size - offset for o, offset in want))
        for o, _ in want:
            self._write_offer(o.hash, o.size, o.digests)
        return [{"hash": o.hash, "offset": offset} for o, offset in want]

    def _offer_path(self, h: str) -> Any:
        return self.node.store.tmp_dir / f"{h}.offer"

    def _read_offer(self, h: str) -> bytes | None:
        try:
            return self._offer_path(h).read_bytes()
        except FileNotFoundError:
            return None

    def _write_offer(self, h: str, size: int, digests: bytes) -> None:
        self._offer_path(h).write_bytes(size.to_bytes(8, "big") + digests)

    async def push_blob(self, request: web.Request) -> web.Response:
        h = check_hash(request.match_info["hash"], "blob hash")
        lock = self.blob_locks.setdefault(h, asyncio.Lock())
        async with lock:
            return await self._receive_push(request, h)

    async def _receive_push(self, request: web.Request, h: str) -> web.Response:
        store = self.node.store
        if await self._run(store.has, h):
            return web.json_response({"offset": await self._run(store.size, h),
                                      "complete": True})
        raw = await self._run(self._read_offer, h)
        if raw is None:
            return _error(409, f"blob {h} was not offered first")
        size, digests = int.from_bytes(raw[:8], "big"), raw[8:]
        try:
            part = await self._run(PartialBlob, store, h, size, digests)
        except TransferError as exc:
            return _error(400, str(exc))
        try:
            offset = int(request.query.get("offset", "-1"))
        except ValueError:
            offset = -1
        if offset != part.offset:
            await self._run(part.close)
            return _error(409, f"send blob {h} from offset {part.offset}, not {offset}")
        peer = request[PEER_KEY].compact
        # The whole body, not only each read, is bounded: a trusted peer trickling a byte a
        # minute would otherwise hold this handler (and the blob's lock) for ever.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_READ_TIMEOUT + (size - part.offset) / MIN_PUSH_RATE
        try:
            while not part.complete:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(min(left, BODY_READ_TIMEOUT)):
                    data = await request.content.read(CHUNK_SIZE)
                if not data:
                    break
                await self._throttle(peer, "in", len(data))
                await self._run(part.feed, data)
                self._stat(peer, "bytes_in", len(data))
            if part.complete:
                await self._run(part.finish)
                await self._run(self._offer_path(h).unlink, True)
                self._offers.get(peer, {}).pop(h, None)
                return web.json_response({"offset": size, "complete": True})
            return web.json_response({"offset": part.offset, "complete": False})
        except (TransferError, BlobHashMismatch) as exc:
            log.warning("pushed blob %s from %s failed verification: %s", h, peer, exc)
            return _error(422, str(exc))
        except TimeoutError:
            log.warning("push of blob %s from %s too slow: %d of %d bytes by its deadline",
                        h, peer, part.offset, size)
            return _error(408, f"push of blob {h} too slow: {part.offset} of {size} bytes "
                               "verified by the deadline; resume from there")
        finally:
            await self._run(part.close)

    async def push_pack(self, request: web.Request) -> web.Response:
        """Several offered small blobs pushed in one body (see :mod:`syncnode.protocol`,
        Pushed packs). Each header is checked before its payload is read; each blob is
        verified and written to its part file in a worker thread while the next frame is
        read; those that verified are installed (durable) before the answer. A blob that
        does not verify, or that another transfer is writing right now, is refused alone;
        a body that breaks the framing is 400 (what arrived before it is installed)."""
        peer = request[PEER_KEY].compact
        pending = self._pending_offers(peer)
        loop = asyncio.get_running_loop()
        seen: set[str] = set()
        total = 0
        refused: dict[str, str] = {}
        mismatched: list[str] = []  # refused because their bytes do not match their hash
        staged: list[StagedBlob] = []
        held: list[asyncio.Lock] = []
        writing: tuple[str, asyncio.Future[StagedBlob | _Refusal]] | None = None
        broken: str | None = None

        async def settle() -> None:
            nonlocal writing
            if writing is not None:
                (blob, job), writing = writing, None
                outcome = await job
                if isinstance(outcome, _Refusal):
                    refused[blob] = outcome.reason
                    if outcome.mismatch:
                        mismatched.append(blob)
                else:
                    staged.append(outcome)

        deadline = loop.time() + BODY_READ_TIMEOUT + protocol.PACK_MAX_BYTES / MIN_PUSH_RATE
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        head = await request.content.readexactly(protocol.PACK_HEADER_SIZE)
                    except asyncio.IncompleteReadError as exc:
                        if exc.partial:
                            broken = "pushed pack ends inside a frame header"
                        break
                    try:
                        blob, status, size, length = protocol.parse_push_frame_header(
                            head, seen, total)
                    except BadRequest as exc:
                        broken = str(exc)
                        break
                    seen.add(blob)
                    total += size
                    try:
                        payload = await request.content.readexactly(length)
                    except asyncio.IncompleteReadError:
                        broken = f"pushed pack ends inside the payload of blob {blob}"
                        break
                    await self._throttle(peer, "in", len(payload))
                    self._stat(peer, "bytes_in", len(payload))
                    lock = self.blob_locks.setdefault(blob, asyncio.Lock())
                    if blob not in pending or lock.locked():
                        refused[blob] = ("not offered (or offered too long ago)"
                                         if blob not in pending else "busy: send it later")
                        continue
                    await lock.acquire()  # free: returns at once
                    held.append(lock)
                    await settle()
                    writing = (blob, loop.run_in_executor(
                        self._pool, local_errors, self._stage_pushed, blob, status, size,
                        payload))
                await settle()
            if staged:
                await self._run(self._install_pushed, staged)
        except TimeoutError:
            broken = "pushed pack too slow"
        finally:
            if writing is not None:  # the body broke off while a blob was being written
                await asyncio.wait([writing[1]])
            for lock in held:
                lock.release()
        installed = [s.digest for s in staged]
        for h in installed:
            pending.pop(h, None)
        tally = self._tally(self._pushed_in, peer)
        tally.bytes += sum(s.size for s in staged)
        for h, why in refused.items():
            log.warning("pushed blob %s from %s refused: %s", h, request[PEER_KEY].short, why)
        if broken is not None:
            log.warning("pushed pack from %s refused after %d blobs: %s",
                        request[PEER_KEY].short, len(seen), broken)
            return web.json_response({"error": broken, "installed": installed,
                                      "refused": refused, "mismatched": mismatched},
                                     status=400)
        return web.json_response({"installed": installed, "refused": refused,
                                  "mismatched": mismatched})

    def _stage_pushed(self, blob: str, status: int, size: int, payload: bytes
                      ) -> StagedBlob | _Refusal:
        """Verify one pushed blob against its offer and hash and write its part file
        (blocking); why not, if it is refused."""
        raw = self._read_offer(blob)
        if raw is None:
            return _Refusal("not offered")
        if int.from_bytes(raw[:8], "big") != size or raw[8:] != implied_chunk_list(blob, size):
            return _Refusal(f"offered with another size or chunk list than the {size} bytes "
                            "sent")
        try:
            data = wire.decompress_chunk(payload, size) if status == protocol.ZSTD else payload
        except wire.FrameError as exc:
            return _Refusal(f"does not decompress: {exc}")
        try:
            return stage_whole(self.node.store, blob, data)
        except (TransferError, BlobHashMismatch) as exc:
            return _Refusal(f"does not verify: {exc}", mismatch=True)

    def _install_pushed(self, staged: list[StagedBlob]) -> None:
        """Make the verified blobs durable and present, then forget their offers."""
        self.node.store.install_staged(staged)  # out of the cache once applied
        for s in staged:
            self._offer_path(s.digest).unlink(missing_ok=True)

    async def push_events(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        try:
            pairs = protocol.parse_events(body)
        except protocol.ProtocolError as exc:
            raise BadRequest(str(exc)) from exc
        try:
            certs = protocol.parse_certs(body.get("certs"))
        except protocol.ProtocolError as exc:
            raise BadRequest(str(exc)) from exc
        await self._run(self.catalog.offer_certificates, certs)
        checked, invalid = await self._run(ev.check_all, pairs)
        result = await self._run(self.node.apply, checked)
        result.rejected.update(invalid)
        if result.refused:  # puts their blob contradicts: the pusher is told, and the admin
            eid, why = next(iter(result.refused.items()))
            log.warning("refused %d pushed puts from %s that do not match their blobs, "
                        "e.g. %s: %s", len(result.refused), request[PEER_KEY].short, eid, why)
        tally = self._tally(self._pushed_in, request[PEER_KEY].compact)
        tally.events += len(result.inserted)
        inserted = set(result.inserted)
        blobs: list[str] = []
        for eid, _, put in checked:
            if eid in inserted and isinstance(put, ev.PutEvent):
                tally.instances += 1
                tally.studies.add(put.study_instance_uid)
                blobs.append(put.blob)
        if blobs:
            await self._run(self.node.settle_received, blobs)
        if result.inserted and self.on_events:
            await self.on_events(result.inserted)
        return web.json_response({"applied": result.inserted, "rejected": result.rejected})


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why one blob of a pushed pack is refused; ``mismatch``: its bytes do not match."""

    reason: str
    mismatch: bool = False


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc


__all__ = ["PeerServer"]
