"""The known-good record: which blobs are served without hashing, and when that stops."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
from syncsupport import alter_in_place

from syncnode import blobstore
from syncnode.blobstore import CHUNK_SIZE, BlobError, BlobStore
from syncnode.knowngood import KnownGood


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "data")


class _NoHashing:
    """Stands in for blake3 in the blob store: any hashing fails the test."""

    def __call__(self, *a: object, **kw: object) -> object:
        raise AssertionError("a known-good blob was hashed again")


@pytest.mark.parametrize("size", [0, 1000, 3 * CHUNK_SIZE + 5])
def test_an_installed_blob_is_read_without_hashing(store: BlobStore, size: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_of(size, 1)
    h = store.put_bytes(data).hash
    assert h in store.known_good
    monkeypatch.setattr(blobstore.blake3, "blake3", _NoHashing())
    assert b"".join(store.read_known(h, piece=CHUNK_SIZE)) == data
    assert store.read_known_whole(h) == data
    assert store.known_fingerprint(h, prefetch=True) is not None


def test_a_blob_altered_in_place_with_its_mtime_restored_is_verified(store: BlobStore) -> None:
    """Size and mtime unchanged, but the change time moved (no program can set it back):
    the blob is read verified again and refused."""
    data = data_of(2 * CHUNK_SIZE + 10, 2)
    h = store.put_bytes(data).hash
    alter_in_place(store.path(h), CHUNK_SIZE + 3)
    assert store.known_fingerprint(h) is None and store.open_known(h) is None
    with pytest.raises(BlobError, match="damaged at chunk 1"):
        b"".join(store.read_known(h))
    assert h not in store.known_good
    with pytest.raises(BlobError):
        store.read_known_whole(h)


def test_a_replaced_file_is_verified_then_known_again(store: BlobStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_of(5000, 3)
    h = store.put_bytes(data).hash
    path = store.path(h)
    copy = path.with_name("copy")
    copy.write_bytes(data)
    os.replace(copy, path)  # the same bytes in another inode: not the file that was hashed
    assert store.open_known(h) is None
    calls: list[int] = []
    real = blobstore.blake3.blake3

    def counting(*a: object, **kw: object) -> object:
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(blobstore.blake3, "blake3", counting)
    assert store.read_known_whole(h) == data  # verified, and recorded
    assert calls
    calls.clear()
    assert store.read_known_whole(h) == data
    assert not calls


def test_silent_bit_rot_is_served_until_the_scrub_finds_it(store: BlobStore) -> None:
    """What the record trusts, shown plainly: corruption under the file system keeps the
    stat (modelled here by recording the altered file's stat as a rotting disk would
    leave it), so DICOMweb reads serve it; the next verify (the scrub) finds it and drops
    it, after which it is refused. Peers and DIMSE read verified throughout."""
    data = data_of(3000, 4)
    h = store.put_bytes(data).hash
    path = store.path(h)
    alter_in_place(path, 100)
    store.known_good.record(h, path.stat())  # the rot: the stat is what was recorded
    assert store.read_known_whole(h) != data  # the documented window
    with pytest.raises(BlobError):
        b"".join(store.read_verified(h))  # peers and DIMSE never get it
    store.known_good.record(h, path.stat())
    damage = store.verify(h)  # the scrub
    assert damage is not None and h not in store.known_good
    with pytest.raises(BlobError):
        store.read_known_whole(h)


def test_reads_and_verify_keep_the_record(store: BlobStore) -> None:
    data = data_of(2 * CHUNK_SIZE + 1, 5)
    h = store.put_bytes(data).hash
    store.known_good.forget(h)
    assert b"".join(store.read_verified(h, 0, CHUNK_SIZE)) == data[:CHUNK_SIZE]
    assert h not in store.known_good  # a part read vouches for a part only
    reader = store.read_verified(h)
    assert b"".join(reader) == data
    assert h in store.known_good  # a whole verified read
    store.known_good.forget(h)
    assert store.verify(h) is None and h in store.known_good  # a verify that found it intact
    # another store object on the same folder (the DICOM SCP has its own) shares the record
    assert h in BlobStore(store.root.parent).known_good
    store.delete(h)
    assert h not in store.known_good


def test_a_blob_cut_to_nothing_is_damaged(store: BlobStore) -> None:
    h = store.put_bytes(b"x" * 100).hash
    path = store.path(h)
    path.chmod(0o644)
    os.truncate(path, 0)
    with pytest.raises(BlobError, match="empty"):
        b"".join(store.read_verified(h))
    with pytest.raises(BlobError):
        store.read_known_whole(h)


def test_the_record_is_bounded_and_least_recently_used_goes_first(tmp_path: Path) -> None:
    record = KnownGood(limit=3)
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"%d" % i)
        paths.append(p)
    for i in range(3):
        record.record(f"h{i}", paths[i].stat())
    assert record.matches("h0", paths[0].stat())  # h0 used: h1 is now the oldest
    record.record("h3", paths[3].stat())
    assert len(record) == 3 and "h1" not in record
    assert all(f"h{i}" in record for i in (0, 2, 3))
    assert not record.matches("h2", paths[3].stat())  # another file's stat


def test_the_record_is_safe_across_threads(tmp_path: Path) -> None:
    record = KnownGood(limit=500)
    p = tmp_path / "f"
    p.write_bytes(b"x")
    st = p.stat()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                key = f"h{(i * 7 + n) % 800}"
                record.record(key, st)
                record.matches(key, st)
                if i % 5 == 0:
                    record.forget(key)
        except BaseException as exc:  # reported below, the test fails on it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(record) <= 500
