"""pynetdicom adapted for a server on an untrusted network: bounded reads, no Nagle, low latency.

pynetdicom 3.0.4 as shipped has three problems for syncnode (DESIGN.md, "Pitfalls"):

1. It reads a PDU of whatever length its 6-byte header announces, before any AE check
   (upstream issue #1086). :class:`GuardedDUL` checks the length against a per-PDU-type
   cap *before* reading the body (P-DATA-TF: the maximum PDU length we announced;
   association PDUs: 1 MiB; release/abort: their fixed size), treats a violation as an
   invalid PDU (the state machine answers A-ABORT) and shuts the read side so nothing
   more is read from that peer. Bodies are read with ``recv_into`` into one buffer of
   the announced (capped) size, under the socket timeout, so a slow sender cannot hold
   a reader forever.
2. It sets ``TCP_NODELAY`` on none of its sockets (about 40 ms lost per instance on
   loopback). :func:`set_nodelay` is applied to every accepted and every requested
   association socket.
3. Its two reactor threads (DUL and association) poll with 1 ms sleeps: each hop of a
   request/response costs up to a millisecond. :class:`GuardedDUL` waits in ``select``
   on the socket and on a wake-up pipe written whenever the local user queues a
   primitive; :class:`FastAssociation` waits on an event set by the DUL after each
   state-machine action. Idle waits are bounded (``IDLE_WAIT``) so timers (ARTIM,
   idle timeout) still fire.

4. It starts an association (a thread that counts toward ``maximum_associations``) for
   every TCP connection, before the peer has said anything: 16 idle sockets filled the
   limit and legitimate associations were refused until pynetdicom's own timers fired.
   Here a connection is *pending* until its A-ASSOCIATE-RQ has arrived whole.
   :meth:`GuardedServer.await_association_request` reads the TLS handshake (for DICOM
   TLS) and that first PDU in the connection's own handler thread under one deadline,
   the ARTIM timeout (PS3.8 9.1.5; ``artim_timeout``, default 10 s); a connection that
   does not deliver in time, or sends another PDU first, is closed. Only then is the
   association created, the PDU handed to its DUL as if just read. Pending connections
   are bounded (:class:`PendingConnections`): per source address and in total; a new
   connection over either bound evicts the *oldest* pending one (as a SYN queue drops
   its oldest half-open entries), so a stranger can hold at most a few slots briefly and
   never locks out a client that associates at once.

Associations are "upgraded" before they start (:func:`upgrade_association`): the DUL is
replaced before the socket is attached, and the instance's class becomes
:class:`FastAssociation`. Acceptor associations are created by
:class:`GuardedRequestHandler`; requestor associations by :class:`SyncnodeAE`, whose
``_create_socket`` hook runs right after pynetdicom creates the association.

Invariants: no PDU body larger than its cap is ever read or buffered; a socket this
module touches has TCP_NODELAY set; no association (thread, limit slot) exists for a
connection before its A-ASSOCIATE-RQ has arrived, and no connection stays pending longer
than the ARTIM timeout; at most ``per_address`` connections per source address and
``total`` connections overall are pending at once; the overridden loops keep pynetdicom's semantics
(same checks, same order), only the waiting differs.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from ..config import ConfigError

log = logging.getLogger("syncnode.dicom")

IDLE_WAIT = 0.01  # seconds a reactor sleeps at most when nothing happens
ASSOCIATION_PDU_CAP = 1 << 20  # A-ASSOCIATE-RQ/AC/RJ: generous for 128 contexts x many TS
DEFAULT_ARTIM_TIMEOUT = 10.0  # seconds from accept to a whole A-ASSOCIATE-RQ (PS3.8 9.1.5)
DEFAULT_PENDING_PER_ADDRESS = 8  # connections one address may hold before associating
DEFAULT_PENDING_TOTAL = 128  # connections all addresses together may hold so
_FIXED_PDU_LENGTH = {0x05: 4, 0x06: 4, 0x07: 4}
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)


@dataclass(frozen=True)
class PduLimits:
    """The largest PDU bodies (the length field of the header) this side reads."""

    max_pdata: int  # our Maximum Length Received (the variable field of a P-DATA-TF)
    max_association: int = ASSOCIATION_PDU_CAP

    def cap(self, pdu_type: int) -> int:
        if pdu_type == 0x04:
            return self.max_pdata
        if pdu_type in _FIXED_PDU_LENGTH:
            return _FIXED_PDU_LENGTH[pdu_type]
        return self.max_association


def set_nodelay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm on a TCP socket (no-op for closed/non-TCP sockets)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.debug("TCP_NODELAY not set: %s", exc)


class GuardedDUL(DULServiceProvider):
    """DUL service provider with capped PDU reads and event-driven waiting."""

    def __init__(self, assoc: Association, limits: PduLimits) -> None:
        super().__init__(assoc)
        self.limits = limits
        self.oversized_pdus = 0
        self._refused = False
        # The A-ASSOCIATE-RQ read by the server before this association existed.
        self.prefetched: bytes | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- waking ------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already has a pending wake-up byte, or closed at shutdown

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        self.wake()
        return super().stop_dul()

    def _idle_wait(self) -> None:
        waiting: list[Any] = [self._wake_r]
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes waiting in the TLS layer: select cannot see them
        if sock is not None and getattr(self.socket, "_is_connected", False):
            waiting.append(sock)
        try:
            readable, _, _ = select.select(waiting, [], [], IDLE_WAIT)
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(IDLE_WAIT)
            return
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def _notify_assoc(self, force: bool = False) -> None:
        """Wake the association thread if there is something for it: a primitive for the
        user (release, abort, association answer) or a DIMSE message to serve. Waking it
        for every PDU would only make it compete for the GIL."""
        wake = getattr(self.assoc, "_wake_evt", None)
        if wake is None or wake.is_set():
            return
        if force or self.to_user_queue.qsize() or self.assoc.dimse.msg_queue.qsize():
            wake.set()

    # -- the reactor (pynetdicom's run_reactor, waiting instead of sleeping) -----------
    def run_reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._idle_wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:  # pynetdicom's own policy: abort
                    log.error("DICOM upper layer failed, aborting the association: %s",
                              type(exc).__name__)
                    self._hard_abort()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                self._notify_assoc()
                idle = False
        finally:
            self._notify_assoc(force=True)
            for s in (self._wake_r, self._wake_w):
                s.close()

    def _hard_abort(self) -> None:
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    # -- reading PDUs ------------------------------------------------------------------
    def _is_transport_event(self) -> bool:
        if self.prefetched is not None:
            self._read_pdu_data()
            return True
        return bool(super()._is_transport_event())

    def _read_pdu_data(self) -> None:
        """Read one PDU: 6-byte header, length checked against its cap, then the body."""
        if self.prefetched is not None:  # already read and checked by the server
            buf, self.prefetched = bytearray(self.prefetched), None
            self._accept_pdu(buf)
            return
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket
        if raw is None:
            self.event_queue.put("Evt17")
            return
        if self._refused:  # after an invalid PDU: read nothing more, close the connection
            sock.close()
            return
        try:
            header = _recv_exact(raw, 6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        if header is None:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            log.warning("DICOM peer sent an unknown PDU type 0x%02X; aborting", pdu_type)
            self._refuse(raw)
            return
        cap = self.limits.cap(pdu_type)
        if length > cap:
            self.oversized_pdus += 1
            log.warning("DICOM peer announced a PDU of %d bytes (type 0x%02X, limit %d); "
                        "aborting without reading it", length, pdu_type, cap)
            self._refuse(raw)
            return
        buf = bytearray(6 + length)
        buf[:6] = header
        try:
            if not _recv_into_exact(raw, memoryview(buf)[6:]):
                self.event_queue.put("Evt17")
                return
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")
            return
        self._accept_pdu(buf)

    def _accept_pdu(self, buf: bytearray) -> None:
        """Decode a whole PDU and queue it for the state machine."""
        try:
            pdu, event = self._decode_pdu(buf)
        except Exception as exc:  # any decoding failure is an invalid PDU
            log.warning("DICOM peer sent an undecodable PDU (type 0x%02X): %s", buf[0],
                        type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _refuse(self, raw: socket.socket) -> None:
        """Invalid PDU: let the state machine abort, and read nothing more from the peer."""
        self._refused = True
        self.event_queue.put("Evt19")
        try:
            raw.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already closed


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _recv_into_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], min(total - got, 1 << 20))
        if n == 0:
            return False
        got += n
    return True


class FastAssociation(Association):
    """An Association whose reactor waits on an event instead of sleeping 1 ms per loop.

    Instances are made by :func:`upgrade_association` (class swap), never constructed.
    """

    _wake_evt: threading.Event
    # Held by the reactor while it acts (after its checkpoint); a user thread that talks
    # on the association itself takes it too (:func:`exchange_turn`). pynetdicom's
    # ``_is_paused`` flag alone races: the reactor can pass the checkpoint, the user
    # thread then sees "paused", and the reactor takes the response it waits for.
    _turn: threading.RLock

    def kill(self) -> None:
        self._wake_evt.set()
        super().kill()

    def _run_reactor(self) -> None:
        # pynetdicom's Association._run_reactor with the sleep replaced by a wait.
        self._is_paused = False
        while not self._kill:
            # Waiting counts as paused (as pynetdicom's checkpoint does): a user thread
            # that clears the checkpoint can use DIMSE at once instead of waiting a tick.
            self._is_paused = True
            self._wake_evt.wait(IDLE_WAIT)
            self._wake_evt.clear()
            self._reactor_checkpoint.wait()
            with self._turn:
                if not self._reactor_checkpoint.is_set():
                    continue  # a user thread took its turn first
                self._is_paused = False
                if self._step():
                    return

    def _step(self) -> bool:
        """One round of the reactor; True once the association is over."""
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))
            self._wake_evt.set()  # more may be queued

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True

        if not self.dul.is_alive():
            self.kill()
            return True

        if self.dul.idle_timer_expired():
            log.warning("DICOM association idle for too long (network timeout)")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


DimseFactory = Callable[[Association], DIMSEServiceProvider]


def upgrade_association(assoc: Association, limits: PduLimits,
                        dimse_factory: DimseFactory | None = None,
                        prefetched: bytes | None = None) -> None:
    """Swap in the guarded DUL (and optionally another DIMSE provider) before the
    association has a socket or has started. ``prefetched``: the first PDU, already read
    from the connection (the DUL processes it as if it had just arrived)."""
    if assoc.dul.socket is not None or assoc.dul.is_alive():
        raise RuntimeError("upgrade_association must run before the socket is attached")
    old = assoc.dul
    dul = GuardedDUL(assoc, limits)
    dul.prefetched = prefetched
    dul._idle_timer = old._idle_timer
    dul.artim_timer = old.artim_timer
    assoc.dul = dul
    if dimse_factory is not None:
        assoc.dimse = dimse_factory(assoc)
    assoc._wake_evt = threading.Event()  # type: ignore[attr-defined]
    assoc._turn = threading.RLock()  # type: ignore[attr-defined]
    assoc.__class__ = FastAssociation


class NoAssociation(Exception):
    """A connection closed before it became an association; ``reason`` is for counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PendingConnections:
    """Connections accepted but not yet associated, bounded per address and in total.

    ``admit`` registers a connection; if that puts its address over ``per_address`` or
    everyone over ``total``, the oldest pending connection (of that address, or overall)
    is evicted: its socket is shut down, so the thread reading it sees end-of-file at
    once. ``release`` forgets a connection (associated, refused or closed).
    """

    def __init__(self, per_address: int, total: int) -> None:
        if per_address < 1 or total < 1:
            raise ValueError("pending connection limits must be at least 1")
        self.per_address = per_address
        self.total = total
        self._lock = threading.Lock()
        self._all: OrderedDict[int, tuple[str, socket.socket]] = OrderedDict()
        self._evicted: set[int] = set()

    def admit(self, sock: socket.socket, address: str) -> None:
        victims: list[socket.socket] = []
        with self._lock:
            self._all[id(sock)] = (address, sock)
            same = [k for k, (a, _s) in self._all.items() if a == address]
            while len(same) > self.per_address:
                victims.append(self._all.pop(same.pop(0))[1])
            while len(self._all) > self.total:
                victims.append(self._all.popitem(last=False)[1][1])
            self._evicted.update(id(v) for v in victims)
        for victim in victims:
            _shut(victim)

    def was_evicted(self, sock: socket.socket) -> bool:
        with self._lock:
            return id(sock) in self._evicted

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self._all.pop(id(sock), None)
            self._evicted.discard(id(sock))

    def count(self, address: str | None = None) -> int:
        with self._lock:
            return sum(1 for a, _s in self._all.values() if address in (None, a))

    def close_all(self) -> None:
        with self._lock:
            socks = [s for _a, s in self._all.values()]
            self._all.clear()
        for sock in socks:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut a socket down under whichever thread is reading it (the plain socket's
    shutdown: an SSLSocket's own would drop its TLS state under the reader)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its reader


def _wait_io(sock: socket.socket, deadline: float, write: bool = False) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise NoAssociation("artim", "no A-ASSOCIATE-RQ within the ARTIM timeout")
    r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], left)
    if not r and not w:
        raise NoAssociation("artim", "no A-ASSOCIATE-RQ within the ARTIM timeout")


def _handshake_before(sock: ssl.SSLSocket, deadline: float) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            _wait_io(sock, deadline)
        except ssl.SSLWantWriteError:
            _wait_io(sock, deadline, write=True)
        except (ssl.SSLError, OSError) as exc:
            raise NoAssociation("tls", f"TLS handshake failed: {_tls_reason(exc)}") from None


def _tls_reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None)
               or type(exc).__name__)


def _read_before(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly ``n`` bytes from a non-blocking socket, or NoAssociation at the deadline."""
    data = bytearray()
    while len(data) < n:
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            _wait_io(sock, deadline)
        try:
            chunk = sock.recv(min(n - len(data), 1 << 16))
        except (BlockingIOError, ssl.SSLWantReadError):
            continue
        except ssl.SSLWantWriteError:
            _wait_io(sock, deadline, write=True)
            continue
        except OSError as exc:
            raise NoAssociation("closed", f"connection failed: {_tls_reason(exc)}") from None
        if not chunk:
            raise NoAssociation("closed", "connection closed before an A-ASSOCIATE-RQ")
        data += chunk
    return bytes(data)


def _abort_pdu(reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # DICOM UL service provider
    pdu.reason_diagnostic = reason
    return cast(bytes, pdu.encode())


class GuardedRequestHandler(RequestHandler):
    """Waits (ARTIM) for the A-ASSOCIATE-RQ, then creates an acceptor association with
    the guarded DUL; sets socket options first."""

    server: GuardedServer

    def handle(self) -> None:
        client = cast(socket.socket, self.request)
        set_nodelay(client)
        try:
            first = self.server.await_association_request(client, str(self.client_address[0]))
        except NoAssociation as exc:
            self.server.note_refusal(exc, str(self.client_address[0]))
            self.server.shutdown_request(client)
            return
        assoc = self._create_association(first)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()

    def _create_association(self, prefetched: bytes | None = None) -> Association:
        # pynetdicom's RequestHandler._create_association, plus the upgrade.
        assoc = Association(self.ae, MODE_ACCEPTOR)
        upgrade_association(assoc, self.server.limits, self.server.dimse_factory, prefetched)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"

        client = cast(socket.socket, self.request)
        set_nodelay(client)
        client.settimeout(self.server.read_timeout)
        sock = AssociationSocket(assoc, client_socket=client)
        assoc.set_socket(sock)

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = copy_contexts(self.server.contexts)
        assoc.requestor.address_info = self.remote

        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(tuple[Callable[..., Any], Any], handler)
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """Per-association copies of the server's supported contexts, as ``deepcopy`` would
    make them, without re-validating every UID: with every storage class in every syntax
    ``deepcopy`` cost ~0.2 s of CPU per association. (Each association may reorder its
    copies' transfer syntaxes; UIDs are immutable and shared.)"""
    out = []
    for cx in contexts:
        new = PresentationContext.__new__(PresentationContext)
        new.__dict__.update(cx.__dict__)
        new._transfer_syntax = list(cx._transfer_syntax)
        out.append(new)
    return out


@dataclass(frozen=True)
class Perimeter:
    """How long and how many connections may wait before associating."""

    artim_timeout: float = DEFAULT_ARTIM_TIMEOUT
    per_address: int = DEFAULT_PENDING_PER_ADDRESS
    total: int = DEFAULT_PENDING_TOTAL


@dataclass
class PerimeterStats:
    """Connections closed before they became associations, by reason."""

    artim_expired: int = 0  # said nothing (or too little) within the ARTIM timeout
    evicted: int = 0  # pushed out by newer pending connections over a limit
    not_association: int = 0  # sent another PDU, or an oversized A-ASSOCIATE-RQ
    tls_failed: int = 0  # DICOM TLS handshake failed
    closed: int = 0  # the peer closed (or reset) before associating

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


GC_INTERVAL = 300.0  # seconds


class GuardedServer(ThreadedAssociationServer):
    """A threaded association server whose associations are guarded (see module doc)."""

    limits: PduLimits
    dimse_factory: DimseFactory | None
    read_timeout: float
    daemon_threads = True
    request_queue_size = 128  # a burst of strangers must not overflow the SYN backlog

    def __init__(self, *args: Any, limits: PduLimits, dimse_factory: DimseFactory | None,
                 read_timeout: float, perimeter: Perimeter | None = None,
                 **kwargs: Any) -> None:
        self.limits = limits
        self.dimse_factory = dimse_factory
        self.read_timeout = read_timeout
        self.perimeter = perimeter or Perimeter()
        self.pending = PendingConnections(self.perimeter.per_address, self.perimeter.total)
        self.refused = PerimeterStats()
        self._stats_lock = threading.Lock()
        self._last_refusal_log = 0.0
        self._refusals_unlogged = 0
        # told of each refused DICOM TLS handshake (address, reason): the audit trail
        self.on_tls_refused: Callable[[str, str], None] | None = None
        self._next_gc = time.monotonic() + GC_INTERVAL
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)

    def service_actions(self) -> None:
        """pynetdicom runs a full ``gc.collect()`` every 60 passes of the server loop (6 s
        at our poll interval): ~0.1 s holding the GIL each time, stalling every
        association of the node (a C-MOVE, a C-STORE stream) at random. Here it runs every
        ``GC_INTERVAL`` seconds at most; Python's own collector runs as usual."""
        now = time.monotonic()
        if now >= self._next_gc:
            self._next_gc = now + GC_INTERVAL
            gc.collect()

    def get_request(self) -> tuple[socket.socket, Any]:
        # pynetdicom wraps TLS here, handshake included, in the accepting thread: one
        # silent stranger would stall every accept. The handshake runs in the
        # connection's thread instead, under the ARTIM deadline.
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def await_association_request(self, sock: socket.socket, address: str) -> bytes:
        """The connection's whole first PDU, an A-ASSOCIATE-RQ, read before the ARTIM
        deadline; the connection counts as pending (bounded) meanwhile."""
        deadline = time.monotonic() + self.perimeter.artim_timeout
        self.pending.admit(sock, address)
        try:
            sock.settimeout(0.0)
            if isinstance(sock, ssl.SSLSocket):
                _handshake_before(sock, deadline)
            header = _read_before(sock, 6, deadline)
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type != 0x01:
                _send_quietly(sock, _abort_pdu(0x02))  # unexpected PDU
                raise NoAssociation("not_association",
                                    f"first PDU is type 0x{pdu_type:02X}, not A-ASSOCIATE-RQ")
            if length > self.limits.max_association:
                _send_quietly(sock, _abort_pdu(0x06))  # invalid PDU parameter value
                raise NoAssociation("not_association",
                                    f"A-ASSOCIATE-RQ of {length} bytes (limit "
                                    f"{self.limits.max_association})")
            return header + _read_before(sock, length, deadline)
        except NoAssociation:
            if self.pending.was_evicted(sock):
                raise NoAssociation("evicted", "evicted by newer connections over the "
                                    "pending-connection limit") from None
            raise
        finally:
            self.pending.release(sock)
            try:
                sock.settimeout(self.read_timeout)
            except OSError:
                pass  # closed under us (evicted)

    def note_refusal(self, exc: NoAssociation, address: str) -> None:
        """Count a refused connection; log it, at most one line a minute (a flood of
        strangers must not flood the log)."""
        if exc.reason == "tls" and self.on_tls_refused is not None:
            self.on_tls_refused(address, str(exc))
        with self._stats_lock:
            reason = exc.reason
            if reason == "evicted":
                self.refused.evicted += 1
            elif reason == "artim":
                self.refused.artim_expired += 1
            elif reason == "tls":
                self.refused.tls_failed += 1
            elif reason == "not_association":
                self.refused.not_association += 1
            else:
                self.refused.closed += 1
            self._refusals_unlogged += 1
            now = time.monotonic()
            if now - self._last_refusal_log < 60:
                return
            self._last_refusal_log, count = now, self._refusals_unlogged
            self._refusals_unlogged = 0
        log.warning("DICOM connection from %s closed before associating: %s "
                    "(%d such connection(s) since the last report)", address, exc, count)

    def server_close(self) -> None:
        super().server_close()
        self.pending.close_all()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except (OSError, ssl.SSLError):
        pass  # the peer is gone or not listening; it is being closed anyway


class DicomTLSError(ConfigError):
    """DICOM TLS cannot be set up with the given key, certificate or client CA file."""


def dicom_tls_context(cert_path: Path, key_path: Path, client_cas: Path | None = None
                      ) -> ssl.SSLContext:
    """Server context for DICOM TLS (PS3.15 B.1, with the BCP 195 profile DCMTK uses):
    TLS 1.2 or newer, the node's own key and certificate. With ``client_cas`` (a PEM
    file of CA or client certificates) a client must present a certificate that
    verifies against it; without, none is asked for (the calling-AE allow-list still
    applies)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL")
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise DicomTLSError(f"DICOM TLS: cannot load the node key/certificate "
                            f"({cert_path}): {exc}") from exc
    if client_cas is None:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(client_cas))
    except (OSError, ssl.SSLError) as exc:
        raise DicomTLSError(f"DICOM TLS: cannot read dicom_tls_clients {client_cas}: "
                            f"{exc}") from exc
    return ctx


def start_server(ae: AE, address: tuple[str, int], *, ae_title: str,
                 evt_handlers: list[Any], limits: PduLimits,
                 dimse_factory: DimseFactory | None = None,
                 read_timeout: float = 60.0, perimeter: Perimeter | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> GuardedServer:
    """Start a non-blocking association server (its own thread) and return it."""
    server = cast(GuardedServer, ae.make_server(
        address, ae_title=ae_title, evt_handlers=evt_handlers, server_class=GuardedServer,
        ssl_context=ssl_context, limits=limits, dimse_factory=dimse_factory,
        read_timeout=read_timeout, perimeter=perimeter))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"dicom-server-{server.server_address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server


class SyncnodeAE(AE):
    """An AE whose requested associations are upgraded (guarded DUL, TCP_NODELAY)."""

    def __init__(self, ae_title: str, limits: PduLimits | None = None) -> None:
        super().__init__(ae_title)
        self.limits = limits or PduLimits(max_pdata=1 << 20)
        # called with each association this AE requests, before it connects
        self.prepare_requested: Callable[[Association], None] | None = None

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: Any) -> AssociationSocket:
        upgrade_association(assoc, self.limits)
        if self.prepare_requested is not None:
            self.prepare_requested(assoc)
        sock = super()._create_socket(assoc, address, tls_args)
        set_nodelay(sock.socket)
        return sock


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
