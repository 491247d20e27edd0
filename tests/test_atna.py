"""IHE ATNA: a running node sends every audit entry as a DICOM audit message in RFC 5424
syslog over TLS to a real collector (Debian's rsyslog with its GnuTLS driver, started here
on a free loopback port with a test CA, writing what it receives to a file). Each received
message is parsed: the RFC 5424 header, then the XML against the structure of the DICOM
audit message schema (PS3.15 A.5.1, checked element by element below) and the codes
expected for its action."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import trustme
from syncsupport import wait_for

from syncnode import atna
from syncnode.audit import AuditLog, read_entries
from syncnode.local import LocalNode

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd"
                                         if os.path.exists("/usr/sbin/rsyslogd") else None)
GTLS = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")
pytestmark = pytest.mark.skipif(RSYSLOGD is None, reason="rsyslog is not installed "
                                                        "(apt-get install rsyslog rsyslog-gnutls)")
CT = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
STUDY = "1.2.826.0.1.3680043.8.498.77"
SYSLOG_RE = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?Z) "
    rb"(?P<host>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) (?P<procid>[\x21-\x7e]{1,128}) "
    rb"(?P<msgid>[\x21-\x7e]{1,32}) (?P<sd>-|\[.*?\]) (?P<msg>.*)$", re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """rsyslogd listening for syslog over TLS (RFC 5425) on 127.0.0.1, one message a line."""

    def __init__(self, folder: Path, ca: trustme.CA) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        cert.private_key_pem.write_to_path(str(folder / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
        self.port = free_port()
        self.out = folder / "received.log"
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(f'''
global(workDirectory="{folder}" maxMessageSize="256k"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{folder}/ca.pem"
       DefaultNetstreamDriverCertFile="{folder}/cert.pem"
       DefaultNetstreamDriverKeyFile="{folder}/key.pem")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="anon")
input(type="imtcp" port="{self.port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\\n")
action(type="omfile" file="{self.out}" template="raw")
''')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert RSYSLOGD is not None
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "stderr", "wb"))
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, (self.folder / "stderr").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("rsyslogd did not listen within 15 s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def messages(self) -> list[bytes]:
        if not self.out.exists():
            return []
        return [line for line in self.out.read_bytes().split(b"\n") if line]


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    if not GTLS.exists() and not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        pytest.skip("rsyslog-gnutls is not installed")
    c = Collector(tmp_path / "collector", trustme.CA())
    yield c
    c.stop()


# -- the DICOM audit message schema (PS3.15 A.5.1), as explicit checks ---------------------
EVENT_ACTION = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
DATETIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def check_coded(el: ET.Element) -> tuple[str, str]:
    assert set(el.attrib) <= {"csd-code", "codeSystemName", "displayName", "originalText"}
    for a in ("csd-code", "codeSystemName", "originalText"):
        assert el.attrib.get(a), f"{el.tag} lacks {a}"
    assert not list(el), f"{el.tag} has children"
    return el.attrib["csd-code"], el.attrib["codeSystemName"]


def check_order(parent: ET.Element, allowed: list[tuple[str, str]]) -> None:
    """Children appear in the schema's order with its cardinalities ('1', '?', '*', '+')."""
    tags = [c.tag for c in parent]
    i = 0
    for tag, card in allowed:
        n = 0
        while i < len(tags) and tags[i] == tag:
            i, n = i + 1, n + 1
        assert not (card == "1" and n != 1), f"{parent.tag}: {tag} {n} times, once expected"
        assert not (card == "?" and n > 1), f"{parent.tag}: {tag} {n} times, at most once"
        assert not (card == "+" and n < 1), f"{parent.tag}: {tag} missing"
    assert i == len(tags), f"{parent.tag}: unexpected or misplaced {tags[i:]}"


def check_schema(root: ET.Element) -> None:
    assert root.tag == "AuditMessage" and not root.attrib
    check_order(root, [("EventIdentification", "1"), ("ActiveParticipant", "+"),
                       ("AuditSourceIdentification", "1"),
                       ("ParticipantObjectIdentification", "*")])
    ev = root.find("EventIdentification")
    assert ev is not None
    assert set(ev.attrib) <= {"EventActionCode", "EventDateTime", "EventOutcomeIndicator"}
    assert ev.attrib.get("EventActionCode", "E") in EVENT_ACTION
    assert DATETIME_RE.match(ev.attrib["EventDateTime"])
    assert ev.attrib["EventOutcomeIndicator"] in OUTCOMES
    check_order(ev, [("EventID", "1"), ("EventTypeCode", "*"),
                     ("EventOutcomeDescription", "?")])
    for c in list(ev)[:-1] if ev[-1].tag == "EventOutcomeDescription" else list(ev):
        check_coded(c)
    for ap in root.findall("ActiveParticipant"):
        assert set(ap.attrib) <= {"UserID", "AlternativeUserID", "UserName", "UserIsRequestor",
                                  "NetworkAccessPointID", "NetworkAccessPointTypeCode"}
        assert "UserID" in ap.attrib and ap.attrib["UserIsRequestor"] in {"true", "false"}
        assert ap.attrib.get("NetworkAccessPointTypeCode", "1") in {"1", "2", "3", "4", "5"}
        check_order(ap, [("RoleIDCode", "*"), ("MediaIdentifier", "?")])
        for r in ap.findall("RoleIDCode"):
            check_coded(r)
    asi = root.find("AuditSourceIdentification")
    assert asi is not None and asi.attrib.get("AuditSourceID")
    assert set(asi.attrib) <= {"AuditEnterpriseSiteID", "AuditSourceID"}
    check_order(asi, [("AuditSourceTypeCode", "*")])
    for t in asi:
        assert t.attrib["csd-code"] in set("123456789") or "codeSystemName" in t.attrib
    for po in root.findall("ParticipantObjectIdentification"):
        assert set(po.attrib) <= {"ParticipantObjectID", "ParticipantObjectTypeCode",
                                  "ParticipantObjectTypeCodeRole",
                                  "ParticipantObjectDataLifeCycle",
                                  "ParticipantObjectSensitivity"}
        assert "ParticipantObjectID" in po.attrib
        assert po.attrib.get("ParticipantObjectTypeCode", "1") in {"1", "2", "3", "4"}
        assert 1 <= int(po.attrib.get("ParticipantObjectTypeCodeRole", "1")) <= 26
        check_order(po, [("ParticipantObjectIDTypeCode", "1"), ("ParticipantObjectName", "?"),
                         ("ParticipantObjectQuery", "?"), ("ParticipantObjectDetail", "*"),
                         ("ParticipantObjectDescription", "*")])
        assert not (po.find("ParticipantObjectName") is not None
                    and po.find("ParticipantObjectQuery") is not None)
        check_coded(po[0])
        q = po.find("ParticipantObjectQuery")
        if q is not None:
            base64.b64decode(q.text or "", validate=True)
        for d in po.findall("ParticipantObjectDescription"):
            for sc in d.findall("SOPClass"):
                int(sc.attrib["NumberOfInstances"])


def parse(raw: bytes) -> tuple[dict[str, bytes], ET.Element]:
    m = SYSLOG_RE.match(raw)
    assert m, raw[:200]
    msg = m["msg"].removeprefix(atna.BOM)
    return m.groupdict(), ET.fromstring(msg)


EXPECTED = {  # action -> (EventID, EventActionCode, EventTypeCode or None)
    "node-start": ("110100", "E", "110120"), "node-stop": ("110100", "E", "110121"),
    "import": ("110107", "C", None), "received": ("110104", "C", None),
    "peer-received": ("110104", "C", None), "peer-sent": ("110104", "R", None),
    "exported": ("110104", "R", None), "downloaded": ("110103", "R", None),
    "query": ("110112", "E", None), "deleted": ("110105", "D", None),
    "trust-add": ("110113", "E", "110129"), "connection-refused": ("110113", "E", "110126"),
    "login": ("110114", "E", "110122"),
}


def roles(root: ET.Element) -> dict[str, ET.Element]:
    out = {}
    for ap in root.findall("ActiveParticipant"):
        for r in ap.findall("RoleIDCode"):
            out[r.attrib["csd-code"]] = ap
    return out


async def test_running_node_sends_every_entry_to_a_tls_syslog_collector(
        collector: Collector, new_node, running, tmp_path: Path) -> None:
    node: LocalNode = new_node("n")
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    # The collector is down when the node starts: entries wait in the trail, the forwarder
    # retries with backoff, and nothing of the node waits for it.
    r = await running(node, audit_syslog=f"127.0.0.1:{collector.port}",
                      audit_syslog_ca=str(collector.folder / "ca.pem"), audit_site="TESTSITE")
    trail = r.audit
    assert trail is not None and r.syslog is not None
    t0 = time.monotonic()
    trail.record("received", "dicom:MODALITY@127.0.0.1", instances=2, studies=[STUDY])
    trail.record("query", "dicom:VIEWER@127.0.0.2", keys=["PatientID", "StudyDate"], count=1,
                 level="STUDY")
    trail.record("peer-sent", "peer:" + "A" * 56, peer="A" * 56, instances=5,
                 studies=[STUDY, "1.2.3.4"])
    trail.record("peer-received", "peer:" + "B" * 56, peer="B" * 56, instances=1,
                 studies=[STUDY])
    trail.record("exported", "node", destination="ORTHANC@127.0.0.1:4242", instances=2,
                 studies=[STUDY])
    trail.record("downloaded", "api:read", studies=[STUDY], instances=1)
    trail.record("deleted", "api:admin", studies=[STUDY], instances=2)
    trail.record("trust-add", "api:admin", subject="C" * 56)
    trail.record("connection-refused", "peer:" + "D" * 56, remote="127.0.0.9", outcome="failure",
                 reason="certificate not trusted")
    trail.record("login", "api:unknown", "failure", reason="wrong API key")
    assert time.monotonic() - t0 < 0.5  # queued: the loop is not held up
    await wait_for(lambda: r.syslog.last_error is not None, 10, "a failed connection")
    # An entry from another process beside `run` (the CLI) goes out too.
    proc = subprocess.run(["syncnode", "import", "--data", str(node.data), str(CT)],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    collector.start()
    n_expected = 12  # node-start, the ten above, the import
    await wait_for(lambda: len(collector.messages()) >= n_expected, 30,
                   "the collector to receive every entry",
                   describe=lambda: (len(collector.messages()), r.syslog.status()))
    await r.stop()
    await wait_for(lambda: len(collector.messages()) >= n_expected + 1, 10, "node-stop")
    received = collector.messages()
    entries = list(read_entries(trail.folder))
    assert len(received) == len(entries) == n_expected + 1
    assert r.syslog is None or r.syslog.dropped == 0

    by_action: dict[str, ET.Element] = {}
    for raw, entry in zip(received, entries, strict=True):
        header, root = parse(raw)
        assert header["pri"] == b"85" and header["msgid"] == b"IHE+RFC-3881"
        assert header["app"] == b"syncnode"
        check_schema(root)
        ev = root.find("EventIdentification")
        assert ev is not None and ev.attrib["EventDateTime"] == entry["time"]
        event_id, action_code, type_code = EXPECTED[entry["action"]]
        assert check_coded(ev[0]) == (event_id, "DCM")
        assert ev.attrib["EventActionCode"] == action_code
        types = [t.attrib["csd-code"] for t in ev.findall("EventTypeCode")]
        assert types == ([type_code] if type_code else [])
        assert ev.attrib["EventOutcomeIndicator"] == ("0" if entry["outcome"] == "success"
                                                      else "4")
        asi = root.find("AuditSourceIdentification")
        assert asi is not None and asi.attrib == {"AuditSourceID": node.node_id.compact,
                                                  "AuditEnterpriseSiteID": "TESTSITE"}
        studies = [po.attrib["ParticipantObjectID"]
                   for po in root.findall("ParticipantObjectIdentification")
                   if po[0].attrib["csd-code"] == "110180"]
        assert studies == entry.get("studies", [])
        by_action[entry["action"]] = root
        # no patient data: neither CT_small's patient name nor its id is anywhere
        assert str(ds.PatientName).encode() not in raw and str(ds.PatientID).encode() not in raw

    # Transfers name the source and the destination.
    got = roles(by_action["received"])
    assert got["110153"].attrib["UserID"] == "MODALITY"
    assert got["110153"].attrib["NetworkAccessPointID"] == "127.0.0.1"
    assert got["110152"].attrib["UserID"] == node.node_id.compact
    got = roles(by_action["exported"])
    assert got["110153"].attrib["UserID"] == node.node_id.compact
    assert got["110152"].attrib["UserID"] == "ORTHANC@127.0.0.1:4242"
    got = roles(by_action["peer-sent"])
    assert got["110152"].attrib["UserID"] == "peer:" + "A" * 56
    assert got["110152"].attrib["UserIsRequestor"] == "true"
    got = roles(by_action["import"])
    assert got["110153"].attrib["UserID"].startswith("cli:")
    # The query carries its keys, base64, and no values; the patient object no id.
    q = [po for po in by_action["query"].findall("ParticipantObjectIdentification")
         if po.attrib["ParticipantObjectTypeCodeRole"] == "24"]
    assert len(q) == 1 and q[0][0].attrib["csd-code"] == "110181"
    assert base64.b64decode(q[0].find("ParticipantObjectQuery").text) == b"PatientID\\StudyDate"
    patients = [po for po in by_action["deleted"].findall("ParticipantObjectIdentification")
                if po.attrib.get("ParticipantObjectTypeCodeRole") == "1"]
    assert len(patients) == 1 and patients[0].attrib["ParticipantObjectID"] == ""
    node_obj = by_action["trust-add"].findall("ParticipantObjectIdentification")
    assert [(p.attrib["ParticipantObjectID"], p[0].attrib["csd-code"]) for p in node_obj] \
        == [("C" * 56, "110182")]


def test_forwarder_resumes_after_the_last_entry_sent(collector: Collector,
                                                     tmp_path: Path) -> None:
    """A restarted forwarder sends what was written meanwhile, and nothing twice."""
    folder = tmp_path / "audit"
    trail = AuditLog(folder)
    source = atna.Source("NODE", "host.example")
    ca = collector.folder / "ca.pem"
    collector.start()
    fwd = atna.SyslogForwarder(folder, f"localhost:{collector.port}", source, ca_file=ca,
                               poll=0.1)
    fwd.start()  # first use: starts after what the trail already holds (nothing here)
    trail.write("query", "api:read", keys=["StudyDate"], count=1)
    deadline = time.monotonic() + 15
    while fwd.sent < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    fwd.stop()
    assert fwd.sent == 1
    for i in range(3):  # written while no forwarder runs
        trail.write("downloaded", "api:read", studies=[STUDY], instances=i + 1)
    trail.close()
    fwd = atna.SyslogForwarder(folder, f"localhost:{collector.port}", source, ca_file=ca,
                               poll=0.1)
    fwd.start()
    deadline = time.monotonic() + 15
    while fwd.sent < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    fwd.stop()
    assert fwd.sent == 3
    deadline = time.monotonic() + 10
    while len(collector.messages()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    got = [parse(m)[1].find("EventIdentification")[0].attrib["csd-code"]  # type: ignore[index]
           for m in collector.messages()]
    assert got == ["110112", "110103", "110103", "110103"]


def test_collector_with_an_untrusted_certificate_gets_nothing(collector: Collector,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "audit"
    trail = AuditLog(folder)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    collector.start()
    fwd = atna.SyslogForwarder(folder, f"127.0.0.1:{collector.port}",
                               atna.Source("NODE", "h"), ca_file=other_ca, poll=0.1)
    fwd.start()
    trail.write("query", "api:read", keys=["StudyDate"], count=1)
    trail.close()
    deadline = time.monotonic() + 10
    while fwd.last_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    fwd.stop(drain=0)
    assert fwd.sent == 0 and "CERTIFICATE_VERIFY_FAILED" in (fwd.last_error or "")
    assert collector.messages() == []


def test_message_is_one_octet_counted_rfc5424_frame() -> None:
    entry = {"seq": 1, "time": "2026-12-06T10:00:00.000001Z", "action": "deleted",
             "actor": "cli:root", "outcome": "success", "studies": [STUDY], "instances": 1}
    frame = atna.syslog_frame(atna.audit_message(entry, atna.Source("N", "h")), entry["time"],
                              "h", 42)
    length, _, msg = frame.partition(b" ")
    assert int(length) == len(msg)
    header, root = parse(msg)
    assert header["procid"] == b"42" and header["ts"] == entry["time"].encode()
    check_schema(root)
    assert b"\n" not in msg


async def test_patient_ids_only_when_the_operator_opts_in(collector: Collector, new_node,
                                                          running) -> None:
    """With audit_patient_ids the messages name the patient of each study (looked up in the
    catalog when sent); the trail file still never holds it."""
    node: LocalNode = new_node("n")
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    collector.start()
    await running(node, audit_syslog=f"127.0.0.1:{collector.port}",
                  audit_syslog_ca=str(collector.folder / "ca.pem"), audit_patient_ids=True)
    proc = subprocess.run(["syncnode", "import", "--data", str(node.data), str(CT)],
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    await wait_for(lambda: len(collector.messages()) >= 2, 30, "node-start and import")
    _, root = parse(collector.messages()[1])
    check_schema(root)
    patients = [po.attrib["ParticipantObjectID"]
                for po in root.findall("ParticipantObjectIdentification")
                if po.attrib.get("ParticipantObjectTypeCodeRole") == "1"]
    assert patients == [str(ds.PatientID)]
    assert str(ds.PatientID) not in (node.data / "audit" / "audit.log").read_text()
