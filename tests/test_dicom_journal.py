"""The SCP's ingest journal: recovery after a crash, dedup, and the invariant that the
catalog never points at a missing or damaged blob."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit
from originkit import FakeOrigin

from syncnode.dicom.ingest import SpoolWriter
from syncnode.dicom.journal import JOURNAL_FILE, IngestJournal
from syncnode.dicomfile import inspect_file
from syncnode.local import CATALOG_FILE, LocalNode


@pytest.fixture
def node(tmp_path: Path) -> LocalNode:
    return LocalNode.init(tmp_path / "n")


def spool(node: LocalNode, path: Path) -> tuple:
    w = SpoolWriter(node.store)
    w.write(path.read_bytes())
    w.flush()
    info = inspect_file(w.tmp_path)
    return info, node.store.install_staged([w.stage()])[0]


def open_journal(node: LocalNode) -> IngestJournal:
    return IngestJournal(node.data, node.data / CATALOG_FILE, node.node_id.compact, node.store,
                         signer=node.signer)


def test_record_apply_and_dedup(node: LocalNode, tmp_path: Path) -> None:
    study = kit.make_study(tmp_path / "s", 3, seed="j1")
    j = open_journal(node)
    try:
        items = [spool(node, f) for f in study.files]
        results = j.record(items)
        assert [new for _e, new, _b in results] == [True, True, True]
        j.durable([(e, b) for e, _n, b in results if b])
        # the same bytes again, before and after they reach the catalog: no new event
        assert [new for _e, new, _b in j.record(items[:1])] == [False]
        assert j.wait_applied()
        assert [new for _e, new, _b in j.record(items[:1])] == [False]
        assert (node.data / JOURNAL_FILE).stat().st_size == 0  # emptied once applied
    finally:
        j.close()
    assert sorted(i.sop_instance_uid for i in node.catalog.instances()) == \
        sorted(study.sop_uids)
    assert node.verify().ok


def test_recovery_replays_acknowledged_and_skips_the_rest(node: LocalNode,
                                                          tmp_path: Path) -> None:
    study = kit.make_study(tmp_path / "s", 4, seed="j2")
    j = open_journal(node)
    items = [spool(node, f) for f in study.files]
    results = j.record(items)
    # "crash": the events were journaled and flushed but never reached the catalog
    j.catalog.close()
    os.close(j._fd)
    # one blob did not survive the crash (its record was never acknowledged), and the
    # journal ends with a torn record
    lost = items[1][1].hash
    os.chmod(node.store.path(lost), 0o644)
    node.store.path(lost).unlink()
    with open(node.data / JOURNAL_FILE, "ab") as f:
        f.write(struct.pack("<4sII", b"SNJ1", 500, 0) + b"partial")
    j2 = open_journal(node)
    try:
        assert j2.recovered == 3
    finally:
        j2.close()
    live = {i.sop_instance_uid for i in node.catalog.instances()}
    assert live == {study.sop_uids[0], study.sop_uids[2], study.sop_uids[3]}
    assert (node.data / JOURNAL_FILE).stat().st_size == 0
    assert node.catalog.counts()["events"] == 3
    assert all(node.catalog.has_event(e) for e, _n, _b in (results[0], results[2], results[3]))


def test_recovery_skips_damaged_blob(node: LocalNode, tmp_path: Path) -> None:
    study = kit.make_study(tmp_path / "s", 2, seed="j3")
    j = open_journal(node)
    items = [spool(node, f) for f in study.files]
    j.record(items)
    j.catalog.close()
    os.close(j._fd)
    bad = node.store.path(items[0][1].hash)
    os.chmod(bad, 0o644)
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    j2 = open_journal(node)
    try:
        assert j2.recovered == 1
    finally:
        j2.close()
    assert [i.sop_instance_uid for i in node.catalog.instances()] == [study.sop_uids[1]]
    assert node.catalog.check_derived() == []


def test_replay_is_idempotent(node: LocalNode, tmp_path: Path) -> None:
    """A crash after the catalog insert but before the journal was emptied."""
    study = kit.make_study(tmp_path / "s", 2, seed="j4")
    j = open_journal(node)
    items = [spool(node, f) for f in study.files]
    results = j.record(items)
    saved = (node.data / JOURNAL_FILE).read_bytes()
    j.durable([(e, b) for e, _n, b in results if b])
    j.close()
    (node.data / JOURNAL_FILE).write_bytes(saved)
    j2 = open_journal(node)
    j2.close()
    assert j2.recovered == 0
    assert node.catalog.counts()["events"] == 2


def test_blob_removed_before_catalog_insert_is_restored(node: LocalNode,
                                                        tmp_path: Path) -> None:
    """``syncnode gc`` between the answer and the catalog insert must not lose it."""
    study = kit.make_study(tmp_path / "s", 2, seed="j5")
    j = open_journal(node)
    try:
        items = [spool(node, f) for f in study.files]
        results = j.record(items)
        for _i, b in items:
            j.keep(b.hash)
        assert node.gc() == 2  # nothing references them yet: gc removes both
        j.durable([(e, b) for e, _n, b in results if b])
        assert j.wait_applied()
    finally:
        j.close()
    assert sorted(i.sop_instance_uid for i in node.catalog.instances()) == \
        sorted(study.sop_uids)
    assert node.verify().ok
    assert list((node.data / "tmp" / "dicom-keep").iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) - 1, 1 << 20, (1 << 20) + 1,
                                  3 * (1 << 20) + 17])
def test_chunk_hasher_fed_in_any_sizes_matches_a_direct_computation(size: int) -> None:
    import random

    import blake3

    from syncnode.blobstore import CHUNK_SIZE, ChunkHasher

    data = os.urandom(size)
    hasher = ChunkHasher()
    rng, pos = random.Random(size), 0
    while pos < size:
        n = rng.randint(1, 300_000)
        hasher.update(data[pos:pos + n])
        pos += n
    chunks = b"".join(blake3.blake3(data[i:i + CHUNK_SIZE]).digest()
                      for i in range(0, size, CHUNK_SIZE))
    assert hasher.finish() == (blake3.blake3(data).hexdigest(), chunks)


def test_new_version_wins_over_a_peer_version_with_a_later_clock(node: LocalNode,
                                                                  tmp_path: Path) -> None:
    """The journal's clock follows the catalog's, which peers' events move forward."""
    from syncnode import events as ev

    study = kit.make_study(tmp_path / "s", 1, seed="j6")
    info, blob = spool(node, study.files[0])
    future = (ev.hlc_tick(0) >> 16) + 3_600_000  # a peer whose clock is an hour ahead
    peer = FakeOrigin("peer")
    peer_event = ev.PutEvent(
        origin=peer.id, hlc=future << 16, blob=blob.hash, size=blob.size,
        chunks=blob.chunks_root, sop_class_uid=info.sop_class_uid,
        sop_instance_uid=info.sop_instance_uid,
        series_instance_uid=info.series_instance_uid,
        study_instance_uid=info.study_instance_uid)
    node.catalog.offer_certificates([peer.cert_der])
    assert node.catalog.apply([peer.sign(peer_event)], blob_present=node.store.has).inserted
    j = open_journal(node)
    try:
        other = tmp_path / "other.dcm"
        data = bytearray(study.files[0].read_bytes())
        data[-2] ^= 0x01  # the same instance, other bytes (e.g. re-sent after an edit)
        other.write_bytes(bytes(data))
        info2, blob2 = spool(node, other)
        results = j.record([(info2, blob2)])
        j.durable([(e, b) for e, _n, b in results if b])
        assert j.wait_applied()
    finally:
        j.close()
    assert node.catalog.instance(info.sop_instance_uid).blob == blob2.hash
