"""``multipart/related`` bodies (RFC 2387) as WADO-RS sends and STOW-RS receives them.

Writing is a handful of byte strings around each part. Reading is sans-IO
(:class:`MultipartParser`): fed bytes as they arrive, it returns events (a part's headers,
a piece of its body, its end, the end of the whole body) and never holds more than one
boundary's length of a part in memory, so a part of any size streams to disk. A body that
ends before its closing boundary is :class:`MultipartError` ("truncated"), as is any other
violation of the format.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 << 10  # of one part's header block


class MultipartError(ValueError):
    """A body that is not a well-formed multipart/related message (the message says how)."""


def new_boundary() -> str:
    return "syncnode-" + secrets.token_hex(16)


def part_head(boundary: str, content_type: str, length: int | None = None,
              location: str | None = None) -> bytes:
    """The delimiter and headers before one part's body (the first part too)."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if location is not None:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


PART_END = b"\r\n"


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def content_type(media: str, boundary: str, **params: str) -> str:
    extra = "".join(f'; {k.replace("_", "-")}={v}' for k, v in params.items())
    return f'multipart/related; type="{media}"; boundary={boundary}{extra}'


def parse_media(header: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c="d"`` -> (``type/subtype`` lower-cased, {a: b, c: d})."""
    parts = _split_params(header)
    media = parts[0].strip().lower() if parts else ""
    params: dict[str, str] = {}
    for p in parts[1:]:
        name, sep, value = p.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"')
    return media, params


def _split_params(text: str) -> list[str]:
    out, cur, quoted = [], [], False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == ";" and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return out


@dataclass(slots=True)
class PartStart:
    headers: dict[str, str]  # names lower-cased


@dataclass(slots=True)
class PartData:
    data: bytes


@dataclass(slots=True)
class PartEnd:
    pass


@dataclass(slots=True)
class BodyEnd:
    pass


Event = PartStart | PartData | PartEnd | BodyEnd


class MultipartParser:
    """Sans-IO reader of a multipart body: ``feed(data)`` returns the events those bytes
    complete; ``finish()`` at the end of the input raises :class:`MultipartError` when the
    closing delimiter was not seen."""

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("the multipart boundary is missing or too long")
        self._delim = b"\r\n--" + boundary.encode("latin-1")
        self._buf = bytearray(b"\r\n")  # so the first delimiter matches like the others
        self._state = "preamble"  # preamble, after_delim, headers, body, done
        self.parts = 0

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            if self._state == "preamble":
                i = self._buf.find(self._delim)
                if i < 0:
                    keep = len(self._delim)
                    if len(self._buf) > keep:
                        del self._buf[:-keep]
                    return events
                del self._buf[:i + len(self._delim)]
                self._state = "after_delim"
            elif self._state == "after_delim":
                if len(self._buf) < 2:
                    return events
                if self._buf[:2] == b"--":
                    self._state = "done"
                    events.append(BodyEnd())
                    self._buf.clear()
                    return events
                i = self._buf.find(b"\r\n")
                if i < 0:
                    if len(self._buf) > 1024:
                        raise MultipartError("garbage after a multipart delimiter")
                    return events
                if self._buf[:i].strip(b" \t"):
                    raise MultipartError("garbage after a multipart delimiter")
                del self._buf[:i + 2]
                self._state = "headers"
            elif self._state == "headers":
                i = self._buf.find(b"\r\n\r\n")
                if self._buf.startswith(b"\r\n"):
                    i, skip = 0, 2
                else:
                    skip = 4
                if i < 0:
                    if len(self._buf) > MAX_HEADER_BYTES:
                        raise MultipartError("a part's headers are too long")
                    return events
                events.append(PartStart(_headers(bytes(self._buf[:i]))))
                del self._buf[:i + skip]
                self.parts += 1
                self._state = "body"
            elif self._state == "body":
                i = self._buf.find(self._delim)
                if i < 0:
                    # keep a tail that may be the start of the delimiter
                    safe = len(self._buf) - len(self._delim) + 1
                    if safe > 0:
                        events.append(PartData(bytes(self._buf[:safe])))
                        del self._buf[:safe]
                    return events
                if i:
                    events.append(PartData(bytes(self._buf[:i])))
                events.append(PartEnd())
                del self._buf[:i + len(self._delim)]
                self._state = "after_delim"
            else:  # done: an epilogue is ignored
                self._buf.clear()
                return events

    def finish(self) -> None:
        if self._state != "done":
            raise MultipartError("the multipart body is truncated: it ends before its "
                                 "closing boundary")


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError("a part header line is not 'Name: value'")
        out[name.strip().lower()] = value.strip()
    return out
