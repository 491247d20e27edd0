"""The DICOM bridge's audit entries, with real DICOM clients on loopback: one ``received``
entry per association (DCMTK ``storescu``), one ``query`` entry per C-FIND naming the keys
but never their values, one ``connection-refused`` entry per refused calling AE, and one
``exported`` entry per association to the local PACS (DCMTK ``storescp``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit
from test_dicom_export import StoreSCP, from_peer, status_of, wait_until
from test_dicom_scp import _find

from syncnode.audit import AuditLog, read_entries, verify
from syncnode.dicom.exporter import Exporter
from syncnode.dicom.scp import DicomServer
from syncnode.local import LocalNode

STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
pytestmark = pytest.mark.skipif(not Path("/usr/bin/storescu").exists()
                                and not Path("/usr/local/bin/storescu").exists(),
                                reason="DCMTK not installed")


@pytest.fixture
def trail(node: LocalNode) -> Iterator[AuditLog]:
    t = AuditLog.for_node(node.data)
    yield t
    t.close()


def entries(trail: AuditLog, action: str | None = None) -> list[dict]:
    assert trail.flush()
    return list(read_entries(trail.folder, action=action))


def wait_entries(trail: AuditLog, n: int, action: str) -> list[dict]:
    deadline = time.monotonic() + 20
    while True:
        got = entries(trail, action)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_store_query_and_refusal_each_one_entry(node: LocalNode, trail: AuditLog,
                                                tmp_path: Path) -> None:
    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                         allowed_aes=["STORESCU", "TESTSCU"], audit=trail)
    port = server.start()
    try:
        study = kit.make_study(tmp_path / "s", 4, seed="audit", patient_id="PAT-SECRET-77",
                               study_date="20230304")
        # four instances in one association: one entry
        kit.run_tool([kit.dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNCNODE",
                      "127.0.0.1", str(port), *map(str, study.files)])
        got = wait_entries(trail, 1, "received")
        assert len(got) == 1
        e = got[0]
        assert e["actor"] == "dicom:STORESCU@127.0.0.1" and e["outcome"] == "success"
        assert (e["instances"], e["unchanged"], e["failed"]) == (4, 0, 0)
        assert e["studies"] == [study.study_uid]
        # the same again, in two associations: two entries, nothing new
        for f in study.files[:2]:
            kit.run_tool([kit.dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNCNODE",
                          "127.0.0.1", str(port), str(f)])
        got = wait_entries(trail, 3, "received")
        assert [(x["instances"], x["unchanged"]) for x in got] == [(4, 0), (0, 1), (0, 1)]

        # one C-FIND, one entry: the matching key's name, not its value
        res = _find(port, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "PAT-SECRET*",
                                       "StudyInstanceUID": "", "PatientName": ""})
        assert [r[0] for r in res] == [0xFF00, 0x0000]
        q = wait_entries(trail, 1, "query")
        assert len(q) == 1
        assert q[0]["actor"] == "dicom:TESTSCU@127.0.0.1"
        assert (q[0]["keys"], q[0]["count"], q[0]["level"]) == (["PatientID"], 1, "STUDY")
        assert q[0]["sop_class"] == STUDY_ROOT
        # a refused query is recorded as a failure, without the message (it may quote values)
        _find(port, STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "PAT-SECRET-77"})
        q = wait_entries(trail, 2, "query")
        assert q[1]["outcome"] == "failure" and q[1]["reason"] == "refused with status 0xC000"

        # a calling AE that is not allowed: one refusal entry
        assert kit.echo("127.0.0.1", port, calling="INTRUDER") is None
        refused = wait_entries(trail, 1, "connection-refused")
        assert [(r["actor"], r["outcome"]) for r in refused] == \
            [("dicom:INTRUDER@127.0.0.1", "failure")]
        assert kit.echo("127.0.0.1", port, calling="TESTSCU") == 0  # an echo: no entry
    finally:
        server.stop()
    everything = entries(trail)
    assert [x["action"] for x in everything].count("received") == 3
    assert len(everything) == 3 + 2 + 1
    raw = (trail.folder / "audit.log").read_text()
    assert "PAT-SECRET" not in raw
    assert verify(trail.folder).ok


def test_export_is_one_entry_per_association(tmp_path: Path) -> None:
    a, b = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    trail = AuditLog.for_node(b.data)
    pacs = StoreSCP(tmp_path / "pacs", kit.free_port())
    try:
        study = kit.make_study(tmp_path / "peer", 6, seed="exp-audit")
        from_peer(a, b, study.files)
        pacs.start()
        ex = Exporter(b, [f"PACS@127.0.0.1:{pacs.port}"], ae_title="SYNCNODE",
                      poll_interval=0.05, backoff_base=0.05, backoff_cap=0.4, audit=trail)
        ex.start()
        try:
            wait_until(lambda: status_of(b, pacs).get("done") == 6, 60, "6 exported")
        finally:
            ex.stop()
        got = entries(trail, "exported")
        assert got and sum(e["instances"] for e in got) == 6
        for e in got:
            assert e["actor"] == "node" and e["destination"] == f"PACS@127.0.0.1:{pacs.port}"
            assert e["studies"] == [study.study_uid] and e["failed"] == 0
        # all six were queued before the exporter started: one batch, one association
        assert len(got) == 1
    finally:
        pacs.stop()
        trail.close()
        a.close()
        b.close()


def test_refused_dicom_tls_handshakes_are_recorded(node: LocalNode, trail: AuditLog,
                                                   tmp_path: Path) -> None:
    """A client whose certificate the SCP does not accept (DICOM TLS) is one
    connection-refused entry, with its address."""
    import trustme

    from syncnode.dicom.transport import Perimeter, dicom_tls_context

    trusted, stranger = trustme.CA(), trustme.CA()
    trusted.cert_pem.write_to_path(str(tmp_path / "trusted-ca.pem"))
    cert = stranger.issue_cert("stranger.example")
    cert.private_key_pem.write_to_path(str(tmp_path / "s.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "s.crt"))
    ctx = dicom_tls_context(node.identity.cert_path, node.identity.key_path,
                            tmp_path / "trusted-ca.pem")
    server = DicomServer(node, ae_title="SYNCNODE", host="127.0.0.1", port=0,
                         ssl_context=ctx, perimeter=Perimeter(artim_timeout=5.0), audit=trail)
    port = server.start()
    try:
        proc = kit.run_tool([kit.dcmtk("echoscu"), "-aec", "SYNCNODE", "-to", "5", "-ta", "5",
                             "+tls", str(tmp_path / "s.key"), str(tmp_path / "s.crt"),
                             "+cf", str(node.identity.cert_path), "127.0.0.1", str(port)],
                            timeout=30, check=False)
        assert proc.returncode != 0
        got = wait_entries(trail, 1, "connection-refused")
    finally:
        server.stop()
    assert len(got) == 1
    assert got[0]["actor"] == "dicom:?@127.0.0.1" and got[0]["remote"] == "127.0.0.1"
    assert got[0]["reason"].startswith("DICOM TLS handshake")
