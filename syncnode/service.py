"""Application services: what an operator can do to a node, written once.

The command line (``syncnode peer add ...``) and the admin API (``POST /api/v1/nodes``)
are two front ends of these operations; neither validates, decides or writes anything
itself, so they cannot disagree. A front end parses its input, calls a method of
:class:`NodeService` and renders the result or the typed error:

=====================  =============  ======================
error                  CLI exit code  HTTP status
=====================  =============  ======================
:class:`UsageError`    2              400
:class:`NotFound`      1              404
:class:`Conflict`      2              409
=====================  =============  ======================

(The CLI's whole table: 0 done; 1 the command ran but found problems or nothing matched:
files rejected by import, damage found by verify, no such instance or peer; 2 it could
not run as given: a malformed argument, a wrong URL, a bad setting, no node in the folder,
a peer whose certificate is not the one named.)

Invariants: a peer URL is stored only in the normal form of
:func:`syncnode.protocol.parse_peer_url`; a peer's certificate is pinned only when its
SHA-256 is the node id the operator gave; a node id is accepted in every form
:meth:`NodeId.parse` reads (dashed, compact, lower case, look-alike letters). A running
node passes itself as the :class:`NodeRuntime`, so a change made through the service takes
effect at once (sync loops refreshed, settings applied); without one (the CLI beside or
instead of ``run``) the running node notices the change in the catalog by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .ids import InvalidUID, check_uid
from .nodeid import InvalidNodeId, NodeId
from .protocol import InvalidPeerURL, parse_peer_url
from .status import discovered_nodes, node_status, peer_rows

if TYPE_CHECKING:
    from .catalog import ApplyResult, Instance
    from .config import Settings
    from .importer import ImportReport, ProgressFn
    from .local import LocalNode

PUSH_MODES = ("auto", "always", "never")
FETCH_TIMEOUT = 5.0  # seconds to fetch a peer's certificate when trusting it


class ServiceError(Exception):
    """An operation refused, with a message an operator can act on."""


class UsageError(ServiceError, ValueError):
    """The request is malformed or not allowed as given (CLI exit 2, HTTP 400)."""


class NotFound(ServiceError):
    """The request names nothing that exists here (CLI exit 1, HTTP 404)."""


class Conflict(ServiceError):
    """The world disagrees with the request, e.g. a peer presents another node id
    (CLI exit 2, HTTP 409)."""


class NodeRuntime(Protocol):
    """What a running node (``syncnode run``) offers beside its data folder."""

    settings: Settings
    ports: dict[str, int]

    def peers_changed(self) -> None: ...
    def local_change(self) -> None: ...
    def apply_settings(self, changes: dict[str, Any]) -> None: ...
    def extra_status(self) -> dict[str, Any]: ...
    def extra_metrics(self) -> dict[str, float]: ...
    def served_bytes(self) -> dict[str, dict[str, int]]: ...


@dataclass(frozen=True, slots=True)
class PeerTrusted:
    node_id: NodeId
    url: str
    pinned: bool
    note: str = ""  # why it is not pinned yet

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": str(self.node_id), "url": self.url, "pinned": self.pinned}


def parse_node_id(text: object) -> NodeId:
    try:
        return NodeId.parse(str(text))
    except InvalidNodeId as exc:
        raise UsageError(str(exc)) from None


def check_url(text: object) -> str:
    """The normal form of a peer URL (``https://HOST:PORT``), or :class:`UsageError`."""
    try:
        return parse_peer_url(str(text)).url
    except InvalidPeerURL as exc:
        raise UsageError(str(exc)) from None


def check_push(value: object) -> str:
    if value not in PUSH_MODES:
        raise UsageError(f"push is {', '.join(PUSH_MODES[:-1])} or {PUSH_MODES[-1]}, "
                         f"not {str(value)[:20]!r}")
    return str(value)


class NodeService:
    """The operations on one node, for every front end."""

    def __init__(self, node: LocalNode, runtime: NodeRuntime | None = None) -> None:
        self.node = node
        self.runtime = runtime

    # -- trust ---------------------------------------------------------------------------
    def _peer(self, text: object) -> NodeId:
        peer = parse_node_id(text)
        if peer == self.node.node_id:
            raise UsageError("that is this node's own id")
        return peer

    async def add_peer(self, node_id: object, url: object, push: object = "auto",
                       certificate: bytes | None = None) -> PeerTrusted:
        """Trust a peer at URL. Its certificate (fetched from URL, or ``certificate`` as
        given) is pinned only if it hashes to NODE_ID; an unreachable peer is trusted by id
        and pinned on first contact."""
        from .tls.errors import NodeTLSError, PeerUnreachable
        from .tls.peercert import fetch_peer_certificate

        peer = self._peer(node_id)
        address = check_url(url)
        mode = check_push(push)
        note = ""
        self.node.trust.undeny(peer)  # trusting it again lifts an earlier `peer remove`
        try:
            der = certificate if certificate is not None else await fetch_peer_certificate(
                address, self.node.identity, peer, timeout=FETCH_TIMEOUT)
            self.node.trust.pin(der, peer)
        except PeerUnreachable as exc:
            note = str(exc)
        except NodeTLSError as exc:
            raise Conflict(str(exc)) from None
        self.node.catalog.add_peer(peer.compact, address, mode)
        self._peers_changed()
        return PeerTrusted(peer, address, not note, note)

    async def accept_peer(self, node_id: object) -> PeerTrusted:
        """Trust a node discovery saw on the LAN, at the address it announced."""
        from .tls.errors import NodeTLSError
        from .tls.peercert import fetch_peer_certificate

        peer = self._peer(node_id)
        seen = {parse_node_id(d["node_id"]): d for d in self.node.catalog.discovered()}
        if peer not in seen:
            raise NotFound(f"{peer} has not been seen on the LAN recently "
                           "(is `run --discovery` on, here and there?)")
        address = check_url(seen[peer]["url"])
        try:
            der = await fetch_peer_certificate(address, self.node.identity, peer,
                                               timeout=FETCH_TIMEOUT)
        except NodeTLSError as exc:
            raise Conflict(str(exc)) from None
        self.node.trust.pin(der, peer)
        self.node.catalog.add_peer(peer.compact, address, "auto")
        self._peers_changed()
        return PeerTrusted(peer, address, True)

    def remove_peer(self, node_id: object) -> NodeId:
        """Stop trusting a peer: its connections are refused from the next request on.

        Its pin goes (and the pin of the id it renewed from); with a cluster CA it is also
        put on the deny list, so that the CA's signature no longer admits it either (at the
        TLS handshake). `peer add` takes it off the list again."""
        peer = parse_node_id(node_id)
        trust = self.node.trust
        known = self.node.catalog.remove_peer(peer.compact)
        unpinned = trust.remove(peer)
        for statement in trust.successors():
            if statement.new == peer:
                trust.remove(statement.old)
        listed = any(row["node_id"] == str(peer) for row in peer_rows(self.node))
        if not (known or unpinned or listed):
            raise NotFound(f"{peer} is not a trusted peer")
        if trust.ca_certificate() is not None and not trust.is_denied(peer):
            trust.deny(peer)
        self._peers_changed()
        return peer

    def peers(self) -> list[dict[str, Any]]:
        return peer_rows(self.node)

    def discovered(self) -> list[dict[str, Any]]:
        return discovered_nodes(self.node)

    def _peers_changed(self) -> None:
        if self.runtime is not None:
            self.runtime.peers_changed()

    # -- instances -----------------------------------------------------------------------
    @property
    def node_id(self) -> NodeId:
        return self.node.node_id

    def instances(self, *, limit: int | None = None, offset: int = 0,
                  **filters: Any) -> list[Instance]:
        """Live instances matching the filters of :meth:`Catalog.instances`."""
        try:
            return self.node.catalog.instances(**filters, limit=limit, offset=offset)
        except InvalidUID as exc:
            raise UsageError(str(exc)) from None

    def instance(self, sop_uid: str) -> Instance:
        try:
            inst = self.node.catalog.instance(check_uid(sop_uid, "SOP Instance UID"))
        except InvalidUID as exc:
            raise UsageError(str(exc)) from None
        if inst is None:
            raise NotFound(f"no live instance {sop_uid}")
        return inst

    def read_file(self, inst: Instance) -> Iterator[bytes]:
        """The instance's stored bytes, each piece verified against its hash as read."""
        return self.node.store.read_verified(inst.blob)

    def studies(self) -> list[dict[str, Any]]:
        return self.node.catalog.studies()

    def delete(self, sop_uids: Iterable[str] = (), study: str | None = None,
               reason: str | None = None) -> ApplyResult:
        """Delete instances (or a whole study): tombstones that sync, blobs freed.
        ``reason`` (``quality``, ``safety``, ``worklist``, ``retention`` or a CID 7011
        code): what the rejection notes sent to the export PACS say (default: each
        destination's ``export_reject_reason``). :class:`NotFound` if nothing live matched
        (nothing is written then)."""
        from .rejection import reason_code

        uids = list(sop_uids)
        if not uids and not study:
            raise UsageError("give SOP Instance UIDs or a Study Instance UID")
        try:
            code = reason_code(reason) if reason is not None else None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            result = (self.node.delete_study(check_uid(study, "Study Instance UID"), code)
                      if study else self.node.delete_instances(
                          [check_uid(u, "SOP Instance UID") for u in uids], code))
        except InvalidUID as exc:
            raise UsageError(str(exc)) from None
        if not result.inserted:
            raise NotFound("nothing matched: no live instance with that UID")
        if self.runtime is not None:
            self.runtime.local_change()
        return result

    def import_paths(self, paths: Iterable[Path], progress: ProgressFn | None = None
                     ) -> ImportReport:
        from .importer import import_paths

        report = import_paths(self.node, paths, progress=progress)
        if report.imported and self.runtime is not None:
            self.runtime.local_change()
        return report

    # -- status and configuration --------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counts, Merkle root, peers, discoveries, the export outbox (and, when running,
        the bound ports and what the running services report)."""
        st = node_status(self.node)
        caps = self.caps_in_force([p["node_id"] for p in st["peers"]])
        st["bandwidth"] = caps
        for p in st["peers"]:  # the caps in force for each peer (besides the overall ones)
            compact = NodeId.parse(p["node_id"]).compact
            p["cap"] = {d: caps.get(f"{compact}:{d}", "unlimited") for d in ("in", "out")}
        if self.runtime is not None:
            st["ports"] = dict(self.runtime.ports)
            st.update(self.runtime.extra_status())
        return st

    # -- bandwidth caps (syncnode.ratelimit; stored in the bandwidth_caps setting) --------
    def caps_in_force(self, peers: Iterable[str] = ()) -> dict[str, str]:
        """Scope -> the rate in force now: ``in``, ``out``, and ``NODEID:in`` /
        ``NODEID:out`` for the peers given and every peer with a cap."""
        from .ratelimit import in_force

        return in_force(self.settings().bandwidth_caps,
                        [NodeId.parse(p).compact for p in peers])

    def limits(self, caps: dict[str, str] | None = None) -> dict[str, Any]:
        """The caps as configured (scope -> schedule) and the rates in force now."""
        from .ratelimit import in_force

        caps = dict(self.settings().bandwidth_caps if caps is None else caps)
        peers = [NodeId.parse(p["node_id"]).compact for p in self.node.catalog.peers()]
        return {"caps": caps, "in_force": in_force(caps, peers)}

    def set_limit(self, scope: object, schedule: object) -> dict[str, Any]:
        """Set the cap of one scope (``in``, ``out``, ``NODEID:in``, ``NODEID:out``) to a
        schedule, persisted in config.toml and in force at once on a running node."""
        from .ratelimit import Schedule, ScheduleError, check_scope, scope_name

        try:
            name = scope_name(*check_scope(str(scope)))
            text = Schedule.parse(str(schedule)).text
        except ScheduleError as exc:
            raise UsageError(str(exc)) from None
        caps = {**self.settings().bandwidth_caps, name: text}
        self.patch_config({"bandwidth_caps": caps})
        return {"scope": name, "schedule": text, **self.limits(caps)}

    def clear_limit(self, scope: object) -> dict[str, Any]:
        """Remove the cap of one scope (unlimited from then on)."""
        from .ratelimit import ScheduleError, check_scope, scope_name

        try:
            name = scope_name(*check_scope(str(scope)))
        except ScheduleError as exc:
            raise UsageError(str(exc)) from None
        caps = dict(self.settings().bandwidth_caps)
        if name not in caps:
            raise NotFound(f"no cap is set for {name}")
        del caps[name]
        self.patch_config({"bandwidth_caps": caps})
        return {"scope": name, **self.limits(caps)}

    def status_verify(self) -> dict[str, Any] | None:
        """The last verify's result (see :mod:`syncnode.scrub`), None if never verified."""
        from .scrub import last_result

        return last_result(self.node.data)

    def settings(self) -> Settings:
        return self.runtime.settings if self.runtime is not None else self.node.settings()

    def config(self) -> dict[str, Any]:
        """The effective settings (secrets masked) and the keys that need a restart."""
        from .config import RESTART_KEYS

        values = self.settings().model_dump(mode="json")
        values["api_key"] = "***" if values.get("api_key") else ""
        values["data"] = str(self.node.data)
        return {"config": values, "restart_keys": sorted(RESTART_KEYS)}

    def patch_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate and persist changes; apply at once those that need no restart."""
        from . import config as cfg

        if not isinstance(changes, dict):
            raise UsageError("changes are an object of setting: value")
        if "data" in changes:
            raise UsageError("the data folder cannot be changed at run time")
        if "api_key" in changes:
            raise UsageError("API keys are not settings: create or replace them with "
                             "`syncnode apikey rotate read|admin` (stored hashed)")
        try:
            settings, restart = cfg.update_file(self.node.data, changes)
        except cfg.ConfigError as exc:
            raise UsageError(str(exc)) from None
        if self.runtime is not None:  # the validated values (e.g. "7d" -> 604800.0)
            self.runtime.apply_settings({k: getattr(settings, k) for k in changes})
        return {"changed": sorted(changes), "restart_required": restart}
