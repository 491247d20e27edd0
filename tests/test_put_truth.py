"""Puts match their bytes: a trusted peer cannot file a blob under another instance.

The "hostile" peer here is a real node with its own trusted key, serving the real peer
protocol over mutual TLS; its catalog simply holds events no honest node would make:

- a put naming SOP ``2.25.1111``, Patient ``OTHER-PATIENT``, modality MR, whose blob is
  the CT file of an honest instance it also serves;
- a put whose blob is 4 bytes that are not DICOM.

The receiver inspects each pulled blob as ``import`` inspects a file and refuses both
puts: nothing of them is live, C-FIND and ``ls`` do not show them, the honest instance
arrives, and the peer's state says ``error`` with the refusal and an error count, retried
with backoff rather than in a tight loop. Peer-supplied study dates and transfer syntax
UIDs that are not a date / a UID are refused when events are decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from syncsupport import (
    cli_json,
    import_files,
    make_dicom,
    peer_state,
    pin,
    pull_from,
    resident_bytes,
    skip_without_page_cache,
    uid,
    url_of,
    wait_for,
)

from syncnode import events as ev
from syncnode import protocol
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.tls.contexts import client_ssl_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

CT = "1.2.840.10008.5.1.4.1.1.2"
StartNode = Callable[..., Awaitable[RunningNode]]


def forged_put(node: LocalNode, blob_bytes: bytes, **claims: str) -> str:
    """Store ``blob_bytes`` on ``node`` and give its catalog a put (made by ``node``) that
    claims ``claims``; the catalog itself does not look at bytes. Returns the event id."""
    info = node.store.put_bytes(blob_bytes)
    fields = {"sop_class_uid": CT, "sop_instance_uid": uid(50, 1),
              "series_instance_uid": uid(50, 0, 1), "study_instance_uid": uid(50, 0),
              "patient_id": "", "modality": "", "study_date": "",
              "transfer_syntax_uid": "1.2.840.10008.1.2.1", **claims}
    body = ev.encode(node.signer.sign(ev.PutEvent(  # signed with the peer's real key
        origin=node.node_id.compact, hlc=ev.hlc_tick(0), blob=info.hash, size=info.size,
        chunks=info.chunks_root, **fields)))
    eid = ev.event_id(body)
    assert node.catalog.apply([(eid, body)], blob_present=node.store.has,
                              local=True).inserted == [eid]
    return eid



def find_patient(port: int, patient_id: str) -> list[str]:
    """SOP Instance UIDs a DCMTK findscu at IMAGE level gets for a Patient ID."""
    return kit.findscu_sops(port, "PatientID", patient_id)


@pytest.mark.timeout(120)
async def test_puts_that_contradict_their_bytes_are_refused(
        new_node: Callable[[str], LocalNode], running: StartNode, tmp_path: Path) -> None:
    a, f = new_node("a"), new_node("hostile")
    honest_sop = uid(50, 0, 1, 1)
    ct = make_dicom(tmp_path / "ct.dcm", sop=honest_sop, study=uid(50, 0),
                    series=uid(50, 0, 1), patient_id="SYNTH-CT")
    import_files(f, ct)
    [honest] = f.catalog.instances()
    mismatched = forged_put(f, ct.read_bytes(), sop_instance_uid="2.25.1111",
                            patient_id="OTHER-PATIENT", modality="MR")
    not_dicom = forged_put(f, b"abcd", sop_instance_uid="2.25.2222",
                           patient_id="OTHER-PATIENT", modality="MR")
    assert f.catalog.event_count() == 3

    ra, rf = await running(a), await running(f)
    pull_from(a, ra, f, url_of(rf))
    await wait_for(lambda: a.catalog.instance(honest_sop) is not None, 30,
                   "the honest instance to arrive")
    await wait_for(lambda: peer_state(a, f).get("integrity_errors", 0) >= 2, 30,
                   "the refusals to be counted")
    st = peer_state(a, f)
    assert st["state"] == "error" and not st["in_sync"], st
    assert "PutMismatch" in st["last_error"], st["last_error"]
    assert "OTHER-PATIENT" not in st["last_error"]  # no patient data in what is shown

    # nothing of the forged puts is in the catalog, live, or visible
    for eid in (mismatched, not_dicom):
        assert not a.catalog.has_event(eid)
    assert [i.sop_instance_uid for i in a.catalog.instances()] == [honest_sop]
    assert a.catalog.instance(honest_sop).blob == honest.blob  # type: ignore[union-attr]
    assert a.catalog.instances(patient_id="OTHER-PATIENT") == []
    listed = await asyncio.to_thread(cli_json, "ls", data=a.data)
    assert "2.25.1111" not in str(listed) and "2.25.2222" not in str(listed)
    assert honest_sop in str(listed)
    port = ra.ports["dicom"]
    assert await asyncio.to_thread(find_patient, port, "OTHER-PATIENT") == []
    assert await asyncio.to_thread(find_patient, port, "SYNTH-CT") == [honest_sop]

    # status shows it, and the peer is backed off, not retried in a tight loop
    status = await asyncio.to_thread(cli_json, "status", data=a.data)
    [row] = [p for p in status["peers"] if p["node_id"] == str(f.node_id)]
    assert row["state"] == "error" and row["integrity_errors"] >= 2
    assert "PutMismatch" in row["last_error"]
    before = peer_state(a, f)["integrity_errors"]
    await asyncio.sleep(4)
    after = peer_state(a, f)
    # a round refuses 2 puts; unbacked retries at the 0.5 s interval or faster would make
    # 16+ in 4 s: backoff (0.5-1 s, 1-2 s, 2-4 s, ...) allows a few rounds at most
    assert after["integrity_errors"] - before <= 8, (before, after)
    assert after["next_attempt"] > time.time() - 1
    assert a.catalog.has_event(mismatched) is False


@pytest.mark.timeout(60)
async def test_pushed_puts_that_contradict_their_bytes_are_refused_and_their_blobs_untouched(
        new_node: Callable[[str], LocalNode], running: StartNode, tmp_path: Path) -> None:
    """``POST /push/events`` from a trusted but hostile peer: an honest put and one that
    claims another patient's instance for bytes A holds. The honest one is applied, indexed
    for C-FIND and its blob let out of A's page cache; the forged one is rejected before it
    is inserted, so nothing indexes it and its blob (a local copy) stays as it was, cached."""
    skip_without_page_cache(tmp_path)
    a, f = new_node("a"), new_node("hostile")
    honest_sop = uid(51, 0, 1, 1)
    honest = make_dicom(tmp_path / "honest.dcm", sop=honest_sop, study=uid(51, 0),
                        series=uid(51, 0, 1), pixel_bytes=120_000, seed=1)
    other = make_dicom(tmp_path / "other.dcm", sop=uid(51, 0, 1, 2), study=uid(51, 0),
                       series=uid(51, 0, 1), pixel_bytes=120_000, seed=2)
    import_files(f, honest)
    [put] = f.catalog.instances()
    forged = forged_put(f, other.read_bytes(), sop_instance_uid="2.25.3333",
                        patient_id="OTHER-PATIENT", modality="MR")
    # A holds both blobs already (as after the pushed pack), written locally: cached
    held = [a.store.put_bytes(p.read_bytes()).hash for p in (honest, other)]
    assert held[0] == put.blob
    pin(a, f)
    pin(f, a)
    ra = await running(a)
    ctx = client_ssl_context(f.identity, f.trust, expected=a.node_id)
    pairs = f.catalog.get_events([put.event_id, forged])
    body = protocol.events_response(pairs, f.catalog.certificates_for([put.event_id, forged]))
    url = f"{url_of(ra)}{protocol.PREFIX}/push/events"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session, \
            session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["applied"] == [put.event_id]
    assert forged in answer["rejected"] and "OTHER-PATIENT" not in str(answer)
    await wait_for(lambda: resident_bytes(a.store.path(put.blob)) == 0, 10,
                   "the honest blob out of A's cache")
    with contextlib.closing(sqlite3.connect(a.catalog.path)) as db:
        rows = dict(db.execute("SELECT blob, readable FROM find_attrs").fetchall())
    assert rows.get(put.blob) == 1 and held[1] not in rows
    assert resident_bytes(a.store.path(held[1])) >= other.stat().st_size
    assert not a.catalog.has_event(forged)
    assert [i.sop_instance_uid for i in a.catalog.instances()] == [honest_sop]


@pytest.mark.parametrize(("field", "value"), [
    ("study_date", "<i>2024</i>"), ("study_date", "20241399"), ("study_date", "2024-01-01"),
    ("transfer_syntax_uid", "../../x'\""), ("transfer_syntax_uid", "1.2.840.10008.1.2.1 "),
])
def test_peer_supplied_date_and_transfer_syntax_are_validated(field: str, value: str) -> None:
    fields = {"sop_class_uid": CT, "sop_instance_uid": "2.25.1",
              "series_instance_uid": "2.25.2", "study_instance_uid": "2.25.3", field: value}
    body = ev.encode(ev.PutEvent(origin="PEER", hlc=1, blob="0" * 64, size=1,
                                 chunks="0" * 64, **fields))
    with pytest.raises(ev.InvalidEvent, match=field):
        ev.decode(body)


def test_valid_date_and_transfer_syntax_pass() -> None:
    body = ev.encode(ev.PutEvent(origin="PEER", hlc=1, blob="0" * 64, size=1, chunks="0" * 64,
                                 sop_class_uid=CT, sop_instance_uid="2.25.1",
                                 series_instance_uid="2.25.2", study_instance_uid="2.25.3",
                                 study_date="20240229", transfer_syntax_uid="1.2.840.10008.1.2"))
    event = ev.decode(body)
    assert isinstance(event, ev.PutEvent) and event.study_date == "20240229"
