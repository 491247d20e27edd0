"""The exporter against a real DICOM peer (DCMTK ``storescp`` as the local PACS).

Instances "from a peer" are made the way sync makes them: put events created on another
node, applied to this node's catalog with their blobs. Instances imported on this node
itself must never be exported.
"""

from __future__ import annotations

import io
import logging
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from syncsupport import alter_in_place, count_verified_reads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

from syncnode.dicom.exporter import Exporter, backoff, dataset_offset, outbox_status
from syncnode.importer import import_paths
from syncnode.local import LocalNode

pytestmark = pytest.mark.skipif(not Path("/usr/bin/storescp").exists() and
                                not Path("/usr/local/bin/storescp").exists(),
                                reason="DCMTK storescp not installed")


class StoreSCP:
    """DCMTK storescp writing every received instance to its own (unique) file."""

    def __init__(self, out: Path, port: int, extra: list[str] | None = None) -> None:
        self.out, self.port, self.extra = out, port, extra or []
        out.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [kit.dcmtk("storescp"), "-aet", "PACS", "-od", str(self.out), "+uf",
             *self.extra, str(self.port)],
            env=kit.tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kit.wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def received(self) -> list[str]:
        """SOP Instance UIDs of every file received (duplicates kept)."""
        return [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in sorted(self.out.iterdir()) if f.is_file()]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs", kit.free_port())
    yield scp
    scp.stop()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[LocalNode, LocalNode]]:
    a, b = LocalNode.init(tmp_path / "a"), LocalNode.init(tmp_path / "b")
    yield a, b
    a.close()
    b.close()


def from_peer(src: LocalNode, dst: LocalNode, files: list[Path]) -> list[str]:
    """Import files on ``src`` and copy the resulting events and blobs to ``dst``."""
    before = set(src.catalog.all_event_ids())
    import_paths(src, files)
    new = [e for e in src.catalog.all_event_ids() if e not in before]
    events = src.catalog.get_events(new)
    for eid, _body in events:
        inst = src.catalog.put_event(eid)
        assert inst is not None
        dst.store.put_file(src.store.path(inst.blob))
    # the origin's certificate travels with its events, as in the peer protocol
    dst.catalog.offer_certificates(src.catalog.certificates_for(new))
    result = dst.catalog.apply(events, blob_present=dst.store.has)
    assert not result.rejected
    return new


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def exporter(node: LocalNode, pacs: StoreSCP) -> Exporter:
    ex = Exporter(node, [f"PACS@127.0.0.1:{pacs.port}"], ae_title="SYNCNODE",
                  poll_interval=0.05, backoff_base=0.05, backoff_cap=0.4)
    ex.start()
    return ex


def status_of(node: LocalNode, pacs: StoreSCP) -> dict:
    return outbox_status(node.data / "catalog.db").get(f"PACS@127.0.0.1:{pacs.port}", {})


def export_until(node: LocalNode, pacs: StoreSCP, done: int, timeout: float) -> None:
    """Run an exporter until ``done`` items of its outbox are delivered, then stop it."""
    ex = exporter(node, pacs)
    try:
        wait_until(lambda: status_of(node, pacs).get("done") == done, timeout,
                   f"{done} exported")
    finally:
        ex.stop()


def test_exports_peer_instances_only(nodes: tuple[LocalNode, LocalNode], pacs: StoreSCP,
                                     tmp_path: Path) -> None:
    a, b = nodes
    peer_study = kit.make_study(tmp_path / "peer", 12, seed="peer", series=2)
    local_study = kit.make_study(tmp_path / "local", 5, seed="local")
    from_peer(a, b, peer_study.files)
    import_paths(b, local_study.files)  # came from B's own PACS: never sent back
    pacs.start()
    export_until(b, pacs, 12, 60)
    assert sorted(pacs.received()) == sorted(peer_study.sop_uids)
    st = status_of(b, pacs)
    assert (st["pending"], st["failed"], st["done"]) == (0, 0, 12)
    # what arrived is what was stored (pixel data compared: storescp rewrites the file)
    for f in sorted(pacs.out.iterdir()):
        got = dcmread(f)
        src = dcmread(peer_study.files[peer_study.sop_uids.index(str(got.SOPInstanceUID))])
        assert got.PixelData == src.PixelData
    # a rejection note from B's own PACS side rejects two of them: the PACS is sent that
    # same note (the deletes' cause), not one made by the node
    from test_rejection import rejection_note

    inst = b.catalog.instance(peer_study.sop_uids[0])
    assert inst is not None
    rejected = sorted(peer_study.sop_uids)[:2]
    note = tmp_path / "note.dcm"
    note_uid = rejection_note(note, peer_study, rejected, "113037",
                              inst.series_instance_uid, inst.sop_class_uid)
    assert import_paths(b, [note]).imported == 1
    assert all(b.catalog.instance(u) is None for u in rejected)
    export_until(b, pacs, 13, 60)
    assert sorted(pacs.received()) == sorted([*peer_study.sop_uids, note_uid])
    assert status_of(b, pacs)["rejection_notes"] == {
        "pending": 0, "done": 0, "failed": 0, "skipped": 0, "committed": 0}


def test_pacs_down_then_up_drains_without_duplicates(nodes: tuple[LocalNode, LocalNode],
                                                     pacs: StoreSCP, tmp_path: Path) -> None:
    a, b = nodes
    first = kit.make_study(tmp_path / "s1", 8, seed="first")
    from_peer(a, b, first.files)
    ex = exporter(b, pacs)  # the PACS is not running yet
    try:
        wait_until(lambda: "no association" in status_of(b, pacs).get("last_error", ""),
                   20, "a connection failure to be recorded")
        assert status_of(b, pacs)["pending"] == 8
        pacs.start()
        wait_until(lambda: status_of(b, pacs).get("done") == 8, 60, "8 exported")
        pacs.stop()
        second = kit.make_study(tmp_path / "s2", 6, seed="second")
        from_peer(a, b, second.files)
        time.sleep(0.5)
        assert status_of(b, pacs)["pending"] == 6
    finally:
        ex.stop()
    # restart of the node: a new exporter picks up the persisted outbox
    pacs.start()
    export_until(b, pacs, 14, 60)
    got = pacs.received()
    assert len(got) == 14 and set(got) == set(first.sop_uids) | set(second.sop_uids)


def test_deleted_instance_is_skipped(nodes: tuple[LocalNode, LocalNode], pacs: StoreSCP,
                                     tmp_path: Path) -> None:
    a, b = nodes
    study = kit.make_study(tmp_path / "s", 4, seed="del")
    from_peer(a, b, study.files)
    b.delete_instances([study.sop_uids[0]])
    pacs.start()
    ex = exporter(b, pacs)
    try:
        wait_until(lambda: status_of(b, pacs).get("done") == 3, 60, "3 exported")
        wait_until(lambda: status_of(b, pacs).get("skipped") == 1, 10, "1 skipped")
    finally:
        ex.stop()
    assert sorted(pacs.received()) == sorted(study.sop_uids[1:])


def test_refused_transfer_syntax_fails_with_reason(nodes: tuple[LocalNode, LocalNode],
                                                   tmp_path: Path) -> None:
    a, b = nodes
    import pydicom.data

    jpeg = Path(pydicom.data.__file__).parent / "test_files" / "JPEG2000.dcm"
    from_peer(a, b, [jpeg])
    pacs = StoreSCP(tmp_path / "pacs", kit.free_port(), extra=["+xi"])  # implicit LE only
    pacs.start()
    ex = exporter(b, pacs)
    try:
        wait_until(lambda: status_of(b, pacs).get("failed") == 1, 30, "the item to fail")
    finally:
        ex.stop()
        pacs.stop()
    st = status_of(b, pacs)
    assert "transcoding" in st["failed_items"][0]["reason"]
    assert pacs.received() == []


def test_backoff_is_capped_with_jitter() -> None:
    rng = random.Random(1)
    for n in range(1, 20):
        d = backoff(n, 1.0, 60.0, rng)
        full = min(60.0, 2 ** (n - 1))
        assert full / 2 <= d <= full


def test_dataset_offset(tmp_path: Path) -> None:
    study = kit.make_study(tmp_path / "s", 1, seed="off")
    data = study.files[0].read_bytes()
    assert data[dataset_offset(data[:4096]):] == kit.dataset_bytes(data)


def test_deflated_instance_sent_inflated_when_deflate_is_refused(
        nodes: tuple[LocalNode, LocalNode], pacs: StoreSCP) -> None:
    """Inflating needs no decoding: a deflated data set inflated is its explicit VR little
    endian encoding, so that fallback is allowed (and only that one)."""
    import pydicom.data

    a, b = nodes
    dfl = Path(pydicom.data.__file__).parent / "test_files" / "image_dfl.dcm"
    from_peer(a, b, [dfl])
    pacs.start()  # storescp accepts the uncompressed syntaxes only
    export_until(b, pacs, 1, 30)
    got = dcmread(next(pacs.out.iterdir()))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert got.PixelData == dcmread(dfl).PixelData


@pytest.mark.parametrize("peer_max", [16384, 4096, 0])
def test_store_framing_matches_pynetdicom(peer_max: int) -> None:
    """The exporter frames C-STORE-RQ P-DATA PDUs itself: the bytes must be pynetdicom's."""
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    from syncnode.dicom.exporter import _fragments, _pdv_pdu, store_command

    ct, sop, data = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", os.urandom(40_001)
    req = C_STORE()
    req.MessageID, req.Priority = 5, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = ct, sop
    req.DataSet = io.BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    theirs = []
    for prim in msg.encode_msg(1, peer_max):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        theirs.append(pdu.encode())
    size = peer_max - 6 if peer_max else len(data)
    frags = list(_fragments(io.BytesIO(data), size))
    mine = [_pdv_pdu(1, 0x03, store_command(ct, sop, 5))] + [
        _pdv_pdu(1, 0x02 if i == len(frags) - 1 else 0x00, f) for i, f in enumerate(frags)]
    assert mine == theirs


def test_known_good_blobs_sent_unhashed_a_damaged_one_never(
        nodes: tuple[LocalNode, LocalNode], pacs: StoreSCP, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs hashed as they were stored go out without a verified read; one rewritten in
    place with its mtime set back is read verified, found damaged: failed with the reason,
    never sent."""
    a, b = nodes
    study = kit.make_study(tmp_path / "s", 3, seed="known")
    from_peer(a, b, study.files)
    bad = b.catalog.instance(study.sop_uids[0])
    assert bad is not None
    alter_in_place(b.store.path(bad.blob))  # one pixel byte flipped, mtime set back
    verified = count_verified_reads(monkeypatch)
    pacs.start()
    ex = exporter(b, pacs)
    try:
        wait_until(lambda: status_of(b, pacs).get("done") == 2, 60, "2 exported")
        wait_until(lambda: status_of(b, pacs).get("failed") == 1, 10, "1 failed")
    finally:
        ex.stop()
    assert "damaged" in status_of(b, pacs)["failed_items"][0]["reason"]
    assert sorted(pacs.received()) == sorted(study.sop_uids[1:])
    assert set(verified) == {bad.blob}  # (each attempt at it verifies it again)


def test_large_instance_streamed_from_the_blob(nodes: tuple[LocalNode, LocalNode],
                                               pacs: StoreSCP, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from syncnode.dicom import exporter as exp

    monkeypatch.setattr(exp, "IN_MEMORY_LIMIT", 1000)  # every blob takes the file path
    a, b = nodes
    study = kit.make_study(tmp_path / "s", 3, seed="big", rows=512, cols=512)
    from_peer(a, b, study.files)
    pacs.start()
    export_until(b, pacs, 3, 60)
    for f in sorted(pacs.out.iterdir()):
        got = dcmread(f)
        src = dcmread(study.files[study.sop_uids.index(str(got.SOPInstanceUID))])
        assert got.PixelData == src.PixelData


def relay(src: LocalNode, dst: LocalNode, since: set[str]) -> None:
    """The events ``src`` made after ``since``, with the blobs of its puts, admitted by
    ``dst`` as a sync pull admits them (:meth:`LocalNode.apply`)."""
    new = [e for e in src.catalog.all_event_ids() if e not in since]
    for eid in new:
        inst = src.catalog.put_event(eid)
        if inst is not None and src.store.has(inst.blob):
            dst.store.put_file(src.store.path(inst.blob))
    dst.catalog.offer_certificates(src.catalog.certificates_for(new))
    assert not dst.apply(src.catalog.get_events(new)).rejected


def test_peer_deletes_become_rejection_notes(nodes: tuple[LocalNode, LocalNode],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Tombstones from a peer for instances sent to a destination queue rejection notes:
    one study's deletes split into notes of at most NOTE_REFERENCES references (here 2),
    the destination's default reason, held ``peer_hold`` seconds, each note's UID derived
    from its deletes (the same note whenever it is made). Deletes the peer made because of
    a rejection note queue a note that is not sent: the peer's note itself is exported. A
    Key Object Selection too large for a note is not read."""
    from test_rejection import rejection_note

    from syncnode import rejection
    from syncnode.catalog import outbox as outbox_model
    from syncnode.rejection import make_note, note_uid

    a, b = nodes
    monkeypatch.setattr(outbox_model, "NOTE_REFERENCES", 2)
    study = kit.make_study(tmp_path / "s", 4, seed="reject-export")
    from_peer(a, b, study.files)
    dest, me = "PACS@127.0.0.1:104", b.node_id.compact
    box = b.catalog.outbox
    box.register(dest)
    assert box.enqueue_new(dest, me, 100) == (4, 4)
    box.record_outcomes([("finish", ("done", "", time.time(), it.id))
                         for it in box.due(dest, 10)])  # (as if sent)
    sops = sorted(i.sop_instance_uid for i in a.catalog.instances(study=study.study_uid))
    before = set(a.catalog.all_event_ids())
    a.delete_instances(sops[:3])  # at the peer, no reason given
    relay(a, b, before)
    assert b.catalog.instance(sops[0]) is None
    start = time.time()
    assert box.enqueue_new(dest, me, 100, "113039", peer_hold=30.0) == (3, 2)
    assert box.due(dest, 10) == []  # held for the peer's own note, if any
    db = sqlite3.connect(b.data / "catalog.db")
    items = db.execute("SELECT id, event_id, sop_instance_uid, next_attempt FROM outbox "
                       "WHERE kind='reject' ORDER BY id").fetchall()
    db.close()
    assert len(items) == 2 and all(due >= start + 30 for *_, due in items)
    told: list[str] = []
    for item_id, key, uid, _ in items:
        what = box.note_contents(item_id, me)
        assert what.code == "113039" and what.subject is not None
        assert what.subject.study_instance_uid == study.study_uid
        assert what.subject.patient_id == "PAT-1"
        assert uid == note_uid(bytes(key))
        note = make_note(what.key, what.code, what.subject, what.rejected, what.made)
        assert note == make_note(what.key, what.code, what.subject, what.rejected, what.made)
        assert dcmread(io.BytesIO(note)).SOPInstanceUID == uid
        told += [r.sop_instance_uid for r in what.rejected]
    assert sorted(told) == sops[:3]
    # the peer rejects the last one with a rejection note: the note travels and is
    # exported; the note queued for the tombstone has nothing left to say
    inst = a.catalog.instance(sops[3])
    assert inst is not None
    path = tmp_path / "note.dcm"
    rejection_note(path, study, [sops[3]], "113001", inst.series_instance_uid,
                   inst.sop_class_uid)
    before = set(a.catalog.all_event_ids())
    assert import_paths(a, [path]).imported == 1
    relay(a, b, before)
    assert b.catalog.rejections.code(sops[3]) == "113001"
    assert box.enqueue_new(dest, me, 100, "113039") == (2, 2)  # the note (a put), a reject
    (item_id,) = [it.id for it in box.due(dest, 10) if it.kind == "reject"]
    what = box.note_contents(item_id, me)
    assert what.subject is None and what.dropped_exported == 1 and what.code == "113001"
    # a stored delete the current rules cannot read (kept from an older release) is
    # passed over with a warning: it never blocks the export
    db = sqlite3.connect(b.data / "catalog.db")
    with db:
        db.execute("INSERT INTO events (id, kind, hlc, origin, body) VALUES "
                   "(x'00', 'delete', 1, 'OLD', x'7b7d')")
    db.close()
    with caplog.at_level(logging.WARNING, logger="syncnode.catalog.outbox"):
        assert box.enqueue_new(dest, me, 100) == (1, 0)
    assert any("not read for a rejection note" in r.getMessage() for r in caplog.records)
    # a Key Object Selection over the size a note may have is not read (bounded cost)
    monkeypatch.setattr(rejection, "MAX_NOTE_BYTES", 100)
    c = LocalNode.init(tmp_path / "c")
    try:
        with caplog.at_level(logging.WARNING, logger="syncnode.local"):
            relay(a, c, before)  # (the note and its tombstone)
        assert c.catalog.rejections.code(sops[3]) is None
        assert any("more than a note may have" in r.getMessage() for r in caplog.records)
    finally:
        c.close()
