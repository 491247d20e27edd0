"""Properties of the compressed wire format (syncnode.wire), for any data, chunk size,
piece sizes, resume point and damage."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode import wire

SETTINGS = settings(max_examples=150, deadline=None)

# Compressible or not: runs of few symbols, or arbitrary bytes.
data_strategy = st.one_of(
    st.binary(max_size=20_000),
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 700)), max_size=60).map(
        lambda runs: b"".join(bytes([b]) * n for b, n in runs)),
)


def encode(data: bytes, start: int, chunk: int) -> bytes:
    return b"".join(wire.compress_chunk(data[i:i + chunk])
                    for i in range(start, len(data), chunk))


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts})
    edges = [0, *points, len(body)]
    return [body[a:b] for a, b in pairwise(edges)]


@SETTINGS
@given(data=data_strategy, chunk=st.integers(1, 4096), first=st.integers(0, 10_000),
       cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_range_from_a_chunk_boundary_decodes_in_any_pieces(
        data: bytes, chunk: int, first: int, cuts: list[int]) -> None:
    """What a resumed pull asks for (from any chunk boundary) decodes to exactly those
    chunks, however the stream is cut into reads."""
    start = min(first // chunk * chunk, len(data) // chunk * chunk)
    sizes = wire.chunk_sizes(start, len(data), chunk)
    dec = wire.ChunkFrames(sizes)
    out: list[bytes] = []
    for piece in split(encode(data, start, chunk), cuts):
        out += dec.feed(piece)
    dec.finish()
    assert [len(c) for c in out] == sizes
    assert b"".join(out) == data[start:]


@SETTINGS
@given(data=data_strategy.filter(bool), chunk=st.integers(1, 4096),
       where=st.integers(0, 10**6), flip=st.integers(1, 255),
       cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_damage_is_refused_or_yields_only_chunks_of_the_right_size(
        data: bytes, chunk: int, where: int, flip: int, cuts: list[int]) -> None:
    """A damaged stream either raises FrameError or decodes to chunks of exactly the
    expected sizes (whose content the chunk digests then judge): never anything else, and
    never more bytes than asked for."""
    sizes = wire.chunk_sizes(0, len(data), chunk)
    body = bytearray(encode(data, 0, chunk))
    body[where % len(body)] ^= flip
    dec = wire.ChunkFrames(sizes)
    out: list[bytes] = []
    try:
        for piece in split(bytes(body), cuts):
            out += dec.feed(piece)
        dec.finish()
    except wire.FrameError:
        assert [len(c) for c in out] == sizes[:len(out)]
        return
    assert [len(c) for c in out] == sizes
