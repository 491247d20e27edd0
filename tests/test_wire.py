"""zstd on the wire (syncnode.wire): the frame decoder's checks, the negotiation, and real
pulls between two nodes over mutual TLS on loopback — compressed, identical, resumable."""

from __future__ import annotations

import asyncio
import random
import re
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import zstandard
from syncsupport import (
    assert_blobs_intact,
    blob_set,
    cli,
    converged,
    describe_nodes,
    import_files,
    live_view,
    make_dicom,
    pull_from,
    settled_state,
    uid,
    url_of,
    wait_for,
)
from test_sync import fp

from syncnode import wire
from syncnode.blobstore import CHUNK_SIZE
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.sync import PeerClient
from syncnode.transfer import TransferError

MiB = 1 << 20
StartNode = Callable[..., Awaitable[RunningNode]]


def frames_of(data: bytes) -> bytes:
    return b"".join(wire.compress_chunk(data[i:i + CHUNK_SIZE])
                    for i in range(0, len(data), CHUNK_SIZE))


def decode_in_pieces(body: bytes, sizes: list[int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    dec = wire.ChunkFrames(sizes)
    out: list[bytes] = []
    pos = 0
    while pos < len(body):
        n = rng.choice([1, 7, 18, 100, 4096, 65536, 300_000])
        out += dec.feed(body[pos:pos + n])
        pos += n
    dec.finish()
    return out


# -- the decoder -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 1000, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 12345])
def test_frames_decode_to_the_chunks_in_any_piece_sizes(size: int) -> None:
    rng = random.Random(size)
    data = bytes(rng.getrandbits(5) for _ in range(size))  # compressible
    body = frames_of(data)
    assert len(body) < size or size < 100
    sizes = wire.chunk_sizes(0, size, CHUNK_SIZE)
    for seed in range(3):
        chunks = decode_in_pieces(body, sizes, seed)
        assert [len(c) for c in chunks] == sizes
        assert b"".join(chunks) == data


def test_a_standard_zstd_decoder_reads_the_body() -> None:
    """The body is plain zstd (concatenated frames): any client can read it."""
    data = bytes(range(256)) * 10_000
    body = frames_of(data)
    assert zstandard.ZstdDecompressor().decompressobj(read_across_frames=True) \
        .decompress(body) == data


def test_a_frame_declaring_more_than_its_chunk_is_refused_before_decompressing() -> None:
    """A decompression bomb: 64 MiB of zeros in a few KiB, sent for a 1 MiB chunk."""
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 * MiB))
    assert len(bomb) < 64 * 1024
    dec = wire.ChunkFrames([CHUNK_SIZE])
    with pytest.raises(wire.FrameError, match="declares 67108864 bytes"):
        dec.feed(bomb)


def test_a_frame_without_its_size_is_refused() -> None:
    c = zstandard.ZstdCompressor(write_content_size=False)
    obj = c.compressobj()
    body = obj.compress(b"x" * 1000) + obj.flush()
    with pytest.raises(wire.FrameError, match="declares"):
        wire.ChunkFrames([1000]).feed(body)


def test_garbage_truncation_and_trailing_bytes_are_refused() -> None:
    data = b"abc" * 500_000  # two chunks
    body = frames_of(data)
    sizes = wire.chunk_sizes(0, len(data), CHUNK_SIZE)
    with pytest.raises(wire.FrameError, match="not a zstd frame"):
        wire.ChunkFrames(sizes).feed(b"\x00" * 64)
    dec = wire.ChunkFrames(sizes)
    got = dec.feed(body[:-5])
    assert [len(c) for c in got] == sizes[:1]
    with pytest.raises(wire.FrameError, match="ended inside chunk 1"):
        dec.finish()
    with pytest.raises(wire.FrameError, match="after its last chunk"):
        wire.ChunkFrames(sizes).feed(body + wire.compress_chunk(b"more"))
    # a frame of the right declared size whose content is damaged
    bad = bytearray(body)
    bad[len(body) // 4] ^= 0xFF
    with pytest.raises(wire.FrameError):
        dec2 = wire.ChunkFrames(sizes)
        dec2.feed(bytes(bad))
        dec2.finish()


def test_accept_encoding_and_the_auto_rule() -> None:
    assert wire.accepts("zstd")
    assert wire.accepts("gzip, zstd;q=0.5")
    assert not wire.accepts("zstd;q=0")
    assert not wire.accepts("identity")
    assert not wire.accepts(None)
    ct = "1.2.840.10008.1.2.1"
    jpeg = "1.2.840.10008.1.2.4.50"
    assert not wire.want_compression("auto", "https://127.0.0.1:8443", ct)
    assert not wire.want_compression("auto", "https://localhost:8443", ct)
    assert not wire.want_compression("auto", "https://[::1]:8443", ct)
    assert wire.want_compression("auto", "https://10.1.2.3:8443", ct)
    assert wire.want_compression("auto", "https://pacs.example.org:8443", ct)
    assert not wire.want_compression("auto", "https://10.1.2.3:8443", jpeg)
    assert wire.want_compression("on", "https://127.0.0.1:8443", jpeg)
    assert not wire.want_compression("off", "https://10.1.2.3:8443", ct)


# -- real pulls --------------------------------------------------------------------------

def _files(tmp_path: Path, tag: int) -> list[Path]:
    """One-chunk and multi-chunk instances, compressible, plus one that is not."""
    spec = [(100 * 1024, True), (3 * MiB + 5000, True), (9 * MiB, True), (2 * MiB, False)]
    return [make_dicom(tmp_path / f"w{tag}-{i}.dcm", sop=uid(40 + tag, i), study=uid(40 + tag),
                       series=uid(40 + tag, 0), pixel_bytes=n, seed=i, compressible=c)
            for i, (n, c) in enumerate(spec)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("puller", "server", "compressed"), [
    ("on", "auto", True),     # asked for and granted
    ("off", "auto", False),   # not asked for
    ("on", "off", False),     # asked for, refused by the serving node
])
async def test_pull_with_and_without_zstd_is_identical(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        puller: str, server: str, compressed: bool) -> None:
    a, b = new_node("a"), new_node("b")
    files = _files(tmp_path, 0)
    import_files(b, *files)
    total = sum(f.stat().st_size for f in files)
    ra = await running(a, compression=puller)
    rb = await running(b, compression=server)
    pull_from(a, ra, b, url_of(rb))
    rb.peers_changed()
    await wait_for(lambda: converged([a, b]), 30, "A to pull B's instances",
                   describe=lambda: describe_nodes([a, b]))
    state = await settled_state(a, b)
    assert_blobs_intact(a)
    assert blob_set(a) == blob_set(b) and len(live_view(a)) == len(files)
    for h in blob_set(a):  # byte for byte
        assert a.store.path(h).read_bytes() == b.store.path(h).read_bytes()
    assert state["bytes_received"] == total
    wire_bytes = state["wire_bytes_received"]
    text = (await asyncio.to_thread(cli, "status", data=a.data)).stdout
    if compressed:
        assert wire_bytes < 0.7 * total, (wire_bytes, total)
        assert re.search(r"received \S+ \S+ \(\d+% of it on the wire\)", text), text
    else:
        assert wire_bytes == total
        assert "received" in text and "on the wire" not in text, text
    assert state["integrity_errors"] == 0


@pytest.mark.timeout(90)
async def test_a_compressed_pull_resumes_after_cuts_without_loss(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"big{i}.dcm", sop=uid(50, i), study=uid(50),
                        series=uid(50, 0), pixel_bytes=24 * MiB, seed=i, compressible=True)
             for i in range(2)]
    import_files(b, *files)
    total = sum(f.stat().st_size for f in files)
    ra, rb = await running(a, compression="on"), await running(b)
    cuts = 6
    # compressed, about 2.5x smaller on the wire: cut every ~1/(cuts+1) of that
    config = fp.FaultConfig(cut_every_bytes=int(total / 2.5) // (cuts + 1), max_cuts=cuts,
                            seed=11)
    async with fp.FaultProxy(("127.0.0.1", rb.ports["peer"]), config=config) as proxy:
        pull_from(a, ra, b, f"https://127.0.0.1:{proxy.port}")
        await wait_for(lambda: converged([a, b]), 60, "A to pull through the cuts",
                       step=0.2, describe=lambda: (describe_nodes([a, b]),
                                                   proxy.stats.snapshot()))
        stats = proxy.stats.snapshot()
        state = await settled_state(a, b)
    assert stats["cuts"] >= 3, stats
    assert_blobs_intact(a)
    assert blob_set(a) == blob_set(b) == a.catalog.referenced_blobs()
    assert not list(a.store.tmp_dir.glob("*.part"))
    assert state["integrity_errors"] == 0
    assert state["bytes_resumed"] > 0
    # Only whole verified chunks are kept: at most one chunk of blob bytes again per cut.
    assert 0 <= state["bytes_received"] - total <= stats["cuts"] * CHUNK_SIZE
    # compressed on the wire (~0.4 of the bytes), plus what each cut threw away of the
    # compressed streams in flight (both blobs are pulled at once)
    assert stats["bytes_down"] < 0.4 * total + stats["cuts"] * 2 * CHUNK_SIZE
    assert stats["bytes_down"] < 0.8 * total


class _Resp:
    """Just enough of an aiohttp response for PeerClient's receive loop."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.content = types.SimpleNamespace(read=self._read)

    async def _read(self, n: int = -1) -> bytes:
        piece, self._body = self._body[:n], self._body[n:]
        return piece


async def test_a_lying_compressed_answer_never_reaches_the_store(tmp_path: Path) -> None:
    """Frames that decode fine but to other bytes (a peer lying above TLS) are refused by
    the chunk check; nothing but verified chunks stays in the part file."""
    from syncnode.blobstore import BlobStore, ChunkHasher
    from syncnode.blobstore import chunks_root as root_of
    from syncnode.transfer import PartialBlob

    store = BlobStore(tmp_path / "store")
    # compressible: random nibbles (made in C: a Python loop over 12 MiB took 15 s)
    nibble = bytes.maketrans(bytes(range(256)), bytes(i & 15 for i in range(256)))
    good = random.Random(1).randbytes(3 * CHUNK_SIZE).translate(nibble)
    hasher = ChunkHasher()
    hasher.update(good)
    digest, digests = hasher.finish()
    lie = good[:CHUNK_SIZE] + bytes(CHUNK_SIZE) + good[2 * CHUNK_SIZE:]
    part = PartialBlob(store, digest, len(good), digests, root_of(digests))
    with pytest.raises(TransferError, match="chunk 1"):
        await PeerClient._receive_compressed(_Resp(frames_of(lie)), part, None, None)
    part.close()
    assert store.part_path(digest).stat().st_size == CHUNK_SIZE  # chunk 0 only
    assert not store.has(digest)
