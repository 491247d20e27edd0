"""IHE ATNA: audit entries sent as DICOM audit messages in syslog over TLS.

Each entry of the audit trail (``syncnode.audit``) becomes one DICOM PS3.15 A.5 audit
message (XML): EventIdentification with the DICOM EventID for its action (see
:data:`EVENTS`), EventActionCode and EventOutcomeIndicator; ActiveParticipants with
UserID, NetworkAccessPointID and the Source/Destination RoleIDCodes for transfers;
AuditSourceIdentification naming this node; and ParticipantObjectIdentification for each
study (by Study Instance UID), the query (C-FIND keys only, never their values) or the
peer concerned. The patient participant object names no patient (an empty
ParticipantObjectID) unless the operator opts in (``audit_patient_ids``): then the patient
IDs of the entry's studies are looked up in the catalog when the message is built. They
go to the collector only; the trail file never holds them.

The message travels as an RFC 5424 syslog message (``<85>1 … IHE+RFC-3881 - <xml>``)
framed by octet counting (RFC 6587/5425) over TLS to the configured collector
(``audit_syslog = "host:port"``, verified against ``audit_syslog_ca``; the node's own
certificate is offered as client certificate).

Invariants: building a message (:func:`audit_message`, :func:`syslog_frame`) is pure.
:class:`SyslogForwarder` runs in its own thread and reads the trail from its file, so the
node never waits for the collector and entries written by the CLI beside ``run`` are sent
too; where it got to is kept in ``audit/syslog.cursor``, so a restart or a collector that
was down resumes after the last entry sent. Reconnects back off up to a minute. An entry
is dropped (and counted) only if more than ``max_backlog`` wait; a message in flight when a
connection breaks may be lost — the trail file stays the complete record.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audit import Follower

log = logging.getLogger("syncnode.atna")

CURSOR_NAME = "syslog.cursor"
PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5), as IHE ITI-20 asks
MSGID = "IHE+RFC-3881"
APP_NAME = "syncnode"
MAX_STUDIES = 200  # study participant objects per message (the file lists up to 1000)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
IMPORT = _dcm("110107", "Import")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
SOURCE = _dcm("110153", "Source Role ID")
DESTINATION = _dcm("110152", "Destination Role ID")
APPLICATION = _dcm("110150", "Application")
STUDY_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")

# action -> (EventID, EventActionCode, EventTypeCode or None, direction)
# direction: "in" = the remote actor is the source and this node the destination;
# "out" = this node is the source; None = the actor requested something of this node.
EVENTS: dict[str, tuple[Code, str, Code | None, str | None]] = {
    "node-start": (APPLICATION_ACTIVITY, "E", _dcm("110120", "Application Start"), None),
    "node-stop": (APPLICATION_ACTIVITY, "E", _dcm("110121", "Application Stop"), None),
    "import": (IMPORT, "C", None, "in"),
    "received": (INSTANCES_TRANSFERRED, "C", None, "in"),
    "peer-received": (INSTANCES_TRANSFERRED, "C", None, "in"),
    "peer-sent": (INSTANCES_TRANSFERRED, "R", None, "out"),
    "exported": (INSTANCES_TRANSFERRED, "R", None, "out"),
    "retrieved": (INSTANCES_TRANSFERRED, "R", None, "out"),
    "downloaded": (INSTANCES_ACCESSED, "R", None, None),
    "query": (QUERY, "E", None, None),
    "deleted": (STUDY_DELETED, "D", None, None),
    "trust-add": (SECURITY_ALERT, "E", _dcm("110129", "Security Configuration"), None),
    "trust-remove": (SECURITY_ALERT, "E", _dcm("110129", "Security Configuration"), None),
    "trust-accept": (SECURITY_ALERT, "E", _dcm("110129", "Security Configuration"), None),
    "config-changed": (SECURITY_ALERT, "E", _dcm("110131", "Software Configuration"), None),
    "connection-refused": (SECURITY_ALERT, "E", _dcm("110126", "Node Authentication"),
                           None),
    "login": (USER_AUTHENTICATION, "E", _dcm("110122", "Login"), None),
    "audit-recovered": (SECURITY_ALERT, "E", _dcm("110133", "Audit Recording Stopped"),
                        None),
    "audit-dropped": (SECURITY_ALERT, "E", _dcm("110133", "Audit Recording Stopped"), None),
}


@dataclass(frozen=True, slots=True)
class Source:
    """How this node names itself in its messages."""

    node_id: str                 # AuditSourceID and this node's UserID
    host: str                    # NetworkAccessPointID (machine name)
    ae_title: str = "SYNCNODE"   # AlternativeUserID
    site: str | None = None      # AuditEnterpriseSiteID


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _actor_parts(actor: str) -> tuple[str, str | None, str | None]:
    """(UserID, NetworkAccessPointID, its type code) of an entry's actor."""
    kind, _, name = actor.partition(":")
    if kind == "dicom" and "@" in name:
        ae, _, ip = name.rpartition("@")
        return ae, ip, "2"
    return actor, None, None


def audit_message(entry: dict[str, Any], source: Source,
                  patients: dict[str, str] | None = None) -> bytes:
    """The DICOM audit message (XML, one line, UTF-8) for one audit entry. ``patients``
    maps Study Instance UIDs to patient IDs when the operator opted in to sending them."""
    event_id, action_code, type_code, direction = EVENTS[entry["action"]]
    root = ET.Element("AuditMessage")
    ev = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action_code, "EventDateTime": entry["time"],
        "EventOutcomeIndicator": "0" if entry["outcome"] == "success" else "4"})
    _coded(ev, "EventID", event_id)
    if type_code is not None:
        _coded(ev, "EventTypeCode", type_code)
    if entry.get("reason"):
        ET.SubElement(ev, "EventOutcomeDescription").text = entry["reason"]

    actor = entry["actor"]
    by_node = actor == "node" or actor.startswith("node:")
    # Who asked: the actor, except for a pull from a peer (this node asked) and the node's
    # own actions.
    actor_asked = not by_node and entry["action"] != "peer-received"
    user, nap, nap_type = _actor_parts(actor)
    me = {"UserID": source.node_id, "AlternativeUserID": source.ae_title,
          "NetworkAccessPointID": source.host, "NetworkAccessPointTypeCode": "1",
          "UserIsRequestor": "false" if actor_asked else "true"}
    if direction == "in":
        src = ET.SubElement(root, "ActiveParticipant",
                            _participant(user, actor_asked, nap, nap_type))
        _coded(src, "RoleIDCode", SOURCE)
        _coded(ET.SubElement(root, "ActiveParticipant", me), "RoleIDCode", DESTINATION)
    elif direction == "out":
        _coded(ET.SubElement(root, "ActiveParticipant", me), "RoleIDCode", SOURCE)
        remote = entry.get("destination") or (
            f"peer:{entry['peer']}" if entry.get("peer") else None)
        if remote is None or remote == actor:
            dst = ET.SubElement(root, "ActiveParticipant",
                                _participant(user, actor_asked, nap, nap_type))
        else:
            if not by_node:
                ET.SubElement(root, "ActiveParticipant",
                              _participant(user, actor_asked, nap, nap_type))
            dst = ET.SubElement(root, "ActiveParticipant",
                                _participant(remote, False, None, None))
        _coded(dst, "RoleIDCode", DESTINATION)
    else:
        if not by_node:
            ET.SubElement(root, "ActiveParticipant", _participant(user, True, nap, nap_type))
        _coded(ET.SubElement(root, "ActiveParticipant", me), "RoleIDCode", APPLICATION)

    asi = ET.SubElement(root, "AuditSourceIdentification", {
        **({"AuditEnterpriseSiteID": source.site} if source.site else {}),
        "AuditSourceID": source.node_id})
    ET.SubElement(asi, "AuditSourceTypeCode", {"csd-code": "4"})

    studies = entry.get("studies") or []
    for uid in studies[:MAX_STUDIES]:
        po = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _coded(po, "ParticipantObjectIDTypeCode", STUDY_UID)
        if len(studies) == 1 and entry.get("instances"):
            desc = ET.SubElement(po, "ParticipantObjectDescription")
            ET.SubElement(desc, "SOPClass", {"NumberOfInstances": str(entry["instances"])})
    if studies:
        # The patient participant object: without an id unless the operator opted in.
        known = patients or {}
        ids = sorted({known[s] for s in studies[:MAX_STUDIES] if known.get(s)}) or [""]
        for pid in ids:
            pat = ET.SubElement(root, "ParticipantObjectIdentification", {
                "ParticipantObjectID": pid, "ParticipantObjectTypeCode": "1",
                "ParticipantObjectTypeCodeRole": "1"})
            _coded(pat, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if entry["action"] == "query":
        q = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": entry.get("sop_class") or STUDY_ROOT_FIND,
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "24"})
        _coded(q, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
        keys = "\\".join(entry.get("keys") or []).encode()  # the keys, without their values
        ET.SubElement(q, "ParticipantObjectQuery").text = base64.b64encode(keys).decode()
    subject = entry.get("subject")
    if subject:
        n = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": subject, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13"})
        _coded(n, "ParticipantObjectIDTypeCode", NODE_ID)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _participant(user: str, requestor: bool, nap: str | None, nap_type: str | None
                 ) -> dict[str, str]:
    attrs = {"UserID": user, "UserIsRequestor": "true" if requestor else "false"}
    if nap:
        attrs["NetworkAccessPointID"] = nap
        attrs["NetworkAccessPointTypeCode"] = nap_type or "2"
    return attrs


def syslog_frame(xml: bytes, timestamp: str, hostname: str, procid: int | str) -> bytes:
    """One RFC 5424 message, octet-counted for a TLS transport (RFC 5425)."""
    host = "".join(c for c in hostname if 33 <= ord(c) <= 126)[:255] or "-"
    header = f"<{PRI}>1 {timestamp} {host} {APP_NAME} {procid} {MSGID} - ".encode("ascii")
    msg = header + BOM + xml
    return str(len(msg)).encode("ascii") + b" " + msg


class SyslogConfigError(ValueError):
    """``audit_syslog`` or its CA file cannot be used."""


def parse_target(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SyslogConfigError(f"audit_syslog {value!r} is not HOST:PORT "
                                "(e.g. audit.example.org:6514)")
    return host.strip("[]"), int(port)


class SyslogForwarder:
    """Sends every new trail entry to a syslog/TLS collector from a background thread."""

    def __init__(self, folder: Path, target: str, source: Source, *,
                 ca_file: Path | None = None, cert_file: Path | None = None,
                 key_file: Path | None = None, poll: float = 1.0,
                 max_backlog: int = 100_000, timeout: float = 10.0,
                 patient_ids: Callable[[list[str]], dict[str, str]] | None = None) -> None:
        self.folder = Path(folder)
        self.host, self.port = parse_target(target)
        self.source = source
        self.poll, self.max_backlog, self.timeout = poll, max_backlog, timeout
        self.patient_ids = patient_ids  # opt-in: Study UIDs -> patient IDs, for messages only
        self.context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None)
        if cert_file and key_file:
            self.context.load_cert_chain(cert_file, key_file)
        self.sent = 0
        self.dropped = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.connected = False
        self._drain_until = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None
        self._follower: Follower | None = None
        self._procid = os.getpid()
        self._clock: Callable[[], float] = time.monotonic

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        after = self._read_cursor()
        self._follower = Follower(self.folder, 0)
        if after is None:  # first use: from the entries written from now on
            after = self._follower.last_written()
            self._write_cursor(after)
        self._follower.last_seq = after
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def wake(self, _entry: object = None) -> None:
        """Something was written: look now rather than at the next poll (an AuditLog sink)."""
        self._wake.set()

    def stop(self, drain: float = 2.0) -> None:
        """Send what is pending for up to ``drain`` seconds, then stop."""
        self._drain_until = self._clock() + drain
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(drain + self.timeout + 1)
            self._thread = None
        self._close()

    def pending(self) -> int:
        if self._follower is None:
            return 0
        return max(0, self._follower.last_written() - self._follower.last_seq)

    def status(self) -> dict[str, Any]:
        return {"target": f"{self.host}:{self.port}", "connected": self.connected,
                "sent": self.sent, "dropped": self.dropped, "reconnects": self.reconnects,
                "last_error": self.last_error}

    def metrics(self) -> dict[str, float]:
        return {"audit_syslog_sent": self.sent, "audit_syslog_dropped": self.dropped,
                "audit_syslog_connected": 1.0 if self.connected else 0.0}

    # -- the thread -----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._follower is not None
        backoff = 0.5
        while True:
            stopping = self._stop.is_set()
            if stopping and self._clock() > self._drain_until:
                return
            try:
                sent_any = self._send_pending()
                backoff = 0.5
                if stopping and not sent_any:
                    return
            except (OSError, ssl.SSLError) as exc:
                self._close()
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("audit syslog %s:%d: %s (retry in %.1f s)", self.host, self.port,
                            self.last_error, backoff)
                if stopping:
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            if not stopping:
                self._wake.wait(self.poll)
                self._wake.clear()

    def _send_pending(self) -> bool:
        follower = self._follower
        assert follower is not None
        behind = follower.last_written() - follower.last_seq
        if behind > self.max_backlog:
            skip = behind - self.max_backlog
            log.error("audit syslog: %d entries waiting; the oldest %d are not sent "
                      "(they stay in the trail file)", behind, skip)
            self.dropped += skip
            follower.seek(follower.last_seq + skip)
            self._write_cursor(follower.last_seq)
        sent_any = False
        while True:
            before = follower.last_seq
            entries = follower.read(100)
            if not entries:
                return sent_any
            frames = []
            for e in entries:
                try:
                    patients = (self.patient_ids(e["studies"][:MAX_STUDIES])
                                if self.patient_ids and e.get("studies") else None)
                    frames.append(syslog_frame(audit_message(e, self.source, patients),
                                               e["time"], self.source.host, self._procid))
                except (KeyError, ValueError, TypeError) as exc:
                    self.dropped += 1
                    log.error("audit syslog: entry %s not sendable: %s", e.get("seq"), exc)
            try:
                sock = self._connect()
                sock.sendall(b"".join(frames))
            except BaseException:
                follower.seek(before)  # send them again on the next connection
                raise
            self.sent += len(frames)
            sent_any = True
            self._write_cursor(follower.last_seq)

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is not None:
            return self._sock
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(self.timeout)
        if self.connected is False and self.sent:
            self.reconnects += 1
        self._sock, self.connected, self.last_error = sock, True, None
        return sock

    def _close(self) -> None:
        sock, self._sock, self.connected = self._sock, None, False
        if sock is not None:
            try:
                sock.settimeout(1.0)
                sock.unwrap().close()  # close_notify: the collector sees a clean end
            except (OSError, ValueError):
                sock.close()  # the connection is gone already: just release it

    # -- where it got to ----------------------------------------------------------------------
    def _read_cursor(self) -> int | None:
        try:
            text = (self.folder / CURSOR_NAME).read_text("ascii").strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def _write_cursor(self, seq: int) -> None:
        tmp = self.folder / (CURSOR_NAME + ".tmp")
        tmp.write_text(f"{seq}\n", "ascii")
        os.replace(tmp, self.folder / CURSOR_NAME)
