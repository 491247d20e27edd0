"""The blob store: content addressing, chunk lists, atomic writes, verification, bounded memory."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest
from syncsupport import resident_bytes, skip_without_page_cache

from syncnode import blobstore
from syncnode.blobstore import (
    CHUNK_SIZE,
    DIGEST_SIZE,
    BlobError,
    BlobHashMismatch,
    BlobMissing,
    BlobStore,
    chunk_count,
)
from syncnode.ids import InvalidHash

MiB = CHUNK_SIZE


def data_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def expected_chunks(data: bytes) -> list[str]:
    """Chunk digests computed independently of the store: BLAKE3 of every 1 MiB slice."""
    return [blake3.blake3(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB)]


def make_writable(path: Path) -> None:
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "data")


# -- put / get -----------------------------------------------------------------------------


def test_put_get_roundtrip(store: BlobStore) -> None:
    data = data_of(100_000, 1)
    info = store.put_bytes(data)
    assert info.hash == blake3.blake3(data).hexdigest()
    assert info.size == len(data)
    assert info.created is True
    assert store.has(info.hash)
    assert store.size(info.hash) == len(data)
    with store.open(info.hash) as f:
        assert f.read() == data
    assert b"".join(store.read_verified(info.hash)) == data
    # fanned-out layout, read-only file, chunk list next to it
    path = store.path(info.hash)
    assert path == store.root / info.hash[:2] / info.hash[2:4] / info.hash
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.chunks_path(info.hash).is_file() == (len(data) > CHUNK_SIZE)
    assert list(store.iter_hashes()) == [info.hash]
    assert files_under(store.tmp_dir) == []


def test_missing_blob(store: BlobStore) -> None:
    absent = blake3.blake3(b"never stored").hexdigest()
    assert not store.has(absent)
    with pytest.raises(BlobMissing):
        store.open(absent)
    with pytest.raises(BlobMissing):
        store.size(absent)
    with pytest.raises(BlobMissing):
        store.chunks(absent)


def test_identical_bytes_stored_once(store: BlobStore) -> None:
    data = data_of(3 * MiB + 17, 2)
    first = store.put_bytes(data)
    second = store.put_bytes(data)
    with store.writer() as w:
        w.write(data[:1000])
        w.write(data[1000:])
        third = w.commit()
    assert first.created is True
    assert second.created is False and third.created is False
    w = store.writer()  # no context manager: commit alone must clean up
    w.write(data)
    fourth = w.commit()
    assert not w.tmp_path.exists()
    assert fourth.created is False
    assert first.hash == second.hash == third.hash == fourth.hash
    assert first.chunks == second.chunks == third.chunks
    assert files_under(store.root) == [store.path(first.hash), store.chunks_path(first.hash)]
    assert files_under(store.tmp_dir) == []


def test_put_again_restores_a_lost_chunk_list(store: BlobStore) -> None:
    data = data_of(MiB + 5, 3)
    info = store.put_bytes(data)
    store.chunks_path(info.hash).unlink()
    assert store.verify(info.hash) is not None
    again = store.put_bytes(data)
    assert again.created is False
    assert store.verify(info.hash) is None
    assert store.chunks(info.hash) == expected_chunks(data)


def test_put_file_and_put_stream(store: BlobStore, tmp_path: Path) -> None:
    data = data_of(2 * MiB + 3, 4)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    info = store.put_file(src)
    assert info.hash == blake3.blake3(data).hexdigest() and info.created
    with open(src, "rb") as f:
        again = store.put_stream(f, expected_hash=info.hash)
    assert again.hash == info.hash and not again.created


# -- chunk lists ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 2 * MiB, 3 * MiB + MiB // 2])
def test_chunk_lists(store: BlobStore, size: int) -> None:
    data = data_of(size, size)
    info = store.put_bytes(data)
    want = expected_chunks(data)
    assert len(want) == chunk_count(size) == -(-size // MiB)
    assert list(info.chunks) == want
    assert store.chunks(info.hash) == want
    raw = b"".join(bytes.fromhex(c) for c in want)
    assert store.chunk_digests(info.hash) == raw
    # a file for the list only when there is more than one chunk; else it is the hash
    if size > MiB:
        assert store.chunks_path(info.hash).read_bytes() == raw
    else:
        assert not store.chunks_path(info.hash).exists()
        assert raw == (bytes.fromhex(info.hash) if size else b"")
    assert len(raw) == DIGEST_SIZE * len(want)
    assert info.chunks_root == blake3.blake3(raw).hexdigest()
    assert store.verify(info.hash) is None


def test_chunk_list_examples() -> None:
    assert [chunk_count(n) for n in (0, 1, MiB, MiB + 1, 3 * MiB + MiB // 2)] == [0, 1, 1, 2, 4]


def test_empty_blob(store: BlobStore) -> None:
    info = store.put_bytes(b"")
    assert info.hash == blake3.blake3(b"").hexdigest()
    assert info.size == 0 and info.chunks == ()
    assert info.chunks_root == blake3.blake3(b"").hexdigest()
    assert not store.chunks_path(info.hash).exists() and store.chunk_digests(info.hash) == b""
    assert b"".join(store.read_verified(info.hash)) == b""
    assert store.verify(info.hash) is None


def test_streaming_writes_in_odd_sizes(store: BlobStore, tmp_path: Path) -> None:
    data = data_of(3 * MiB + 12345, 5)
    whole = BlobStore(tmp_path / "other").put_bytes(data)
    rng = random.Random(6)
    sizes = [1, 7, 4093, MiB - 1, 1, MiB + 3, 2, 65536]
    with store.writer() as w:
        pos = 0
        i = 0
        while pos < len(data):
            n = sizes[i] if i < len(sizes) else rng.randint(1, 300_000)
            w.write(memoryview(data)[pos : pos + n] if i % 2 else data[pos : pos + n])
            pos += n
            i += 1
        assert w.size == len(data)
        streamed = w.commit()
    assert streamed.hash == whole.hash
    assert streamed.chunks == whole.chunks
    assert streamed.size == whole.size
    assert streamed.chunks_root == whole.chunks_root
    assert store.chunks(streamed.hash) == expected_chunks(data)


@pytest.mark.parametrize("splits", [
    [MiB - 1, 1, MiB - 1, 2],
    [MiB - 1, 2, MiB],
    [1, MiB - 2, 1, 5],
    [MiB, MiB - 1, 1, 1],
    [MiB + 1, MiB - 1, 3],
])
def test_write_boundaries_next_to_chunk_edges(store: BlobStore, splits: list[int]) -> None:
    data = data_of(sum(splits), len(splits))
    with store.writer() as w:
        pos = 0
        for n in splits:
            w.write(data[pos : pos + n])
            pos += n
        info = w.commit()
    assert list(info.chunks) == expected_chunks(data)
    assert info.hash == blake3.blake3(data).hexdigest()


def test_writer_refuses_use_after_commit(store: BlobStore) -> None:
    w = store.writer()
    w.write(b"abc")
    w.commit()
    with pytest.raises(BlobError):
        w.write(b"more")
    with pytest.raises(BlobError):
        w.commit()


def test_abort_leaves_nothing(store: BlobStore) -> None:
    with store.writer() as w:
        w.write(data_of(5000, 7))
        assert w.tmp_path.exists()
    assert files_under(store.tmp_dir) == []
    assert files_under(store.root) == []


# -- wrong hash ----------------------------------------------------------------------------


def test_commit_with_wrong_expected_hash_stores_nothing(store: BlobStore) -> None:
    data = data_of(2 * MiB + 1, 8)
    right = blake3.blake3(data).hexdigest()
    wrong = blake3.blake3(data + b"x").hexdigest()
    w = store.writer()
    w.write(data)
    with pytest.raises(BlobHashMismatch) as exc_info:
        w.commit(expected_hash=wrong)
    assert exc_info.value.expected == wrong
    assert exc_info.value.actual == right
    assert files_under(store.root) == []
    assert files_under(store.tmp_dir) == []
    assert not store.has(right)
    # the same through put_stream
    import io

    with pytest.raises(BlobHashMismatch):
        store.put_stream(io.BytesIO(data), expected_hash=wrong)
    assert files_under(store.root) == [] and files_under(store.tmp_dir) == []
    # and the right hash is accepted
    assert store.put_stream(io.BytesIO(data), expected_hash=right).hash == right


# -- verify --------------------------------------------------------------------------------


def stored(store: BlobStore, size: int = 2 * MiB + MiB // 2, seed: int = 9) -> tuple[str, bytes]:
    data = data_of(size, seed)
    return store.put_bytes(data).hash, data


def flip_byte(path: Path, offset: int) -> None:
    make_writable(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_intact(store: BlobStore) -> None:
    h, _ = stored(store)
    assert store.verify(h) is None
    assert list(store.verify_all()) == [(h, None)]


@pytest.mark.parametrize("offset", [0, MiB - 1, MiB, 2 * MiB + 100])
def test_verify_detects_flipped_byte(store: BlobStore, offset: int) -> None:
    h, _ = stored(store)
    other, _ = stored(store, 1000, seed=10)
    flip_byte(store.path(h), offset)
    damage = store.verify(h)
    assert damage is not None and damage.hash == h
    assert "content hashes to" in damage.reason
    report = dict(store.verify_all())
    assert report[other] is None and report[h] == damage


def test_verify_detects_truncation(store: BlobStore) -> None:
    h, _ = stored(store)
    path = store.path(h)
    make_writable(path)
    os.truncate(path, 2 * MiB)  # at a chunk boundary: every remaining chunk is intact
    damage = store.verify(h)
    assert damage is not None and "content hashes to" in damage.reason


def test_verify_detects_missing_blob(store: BlobStore) -> None:
    h, _ = stored(store)
    store.path(h).unlink()
    damage = store.verify(h)
    assert damage is not None and damage.reason == "missing"


def test_verify_detects_missing_chunk_list(store: BlobStore) -> None:
    h, _ = stored(store)
    store.chunks_path(h).unlink()
    damage = store.verify(h)
    assert damage is not None and "chunk list" in damage.reason


@pytest.mark.parametrize("how", ["flip", "truncate", "extend", "empty"])
def test_verify_detects_altered_chunk_list(store: BlobStore, how: str) -> None:
    h, _ = stored(store)
    cpath = store.chunks_path(h)
    raw = cpath.read_bytes()
    changed = {"flip": raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], "truncate": raw[:-DIGEST_SIZE],
               "extend": raw + raw[:DIGEST_SIZE], "empty": b""}[how]
    make_writable(cpath)
    cpath.write_bytes(changed)
    damage = store.verify(h)
    assert damage is not None and "chunk list" in damage.reason


# -- read_verified -------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end"), [
    (0, None), (0, 10), (5, MiB - 5), (MiB - 5, MiB + 5), (MiB, 2 * MiB), (2 * MiB + 7, None),
    (100, 100), (0, 10 * MiB), (2 * MiB + MiB // 2 - 1, None), (2 * MiB + MiB // 2, None),
])
def test_read_verified_ranges(store: BlobStore, start: int, end: int | None) -> None:
    h, data = stored(store)
    got = b"".join(store.read_verified(h, start, end))
    assert got == data[start:end]


def collect_until_error(it) -> tuple[bytes, BaseException | None]:
    out = bytearray()
    try:
        for piece in it:
            out += piece
    except BlobError as exc:
        return bytes(out), exc
    return bytes(out), None


def test_read_verified_refuses_damaged_chunk(store: BlobStore) -> None:
    h, data = stored(store)
    flip_byte(store.path(h), MiB + 10)  # damage chunk 1 of 3
    # chunk 0 alone is still served
    assert b"".join(store.read_verified(h, 0, MiB)) == data[:MiB]
    # chunk 2 alone is still served
    assert b"".join(store.read_verified(h, 2 * MiB, None)) == data[2 * MiB :]
    # any range touching chunk 1 is refused, and no byte of chunk 1 is handed out
    for start, end in [(0, None), (MiB + 10, MiB + 11), (MiB - 1, MiB + 1), (2 * MiB - 1, None)]:
        served, error = collect_until_error(store.read_verified(h, start, end))
        assert error is not None, (start, end)
        intact_prefix = data[start : min(MiB, end or MiB)] if start < MiB else b""
        assert served == intact_prefix, (start, end)


def test_read_verified_refuses_damaged_chunk_list(store: BlobStore) -> None:
    h, _ = stored(store)
    cpath = store.chunks_path(h)
    raw = bytearray(cpath.read_bytes())
    raw[0] ^= 0xFF
    make_writable(cpath)
    cpath.write_bytes(bytes(raw))
    served, error = collect_until_error(store.read_verified(h))
    assert error is not None and served == b""


def test_read_verified_refuses_missing_chunk_list(store: BlobStore) -> None:
    h, _ = stored(store)
    store.chunks_path(h).unlink()
    with pytest.raises(BlobMissing):
        b"".join(store.read_verified(h))


@pytest.mark.parametrize("cut", [2 * MiB + 100, 2 * MiB, MiB, 1])
def test_read_verified_refuses_truncated_blob(store: BlobStore, cut: int) -> None:
    """A blob shorter than its chunk list says is damaged, even when cut on a chunk boundary
    (every remaining chunk then hashes correctly): a full read must not end short silently."""
    h, data = stored(store)
    path = store.path(h)
    make_writable(path)
    os.truncate(path, cut)
    served, error = collect_until_error(store.read_verified(h))
    assert error is not None
    assert data.startswith(served) and len(served) < len(data)


def test_read_verified_refuses_extended_blob(store: BlobStore) -> None:
    h, _data = stored(store, 2 * MiB)
    path = store.path(h)
    make_writable(path)
    with open(path, "ab") as f:
        f.write(b"tail")
    _served, error = collect_until_error(store.read_verified(h))
    assert error is not None


# -- temp files ----------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_tmp(store: BlobStore) -> None:
    gone = dead_pid()
    me = os.getpid()
    part = store.part_path(blake3.blake3(b"partial").hexdigest())
    part.write_bytes(b"partial pull")
    keep = [store.tmp_dir / f"blob-{me}-aaaa.tmp", store.tmp_dir / f"chunks-{me}-bbbb.tmp",
            part]
    drop = [store.tmp_dir / f"blob-{gone}-cccc.tmp", store.tmp_dir / f"chunks-{gone}-dddd.tmp",
            store.tmp_dir / "stray.tmp"]
    for p in keep + drop:
        if not p.exists():
            p.write_bytes(b"x")
    with store.writer() as w:  # a write in progress in this (live) process
        w.write(b"in progress")
        assert store.clean_tmp() == len(drop)
        assert w.tmp_path.exists()
        info = w.commit()
    assert store.has(info.hash)
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in drop)
    assert store.clean_tmp() == 0


# -- hashes as paths -----------------------------------------------------------------------

BAD_HASHES = [
    "../../etc/passwd",
    "../" + "a" * 61,
    "A" * 64,
    "ab" * 31 + "AB",
    "a" * 63,
    "a" * 65,
    "a" * 64 + "\n",
    " " + "a" * 63,
    "g" * 64,
    "",
    None,
    b"a" * 64,
    "/" + "a" * 63,
]


@pytest.mark.parametrize("bad", BAD_HASHES)
def test_paths_only_from_valid_hashes(store: BlobStore, bad: object) -> None:
    for method in (store.path, store.chunks_path, store.part_path, store.has, store.open,
                   store.size, store.chunks, store.verify, store.delete):
        with pytest.raises(InvalidHash):
            method(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidHash):
        list(store.read_verified(bad))  # type: ignore[arg-type]


def test_delete_removes_blob_and_chunk_list(store: BlobStore) -> None:
    h, _ = stored(store, 10)
    assert store.delete(h) is True
    assert not store.has(h) and not store.chunks_path(h).exists()
    assert store.delete(h) is False


# -- bounded memory ------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import blake3
    from syncnode.blobstore import BlobStore

    TOTAL = int(sys.argv[2])
    def rss_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def blocks():
        # deterministic, incompressible, generated on the fly in odd-sized pieces
        xof = blake3.blake3(b"syncnode memory test")
        pos, sizes, i = 0, (1_000_003, 65_537, 4_194_301, 999), 0
        while pos < TOTAL:
            n = min(sizes[i % len(sizes)], TOTAL - pos)
            yield xof.digest(length=n, seek=pos)
            pos += n
            i += 1

    store = BlobStore(sys.argv[1])
    whole = blake3.blake3()
    for b in blocks():  # warm up the generator and the hash code once
        whole.update(b)
        break
    base = rss_kib()
    w = store.writer()
    whole = blake3.blake3()
    for b in blocks():
        w.write(b)
        whole.update(b)
    info = w.commit()
    assert info.hash == whole.hexdigest(), "hash"
    assert info.size == TOTAL and len(info.chunks) == -(-TOTAL // (1 << 20)), "chunks"
    assert store.verify(info.hash) is None, "verify"
    check = blake3.blake3()
    n = 0
    for piece in store.read_verified(info.hash):
        check.update(piece)
        n += len(piece)
    assert n == TOTAL and check.hexdigest() == info.hash, "read_verified"
    print(rss_kib() - base)
""")


@pytest.mark.timeout(120)
def test_memory_is_flat_for_a_large_blob(tmp_path: Path) -> None:
    total = 300 * 1000 * 1000
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "data"),
                           str(total)], check=False, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr
    growth_kib = int(proc.stdout.strip())
    assert growth_kib < 60 * 1024, f"peak RSS grew by {growth_kib} KiB storing {total} bytes"
    blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()
             and not p.name.endswith(".chunks")]
    assert len(blobs) == 1 and blobs[0].stat().st_size == total


@pytest.mark.parametrize("err", ["ENOSPC", "EDQUOT"])
def test_no_space_or_quota_is_store_full(tmp_path: Path, err: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk and a full quota are both StoreFull wherever the store writes, and a
    half-written file is removed."""
    import errno

    from syncnode.blobstore import StoreFull, copy_fd, write_file

    code = getattr(errno, err)

    def refuse(*_a: object, **_k: object) -> int:
        raise OSError(code, os.strerror(code))

    store = blobstore.BlobStore(tmp_path / "data")
    monkeypatch.setattr(blobstore.os, "writev", refuse)
    target = tmp_path / "piece"
    with pytest.raises(StoreFull):
        write_file(target, [b"abc", b"def"])
    assert not target.exists()

    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    monkeypatch.setattr(blobstore.os, "copy_file_range", refuse)
    monkeypatch.setattr(blobstore.os, "write", refuse)
    tmp, fd = store.new_tmp()
    try:
        with open(src, "rb") as f, pytest.raises(StoreFull):
            copy_fd(f.fileno(), fd, 5000)
    finally:
        os.close(fd)
        tmp.unlink()

    with store.writer() as w:
        w.write(b"y" * 10)
        monkeypatch.setattr(blobstore.os, "fsync", refuse)
        with pytest.raises(StoreFull):
            w.commit()
    assert not any((tmp_path / "data" / "tmp").iterdir())


# -- the page cache ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["group", "verified", "writer"])
def test_installs_keep_their_pages_and_drop_cached_lets_exactly_those_named_go(
        store: BlobStore, tmp_path: Path, how: str) -> None:
    """However a blob is installed it stays in the page cache (what arrives locally is about
    to be pulled by every peer); :meth:`BlobStore.drop_cached` then evicts the blobs it
    names and no other (a peer's, once applied and indexed), and they read back intact. A
    control file proves the filesystem keeps written pages, so the drop is the store's."""
    skip_without_page_cache(tmp_path)
    control = tmp_path / "control"
    with open(control, "wb") as f:
        f.write(data_of(3 * MiB, seed=9))
        f.flush()
        os.fsync(f.fileno())
    infos = []
    datas = [data_of(6 * MiB + 12_345, seed=seed) for seed in (7, 8)]
    for data in datas:
        if how == "group":
            tmp, fd = store.new_tmp()
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            [info] = store.install_staged([store.stage_tmp(tmp)])
        elif how == "verified":
            tmp, fd = store.new_tmp()
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            digest, chunk_digests = blobstore.hash_chunks(data)
            info = store.install_verified(tmp, digest, len(data), chunk_digests)
        else:
            with store.writer() as w:
                w.write(data)
                info = w.commit()
        assert info.created
        infos.append(info)
    assert resident_bytes(control) >= 3 * MiB  # fincore sees what a write leaves cached
    kept, dropped = (i.hash for i in infos)
    assert all(resident_bytes(store.path(i.hash)) >= i.size for i in infos)
    store.drop_cached([dropped])
    assert resident_bytes(store.path(dropped)) == 0
    assert resident_bytes(store.path(kept)) >= infos[0].size
    assert b"".join(store.read_verified(dropped)) == datas[1]
