"""WADO-RS (PS3.18 10.4): what a retrieve sends, decided apart from the HTTP adapter.

- **Instances** leave as their stored Part-10 bytes, unchanged (``transfer-syntax=*``):
  :func:`instance_pieces` yields them a piece at a time, so a whole study streams with
  bounded memory. Every read here goes through :meth:`BlobStore.read_known`: a blob whose
  file is unchanged since it was last hashed intact is not hashed again, any other is
  verified against its chunk hashes (a damaged blob is never sent); see
  :mod:`syncnode.knowngood` for what that trusts.
  Asking for another transfer syntax is 406: nothing is transcoded here.
- **Metadata** is each instance's data set as DICOM JSON, bulk data (pixel data included)
  by ``BulkDataURI`` pointing at this node's ``.../bulk/{tag}`` route.
- **Frames**: native pixel data is sliced (for an instance over ``IN_MEMORY``, each frame
  read at its offset in the verified file; encapsulated ones frame by frame from the file:
  memory holds the asked frames, not the pixel data); encapsulated pixel data gives the frame's
  fragments in the stored syntax (``image/jpeg``, ``image/jp2``, ``image/jls``,
  ``image/dicom-rle`` ...). ``application/octet-stream`` with an explicit uncompressed
  syntax is decoded when the stored syntax is lossless and decodable here, else 406.
- **Rendered**: one frame, modality LUT and the data set's first window (else the frame's
  min/max), to PNG (default) or JPEG; RGB and YBR images as colour; fitted to a
  ``viewport`` when asked. **Thumbnails** of an instance, a series (its middle instance)
  or a study (the middle instance of its first series), the next candidate tried when one
  has nothing to render (:func:`thumbnail_order`).

Every function here blocks (disk, hashing, decoding): the adapter runs them in a worker
thread. Errors are :class:`WadoError` with the HTTP status to answer.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..blobstore import BlobError, BlobStore
from ..catalog import Instance
from ..knowngood import Fingerprint
from .json import dataset_json
from .multipart import parse_media

IN_MEMORY = 16 << 20  # an instance up to this size is read (verified) into memory at once
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
# stored syntax -> frame media type (PS3.18 table 8.7.3-2)
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}
LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.5"}
OCTET = "application/octet-stream"


class WadoError(Exception):
    """A retrieve that cannot be answered; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def accept_ranges(header: str | None) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header, in order (q-values ignored), multipart ones
    as (their ``type``, params). Empty for none or ``*/*``."""
    out = []
    for item in _split_top(header or ""):
        media, params = parse_media(item)
        if media == "multipart/related":
            media = params.get("type", "").lower()
        if media in ("", "*/*", "*"):
            continue
        out.append((media, params))
    return out


def _split_top(text: str) -> list[str]:
    out, cur, quoted = [], [], False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return [s for s in (p.strip() for p in out) if s]


def wants_single_part(header: str | None) -> bool:
    """Does the Accept header ask for the bare value (``application/octet-stream``, not
    inside ``multipart/related``) before any multipart form?"""
    for item in _split_top(header or ""):
        media, _ = parse_media(item)
        if media == "multipart/related":
            return False
        if media == OCTET:
            return True
    return False


def check_instance_accept(header: str | None, stored: list[str]) -> None:
    """Refuse (406) an Accept that no range of stored bytes satisfies: the stored syntax
    of every instance is sent, never another one."""
    ranges = accept_ranges(header)
    if not ranges:
        return
    for media, params in ranges:
        if media not in ("application/dicom", "application/*"):
            continue
        ts = params.get("transfer-syntax", "*")
        if ts == "*" or all(s == ts for s in stored):
            return
    raise WadoError("this node sends the stored bytes unchanged: ask for "
                    "multipart/related; type=\"application/dicom\"; transfer-syntax=*", 406)


def instance_pieces(store: BlobStore, inst: Instance) -> Iterator[bytes]:
    """The stored bytes, a piece at a time (known good, or checked as read)."""
    return store.read_known(inst.blob)


def read_whole(store: BlobStore, inst: Instance) -> bytes:
    """A small instance's stored bytes, known good or verified (the adapter's fast path)."""
    try:
        return store.read_known_whole(inst.blob)
    except (BlobError, OSError) as exc:
        raise _unreadable(inst, exc) from exc


GROUP_BYTES = 8 << 20  # small instances read in one worker-thread job, up to this size
GROUP_COUNT = 64


def read_groups(instances: list[Instance]) -> list[list[Instance]]:
    """Consecutive small instances in groups of up to GROUP_BYTES / GROUP_COUNT (read
    together by :func:`read_group`); each large instance alone. Order is kept."""
    groups: list[list[Instance]] = []
    size = 0
    for inst in instances:
        small = inst.size <= IN_MEMORY
        if (small and groups and groups[-1][0].size <= IN_MEMORY
                and len(groups[-1]) < GROUP_COUNT and size + inst.size <= GROUP_BYTES):
            groups[-1].append(inst)
            size += inst.size
        else:
            groups.append([inst])
            size = inst.size
    return groups


def read_group(store: BlobStore, group: list[Instance]) -> list[bytes]:
    """The stored bytes of a group of small instances, each known good or verified."""
    return [read_whole(store, inst) for inst in group]


SENDFILE_MIN = 64 << 10  # a smaller instance is cheaper joined to its part head in memory


@dataclass(frozen=True, slots=True)
class Ready:
    """One instance of a retrieve, ready to go: its bytes (``data``), or, for a known-good
    blob sent from its file as is (``sendfile``), the stat its file must still have."""

    inst: Instance
    data: bytes | None
    stat: Fingerprint | None = None


def prepare_group(store: BlobStore, group: list[Instance], files: bool) -> list[Ready]:
    """A group of instances ready to send. With ``files`` (the connection can take
    ``sendfile``), a known-good blob of at least SENDFILE_MIN bytes is only checked and
    prefetched into the page cache; every other one is read (verified unless known
    good). Blocking: run it in a worker thread."""
    out = []
    for inst in group:
        if files and inst.size >= SENDFILE_MIN:
            try:
                stat = store.known_fingerprint(inst.blob, prefetch=True)
            except (BlobError, OSError) as exc:
                raise _unreadable(inst, exc) from exc
            if stat is not None:
                out.append(Ready(inst, None, stat))
                continue
        out.append(Ready(inst, None if inst.size > IN_MEMORY else read_whole(store, inst)))
    return out


def _unreadable(inst: Instance, exc: BaseException) -> WadoError:
    return WadoError(f"instance {inst.sop_instance_uid} cannot be read from this node's "
                     f"store ({type(exc).__name__}); run `syncnode verify --repair`", 500)


def load(store: BlobStore, inst: Instance, *, pixels: bool = True) -> Dataset:
    """The stored data set, read only after its bytes were verified. Large instances are
    read from the file with their big values deferred (left on disk until used)."""
    if inst.size <= IN_MEMORY:
        data = read_whole(store, inst)
        return dcmread(io.BytesIO(data), stop_before_pixels=not pixels, force=True)
    try:
        known = store.open_known(inst.blob)
        if known is not None:
            known[0].close()  # unchanged since found intact: nothing to read here
        else:
            for _ in store.read_verified(inst.blob):
                pass
    except (BlobError, OSError) as exc:
        raise _unreadable(inst, exc) from exc
    return dcmread(store.path(inst.blob), stop_before_pixels=not pixels, defer_size=1 << 16,
                   force=True)


def instance_url(base: str, inst: Instance) -> str:
    return (f"{base}/studies/{inst.study_instance_uid}/series/{inst.series_instance_uid}"
            f"/instances/{inst.sop_instance_uid}")


def metadata(store: BlobStore, inst: Instance, base: str) -> dict[str, Any]:
    ds = load(store, inst, pixels=inst.size <= IN_MEMORY)
    url = instance_url(base, inst)
    out = dataset_json(ds, lambda tag: f"{url}/bulk/{tag}")
    if inst.size > IN_MEMORY and "Rows" in ds:  # pixel data not read: known to be there
        out["7FE00010"] = {"vr": "OW", "BulkDataURI": f"{url}/bulk/7FE00010"}
    # what the catalog knows for sure, whatever the file meta says
    out["00020010"] = {"vr": "UI", "Value": [inst.transfer_syntax_uid]}
    return dict(sorted(out.items()))


def bulk(store: BlobStore, inst: Instance, tag: int) -> bytes:
    """The value of a top-level binary element (pixel data: its stored value, fragments
    and all)."""
    ds = load(store, inst)
    elem = ds.get(tag)
    if elem is None or not isinstance(elem.value, (bytes, bytearray)):
        raise WadoError(f"instance {inst.sop_instance_uid} has no bulk data {tag:08X}", 404)
    return bytes(elem.value)


@dataclass
class Frames:
    media: str  # of each part
    transfer_syntax: str
    parts: list[bytes]


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _choose(accept: str | None, stored_ts: str) -> tuple[str, str, bool]:
    """(media, transfer syntax, decode?) for frames, or 406."""
    encapsulated = stored_ts in FRAME_MEDIA
    stored_media = FRAME_MEDIA.get(stored_ts, OCTET)
    ranges = accept_ranges(accept) or [("*", {"transfer-syntax": "*"})]
    for media, params in ranges:
        ts = params.get("transfer-syntax")
        if media in ("*", "*/*") or (ts == "*" and media in (OCTET, stored_media)):
            return stored_media, stored_ts, False
        if media == stored_media and ts in (None, stored_ts):
            if not encapsulated and stored_ts != EXPLICIT_LE and ts is None:
                continue  # native but not Explicit VR LE: the bytes are not the default
            return stored_media, stored_ts, False
        if media == OCTET and ts in (None, EXPLICIT_LE) and encapsulated \
                and stored_ts in LOSSLESS:
            return OCTET, EXPLICIT_LE, True
    raise WadoError(f"frames of this instance are stored as {UID(stored_ts).name}: ask for "
                    f"{stored_media} (or transfer-syntax=*)"
                    + ("; uncompressed is only given for lossless syntaxes"
                       if encapsulated else ""), 406)


def frames(store: BlobStore, inst: Instance, numbers: list[int],
           accept: str | None) -> Frames:
    ds = load(store, inst)
    if "PixelData" not in ds:
        raise WadoError(f"instance {inst.sop_instance_uid} has no pixel data", 404)
    stored_ts = str(ds.file_meta.get("TransferSyntaxUID", inst.transfer_syntax_uid))
    count = _frame_count(ds)
    bad = [n for n in numbers if not 1 <= n <= count]
    if bad:
        raise WadoError(f"frame {bad[0]} is not in 1..{count}", 404)
    media, ts, decode = _choose(accept, stored_ts)
    if decode:
        return Frames(media, ts, [_decoded_frame(ds, n - 1) for n in numbers])
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    on_disk = (inst.size > IN_MEMORY and stored_ts != DEFLATED
               and getattr(raw, "value", b"") is None)  # deferred: still in the file
    if stored_ts in FRAME_MEDIA:
        from pydicom.encaps import generate_frames

        wanted = set(numbers)
        got: dict[int, bytes] = {}
        with contextlib.ExitStack() as stack:
            if on_disk:  # one frame in memory at a time, read from the verified file
                source: Any = stack.enter_context(open(store.path(inst.blob), "rb"))
                source.seek(raw.value_tell)
            else:
                source = ds.PixelData
            for i, frame in enumerate(generate_frames(source, number_of_frames=count), 1):
                if i in wanted:
                    got[i] = frame
                if len(got) == len(wanted):
                    break
        if len(got) != len(wanted):
            raise WadoError(f"instance {inst.sop_instance_uid} holds fewer frames than its "
                            "Number of Frames", 500)
        return Frames(media, ts, [got[n] for n in numbers])
    size = _native_frame_size(ds)
    if on_disk:  # native pixel data of a large instance: each frame read at its offset
        if raw.length < size * count:
            raise WadoError(f"instance {inst.sop_instance_uid} holds less pixel data than "
                            "its Rows x Columns x frames", 500)
        with open(store.path(inst.blob), "rb") as f:
            parts = [os.pread(f.fileno(), size, raw.value_tell + (n - 1) * size)
                     for n in numbers]
        return Frames(media, ts, parts)
    data = ds.PixelData
    if len(data) < size * count:
        raise WadoError(f"instance {inst.sop_instance_uid} holds less pixel data than its "
                        "Rows x Columns x frames", 500)
    return Frames(media, ts, [bytes(data[(n - 1) * size:n * size]) for n in numbers])


def _native_frame_size(ds: Dataset) -> int:
    bits = int(ds.BitsAllocated)
    if bits % 8:
        raise WadoError(f"frames of {bits}-bit pixel data are not served", 406)
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8


def _decoded_frame(ds: Dataset, index: int) -> bytes:
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(ds, index=index, as_rgb=False)
    except (RuntimeError, NotImplementedError, ValueError, ImportError) as exc:
        raise WadoError(f"cannot decode {UID(str(ds.file_meta.TransferSyntaxUID)).name} "
                        f"losslessly on this node ({type(exc).__name__})", 406) from exc
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def rendered_media(accept: str | None) -> str:
    """image/png (the default) or image/jpeg, as the Accept header prefers; else 406."""
    ranges = [m for m, _ in accept_ranges(accept)]
    usable = [m for m in ranges if m in ("image/png", "image/jpeg", "image/*")]
    if ranges and not usable:
        raise WadoError("rendered images are image/png or image/jpeg", 406)
    return "image/jpeg" if usable and usable[0] == "image/jpeg" else "image/png"


THUMBNAIL_SIZE = 128  # a thumbnail without a viewport fits in this square
MAX_VIEWPORT = 4096  # pixels a side at most
THUMBNAIL_TRIES = 8  # instances tried, at most, for a study's or series' thumbnail


def parse_viewport(text: str | None) -> tuple[int, int] | None:
    """``viewport=width,height`` (PS3.18 8.3.5.1.3); the source-region form is refused."""
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise WadoError("viewport is width,height in pixels (e.g. viewport=256,256); a "
                        "source region is not supported", 400)
    w, h = (int(p) for p in parts)
    if not (1 <= w <= MAX_VIEWPORT and 1 <= h <= MAX_VIEWPORT):
        raise WadoError(f"viewport sides are 1 to {MAX_VIEWPORT} pixels", 400)
    return w, h


def fit(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """``size`` scaled (up or down) to fit ``box``, keeping its aspect ratio."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def thumbnail_order(rows: list[dict[str, Any]], series: str | None) -> list[str]:
    """The SOP Instance UIDs to try, in order, for the thumbnail of a study (``series``
    None) or a series, from QIDO/C-FIND rows of its instances: the middle instance (by
    Instance Number) of each series, series by Series Number, then, for one series, its
    first and last. Pure; at most THUMBNAIL_TRIES."""
    def number(row: dict[str, Any], key: str) -> tuple[int, str]:
        text = str(row.get(key) or "").strip()
        try:
            return int(float(text)), ""
        except ValueError:
            return 2**31, text

    by_series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if series is None or row.get("SeriesInstanceUID") == series:
            by_series.setdefault(str(row.get("SeriesInstanceUID")), []).append(row)
    ordered = sorted(by_series.items(),
                     key=lambda kv: (number(kv[1][0], "SeriesNumber"), kv[0]))
    out: list[str] = []
    for _, members in ordered:
        members.sort(key=lambda r: (number(r, "InstanceNumber"), str(r["SOPInstanceUID"])))
        picks = [members[(len(members) - 1) // 2]]
        if series is not None:
            picks += [members[0], members[-1]]
        for row in picks:
            sop = str(row["SOPInstanceUID"])
            if sop not in out:
                out.append(sop)
    return out[:THUMBNAIL_TRIES]


def rendered(store: BlobStore, inst: Instance, frame: int, accept: str | None,
             thumbnail: bool = False, viewport: tuple[int, int] | None = None
             ) -> tuple[str, bytes]:
    """One frame as an 8-bit PNG or JPEG (media type, bytes), fitted to ``viewport``
    (width, height) when given; a thumbnail without one fits THUMBNAIL_SIZE."""
    media = rendered_media(accept)
    ds = load(store, inst)
    if "PixelData" not in ds:
        raise WadoError(f"instance {inst.sop_instance_uid} has no pixel data", 404)
    if not 1 <= frame <= _frame_count(ds):
        raise WadoError(f"frame {frame} is not in 1..{_frame_count(ds)}", 404)
    import numpy as np
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, pixel_array

    try:
        arr = pixel_array(ds, index=frame - 1)
    except (RuntimeError, NotImplementedError, ValueError, ImportError, AttributeError) as exc:
        raise WadoError(f"cannot decode this instance's pixel data here "
                        f"({type(exc).__name__})", 406) from exc
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 1:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        center, width = _window(ds)
        if center is None or width is None or width <= 0:
            lo, hi = float(values.min()), float(values.max())
        else:
            lo, hi = center - width / 2.0, center + width / 2.0
        scaled = np.clip((values - lo) / max(hi - lo, 1e-9), 0.0, 1.0) * 255.0
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    elif samples == 3:
        if arr.dtype != np.uint8:
            top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
            arr = np.clip(arr.astype(np.float64) / top * 255.0, 0, 255).round()
        image = Image.fromarray(arr.astype(np.uint8), mode="RGB")
    else:
        raise WadoError(f"{samples} samples per pixel are not rendered", 406)
    if viewport is not None:
        size = fit(image.size, viewport)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    elif thumbnail:
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    out = io.BytesIO()
    image.save(out, format="JPEG" if media == "image/jpeg" else "PNG")
    return media, out.getvalue()


def _window(ds: Dataset) -> tuple[float | None, float | None]:
    def first(name: str) -> float | None:
        value = ds.get(name)
        if value is None or value == "":
            return None
        try:
            return float(value[0] if isinstance(value, (list, tuple)) or
                         type(value).__name__ == "MultiValue" else value)
        except (TypeError, ValueError, IndexError):
            return None
    return first("WindowCenter"), first("WindowWidth")
