"""Wire compression of blob bytes: zstd, one frame per 1 MiB chunk.

Negotiated per request: a puller that wants it sends ``Accept-Encoding: zstd`` with its
blob GET; a server that agrees answers ``Content-Encoding: zstd``. The body is then a
standard zstd stream (RFC 8878) made of one frame per chunk of the requested range, each
frame declaring its decompressed size. Ranges always count blob bytes, not compressed
bytes, and a compressed answer starts on a chunk boundary, so a transfer cut anywhere
resumes exactly as an uncompressed one does.

The receiver checks, before decompressing a frame, that it declares exactly the size of
the chunk it should carry: a frame can never expand beyond one chunk (no decompression
bombs), and every decompressed chunk is then verified against its digest as usual.

Whether to ask is the puller's choice (``compression`` setting): ``auto`` asks for peers
that are not on this machine, and only for instances whose transfer syntax is not already
compressed; CT and MR in native syntaxes shrink about 2x, which doubles what a WAN link
carries. On loopback or a fast LAN the CPU cost outweighs the gain, so ``auto`` leaves it off
there.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from urllib.parse import urlsplit

import zstandard

ENCODING = "zstd"
LEVEL = 1  # fast: ~300-500 MB/s per core, CT about 2x smaller
MODES = ("auto", "on", "off")
# Native (uncompressed) transfer syntaxes: worth compressing on the wire. Others (JPEG,
# JPEG-LS, JPEG 2000, RLE, deflate, MPEG...) are already compressed.
NATIVE_SYNTAXES = frozenset({
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "",  # unknown: try
})
_MAX_FRAME_HEADER = 18  # ZSTD_FRAMEHEADERSIZE_MAX

_local = threading.local()


class FrameError(ValueError):
    """A compressed body that does not decode to the expected chunks."""


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "compressor", None)
    if c is None:  # one per thread: a ZstdCompressor must not be shared between threads
        c = _local.compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    return c


def compress_chunk(chunk: bytes) -> bytes:
    """One chunk as one zstd frame that declares its size. Blocking (run in a thread)."""
    return _compressor().compress(chunk)


def accepts(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header value allows zstd (and does not refuse it)."""
    if not header:
        return False
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() == ENCODING:
            params = params.strip()
            q = params[2:].strip() if params.startswith("q=") else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


@functools.lru_cache(maxsize=256)
def is_local_url(url: str) -> bool:
    """A peer URL on this machine (loopback address or ``localhost``)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def want_compression(mode: str, peer_url: str, transfer_syntax: str) -> bool:
    """Whether a pull from ``peer_url`` of an instance in ``transfer_syntax`` asks for zstd."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    return transfer_syntax in NATIVE_SYNTAXES and not is_local_url(peer_url)


class ChunkFrames:
    """Decodes a compressed blob body into whole chunks, frame by frame.

    ``sizes`` are the decompressed sizes of the chunks the body must carry, in order.
    :meth:`feed` takes compressed bytes in any pieces and returns the chunks completed by
    them; :meth:`finish` checks nothing is missing or left over. Blocking (run in a thread).
    """

    def __init__(self, sizes: list[int]) -> None:
        self._sizes = sizes
        self._next = 0  # index into sizes of the chunk being decoded
        self._buf = bytearray()
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._out: list[bytes] = []
        self._out_len = 0

    @property
    def done(self) -> bool:
        return self._next >= len(self._sizes)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        chunks: list[bytes] = []
        while self._buf:
            if self._obj is None:
                if self.done:
                    raise FrameError("compressed body goes on after its last chunk")
                if not self._start_frame():
                    break  # header incomplete: wait for more bytes
            assert self._obj is not None
            data, self._buf = bytes(self._buf), bytearray()
            try:
                piece = self._obj.decompress(data)
            except zstandard.ZstdError as exc:
                raise FrameError(f"chunk {self._next} does not decompress: {exc}") from exc
            self._out.append(piece)
            self._out_len += len(piece)
            want = self._sizes[self._next]
            if self._out_len > want:
                raise FrameError(f"chunk {self._next} decompresses to more than {want} bytes")
            if self._obj.eof:
                if self._out_len != want:
                    raise FrameError(f"chunk {self._next} decompressed to {self._out_len} "
                                     f"bytes, not {want}")
                chunks.append(b"".join(self._out))
                self._out, self._out_len = [], 0
                self._buf = bytearray(self._obj.unused_data)
                self._obj = None
                self._next += 1
        return chunks

    def _start_frame(self) -> bool:
        """Check the next frame's header declares the next chunk's size; False if the
        header is not complete yet."""
        want = self._sizes[self._next]
        try:
            declared = zstandard.frame_content_size(bytes(self._buf[:_MAX_FRAME_HEADER]))
        except zstandard.ZstdError as exc:
            if len(self._buf) >= _MAX_FRAME_HEADER:
                raise FrameError(f"chunk {self._next}: not a zstd frame ({exc})") from exc
            return False
        if declared != want:
            raise FrameError(f"chunk {self._next}: frame declares {declared} bytes, "
                             f"the chunk has {want}")
        self._obj = self._dctx.decompressobj()
        return True

    def finish(self) -> None:
        if self._buf or self._obj is not None or not self.done:
            raise FrameError(f"compressed body ended inside chunk {self._next} of "
                             f"{len(self._sizes)}")


def decompress_chunk(frame: bytes, size: int) -> bytes:
    """The content of one zstd frame that must declare, and hold, exactly ``size`` bytes
    (at most one chunk: checked before decompressing). Raises FrameError. Blocking."""
    frames = ChunkFrames([size])
    chunks = frames.feed(frame)
    frames.finish()
    return chunks[0]


def chunk_sizes(start: int, end: int, chunk_size: int) -> list[int]:
    """Sizes of the chunks covering blob bytes [start, end), ``start`` on a boundary."""
    return [min(chunk_size, end - pos) for pos in range(start, end, chunk_size)]


def max_frame_size(size: int) -> int:
    """Upper bound of the compressed size of ``size`` bytes (zstd's compress bound)."""
    return size + (size >> 8) + 512


__all__ = ["ENCODING", "MODES", "ChunkFrames", "FrameError", "accepts", "chunk_sizes",
           "compress_chunk", "decompress_chunk", "is_local_url", "max_frame_size",
           "want_compression"]
