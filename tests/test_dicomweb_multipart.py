"""The multipart/related reader, without a network: any split of the input gives the same
parts, a part never needs the whole body in memory, and a body without its closing
delimiter is refused as truncated."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode.dicomweb.multipart import (
    BodyEnd,
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    closing,
    part_head,
)


def body(parts: list[bytes], boundary: str = "b0und") -> bytes:
    return b"".join(part_head(boundary, "application/dicom") + p + b"\r\n"
                    for p in parts) + closing(boundary)


def parse(data: bytes, cuts: list[int], boundary: str = "b0und") -> list[bytes]:
    parser = MultipartParser(boundary)
    out: list[bytes] = []
    cur: list[bytes] = []
    ended = False
    pos = 0
    for cut in [*sorted(cuts), len(data)]:
        for ev in parser.feed(data[pos:cut]):
            if isinstance(ev, PartStart):
                assert ev.headers["content-type"] == "application/dicom"
                cur = []
            elif isinstance(ev, PartData):
                assert len(ev.data) <= max(cut - pos, 0) + 64  # no whole-part buffering
                cur.append(ev.data)
            elif isinstance(ev, PartEnd):
                out.append(b"".join(cur))
            elif isinstance(ev, BodyEnd):
                ended = True
        pos = max(pos, cut)
    parser.finish()
    assert ended
    return out


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 1500), max_size=12))
def test_any_split_gives_the_same_parts(parts: list[bytes], cuts: list[int]) -> None:
    # parts that look like the delimiter's start do not end early
    parts = [p.replace(b"\r\n--b0und", b"\r\n--b0unX") for p in parts]
    assert parse(body(parts), cuts) == parts


def test_a_part_holding_delimiter_lookalikes() -> None:
    tricky = [b"\r\n--b0un", b"--b0und", b"x\r\n-", b"\r\n--b0unddd"[:-4] + b"Z"]
    assert parse(body(tricky), list(range(0, 200, 3))) == tricky


@pytest.mark.parametrize("cut", [10, 40, -30, -12, -3])
def test_truncated_bodies_are_refused(cut: int) -> None:
    data = body([b"A" * 50, b"B" * 20])[:cut]
    parser = MultipartParser("b0und")
    parser.feed(data)
    with pytest.raises(MultipartError, match="truncated"):
        parser.finish()


def test_headers_too_long_or_malformed() -> None:
    with pytest.raises(MultipartError):
        MultipartParser("b").feed(b"--b\r\n" + b"X" * 20000)
    with pytest.raises(MultipartError):
        MultipartParser("b").feed(b"--b\r\nno colon here\r\n\r\nbody\r\n--b--\r\n")
