"""The audit trail: the hash chain catches every changed byte, removed entries and a cut
end; several processes append to one valid chain; rotation keeps the chain; entries refuse
patient-shaped details; the queued writer records exactly what was asked."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from syncnode import audit
from syncnode.audit import AuditLog, InvalidAuditEntry, make_entry, read_entries, verify

STUDY = "1.2.826.0.1.3680043.8.498.1"
STUDY2 = "1.2.826.0.1.3680043.8.498.2"


def fill(folder: Path, n: int, **kw: object) -> AuditLog:
    trail = AuditLog(folder, **kw)  # type: ignore[arg-type]
    for i in range(n):
        trail.write("import", "cli:tester", files=i, instances=i, studies=[STUDY])
    trail.close()
    return trail


def test_entries_chain_and_read_back(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path)
    a = trail.write("import", "cli:alice", files=2, instances=2, studies=[STUDY, STUDY2])
    b = trail.write("deleted", "api:admin", studies=[STUDY], instances=1)
    trail.close()
    assert (a["seq"], b["seq"]) == (1, 2)
    assert a["prev"] == audit.GENESIS and b["prev"] == a["hash"]
    assert a["studies_count"] == 2
    report = verify(tmp_path)
    assert report.ok and report.entries == 2 and report.last_hash == b["hash"]
    assert [e["seq"] for e in read_entries(tmp_path)] == [1, 2]
    assert [e["seq"] for e in read_entries(tmp_path, since="2")] == [2]
    assert [e["action"] for e in read_entries(tmp_path, action="deleted")] == ["deleted"]
    assert list(read_entries(tmp_path, since="2999-01-01T00:00")) == []
    assert len(list(read_entries(tmp_path, since="2000-01-01T00:00Z"))) == 2
    with pytest.raises(audit.AuditError):
        list(read_entries(tmp_path, since="yesterday"))


def test_every_changed_byte_names_its_entry(tmp_path: Path) -> None:
    """Flip each byte of the log in turn: verify fails, naming the entry holding it."""
    fill(tmp_path, 3)
    log = tmp_path / audit.LOG_NAME
    original = log.read_bytes()
    line_of = []
    for seq, line in enumerate(original.splitlines(keepends=True), 1):
        line_of += [seq] * len(line)
    assert verify(tmp_path).ok
    for pos in range(len(original)):
        damaged = bytearray(original)
        damaged[pos] ^= 0x01
        log.write_bytes(bytes(damaged))
        report = verify(tmp_path)
        assert not report.ok, f"byte {pos} changed and not detected"
        assert report.broken_seq == line_of[pos], (pos, report)
    log.write_bytes(original)
    assert verify(tmp_path).ok


def test_truncation_is_detected(tmp_path: Path) -> None:
    fill(tmp_path, 4)
    log = tmp_path / audit.LOG_NAME
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]) + lines[-1][:-7])  # the last entry cut short
    report = verify(tmp_path)
    assert not report.ok and report.broken_seq == 4 and "incomplete" in (report.reason or "")
    log.write_bytes(b"".join(lines[:-1]))  # the last entry removed whole
    report = verify(tmp_path)
    assert not report.ok and report.broken_seq == 4 and "truncated" in (report.reason or "")
    log.write_bytes(b"".join(lines[:2]))
    assert verify(tmp_path).broken_seq == 3


def test_replaced_last_entry_is_detected(tmp_path: Path) -> None:
    """A re-forged last entry (valid chain, recomputed hash) differs from the head."""
    fill(tmp_path, 2)
    log = tmp_path / audit.LOG_NAME
    lines = log.read_bytes().splitlines(keepends=True)
    first = json.loads(lines[0])
    _forged, line = audit.seal(make_entry("import", "cli:mallory", files=0), 2, first["hash"])
    log.write_bytes(lines[0] + line)
    report = verify(tmp_path)
    assert not report.ok and report.broken_seq == 2 and "replaced" in (report.reason or "")


def test_cut_end_is_recorded_before_going_on(tmp_path: Path) -> None:
    """An incomplete last line (a crash during a write) is set aside and the fact is the
    next entry of the chain, which stays valid."""
    fill(tmp_path, 2)
    log = tmp_path / audit.LOG_NAME
    data = log.read_bytes()
    log.write_bytes(data + b'{"action":"imp')
    assert not verify(tmp_path).ok
    trail = AuditLog(tmp_path)
    e = trail.write("deleted", "cli:bob", instances=1)
    trail.close()
    entries = list(read_entries(tmp_path))
    assert [x["action"] for x in entries] == ["import", "import", "audit-recovered", "deleted"]
    assert e["seq"] == 4
    report = verify(tmp_path)
    assert report.ok and report.recoveries == [3]
    kept = list(tmp_path.glob("discarded-*.bin"))
    assert len(kept) == 1 and kept[0].read_bytes() == b'{"action":"imp'


def test_rotation_keeps_the_chain(tmp_path: Path) -> None:
    fill(tmp_path, 40, rotate_bytes=2000)
    files = audit.log_files(tmp_path)
    assert len(files) >= 3 and files[-1].name == audit.LOG_NAME
    report = verify(tmp_path)
    assert report.ok and report.entries == 40 and report.files == [f.name for f in files]
    # the first entry of each file names the last hash of the file before it
    for older, newer in itertools.pairwise(files):
        last = json.loads(older.read_bytes().splitlines()[-1])
        first = json.loads(newer.read_bytes().splitlines()[0])
        assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
    # a change in a rotated file is found there
    damaged = bytearray(files[0].read_bytes())
    damaged[30] ^= 0x01
    files[0].write_bytes(bytes(damaged))
    assert verify(tmp_path).broken_file == files[0].name
    # and a rotated file removed breaks the chain at the first entry it held
    files[0].write_bytes(bytes(damaged[:30]) + bytes([damaged[30] ^ 0x01]) + damaged[31:])
    second_first = json.loads(files[1].read_bytes().splitlines()[0])["seq"]
    files[1].unlink()
    assert verify(tmp_path).broken_seq == second_first


WRITER = textwrap.dedent("""
    import sys
    from syncnode.audit import AuditLog
    trail = AuditLog(sys.argv[1])
    for i in range(int(sys.argv[2])):
        if i % 2:
            trail.write("query", "dicom:" + sys.argv[3] + "@127.0.0.1", keys=["PatientID"],
                        count=i)
        else:
            trail.record("query", "dicom:" + sys.argv[3] + "@127.0.0.1", keys=["StudyDate"],
                         count=i)
    trail.close()
""")


def test_two_processes_append_to_one_chain(tmp_path: Path) -> None:
    n = 300
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(n), ae])
             for ae in ("ALPHA", "BRAVO")]
    for p in procs:
        assert p.wait(timeout=120) == 0
    report = verify(tmp_path)
    assert report.ok, report
    assert report.entries == 2 * n
    by_actor: dict[str, list[int]] = {}
    for e in read_entries(tmp_path):
        by_actor.setdefault(e["actor"], []).append(e["count"])
    assert sorted(by_actor) == ["dicom:ALPHA@127.0.0.1", "dicom:BRAVO@127.0.0.1"]
    for counts in by_actor.values():
        assert sorted(counts) == list(range(n))


async def test_record_from_the_event_loop_writes_each_entry_once(tmp_path: Path) -> None:
    trail = AuditLog(tmp_path)
    loop_thread_blocked = 0.0
    t0 = asyncio.get_running_loop().time()
    for i in range(500):
        trail.record("peer-sent", "peer:ABCDEFG", instances=i, bytes=i * 10)
    loop_thread_blocked = asyncio.get_running_loop().time() - t0
    assert await trail.aflush()
    trail.close()
    entries = list(read_entries(tmp_path))
    assert [e["instances"] for e in entries] == list(range(500))
    assert verify(tmp_path).ok
    assert loop_thread_blocked < 1.0  # queued, not written on the loop


def test_full_queue_is_counted_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(audit, "QUEUE_MAX", 5)
    trail = AuditLog(tmp_path)
    with trail._mutex:  # the writer thread stalls on the lock, as on a stalled disk
        for i in range(20):
            trail.record("query", "api:read", count=i)
        assert trail.dropped > 0
        dropped = trail.dropped
    assert trail.flush()
    trail.write("query", "api:read", count=99)  # the drop note has been written by now
    trail.close()
    entries = list(read_entries(tmp_path))
    notes = [e for e in entries if e["action"] == "audit-dropped"]
    assert sum(e["dropped"] for e in notes) == dropped
    assert len(entries) - len(notes) == 20 - dropped + 1
    assert verify(tmp_path).ok


@pytest.mark.parametrize("details", [
    {"patient": "DOE^JOHN"},                       # not a detail key at all
    {"studies": ["DOE^JOHN"]},                     # not a UID
    {"keys": ["PatientName=DOE"]},                 # a value with the key
    {"reason": "name DOE^JOHN\n"},                 # not one printable line
    {"instances": -1},
    {"blobs": ["not-a-hash"]},
])
def test_entries_refuse_what_is_not_an_identifier(details: dict[str, object]) -> None:
    with pytest.raises(InvalidAuditEntry):
        make_entry("query", "api:read", **details)  # type: ignore[arg-type]


def test_entries_refuse_unknown_actions_and_actors() -> None:
    with pytest.raises(InvalidAuditEntry):
        make_entry("looked", "api:read")
    with pytest.raises(InvalidAuditEntry):
        make_entry("query", "someone")
    with pytest.raises(InvalidAuditEntry):
        make_entry("query", "api:read", "maybe")


def test_unwritable_trail_says_so(tmp_path: Path) -> None:
    (tmp_path / audit.LOG_NAME).mkdir()  # something in the way that even root cannot append to
    with pytest.raises(OSError):
        AuditLog(tmp_path).write("import", "cli:x")


def test_refusals_from_one_source_cannot_fill_the_disk(tmp_path: Path) -> None:
    """A flood of refusals from one source writes at most THROTTLE_PER_MINUTE entries a
    minute; what was left out is counted, and another source is not held back."""
    trail = AuditLog(tmp_path)
    for _ in range(500):
        trail.record("connection-refused", "dicom:FLOOD@10.0.0.9", "failure",
                     reason="calling AE title not allowed")
    trail.record("connection-refused", "dicom:OTHER@10.0.0.8", "failure")
    trail.record("connection-refused", "dicom:FLOOD@10.0.0.9", "success")  # not throttled
    trail.close()
    got = list(read_entries(tmp_path))
    flood = [e for e in got if e["actor"] == "dicom:FLOOD@10.0.0.9" and e["outcome"] ==
             "failure"]
    assert len(flood) == audit.THROTTLE_PER_MINUTE + 1
    assert flood[-1]["suppressed"] == 500 - audit.THROTTLE_PER_MINUTE
    assert sum(e.get("suppressed", 0) for e in flood) + audit.THROTTLE_PER_MINUTE == 500
    assert [e["actor"] for e in got].count("dicom:OTHER@10.0.0.8") == 1
    assert verify(tmp_path).ok
