"""Properties of the pack answer decoder (syncnode.protocol.PackReader): an honest answer
decodes to exactly its frames, in order; any other bytes (a mutated answer, or noise) end
in ProtocolError or in frames that still keep every bound: only the blobs asked for, in
the order asked, each with its announced size and a payload no longer than its limit. The
reader never asks for more than one frame's worth of bytes at once. A pushed pack's frame
headers, checked one by one as the peer server reads them, keep the caps of a whole pack
whatever a pusher sends."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode import protocol
from syncnode.blobstore import CHUNK_SIZE
from syncnode.protocol import PackFrame, PackReader, ProtocolError

SETTINGS = settings(max_examples=300, deadline=None)


def blob_id(i: int) -> str:
    return hashlib.blake2b(i.to_bytes(4, "big"), digest_size=32).hexdigest()


# what was asked for: distinct blobs with their announced sizes (small, to keep it fast;
# the limits scale with the size)
expected_strategy = st.lists(st.integers(0, 3000), min_size=1, max_size=6).map(
    lambda sizes: [(blob_id(i), n) for i, n in enumerate(sizes)])


@st.composite
def honest_answer(draw: st.DrawFn) -> tuple[list[tuple[str, int]], bytes, list[PackFrame]]:
    """An answer a correct server could send, and the frames it must decode to."""
    expected = draw(expected_strategy)
    body, frames = b"", []
    for blob, size in expected:
        status = draw(st.sampled_from(sorted(protocol.PACK_STATUSES)))
        if status == protocol.RAW:
            payload = draw(st.binary(min_size=size, max_size=size))
        elif status == protocol.ZSTD:
            payload = draw(st.binary(min_size=1, max_size=protocol.pack_payload_limit(size)))
        else:
            payload = b""
        announced = 0 if status == protocol.ABSENT else size
        body += protocol.pack_frame_header(blob, status, announced, len(payload)) + payload
        frames.append(PackFrame(blob, status, announced, payload))
    return expected, body, frames


def decode(reader: PackReader, body: bytes, largest: int) -> tuple[list[PackFrame], int]:
    """Feed ``body`` as a client does (exactly what need() asks, while there is enough);
    returns the frames and the bytes left unread. Checks the read bound on every step."""
    frames, at = [], 0
    while n := reader.need():
        assert n <= max(protocol.PACK_HEADER_SIZE, protocol.pack_payload_limit(largest))
        if at + n > len(body):
            break  # the answer ended early: the caller reports the blobs still due
        frame = reader.feed(body[at:at + n])
        at += n
        if frame is not None:
            frames.append(frame)
    return frames, len(body) - at


@SETTINGS
@given(answer=honest_answer())
def test_an_honest_answer_decodes_to_its_frames_in_order(
        answer: tuple[list[tuple[str, int]], bytes, list[PackFrame]]) -> None:
    expected, body, frames = answer
    reader = PackReader(expected)
    got, left = decode(reader, body, max(n for _, n in expected))
    assert got == frames and left == 0
    assert reader.done and reader.missing() == []


def check_bounds(frames: list[PackFrame], expected: list[tuple[str, int]]) -> None:
    assert [f.blob for f in frames] == [b for b, _ in expected[:len(frames)]]
    for frame, (_, size) in zip(frames, expected, strict=False):
        assert frame.status in protocol.PACK_STATUSES
        if frame.status != protocol.ABSENT:
            assert frame.size == size
        if frame.status in (protocol.RAW, protocol.ZSTD):
            assert len(frame.payload) <= protocol.pack_payload_limit(size)
            if frame.status == protocol.RAW and len(frame.payload) != size:
                assert frame.problem  # refused alone, never installed
        else:
            assert frame.payload == b""


@SETTINGS
@given(answer=honest_answer(), data=st.data())
def test_a_mutated_answer_is_refused_or_keeps_every_bound(
        answer: tuple[list[tuple[str, int]], bytes, list[PackFrame]],
        data: st.DataObject) -> None:
    expected, body, _ = answer
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(mutated) - 1, 0)))
        if kind == "flip" and mutated:
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del mutated[at:]
        elif kind == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        elif mutated:
            del mutated[at:at + data.draw(st.integers(1, 64))]
    reader = PackReader(expected)
    try:
        frames, _ = decode(reader, bytes(mutated), max(n for _, n in expected))
    except ProtocolError:
        return
    check_bounds(frames, expected)


@SETTINGS
@given(expected=expected_strategy, noise=st.binary(max_size=4000))
def test_noise_is_refused_or_keeps_every_bound(expected: list[tuple[str, int]],
                                               noise: bytes) -> None:
    reader = PackReader(expected)
    try:
        frames, _ = decode(reader, noise, max(n for _, n in expected))
    except ProtocolError:
        return
    check_bounds(frames, expected)


@SETTINGS
@given(answer=honest_answer(), data=st.data())
def test_a_header_with_one_field_wrong_is_refused_before_its_payload(
        answer: tuple[list[tuple[str, int]], bytes, list[PackFrame]],
        data: st.DataObject) -> None:
    """Another blob's hash, a size other than the put event's, an unknown status or a
    payload longer than the limit: refused from the header alone (nothing of the payload
    is asked for), whatever came before it."""
    expected, body, frames = answer
    k = data.draw(st.integers(0, len(frames) - 1))
    offset = sum(protocol.PACK_HEADER_SIZE + len(f.payload) for f in frames[:k])
    size = expected[k][1]
    raw, status, announced, length = protocol.PACK_HEADER.unpack(
        body[offset:offset + protocol.PACK_HEADER_SIZE])
    field = data.draw(st.sampled_from(["hash", "size", "status", "length"]))
    if field == "hash":
        raw = bytes.fromhex(data.draw(st.integers(100, 10**6).map(blob_id)))
    elif field == "size":
        status = data.draw(st.sampled_from([protocol.RAW, protocol.ZSTD, protocol.DAMAGED,
                                            protocol.NOT_PACKED]))
        announced = data.draw(st.integers(0, 2**64 - 1).filter(lambda n: n != size))
        length = 0
    elif field == "status":
        status = data.draw(st.integers(0, 255).filter(
            lambda s: s not in protocol.PACK_STATUSES))
    else:
        status = data.draw(st.sampled_from([protocol.RAW, protocol.ZSTD]))
        length = data.draw(st.integers(protocol.pack_payload_limit(size) + 1, 2**32 - 1))
    header = protocol.PACK_HEADER.pack(raw, status, announced, length)
    reader = PackReader(expected)
    _, left = decode(reader, body[:offset], max(n for _, n in expected))
    assert left == 0 and reader.need() == protocol.PACK_HEADER_SIZE
    try:
        reader.feed(header)
    except ProtocolError:
        return
    raise AssertionError(f"a header with a wrong {field} was taken: {reader.need()} bytes "
                         "of payload asked for")


# A pushed pack's frame headers, as a hostile pusher might send them: mostly well formed
# (so that long runs reach the caps on blobs and bytes), blobs from a pool in which some
# repeat, now and then a wrong status, a size past a chunk or a length past its limit.
@st.composite
def push_header(draw: st.DrawFn) -> bytes:
    blob = blob_id(draw(st.integers(0, 400)))
    status = draw(st.sampled_from([protocol.RAW] * 5 + [protocol.ZSTD] * 4
                                  + [protocol.ABSENT, protocol.DAMAGED, 7, 255]))
    size = draw(st.one_of(st.integers(0, 120_000), st.integers(0, 120_000),
                          st.integers(CHUNK_SIZE - 2, CHUNK_SIZE + 2),
                          st.integers(0, 2**64 - 1)))
    limit = protocol.pack_payload_limit(size)
    if status == protocol.RAW:
        length = draw(st.one_of(st.just(size), st.just(size), st.just(size),
                                st.integers(0, 2**32 - 1)))
    else:
        length = draw(st.one_of(st.integers(0, limit), st.integers(0, limit),
                                st.integers(limit, limit + 2), st.integers(0, 2**32 - 1)))
    return protocol.PACK_HEADER.pack(bytes.fromhex(blob), status, size,
                                     min(length, 2**32 - 1))


@st.composite
def well_formed_push(draw: st.DrawFn) -> list[bytes]:
    """Well-formed headers of distinct blobs, small or up to a chunk: long enough runs to
    reach the caps on blobs (PACK_MAX_BLOBS) and on bytes (PACK_MAX_BYTES)."""
    n = draw(st.integers(0, 80))
    sizes = draw(st.lists(st.one_of(st.integers(0, 70_000), st.integers(0, CHUNK_SIZE)),
                          min_size=n, max_size=n))
    out = []
    for i, size in enumerate(sizes):
        zstd = draw(st.booleans())
        length = draw(st.integers(0, protocol.pack_payload_limit(size))) if zstd else size
        out.append(protocol.PACK_HEADER.pack(bytes.fromhex(blob_id(1000 + i)),
                                             protocol.ZSTD if zstd else protocol.RAW,
                                             size, length))
    return out


@SETTINGS
@given(run=well_formed_push(), hostile=st.lists(push_header(), max_size=30),
       at=st.integers(0, 80))
def test_a_pushed_packs_headers_keep_every_cap_together(run: list[bytes],
                                                        hostile: list[bytes],
                                                        at: int) -> None:
    """Headers are checked one by one against what came before (as the peer server reads
    a pushed pack): whatever a pusher sends, what is taken before the first refusal keeps
    the caps of a whole pack: RAW or ZSTD only, no blob twice, at most PACK_MAX_BLOBS
    blobs of at most one chunk and PACK_MAX_BYTES in all, each payload within its limit."""
    headers = run[:at] + hostile + run[at:]
    seen: set[str] = set()
    total = 0
    for header in headers:
        try:
            blob, status, size, length = protocol.parse_push_frame_header(header, seen, total)
        except protocol.BadRequest:
            break
        assert status in (protocol.RAW, protocol.ZSTD)
        assert size <= CHUNK_SIZE and length <= protocol.pack_payload_limit(size)
        assert status != protocol.RAW or length == size
        assert blob not in seen
        seen.add(blob)
        total += size
    assert len(seen) <= protocol.PACK_MAX_BLOBS and total <= protocol.PACK_MAX_BYTES


def test_the_payload_limit_never_exceeds_a_chunk_and_its_bound() -> None:
    assert protocol.pack_payload_limit(10 * CHUNK_SIZE) == protocol.pack_payload_limit(CHUNK_SIZE)
    assert protocol.pack_payload_limit(0) == 512
