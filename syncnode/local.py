"""A node's data folder: identity, configuration, blob store and catalog, opened together.

Layout of ``<data>``::

    node.key, node.crt   the identity (the node id is the SHA-256 of node.crt)
    ca.crt, crl.pem      the cluster CA this node trusts, if any, and its revocation list
    pending.key          a key waiting for the CA's certificate (cert csr / cert install)
    previous/            the key and certificate before a renewal (syncnode.renewal)
    trust/               pinned peer certificates; denied/, seen/, successors/
    config.toml          settings (see syncnode.config)
    api-keys.json        the hashes of the admin API keys (see syncnode.apikeys)
    catalog.db           the catalog (SQLite, WAL)
    blobs/, tmp/         the blob store

Operations that touch both the store and the catalog live here, so that every command
and service keeps the same invariant: a catalog row that is not removed points at a whole
blob, and blobs nothing refers to are collected.

The blocking boundary: asyncio code (peer server, sync engine) never calls the catalog
(SQLite), fsync or hashing on its event loop. It goes through :func:`offload`, which runs
the call in a worker thread and turns the local storage's failures into
:class:`LocalStoreError` (a full disk stays :class:`StoreFull`), so that a broken disk is
never mistaken for a broken network or a misbehaving peer.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from . import events as ev
from . import rejection
from .authority import Policy
from .blobstore import BlobDamage, BlobError, BlobStore, LocalStoreError, StoreFull
from .catalog import ApplyResult, Catalog, put_contradictions
from .dicomfile import InstanceInfo, InvalidDicom, inspect_file
from .ids import is_hash
from .nodeid import NodeId
from .rejection import (
    KEY_OBJECT_SELECTION,
    REFUSE_AGAIN,
    InvalidRejectionNote,
    RejectionNote,
    read_note,
)

if TYPE_CHECKING:
    from .config import Settings
    from .signing import Signer
    from .tls.identity import CertificateAuthority, Identity
    from .tls.truststore import TrustStore

CATALOG_FILE = "catalog.db"
RUN_LOCK = "run.lock"  # held (flock) by `syncnode run` while it uses the folder
TRANSFER_MAX_AGE = 3600.0  # seconds unwritten before a transfer counts as abandoned
log = logging.getLogger("syncnode.local")
P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("syncnode.local")


def local_errors(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``fn`` and name what its failures are: an OSError (other than a missing blob)
    or an SQLite error from this node's storage becomes LocalStoreError, 'no space'
    becomes StoreFull. Typed blob errors pass through unchanged."""
    try:
        return fn(*args, **kwargs)
    except (BlobError, LocalStoreError):
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreFull("no space left for the blob store") from exc
        raise LocalStoreError(f"local storage failed: {type(exc).__name__}: {exc}") from exc
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):  # SQLITE_FULL: the catalog's disk is full
            raise StoreFull(f"no space left for the catalog: {exc}") from exc
        raise LocalStoreError(f"catalog failed: {exc}") from exc
    except sqlite3.Error as exc:
        raise LocalStoreError(f"catalog failed: {exc}") from exc


async def offload(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking call on this node's storage (catalog, blob store, fsync, hashing) in
    a worker thread: the one way asyncio code reaches them. Errors as in
    :func:`local_errors`."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        None, functools.partial(local_errors, fn, *args, **kwargs))


async def offload_to(pool: Executor, fn: Callable[P, T], *args: P.args,
                     **kwargs: P.kwargs) -> T:
    """:func:`offload` on a given pool (a service that must not crowd the others, or the
    event loop's share of the GIL, with its own small pool)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        pool, functools.partial(local_errors, fn, *args, **kwargs))


def policy_of(settings: Settings, node_id: str,
              lineage: dict[str, str] | None = None) -> Policy:
    """The received-event rules a node's settings ask for (see syncnode.authority);
    ``lineage``: renewed ids -> their first id (see syncnode.renewal)."""
    return Policy(local_node=node_id, may_delete=frozenset(settings.may_delete),
                  lineage=dict(lineage or {}),
                  delete_authority=settings.delete_authority,
                  accept_unsigned=settings.accept_unsigned_events,
                  max_clock_skew_ms=int(settings.max_clock_skew * 1000),
                  max_unknown_per_origin=settings.max_unknown_tombstones,
                  unknown_ttl_s=settings.unknown_tombstone_ttl)


class NodeNotInitialised(Exception):
    def __init__(self, data: Path) -> None:
        super().__init__(f"no node in {data}: run `syncnode init --data {data}` first")


@dataclass(slots=True)
class VerifyReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    damaged: list[BlobDamage] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # referenced by the catalog, absent
    catalog_problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    # unfinished transfers in tmp/ (.part, .offer): not damage, but disk a gc can free
    transfer_files: int = 0
    transfer_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not (self.damaged or self.missing or self.catalog_problems)


class LocalNode:
    """The data folder of one node. Cheap to open; safe to open from several processes."""

    def __init__(self, data: Path | str) -> None:
        self.data = Path(data)
        cert = self.data / "node.crt"
        if (self.data / "previous" / "next.crt").exists():  # a renewal a crash interrupted
            from .renewal import finish_renewal

            finish_renewal(self.data)
        if not cert.is_file():
            raise NodeNotInitialised(self.data)
        # The node id is the SHA-256 of the certificate: no X.509 parsing (and ~50 ms less
        # start-up) for commands that never use the key or the trust list, such as import.
        # The identity itself is loaded and checked (key matches certificate) on first use.
        self._identity: Identity | None = None
        self.new_api_keys: dict[str, str] = {}  # role -> key, when just created by init
        self._trust: TrustStore | None = None
        self._signer: Signer | None = None
        self._settings: Settings | None = None  # as given to configure()
        node_id = NodeId.from_certificate_pem(cert.read_bytes())
        self.node_id = node_id if node_id is not None else self.identity.node_id
        self.store = BlobStore(self.data)
        self.catalog = Catalog(self.data / CATALOG_FILE, node_id=self.node_id.compact,
                               signer=lambda: self.signer)

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            from .tls.errors import IdentityError
            from .tls.identity import load_identity

            identity = load_identity(self.data)
            if getattr(self, "node_id", identity.node_id) != identity.node_id:
                raise IdentityError(f"node certificate in {self.data} changed while open")
            self._identity = identity
        return self._identity

    @property
    def signer(self) -> Signer:
        """Signs this node's events (the key is loaded on first use)."""
        if self._signer is None:
            from .signing import Signer, load_private_key

            identity = self.identity
            self._signer = Signer(load_private_key(identity.key_path), identity.cert_der)
        return self._signer

    def configure(self, settings: Settings) -> None:
        """Take the rules for received events from the settings (see
        :meth:`refresh_policy`)."""
        self._settings = settings
        if settings.crl_file and self._trust is not None:
            self._trust.crl_path = self.data / settings.crl_file
        self.refresh_policy()

    def refresh_policy(self) -> None:
        """Recompute the rules for received events from the settings and the renewal links
        (a renewed node's old and new ids are one lineage for delete authority); if the
        delete-authority rules changed since the tombstones were made, make them follow the
        new ones (:meth:`Catalog.reconcile_authority`) and collect the blobs that freed."""
        if self._settings is None:
            return
        from .renewal import lineage

        self.catalog.policy = policy_of(self._settings, self.node_id.compact, lineage(self))
        done = self.catalog.reconcile_authority(self.store.has)
        if done.freed_blobs:
            self.catalog.collect_garbage(done.freed_blobs, self.store.delete)
        if done.removed or done.restored or done.kept_removed:
            log.info("delete authority changed: %d instances removed, %d live again, %d "
                     "stay removed (their blobs were already collected)", done.removed,
                     done.restored, done.kept_removed)

    @property
    def trust(self) -> TrustStore:
        if self._trust is None:
            from .tls.truststore import TrustStore

            crl = self._settings.crl_file if self._settings is not None else None
            self._trust = TrustStore(self.data, self.data / crl if crl else None)
        return self._trust

    def previous_identity(self) -> Identity | None:
        """The identity this node had before it renewed, while the grace period lasts."""
        from .renewal import PREVIOUS_DIR, statement
        from .tls.errors import IdentityError
        from .tls.identity import load_identity

        s = statement(self.data)
        if s is None or s.new != self.node_id:
            return None
        try:
            return load_identity(self.data / PREVIOUS_DIR)
        except IdentityError as exc:
            log.error("cannot serve the previous certificate: %s", exc)
            return None

    @classmethod
    def init(cls, data: Path | str, ca: CertificateAuthority | None = None,
             adopt_identity: bool = False) -> LocalNode:
        """Create a node in ``data``; ``adopt_identity``: its key and certificate are already
        there (installed from a signing request), make only the rest."""
        from .tls.identity import create_identity

        data = Path(data)
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not adopt_identity:
            create_identity(data, ca=ca)
        from . import config as cfg  # imported here: it costs ~0.2 s of start-up

        if not (data / cfg.CONFIG_FILE).exists():
            cfg.write_file(data, cfg.initial_values())
        from .apikeys import KeyStore

        keys = KeyStore(data).create_missing()
        node = cls(data)
        node.new_api_keys = keys  # shown once by `init`; only their hashes are on disk
        return node

    def settings(self, **flags: object) -> Settings:
        from . import config as cfg

        return cfg.load(self.data, **flags)

    def close(self) -> None:
        self.catalog.close()

    # -- deleting ------------------------------------------------------------------------
    def apply(self, received: Iterable[tuple[str, bytes] | ev.Checked]) -> ApplyResult:
        """Apply events received from a peer ((id, body) pairs or events already
        :class:`~syncnode.events.Checked`; a put only if its blob is here or it is already
        removed) and remove the blobs they freed. Each body is decoded once, here or where
        it arrived.

        Puts must match their bytes (:meth:`refuse_untrue_puts`): one that does not is
        refused, listed in ``rejected`` and ``refused``, and changes nothing."""
        checked, invalid = ev.check_all(received)
        refused = self.refuse_untrue_puts(checked)
        if refused:
            checked = [c for c in checked if c.eid not in refused]
        result = self.collect(self.catalog.apply(checked, blob_present=self.store.has))
        result.rejected.update(invalid)
        result.rejected.update(refused)
        result.refused.update(refused)
        if result.inserted:
            self.remember_rejections(checked, set(result.inserted))
        return result

    def remember_rejections(self, checked: Iterable[ev.Checked], inserted: set[str]
                            ) -> list[RejectionNote]:
        """Record the IOCM rejection notes among a peer's puts just admitted (so that an
        instance they reject is refused here too if it is sent again), without deleting
        anything: the deletes travel as tombstones, under the delete authority policy.
        Only Key Object Selection puts are read. A note that cannot be read or names
        nothing usable is logged (UIDs only) and not recorded; it never fails the batch."""
        notes: list[RejectionNote] = []
        for eid, _, event in checked:
            if (not isinstance(event, ev.PutEvent) or eid not in inserted
                    or event.sop_class_uid != KEY_OBJECT_SELECTION
                    or not self.store.has(event.blob)):
                continue
            if event.size > rejection.MAX_NOTE_BYTES:
                log.warning("Key Object Selection %s from %s: not recorded as a rejection "
                            "note: %d bytes, more than a note may have (%d)",
                            event.sop_instance_uid, event.origin[:12], event.size,
                            rejection.MAX_NOTE_BYTES)
                continue
            try:
                note = read_note(self.store.path(event.blob))
            except Exception as exc:  # hostile or broken bytes: logged, never recorded
                # (a parser's message may quote the data set: only ours is shown)
                why = str(exc) if isinstance(exc, InvalidRejectionNote) else "unreadable"
                log.warning("Key Object Selection %s from %s: not recorded as a rejection "
                            "note: %s (%s)", event.sop_instance_uid, event.origin[:12], why,
                            type(exc).__name__)
                continue
            if note is None:
                continue
            self.catalog.rejections.record(note.sop_instance_uid, note.code,
                                           list(note.rejected))
            log.info("rejection note %s (%s) from %s: %d instances recorded as rejected",
                     note.sop_instance_uid, note.code, event.origin[:12], len(note.rejected))
            notes.append(note)
        return notes

    def settle_received(self, blobs: list[str]) -> None:
        """Blobs a peer sent, stored and their puts applied: index their headers for C-FIND
        while they are still in the page cache, then let them leave it (see
        :mod:`syncnode.blobstore`). The backfill would otherwise read them moments later,
        from disk."""
        try:
            self.catalog.index_find_attributes_of(self.store.path, blobs)
        except sqlite3.Error as exc:  # the backfill indexes them later, from disk
            log.warning("C-FIND index of %d received blobs deferred to the backfill: %s",
                        len(blobs), exc)
        self.store.drop_cached(blobs)

    def refuse_untrue_puts(self, checked: Iterable[ev.Checked]) -> dict[str, str]:
        """The peer's put events (new to this node, blob present) whose blob is not the
        instance they claim: the blob is inspected as ``import`` inspects a file
        (:func:`syncnode.dicomfile.inspect_file`) and its indexed attributes compared with
        the event's (:func:`syncnode.catalog.put_contradictions`). Returns id -> reason
        (field names and UIDs only, never patient data)."""
        refused: dict[str, str] = {}
        seen: dict[str, InstanceInfo | InvalidDicom] = {}  # blob -> what it holds
        for eid, _, event in checked:
            if (not isinstance(event, ev.PutEvent) or not is_hash(eid)
                    or not self.store.has(event.blob) or self.catalog.has_event(eid)):
                continue
            held = seen.get(event.blob)
            if held is None:
                try:
                    held = inspect_file(self.store.path(event.blob))
                except InvalidDicom as exc:
                    held = exc
                seen[event.blob] = held
            if isinstance(held, InvalidDicom):
                refused[eid] = (f"put {event.sop_instance_uid}: blob {event.blob} is not a "
                                f"DICOM instance ({held.reason})")
                continue
            wrong = put_contradictions(event, held.to_dict())
            if wrong:
                shown = ", ".join(wrong)
                refused[eid] = (f"put {event.sop_instance_uid}: blob {event.blob} holds "
                                f"another instance (differs in {shown})")
        return refused

    def collect(self, result: ApplyResult) -> ApplyResult:
        """Remove the blobs a batch of events freed."""
        if result.freed_blobs:
            self.catalog.collect_garbage(result.freed_blobs, self.store.delete)
        return result

    def delete_instances(self, sop_uids: Iterable[str], reason: str | None = None,
                         note: str = "") -> ApplyResult:
        """Tombstone these instances; ``reason``: the rejection code (CID 7011) the export
        PACS is told, ``note``: the rejection note that caused the deletes (see
        :meth:`Catalog.delete_instances`)."""
        return self.collect(self.catalog.delete_instances(sop_uids, reason, note))

    def delete_study(self, study_uid: str, reason: str | None = None) -> ApplyResult:
        return self.collect(self.catalog.delete_study(study_uid, reason))

    def apply_rejection(self, blob_hash: str) -> RejectionNote | None:
        """If the stored instance ``blob_hash`` is an IOCM rejection note
        (:mod:`syncnode.rejection`): remember what it rejects (so that it is refused if it
        comes again) and delete those instances through the one delete path. Returns the
        note, or None for any other instance. Raises
        :class:`~syncnode.rejection.InvalidRejectionNote`."""
        note = read_note(self.store.path(blob_hash))
        if note is None:
            return None
        self.catalog.rejections.record(note.sop_instance_uid, note.code, list(note.rejected))
        result = self.delete_instances(note.rejected, note.code, note.sop_instance_uid)
        log.info("rejection note %s (%s): %d instances rejected, %d deleted here",
                 note.sop_instance_uid, note.code, len(note.rejected), len(result.inserted))
        return note

    def refused_as_rejected(self, sop_uid: str) -> str | None:
        """Why an arriving instance is refused because a rejection note rejected it (the
        code says it must not come back), or None."""
        code = self.catalog.rejections.code(sop_uid)
        if code is None or code not in REFUSE_AGAIN:
            return None
        return f"rejected by a rejection note ({code}): not accepted again"

    def gc(self) -> int:
        """Remove every stored blob no event keeps alive, and stale temp files: the files
        of unfinished transfers too, all of them when no ``run`` uses this folder, else
        those not written to for TRANSFER_MAX_AGE."""
        self.store.clean_tmp(transfers_older_than=TRANSFER_MAX_AGE if self.running() else 0)
        keep = self.catalog.referenced_blobs()
        unreferenced = [h for h in self.store.iter_hashes() if h not in keep]
        return self.catalog.collect_garbage(unreferenced, self.store.delete)

    def running(self) -> bool:
        """Whether a ``syncnode run`` holds this data folder (its lock on ``run.lock``)."""
        try:
            fd = os.open(self.data / RUN_LOCK, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- checking ------------------------------------------------------------------------
    def verify(self, progress: Callable[[str, int], None] | None = None) -> VerifyReport:
        """Re-hash every blob and chunk list; check every referenced blob is present and
        the Merkle index matches the events."""
        report = VerifyReport()
        referenced = self.catalog.referenced_blobs()
        for h, damage in self.store.verify_all():
            size = self.store.path(h).stat().st_size if damage is None else 0
            report.blobs_checked += 1
            report.bytes_checked += size
            if damage is not None:
                report.damaged.append(damage)
            if progress:
                progress(h, size)
        present = set(self.store.iter_hashes())
        report.missing = sorted(referenced - present)
        for _f, st in self.store.transfers():
            report.transfer_files += 1
            report.transfer_bytes += st.st_size
        report.catalog_problems = self.catalog.check_derived()
        return report
