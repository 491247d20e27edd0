"""The audit trail: who did what to which studies, append-only and tamper-evident.

Vocabulary:

- **entry** – one JSON object on one line of ``<data>/audit/audit.log``: ``seq`` (1, 2, 3 …
  with no gap), ``time`` (UTC, ISO 8601), ``action`` (one of :data:`ACTIONS`), ``actor``
  (``cli:<user>``, ``api:<role>``, ``peer:<node id>``, ``dicom:<AE>@<IP>``, ``node``),
  ``outcome`` (``success`` or ``failure``), details (UIDs, hashes, counts, tag names:
  see :data:`DETAIL_KEYS`), ``prev`` and ``hash``.
- **chain** – ``hash`` is the BLAKE3-256 of the entry's canonical JSON without ``hash``;
  ``prev`` is the ``hash`` of the entry before it (64 zeros for the first entry ever).
  Changing, removing or reordering any entry breaks the chain at that entry.
- **head** – ``audit/head`` holds the ``seq`` and ``hash`` of the last entry, written after
  each append: removing whole entries from the end of the log, which the chain alone
  cannot reveal, is caught by comparing the two.
- **rotation** – when ``audit.log`` outgrows its limit it is renamed
  ``audit-<first seq>.log`` and a new ``audit.log`` goes on with the same chain: the first
  entry of the new file names the hash of the last one of the old file.

Invariants:

- Entries never hold patient names, patient IDs or birth dates. Only the keys of
  :data:`DETAIL_KEYS` are accepted, UIDs must be UIDs, hashes hashes and C-FIND keys
  DICOM keywords (the matching values are never recorded).
- Several processes may append at once (the CLI beside ``syncnode run``): an append takes
  an exclusive ``flock`` on ``audit/lock``, reads the tail of the log for the last
  ``seq``/``hash``, writes its entries with one ``write`` and one ``fsync``. An entry is
  durable when :meth:`AuditLog.write` returns.
- Nothing here runs on an asyncio loop: :meth:`AuditLog.record` only queues; a writer
  thread appends what is queued in small batches (one fsync per batch: an audit entry is
  written within milliseconds of its action and a burst of actions costs one disk flush,
  not one each). The queue is bounded; if it is ever full the overflow is counted and an
  ``audit-dropped`` entry with the count is written as soon as there is room.
- What strangers can cause at will (refused connections, failed logins) cannot fill the
  disk: per source at most :data:`THROTTLE_PER_MINUTE` such entries a minute are written;
  the others are counted in the next one (``suppressed``), or at ``close``.
- A log that ends in an incomplete line (a crash during a write) or shorter than its head
  is never silently continued: the next append first writes an ``audit-recovered`` entry
  saying what was found (the incomplete bytes are kept in ``audit/discarded-*.bin``), so
  the fact stays in the chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from .ids import is_hash, is_uid

log = logging.getLogger("syncnode.audit")

AUDIT_DIR = "audit"
LOG_NAME = "audit.log"
HEAD_NAME = "head"
LOCK_NAME = "lock"
GENESIS = "0" * 64
ROTATE_BYTES = 64 << 20
QUEUE_MAX = 10_000
BATCH_MAX = 256
MAX_LIST = 1000  # UIDs listed per entry; the count is always complete
# Refusals an outsider can cause at will are recorded at most this often per source and
# minute; the rest are counted in the next entry for that source ("suppressed").
THROTTLED = frozenset({"connection-refused", "login"})
THROTTLE_PER_MINUTE = 20
_THROTTLE_KEYS = 10_000
_TAIL_READ = 1 << 16
_ARCHIVE_RE = re.compile(r"^audit-(\d{12,})\.log$")
_KEYWORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}$")
_ACTOR_RE = re.compile(r"^(cli|api|peer|dicom|node)(:[\x21-\x7e]{1,200})?$")
_TEXT_RE = re.compile(r"^[\x20-\x7e]{0,300}$")

# What happened; the ATNA event each maps to is in syncnode.atna.
ACTIONS = frozenset({
    "node-start", "node-stop",            # the node began or stopped serving
    "import",                             # files read into the node (syncnode import)
    "received",                           # instances received by C-STORE or STOW
    "peer-received", "peer-sent",         # instances pulled from / served to a peer, a round
    "exported",                           # instances delivered to a local PACS
    "retrieved",                          # instances sent by C-MOVE/C-GET
    "downloaded",                         # instance files read through the admin API
    "query",                              # C-FIND or QIDO (keys only)
    "deleted",                            # tombstones written (rm, API delete)
    "trust-add", "trust-remove", "trust-accept",  # the trust list changed
    "config-changed",                     # settings changed (subject: their names)
    "connection-refused",                 # a peer or DICOM connection refused
    "login",                              # an admin API credential checked
    "audit-recovered", "audit-dropped",   # the trail itself
})
OUTCOMES = frozenset({"success", "failure"})
# Detail keys and what each may hold. Nothing else reaches the file.
DETAIL_KEYS: dict[str, str] = {
    "studies": "uids", "series": "uids", "sops": "uids", "blobs": "hashes",
    "instances": "int", "files": "int", "failed": "int", "unchanged": "int",
    "bytes": "int", "studies_count": "int", "count": "int", "dropped": "int",
    "peer": "text", "remote": "text", "destination": "text", "url": "text",
    "level": "text", "reason": "text", "role": "text", "subject": "text",
    "keys": "keywords", "sop_class": "uid", "suppressed": "int",
}


class AuditError(Exception):
    """The audit trail cannot be written or read; the message says what to check."""


class InvalidAuditEntry(AuditError, ValueError):
    """An entry that would break the trail's rules (unknown action, PHI-shaped detail)."""


# -- entries (pure) ----------------------------------------------------------------------
def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """BLAKE3 of the entry's canonical JSON without its ``hash`` field."""
    return blake3.blake3(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_detail(key: str, value: Any) -> Any:
    kind = DETAIL_KEYS.get(key)
    if kind is None:
        raise InvalidAuditEntry(f"audit detail {key!r} is not one of {sorted(DETAIL_KEYS)}")
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidAuditEntry(f"audit detail {key!r} must be a count")
        return value
    if kind == "uid":
        if not is_uid(value):
            raise InvalidAuditEntry(f"audit detail {key!r} must be a UID")
        return value
    if kind == "text":
        if not isinstance(value, str) or not _TEXT_RE.fullmatch(value):
            raise InvalidAuditEntry(f"audit detail {key!r} must be short printable ASCII")
        return value
    items = sorted(set(value))
    check = {"uids": is_uid, "hashes": is_hash,
             "keywords": lambda v: isinstance(v, str) and bool(_KEYWORD_RE.fullmatch(v))}[kind]
    bad = [v for v in items if not check(v)]
    if bad:
        raise InvalidAuditEntry(f"audit detail {key!r} holds {len(bad)} value(s) that are not "
                                f"{kind} (values are never recorded)")
    return items[:MAX_LIST]


def make_entry(action: str, actor: str, outcome: str = "success", *,
               time_: str | None = None, **details: Any) -> dict[str, Any]:
    """Check and normalise an entry's content (without ``seq``/``prev``/``hash``)."""
    if action not in ACTIONS:
        raise InvalidAuditEntry(f"unknown audit action {action!r}")
    if outcome not in OUTCOMES:
        raise InvalidAuditEntry(f"audit outcome is success or failure, not {outcome!r}")
    if not isinstance(actor, str) or not _ACTOR_RE.fullmatch(actor):
        raise InvalidAuditEntry(f"audit actor {actor!r} is not kind[:name] "
                                "(cli, api, peer, dicom, node)")
    entry: dict[str, Any] = {"action": action, "actor": actor, "outcome": outcome,
                             "time": time_ or utc_now()}
    for key, value in details.items():
        if value is None:
            continue
        entry[key] = _check_detail(key, value)
        if key == "studies" and "studies_count" not in details:
            entry["studies_count"] = len(set(value))
    return entry


def seal(entry: dict[str, Any], seq: int, prev: str) -> tuple[dict[str, Any], bytes]:
    """Number and chain an entry; return it and its line (with the newline)."""
    sealed = {**entry, "seq": seq, "prev": prev}
    sealed["hash"] = entry_hash(sealed)
    return sealed, canonical(sealed) + b"\n"


# -- actors --------------------------------------------------------------------------------
def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return "cli:" + (re.sub(r"[^\x21-\x7e]", "?", user)[:64] or "?")


def dicom_actor(ae_title: str, address: str) -> str:
    ae = re.sub(r"[^\x21-\x7e]", "_", ae_title.strip())[:16] or "?"
    return f"dicom:{ae}@{address}"


def peer_actor(node_id: str) -> str:
    return f"peer:{node_id}"


def api_actor(role: str, name: str | None = None) -> str:
    return f"api:{role}" + (f"/{name}" if name else "")


@dataclass(slots=True)
class Tally:
    """What moved during one span (a sync round, a peer's round against our server): recorded
    as one entry, not one per instance."""

    instances: int = 0
    events: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.instances or self.events or self.bytes)

    def record(self, trail: AuditLog | None, action: str, peer: str,
               outcome: str = "success") -> None:
        """One entry for a peer (its compact node id), if anything moved."""
        if trail is not None and self:
            trail.record(action, peer_actor(peer), outcome, peer=peer,
                         instances=self.instances, count=self.events, bytes=self.bytes,
                         studies={u for u in self.studies if is_uid(u)})


# -- reading and verifying -------------------------------------------------------------------
@dataclass(slots=True)
class VerifyReport:
    entries: int = 0
    files: list[str] = field(default_factory=list)
    last_seq: int = 0
    last_hash: str = GENESIS
    broken_seq: int | None = None   # the entry number (seq) where the chain breaks
    broken_file: str | None = None
    broken_line: int | None = None  # 1-based line in broken_file
    reason: str | None = None
    recoveries: list[int] = field(default_factory=list)  # seqs of audit-recovered entries

    @property
    def ok(self) -> bool:
        return self.reason is None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "files": self.files,
                "last_seq": self.last_seq, "last_hash": self.last_hash,
                "broken_seq": self.broken_seq, "broken_file": self.broken_file,
                "broken_line": self.broken_line, "reason": self.reason,
                "recoveries": self.recoveries}


def log_files(folder: Path) -> list[Path]:
    """The rotated files in chain order, then the current one."""
    archived = sorted((p for p in folder.glob("audit-*.log") if _ARCHIVE_RE.match(p.name)),
                      key=lambda p: int(_ARCHIVE_RE.match(p.name)[1]))  # type: ignore[index]
    current = folder / LOG_NAME
    return [*archived, *([current] if current.exists() else [])]


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """The entry a line holds if the line is exactly its canonical form, else None."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or canonical(obj) != raw:
        return None
    return obj


def read_head(folder: Path) -> tuple[int, str] | None:
    try:
        text = (folder / HEAD_NAME).read_text("ascii").split()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read {folder / HEAD_NAME}: {exc}") from exc
    if len(text) != 2 or not text[0].isdigit() or not is_hash(text[1]):
        return (-1, "")
    return int(text[0]), text[1]


def verify(folder: Path) -> VerifyReport:
    """Walk the whole chain; stop at the first entry that breaks it."""
    report = VerifyReport()
    head = read_head(folder)  # read first: the log is at least as long as the head says
    prev, seq = GENESIS, 0
    head_hash_seen: str | None = None

    def broken(path: Path, line: int, why: str) -> VerifyReport:
        report.broken_seq, report.broken_file = seq + 1, path.name
        report.broken_line, report.reason = line, why
        return report

    for path in log_files(folder):
        report.files.append(path.name)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    return broken(path, lineno, "incomplete last entry (the log was cut or a "
                                                "write did not finish)")
                entry = _parse_line(raw[:-1])
                if entry is None:
                    return broken(path, lineno, "not a well-formed entry (bytes changed)")
                if entry.get("seq") != seq + 1:
                    return broken(path, lineno, f"sequence number {entry.get('seq')!r} where "
                                                f"{seq + 1} was expected (entries removed or "
                                                "reordered)")
                if entry.get("prev") != prev:
                    return broken(path, lineno, "does not chain to the entry before it "
                                                "(an entry before it changed or is missing)")
                if entry.get("hash") != entry_hash(entry):
                    return broken(path, lineno, "its hash does not match its content "
                                                "(the entry was changed)")
                seq, prev = entry["seq"], entry["hash"]
                report.entries += 1
                if entry.get("action") == "audit-recovered":
                    report.recoveries.append(seq)
                if head is not None and seq == head[0]:
                    head_hash_seen = prev
    report.last_seq, report.last_hash = seq, prev
    if head is not None:
        if head[0] < 0:
            report.reason = f"{HEAD_NAME} is damaged"
        elif head[0] > seq:
            report.broken_seq = seq + 1
            report.reason = (f"entries {seq + 1}..{head[0]} are missing: the log ends at "
                             f"{seq} but was written up to {head[0]} (truncated)")
        elif head[0] > 0 and head_hash_seen != head[1]:
            report.broken_seq = head[0]
            report.reason = f"entry {head[0]} differs from the one last written (replaced)"
    return report


def _parse_since(since: str | None) -> tuple[int, str]:
    if not since:
        return 0, ""
    if since.isdigit():
        return int(since), ""
    try:
        when = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError as exc:
        raise AuditError(f"--since {since!r}: give an entry number or an ISO date/time "
                         "(e.g. 2026-12-06T14:00Z)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return 0, when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def read_entries(folder: Path, since: str | None = None,
                 action: str | None = None) -> Iterator[dict[str, Any]]:
    """Entries in order, from entry number ``since`` or the first at or after the ISO time
    ``since``, optionally of one action. Lines that do not parse are skipped here (``verify``
    reports them)."""
    min_seq, min_time = _parse_since(since)
    if action is not None and action not in ACTIONS:
        raise AuditError(f"unknown action {action!r}; one of: {', '.join(sorted(ACTIONS))}")
    for path in log_files(folder):
        with open(path, "rb") as f:
            for raw in f:
                entry = _parse_line(raw.rstrip(b"\n"))
                if entry is None or entry.get("seq", 0) < min_seq \
                        or entry.get("time", "") < min_time:
                    continue
                if action is None or entry.get("action") == action:
                    yield entry



class Follower:
    """Reads the entries after a given ``seq`` as they are appended, across rotations,
    without re-reading the whole trail each time (used by the syslog forwarder)."""

    def __init__(self, folder: Path, after_seq: int) -> None:
        self.folder = Path(folder)
        self.last_seq = after_seq
        self._file: Path | None = None
        self._ino: int | None = None
        self._offset = 0

    def last_written(self) -> int:
        """The ``seq`` of the last entry in the trail now (0 if none)."""
        head = read_head(self.folder)
        if head is not None and head[0] > 0:
            return head[0]
        last = 0
        for e in read_entries(self.folder):
            last = e["seq"]
        return last

    def seek(self, after_seq: int) -> None:
        """Read on from the entry after ``after_seq``."""
        self.last_seq, self._file = after_seq, None

    def _locate(self) -> None:
        """Choose the file holding ``last_seq + 1``: the last whose first entry is not after
        it."""
        files = log_files(self.folder)
        chosen = files[0] if files else None
        for p in files:
            with open(p, "rb") as f:
                first = _parse_line(f.readline().rstrip(b"\n"))
            if first is not None and first.get("seq", 0) <= self.last_seq + 1:
                chosen = p
        self._file, self._offset = chosen, 0
        self._ino = chosen.stat().st_ino if chosen is not None else None

    def read(self, limit: int = 100) -> list[dict[str, Any]]:
        """Up to ``limit`` complete entries after ``last_seq`` (advances ``last_seq``)."""
        out: list[dict[str, Any]] = []
        for _ in range(4):  # a rotation or two between calls
            current = self.folder / LOG_NAME
            if self._file is None:
                self._locate()
                if self._file is None:
                    return out
            try:
                st = self._file.stat()
                same = st.st_ino == self._ino
            except FileNotFoundError:
                same = False
            if not same:  # renamed by a rotation: find the entry again by its seq
                self._locate()
                continue
            with open(self._file, "rb") as f:
                f.seek(self._offset)
                while len(out) < limit:
                    raw = f.readline()
                    if not raw.endswith(b"\n"):
                        break
                    self._offset += len(raw)
                    entry = _parse_line(raw[:-1])
                    if entry is None or entry.get("seq", 0) <= self.last_seq:
                        continue
                    out.append(entry)
                    self.last_seq = entry["seq"]
            if len(out) >= limit or self._file == current:
                return out
            # the end of a rotated file: go on in the next one
            self._file = None
        return out

# -- writing ----------------------------------------------------------------------------------
def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """The last complete line of a file and the offset where complete lines end."""
    if size == 0:
        return None, 0
    start = max(0, size - _TAIL_READ)
    while True:
        block = os.pread(fd, size - start, start)
        end = block.rfind(b"\n")
        if end < 0 and start > 0:
            start = max(0, start - _TAIL_READ * 16)
            continue
        if end < 0:
            return None, 0
        begin = block.rfind(b"\n", 0, end) + 1
        if begin == 0 and start > 0:
            start = max(0, start - _TAIL_READ * 16)
            continue
        return block[begin:end], start + end + 1


class AuditLog:
    """The audit trail of one data folder. ``write`` appends now (durable on return);
    ``record`` queues for the writer thread (for callers on an event loop or a hot path).
    ``sinks`` are called with each entry once it is durable (e.g. a metrics counter)."""

    def __init__(self, folder: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.folder = Path(folder)
        self.rotate_bytes = rotate_bytes
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        self.written = 0
        self.dropped = 0
        self._reported_dropped = 0
        self._mutex = threading.Lock()  # flock is per open file: threads need their own
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._windows: dict[tuple[str, str], list[Any]] = {}  # throttle: start, n, left out

    @classmethod
    def for_node(cls, data: Path | str, rotate_bytes: int = ROTATE_BYTES) -> AuditLog:
        return cls(Path(data) / AUDIT_DIR, rotate_bytes)

    # -- public ------------------------------------------------------------------------
    def write(self, action: str, actor: str, outcome: str = "success",
              **details: Any) -> dict[str, Any]:
        """Append one entry now and return it sealed (``seq``, ``hash``)."""
        return self._append([make_entry(action, actor, outcome, **details)])[0]

    def record(self, action: str, actor: str, outcome: str = "success",
               **details: Any) -> None:
        """Queue one entry for the writer thread; never blocks, never does I/O. The entry
        is checked here, so a bad call fails at its call site."""
        if outcome == "failure" and action in THROTTLED:
            # per source: the actor, and its address where the actor is not known
            suppressed = self._throttled(action, f"{actor} {details.get('remote') or ''}")
            if suppressed < 0:
                return
            if suppressed:
                details["suppressed"] = suppressed
        entry = make_entry(action, actor, outcome, **details)
        self._ensure_thread()
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            with self._thread_lock:
                self.dropped += 1
            log.error("audit queue full: an %s entry was dropped (disk stalled?)", action)

    def _throttled(self, action: str, actor: str) -> int:
        """-1: do not record (over the rate); else how many were left out before this one."""
        now = time.monotonic()
        with self._thread_lock:
            window = self._windows.get((action, actor))
            if window is None or now - window[0] >= 60.0:
                if len(self._windows) >= _THROTTLE_KEYS:
                    self._windows = {k: w for k, w in self._windows.items()
                                     if now - w[0] < 60.0 or w[2]}
                before = window[2] if window else 0
                self._windows[(action, actor)] = [now, 1, 0]
                return before
            if window[1] >= THROTTLE_PER_MINUTE:
                window[2] += 1
                return -1
            window[1] += 1
            before, window[2] = window[2], 0
            return before

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put({"__flush__": done}, timeout=0.1)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    return False
        return done.wait(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer thread, release the lock file."""
        with self._thread_lock:
            left = [(k, w[2]) for k, w in self._windows.items() if w[2]]
            self._windows = {}
        for (action, source), n in left:
            actor, _, remote = source.partition(" ")
            self.record(action, actor, "failure", suppressed=n, remote=remote or None,
                        reason="refusals left out at the rate limit")
        thread = self._thread
        if thread is not None:
            self.flush(timeout)
            self._queue.put(None)
            thread.join(timeout)
            self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def aflush(self, timeout: float = 10.0) -> bool:
        import asyncio

        return await asyncio.to_thread(self.flush, timeout)

    # -- the writer thread -----------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-writer",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[dict[str, Any]] = []
            flushes: list[threading.Event] = []
            while True:
                if item is None:
                    stop = True
                elif "__flush__" in item:
                    flushes.append(item["__flush__"])
                else:
                    batch.append(item)
                if stop or len(batch) >= BATCH_MAX:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            with self._thread_lock:
                lost = self.dropped - self._reported_dropped
                self._reported_dropped = self.dropped
            if lost:
                batch.append(make_entry("audit-dropped", "node", "failure", dropped=lost))
            if batch:
                self._append_retrying(batch)
            for ev in flushes:
                ev.set()

    def _append_retrying(self, batch: list[dict[str, Any]]) -> None:
        delay = 0.1
        for attempt in range(8):
            try:
                self._append(batch)
                return
            except (OSError, AuditError) as exc:
                log.error("audit trail not written (attempt %d): %s", attempt + 1, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        with self._thread_lock:
            self.dropped += len(batch)

    # -- appending ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._lock_fd is None:
                self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._lock_fd = os.open(self.folder / LOCK_NAME,
                                        os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _append(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        path = self.folder / LOG_NAME
        with self._locked():
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                seq, prev, size = self._tail(fd, path, size)
                if size >= self.rotate_bytes:
                    fd = self._rotate(fd, path)
                sealed, lines = [], []
                for entry in entries:
                    seq += 1
                    s, line = seal(entry, seq, prev)
                    prev = s["hash"]
                    sealed.append(s)
                    lines.append(line)
                data = b"".join(lines)
                written = os.write(fd, data)
                if written != len(data):
                    raise AuditError(f"short write to {path} ({written} of {len(data)} bytes):"
                                     " is the disk full?")
                os.fsync(fd)
                self._write_head(seq, prev)
            finally:
                os.close(fd)
        self.written += len(sealed)
        for s in sealed:
            for sink in self.sinks:
                try:
                    sink(s)
                except Exception:  # a sink (metrics, forwarder) never stops the trail
                    log.exception("audit sink failed")
        return sealed

    def _tail(self, fd: int, path: Path, size: int) -> tuple[int, str, int]:
        """The last seq and hash; a damaged end is set aside and recorded first."""
        raw, complete = _last_line(fd, size)
        last = _parse_line(raw) if raw is not None else None
        if last is None and raw is not None:
            raise AuditError(f"the last entry of {path} is damaged: run `syncnode audit "
                             "verify`, keep a copy of the audit folder, then move audit.log "
                             "aside to start a new file")
        if last is None:
            seq, prev = self._previous_file_tail()
        else:
            seq, prev = int(last["seq"]), str(last["hash"])
        problems = []
        if complete < size:  # an incomplete line at the end
            kept = self.folder / f"discarded-{int(time.time())}-{seq + 1}.bin"
            kept.write_bytes(os.pread(fd, size - complete, complete))
            os.ftruncate(fd, complete)
            size = complete
            problems.append(f"incomplete entry after {seq} set aside ({kept.name})")
        head = read_head(self.folder)
        if head is not None and head[0] > seq:
            problems.append(f"log ends at {seq} but {HEAD_NAME} says {head[0]} was written")
        elif head is not None and head[0] == seq and head[1] != prev:
            problems.append(f"entry {seq} differs from the one last written")
        if problems:
            note, line = seal(make_entry("audit-recovered", "node", "failure",
                                         reason="; ".join(problems)[:300]), seq + 1, prev)
            os.write(fd, line)
            seq, prev = seq + 1, note["hash"]
            size += len(line)
            log.error("audit trail: %s", "; ".join(problems))
        return seq, prev, size

    def _previous_file_tail(self) -> tuple[int, str]:
        files = [p for p in log_files(self.folder) if p.name != LOG_NAME]
        if not files:
            return 0, GENESIS
        fd = os.open(files[-1], os.O_RDONLY)
        try:
            raw, _ = _last_line(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        last = _parse_line(raw) if raw is not None else None
        if last is None:
            raise AuditError(f"the last entry of {files[-1]} is damaged: run `syncnode audit "
                             "verify`")
        return int(last["seq"]), str(last["hash"])

    def _rotate(self, fd: int, path: Path) -> int:
        raw = os.pread(fd, 4096, 0)
        first = _parse_line(raw.split(b"\n", 1)[0])
        if first is None:
            raise AuditError(f"cannot rotate {path}: its first entry is damaged")
        os.rename(path, self.folder / f"audit-{int(first['seq']):012d}.log")
        os.close(fd)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, 0o600)
        dfd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return fd

    def _write_head(self, seq: int, last_hash: str) -> None:
        # Not fsynced: after a power loss the head may lag the (fsynced) log, never lead it.
        fd = os.open(self.folder / HEAD_NAME, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            data = f"{seq:020d} {last_hash}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def summarise(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Entries per action (for status pages and tests)."""
    out: dict[str, int] = {}
    for e in entries:
        out[e["action"]] = out.get(e["action"], 0) + 1
    return out
