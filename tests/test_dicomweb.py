"""DICOMweb of a running node, through an independent client (``dicomweb-client``), DCMTK's
``findscu`` and ``curl``: QIDO-RS at every level, WADO-RS byte for byte, metadata, frames
(native, encapsulated, decoded), rendered images, STOW-RS through the ingest path, and the
refusals (bad UID, unknown study, no key, read key on STOW, oversized and truncated
bodies, CORS)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from syncsupport import alter_in_place

from syncnode.apikeys import KeyStore
from syncnode.audit import AUDIT_DIR, read_entries
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.node import RunningNode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import dicom_testkit as kit

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
FILES = ["CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm", "SC_rgb_rle_2frame.dcm",
         "SC_rgb_jpeg_dcmtk.dcm"]
ORIGIN = "http://viewer.example:3000"


@dataclass
class Node:
    running: RunningNode
    base: str
    admin: str
    read: str
    study: kit.StudyFiles

    def client(self, key: str | None = None) -> DICOMwebClient:
        return DICOMwebClient(url=f"{self.base}/dicom-web",
                              headers={"X-API-Key": key or self.read})

    @property
    def dicom_port(self) -> int:
        return self.running.ports["dicom"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One running node (its own event loop in a thread: the client blocks) holding
    pydicom's test files and a generated 6-image study in two series."""
    tmp = tmp_path_factory.mktemp("dicomweb")
    src = tmp / "src"
    src.mkdir()
    for name in FILES:
        shutil.copy(TEST_FILES / name, src / name)
    study = kit.make_study(src / "gen", 6, seed="dicomweb", series=2, rows=32, cols=32)
    local = LocalNode.init(tmp / "node")
    import_paths(local, [src])
    settings = local.settings(peer_host="127.0.0.1", peer_port=0, api_host="127.0.0.1",
                              api_port=0, dicom_host="127.0.0.1", dicom_port=0,
                              discovery=False, dicomweb_cors_origins=[ORIGIN],
                              dicomweb_max_request_bytes=2 << 20, dicomweb_read_timeout=2.0)
    loop = asyncio.new_event_loop()
    running = RunningNode(local, settings)
    started = threading.Event()
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            await running.start()
        except BaseException as exc:
            failure.append(exc)
            started.set()
            raise
        started.set()
        await stop.wait()
        await running.stop()
        # keep-alive connections of the clients still have handler tasks: end them here
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60) and not failure, failure
    keys = KeyStore(local.data)
    yield Node(running, f"http://127.0.0.1:{running.ports['api']}", keys.rotate("admin"),
               keys.rotate("read"), study)
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)
    loop.close()
    local.close()


def curl(*args: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a curl request."""
    res = subprocess.run(["curl", "-sS", "-i", "--max-time", "30", *args], input=data,
                         capture_output=True, timeout=60, check=True)
    head, _, body = res.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def blob_bytes(node: Node, sop: str) -> bytes:
    inst = node.running.node.catalog.instance(sop)
    assert inst is not None
    return node.running.node.store.path(inst.blob).read_bytes()


def tag(result: dict, keyword: str) -> list:
    return result.get(f"{pydicom.datadict.tag_for_keyword(keyword):08X}", {}).get("Value", [])


# -- QIDO-RS -------------------------------------------------------------------------------
def test_qido_all_levels(node: Node) -> None:
    c = node.client()
    studies = c.search_for_studies()
    by_uid = {tag(s, "StudyInstanceUID")[0]: s for s in studies}
    s = by_uid[node.study.study_uid]
    assert tag(s, "NumberOfStudyRelatedInstances") == [6]
    assert tag(s, "NumberOfStudyRelatedSeries") == [2]
    assert tag(s, "ModalitiesInStudy") == ["CT"]
    assert tag(s, "PatientName")[0]["Alphabetic"] == "TEST^dicomweb"
    assert tag(s, "AccessionNumber") == ["ACCcomweb"]
    assert tag(s, "StudyDate") == ["20200115"] and tag(s, "StudyTime")
    assert tag(s, "RetrieveURL")[0].endswith(f"/dicom-web/studies/{node.study.study_uid}")
    # the same matching as C-FIND: PN case-insensitive with wildcards, date ranges
    assert [tag(x, "StudyInstanceUID") for x in c.search_for_studies(
        search_filters={"PatientName": "test^DICOM*", "StudyDate": "20200101-20200131"})] \
        == [[node.study.study_uid]]
    assert c.search_for_studies(search_filters={"PatientName": "nobody*"}) == []
    series = c.search_for_series(node.study.study_uid)
    assert sorted(tag(x, "SeriesNumber")[0] for x in series) == [1, 2]
    assert all(tag(x, "NumberOfSeriesRelatedInstances") == [3] and tag(x, "Modality") == ["CT"]
               for x in series)
    assert len(c.search_for_series(search_filters={"Modality": "CT"})) >= 3
    instances = c.search_for_instances(node.study.study_uid, node.study.series_uids[0])
    assert sorted(tag(i, "SOPInstanceUID")[0] for i in instances) == \
        sorted(node.study.sop_uids[0::2])
    assert all(tag(i, "Rows") == [32] and tag(i, "Columns") == [32] and tag(i, "SOPClassUID")
               and tag(i, "InstanceNumber") for i in instances)
    assert len(c.search_for_instances(node.study.study_uid)) == 6
    everything = c.search_for_instances()
    assert len(everything) == 11
    # limit / offset page through the same order
    pages = [c.search_for_instances(limit=4, offset=o) for o in (0, 4, 8)]
    assert [tag(i, "SOPInstanceUID") for p in pages for i in p] == \
        [tag(i, "SOPInstanceUID") for i in everything]
    # includefield, fuzzymatching
    [one] = c.search_for_instances(search_filters={"SOPInstanceUID": node.study.sop_uids[0]},
                                   fields=["PatientBirthDate", "BitsStored"], fuzzymatching=True)
    assert tag(one, "BitsStored") == [12]
    [full] = c.search_for_instances(search_filters={"SOPInstanceUID": node.study.sop_uids[0]},
                                    fields=["all"])
    assert tag(full, "HighBit") == [11] and "7FE00010" not in full


def test_qido_refusals(node: Node) -> None:
    url = f"{node.base}/dicom-web/studies"
    key = ["-H", f"X-API-Key: {node.read}"]
    # a key this node cannot match is refused, not ignored (never a wider answer)
    status, _, body = curl(*key, f"{url}?ReferencedStudySequence.StudyInstanceUID=1.2")
    assert status == 400
    status, _, body = curl(*key, f"{url}?SeriesDescription=abc")
    assert status == 400 and b"SeriesDescription" in body and b"abc" not in body
    assert curl(*key, f"{url}?StudyInstanceUID=1.2.abc")[0] == 400
    assert curl(*key, f"{url}?limit=0")[0] == 400
    assert curl(f"{url}")[0] == 401


def test_dicomweb_client_as_a_user_writes_it(node: Node, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """``DICOMwebClient("http://127.0.0.1:PORT/dicom-web")``, nothing else: it sends
    ``Host: 127.0.0.1`` without the port, which a served name makes acceptable; a foreign
    name without a port is still refused."""
    hosts: list[str] = []
    real = requests.Session.send

    def spy(self: requests.Session, request: requests.PreparedRequest, **kw: object
            ) -> requests.Response:
        hosts.append(str(request.headers.get("Host")))
        return real(self, request, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(requests.Session, "send", spy)
    port = node.running.ports["api"]
    c = DICOMwebClient(f"http://127.0.0.1:{port}/dicom-web", headers={"X-API-Key": node.read})
    st = node.study
    studies = c.search_for_studies()
    assert {tag(s, "StudyInstanceUID")[0] for s in studies} >= {st.study_uid}
    # the URLs in answers lead back to this listener, port included
    assert all(tag(s, "RetrieveURL")[0].startswith(f"http://127.0.0.1:{port}/dicom-web/")
               for s in studies)
    assert len(c.retrieve_study(st.study_uid)) == 6
    admin = DICOMwebClient(f"http://127.0.0.1:{port}/dicom-web",
                           headers={"X-API-Key": node.admin})
    ds = _new_instance()
    admin.store_instances([ds])
    assert c.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                               ds.SOPInstanceUID).SOPInstanceUID == ds.SOPInstanceUID
    assert "127.0.0.1" in hosts and all(h == "127.0.0.1" for h in hosts), hosts
    status, _, _ = curl("-H", "Host: attacker.example", "-H", f"X-API-Key: {node.read}",
                        f"{node.base}/dicom-web/studies")
    assert status == 421


# -- WADO-RS -------------------------------------------------------------------------------
def test_wado_retrieve_byte_for_byte(node: Node) -> None:
    c = node.client()
    st = node.study
    got = c.retrieve_study(st.study_uid)
    assert len(got) == 6
    for ds in got:  # each part is the stored file, unchanged
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert ds.SOPInstanceUID in st.sop_uids
    # byte comparison on the raw parts
    raw = list(c.iter_study(st.study_uid))
    assert len(raw) == 6
    resp = requests.get(f"{node.base}/dicom-web/studies/{st.study_uid}/series/"
                        f"{st.series_uids[1]}", headers={
                            "X-API-Key": node.read,
                            "Accept": 'multipart/related; type="application/dicom"; '
                                      "transfer-syntax=*"}, timeout=30)
    assert resp.status_code == 200
    parts = _parts(resp)
    assert [p for _, p in parts] == [blob_bytes(node, s) for s in sorted(st.sop_uids[1::2])] \
        or sorted(p for _, p in parts) == sorted(blob_bytes(node, s) for s in st.sop_uids[1::2])
    sop = st.sop_uids[0]
    inst = c.retrieve_instance(st.study_uid, st.series_uids[0], sop)
    assert inst.SOPInstanceUID == sop
    resp = requests.get(f"{node.base}/dicom-web/studies/{st.study_uid}/series/"
                        f"{st.series_uids[0]}/instances/{sop}",
                        headers={"X-API-Key": node.read}, timeout=30)
    ts = inst.file_meta.TransferSyntaxUID
    assert _parts(resp) == [(f"application/dicom; transfer-syntax={ts}", blob_bytes(node, sop))]
    # another transfer syntax is not made up: 406
    status, _, _ = curl("-H", f"X-API-Key: {node.read}", "-H",
                        'Accept: multipart/related; type="application/dicom"; '
                        "transfer-syntax=1.2.840.10008.1.2.4.50",
                        f"{node.base}/dicom-web/studies/{st.study_uid}")
    assert status == 406


def _parts(resp: requests.Response) -> list[tuple[str, bytes]]:
    from syncnode.dicomweb.multipart import (
        MultipartParser,
        PartData,
        PartEnd,
        PartStart,
        parse_media,
    )

    _, params = parse_media(resp.headers["Content-Type"])
    parser = MultipartParser(params["boundary"])
    out: list[tuple[str, bytes]] = []
    cur: list[bytes] = []
    ctype = ""
    for ev in parser.feed(resp.content):
        if isinstance(ev, PartStart):
            ctype, cur = ev.headers["content-type"], []
        elif isinstance(ev, PartData):
            cur.append(ev.data)
        elif isinstance(ev, PartEnd):
            out.append((ctype, b"".join(cur)))
    parser.finish()
    return out


def test_wado_errors(node: Node) -> None:
    base = f"{node.base}/dicom-web/studies"
    key = ["-H", f"X-API-Key: {node.read}"]
    assert curl(*key, f"{base}/1.2.x")[0] == 400
    assert curl(*key, f"{base}/1.2.3.4.5.6")[0] == 404
    assert curl(*key, f"{base}/1.2.3.4.5.6/metadata")[0] == 404
    assert curl(f"{base}/{node.study.study_uid}")[0] == 401
    assert curl("-H", "X-API-Key: wrong", f"{base}/{node.study.study_uid}")[0] == 403


def test_metadata_and_bulk_data(node: Node) -> None:
    c = node.client()
    st = node.study
    meta = c.retrieve_study_metadata(st.study_uid)
    assert len(meta) == 6
    m = next(x for x in meta if tag(x, "SOPInstanceUID") == [st.sop_uids[0]])
    assert tag(m, "Rows") == [32] and tag(m, "PatientID") == [st.patient_id]
    uri = m["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{st.sop_uids[0]}/bulk/7FE00010")
    got = c.retrieve_bulkdata(uri)
    [pixels] = got
    assert pixels == pydicom.dcmread(io.BytesIO(blob_bytes(node, st.sop_uids[0]))).PixelData
    # the bare value when asked for without multipart (OHIF's "singlepart" bulk data)
    resp = requests.get(uri, headers={"X-API-Key": node.read,
                                      "Accept": "application/octet-stream"}, timeout=30)
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.content == pixels
    series_meta = c.retrieve_series_metadata(st.study_uid, st.series_uids[0])
    assert len(series_meta) == 3
    one = c.retrieve_instance_metadata(st.study_uid, st.series_uids[0], st.sop_uids[0])
    assert one == m


def test_frames_native_encapsulated_and_decoded(node: Node) -> None:
    c = node.client()
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    [frame] = c.retrieve_instance_frames(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                         ct.SOPInstanceUID, [1])
    assert frame == ct.PixelData
    rle = pydicom.dcmread(TEST_FILES / "SC_rgb_rle_2frame.dcm")
    ids = (rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.SOPInstanceUID)
    stored = list(pydicom.encaps.generate_frames(rle.PixelData, number_of_frames=2))
    got = c.retrieve_instance_frames(*ids, [2, 1], media_types=(
        ("image/dicom-rle", "1.2.840.10008.1.2.5"),))
    assert got == [stored[1], stored[0]]
    # uncompressed on request: RLE is lossless, so decoded
    decoded = c.retrieve_instance_frames(*ids, [1], media_types=(
        ("application/octet-stream", "1.2.840.10008.1.2.1"),))
    assert decoded[0] == rle.pixel_array[0].tobytes()
    # a lossy JPEG is never given as uncompressed
    jpg = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    url = (f"{node.base}/dicom-web/studies/{jpg.StudyInstanceUID}/series/"
           f"{jpg.SeriesInstanceUID}/instances/{jpg.SOPInstanceUID}/frames/1")
    status, _, _ = curl("-H", f"X-API-Key: {node.read}", "-H",
                        "Accept: multipart/related; type=application/octet-stream; "
                        "transfer-syntax=1.2.840.10008.1.2.1", url)
    assert status == 406
    status, headers, _ = curl("-H", f"X-API-Key: {node.read}", "-H",
                              "Accept: multipart/related; type=application/octet-stream; "
                              "transfer-syntax=*", url)
    assert status == 200 and 'type="image/jpeg"' in headers["content-type"]
    assert curl("-H", f"X-API-Key: {node.read}", url.replace("/frames/1", "/frames/9"))[0] \
        == 404


def test_rendered_grayscale_and_rgb(node: Node) -> None:
    from PIL import Image

    c = node.client()
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    png = c.retrieve_instance_rendered(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                       ct.SOPInstanceUID, media_types=("image/png",))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "L" and img.size == (128, 128)
    assert len(np.unique(np.asarray(img))) > 20  # an image, not a blank
    rgb = pydicom.dcmread(TEST_FILES / "examples_rgb_color.dcm")
    jpg = c.retrieve_instance_rendered(rgb.StudyInstanceUID, rgb.SeriesInstanceUID,
                                       rgb.SOPInstanceUID, media_types=("image/jpeg",))
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (320, 240)
    status, _, body = curl(
        "-H", f"X-API-Key: {node.read}",
        f"{node.base}/dicom-web/studies/{rgb.StudyInstanceUID}/series/"
        f"{rgb.SeriesInstanceUID}/instances/{rgb.SOPInstanceUID}/thumbnail")
    assert status == 200 and max(Image.open(io.BytesIO(body)).size) <= 128


def test_thumbnails_of_studies_and_series(node: Node) -> None:
    """A series' thumbnail is its middle instance's (by Instance Number), a study's that
    of its first series that renders; ``viewport`` sets the size; 404 when nothing can be
    rendered."""
    from PIL import Image

    st = node.study
    key = ["-H", f"X-API-Key: {node.read}"]
    base = f"{node.base}/dicom-web/studies/{st.study_uid}"

    def image(url: str, *extra: str, media: str = "PNG") -> tuple[Image.Image, bytes]:
        status, headers, body = curl(*key, *extra, url)
        assert status == 200, (url, status, body[:200])
        img = Image.open(io.BytesIO(body))
        img.load()  # decodable to the last pixel
        assert img.format == media and headers["content-type"] == f"image/{media.lower()}"
        return img, body

    series0 = f"{base}/series/{st.series_uids[0]}"
    img, body = image(f"{series0}/thumbnail")
    assert img.size == (32, 32)  # already under 128 x 128: not enlarged
    middle = st.sop_uids[2]  # series 0 holds images 1, 3, 5 (Instance Numbers 1, 3, 5)
    assert body == image(f"{series0}/instances/{middle}/thumbnail")[1]
    img, _ = image(f"{series0}/thumbnail?viewport=100,50", "-H", "Accept: image/jpeg",
                   media="JPEG")
    assert img.size == (50, 50)
    img, _ = image(f"{base}/thumbnail?viewport=64,200")
    assert img.size == (64, 64) and len(np.unique(np.asarray(img))) > 5
    assert image(f"{base}/thumbnail")[1] == body  # the study's: its first series'
    img, _ = image(f"{series0}/instances/{middle}/rendered?viewport=20,10")
    assert img.size == (10, 10)
    # a study whose first series has nothing to render: the next series stands for it
    admin = node.client(node.admin)
    plan = pydicom.dcmread(TEST_FILES / "rtplan.dcm")
    ct = _new_instance()
    plan.StudyInstanceUID = ct.StudyInstanceUID
    plan.SeriesInstanceUID = generate_uid()
    plan.SOPInstanceUID = plan.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    plan.SeriesNumber, ct.SeriesNumber = 1, 2
    admin.store_instances([plan, ct])
    mixed = f"{node.base}/dicom-web/studies/{ct.StudyInstanceUID}"
    img, _ = image(f"{mixed}/thumbnail?viewport=64,32")
    assert img.size == (32, 32)
    for url, code in ((f"{mixed}/series/{plan.SeriesInstanceUID}/thumbnail", 404),
                      (f"{node.base}/dicom-web/studies/1.2.3.999/thumbnail", 404),
                      (f"{mixed}/series/1.2.3.999/thumbnail", 404),
                      (f"{mixed}/thumbnail?viewport=0,10", 400),
                      (f"{mixed}/thumbnail?viewport=10,10,0,0,5,5", 400)):
        status, _, body = curl(*key, url)
        assert status == code and b"error" in body, (url, status)
    assert curl(*key, "-H", "Accept: application/dicom", f"{mixed}/thumbnail")[0] == 406
    assert curl(f"{mixed}/thumbnail")[0] == 401


def test_thumbnail_order() -> None:
    from syncnode.dicomweb.wado import thumbnail_order

    rows = [{"SOPInstanceUID": f"1.{i}", "SeriesInstanceUID": f"9.{s}",
             "SeriesNumber": str(sn), "InstanceNumber": str(n)}
            for i, (s, sn, n) in enumerate([(1, 2, 3), (1, 2, 1), (1, 2, 2), (2, 1, 10),
                                            (2, 1, 20), (3, "", 1)])]
    # the middle of each series, series by number (a series without one last)
    assert thumbnail_order(rows, None) == ["1.3", "1.2", "1.5"]
    # one series: its middle, then its first and last
    assert thumbnail_order(rows, "9.1") == ["1.2", "1.1", "1.0"]
    assert thumbnail_order(rows, "9.9") == []


# -- STOW-RS -------------------------------------------------------------------------------
def _new_instance(study: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds



def _json_stow_body(ds: pydicom.Dataset, frame_media: str | None = None,
                    drop: bool = False) -> tuple[bytes, str]:
    """A STOW-RS body of DICOM JSON metadata and bulk data parts (PS3.18 10.5.1.2):
    values over 1 KiB by BulkDataURI, each in a part with that Content-Location. With
    ``frame_media`` the pixel data goes as one compressed frame in that media type;
    ``drop`` leaves the pixel data part out."""
    from pydicom.encaps import generate_frames

    bulk: dict[str, tuple[str, bytes]] = {}

    def handler(elem: pydicom.DataElement) -> str:
        uri = f"urn:bulk:{len(bulk)}:{elem.tag:08X}"
        value = bytes(elem.value)
        media = "application/octet-stream"
        if elem.tag == 0x7FE00010 and frame_media:
            [value] = list(generate_frames(value, number_of_frames=1))
            media = f"{frame_media}; transfer-syntax={ds.file_meta.TransferSyntaxUID}"
        if not (drop and elem.tag == 0x7FE00010):
            bulk[uri] = (media, value)
        return uri

    meta = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=handler)
    out = [b"--J\r\nContent-Type: application/dicom+json\r\n\r\n" + json.dumps([meta]).encode()]
    for uri, (media, value) in bulk.items():
        out.append(f"--J\r\nContent-Type: {media}\r\nContent-Location: {uri}\r\n\r\n"
                   .encode() + value)
    return b"\r\n".join(out) + b"\r\n--J--\r\n", "J"


def test_stow_json_metadata_with_bulk_data(node: Node) -> None:
    """DICOM JSON metadata and bulk data parts become Part-10 files that go through the
    same ingest as application/dicom parts: native pixel data, a compressed frame in its
    own transfer syntax; an instance whose bulk data part is missing is refused alone;
    metadata that is not JSON stores nothing."""
    url = f"{node.base}/dicom-web/studies"
    admin = ["-H", f"X-API-Key: {node.admin}"]

    def post(body: bytes, kind: str = "application/dicom+json") -> tuple[int, dict]:
        status, _, out = curl("-X", "POST", "--data-binary", "@-", "-H",
                              f'Content-Type: multipart/related; type="{kind}"; boundary=J',
                              *admin, url, data=body)
        return status, (json.loads(out) if out.startswith(b"{") else {})

    native = _new_instance()
    status, answer = post(_json_stow_body(native)[0])
    assert status == 200, answer
    [ref] = answer["00081199"]["Value"]
    assert tag(ref, "ReferencedSOPInstanceUID") == [native.SOPInstanceUID]
    got = node.client().retrieve_instance(native.StudyInstanceUID, native.SeriesInstanceUID,
                                          native.SOPInstanceUID)
    assert got.PixelData == native.PixelData and got.PatientName == native.PatientName
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert native.SOPInstanceUID in kit.findscu_sops(node.dicom_port, "StudyInstanceUID",
                                                     native.StudyInstanceUID)
    jpeg = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID = generate_uid(), generate_uid()
    jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    lost = _new_instance(jpeg.StudyInstanceUID)
    body = (_json_stow_body(jpeg, "image/jpeg")[0][:-len(b"--J--\r\n")]
            + _json_stow_body(lost, drop=True)[0])
    status, answer = post(body)
    assert status == 202, answer
    [bad] = answer["00081198"]["Value"]
    assert tag(bad, "ReferencedSOPInstanceUID") == [lost.SOPInstanceUID]
    assert tag(bad, "FailureReason") == [0xC000]
    assert node.running.node.catalog.instance(lost.SOPInstanceUID) is None
    stored = node.running.node.catalog.instance(jpeg.SOPInstanceUID)
    assert stored is not None and stored.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
    frame = list(pydicom.encaps.generate_frames(jpeg.PixelData, number_of_frames=1))
    assert node.client().retrieve_instance_frames(
        jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID, jpeg.SOPInstanceUID, [1],
        media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),)) == frame
    # not JSON at all: 400, nothing stored; DICOM XML: 415
    other = _new_instance()
    body = _json_stow_body(other)[0].replace(b"[{", b"[{{", 1)
    status, _ = post(body)
    assert status == 400 and node.running.node.catalog.instance(other.SOPInstanceUID) is None
    assert post(_json_stow_body(other)[0], kind="application/dicom+xml")[0] == 415
    # hostile nesting: JSON arrays 100,000 deep (400), and sequences nested 300 deep
    # inside otherwise valid metadata (that instance refused alone): never a 500
    deep = b"--J\r\nContent-Type: application/dicom+json\r\n\r\n" + b"[" * 100_000 + \
        b"]" * 100_000 + b"\r\n--J--\r\n"
    assert post(deep)[0] == 400
    meta = json.loads(_json_stow_body(other)[0].split(b"\r\n\r\n", 1)[1].split(b"\r\n--J")[0])
    meta[0]["00081115"] = "NESTED"
    nested = '{"00081115": {"vr": "SQ", "Value": [' * 300 + "{}" + "]}}" * 300
    text = json.dumps(meta).replace('"NESTED"', '{"vr": "SQ", "Value": [' + nested + ']}')
    status, answer = post(b"--J\r\nContent-Type: application/dicom+json\r\n\r\n"
                          + text.encode() + b"\r\n--J--\r\n")
    assert status in (400, 409), (status, answer)
    assert node.running.node.catalog.instance(other.SOPInstanceUID) is None
    assert not [p for p in node.running.node.store.tmp_dir.iterdir()
                if p.name.startswith("blob-")]


def _findscu_sops(port: int, study: str) -> list[str]:
    return kit.findscu_sops(port, "StudyInstanceUID", study)


def test_stow_then_cfind_and_catalog(node: Node) -> None:
    a, b = _new_instance(), _new_instance()
    b.StudyInstanceUID = a.StudyInstanceUID
    c = node.client(node.admin)
    answer = c.store_instances([a, b])
    refs = answer.ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(
        [a.SOPInstanceUID, b.SOPInstanceUID])
    assert all(r.RetrieveURL.endswith(f"/instances/{r.ReferencedSOPInstanceUID}")
               for r in refs)
    assert "FailedSOPSequence" not in answer
    # durable and in the catalog at once, found by C-FIND and QIDO
    cat = node.running.node.catalog
    assert {i.sop_instance_uid for i in cat.instances(study=a.StudyInstanceUID)} == \
        {a.SOPInstanceUID, b.SOPInstanceUID}
    assert sorted(_findscu_sops(node.dicom_port, a.StudyInstanceUID)) == \
        sorted([a.SOPInstanceUID, b.SOPInstanceUID])
    [back] = node.client().retrieve_instance(a.StudyInstanceUID, a.SeriesInstanceUID,
                                             a.SOPInstanceUID),
    assert back.SOPInstanceUID == a.SOPInstanceUID
    # to /studies/{study}: an instance of another study fails with 0xA900, the rest stored;
    # a part that is not DICOM fails with 0xC000
    other, same = _new_instance(), _new_instance(a.StudyInstanceUID)
    boundary = "XbX"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in (_bytes(other), _bytes(same), b"not dicom at all" * 10)) \
        + f"--{boundary}--\r\n".encode()
    status, _, out = curl(
        "-X", "POST", "-H", f"X-API-Key: {node.admin}", "-H",
        f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
        "--data-binary", "@-", f"{node.base}/dicom-web/studies/{a.StudyInstanceUID}",
        data=body)
    assert status == 202, out
    doc = json.loads(out)
    failed = {(tag(i, "ReferencedSOPInstanceUID") or [None])[0]: tag(i, "FailureReason")[0]
              for i in doc["00081198"]["Value"]}
    assert failed == {other.SOPInstanceUID: 0xA900, None: 0xC000}
    assert [tag(i, "ReferencedSOPInstanceUID") for i in doc["00081199"]["Value"]] == \
        [[same.SOPInstanceUID]]
    assert cat.instance(other.SOPInstanceUID) is None
    assert cat.instance(same.SOPInstanceUID) is not None


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_stow_refusals_store_nothing(node: Node) -> None:
    url = f"{node.base}/dicom-web/studies"
    ds = _new_instance()
    data = _bytes(ds)
    ctype = 'Content-Type: multipart/related; type="application/dicom"; boundary=B'
    whole = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--B--\r\n"
    post = ["-X", "POST", "--data-binary", "@-", "-H", ctype]
    cat = node.running.node.catalog
    tmp = node.running.node.store.tmp_dir

    def leftovers() -> list[str]:
        return [p.name for p in tmp.iterdir() if p.name.startswith("blob-")]

    assert curl(*post, url, data=whole)[0] == 401
    assert curl(*post, "-H", f"X-API-Key: {node.read}", url, data=whole)[0] == 403
    admin = ["-H", f"X-API-Key: {node.admin}"]
    status, _, body = curl(*post, *admin, url, data=whole[:-12])  # no closing boundary
    assert status == 400 and b"truncated" in body
    status, _, body = curl(*post, *admin, url, data=whole[: len(whole) // 2])
    assert status == 400
    big = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + bytes(3 << 20) + b"\r\n--B--\r\n"
    assert curl(*post, *admin, url, data=big)[0] == 413
    assert curl("-X", "POST", "--data-binary", "@-", "-H", "Content-Type: application/json",
                *admin, url, data=b"{}")[0] == 415
    assert cat.instance(ds.SOPInstanceUID) is None and leftovers() == []
    status, _, _ = curl(*post, *admin, url, data=whole)
    assert status == 200 and cat.instance(ds.SOPInstanceUID) is not None
    assert leftovers() == []
    # an instance an IOCM rejection note rejected for good is refused (0xC000), as by
    # C-STORE and import
    rejected = _new_instance()
    cat.rejections.record("2.25.4242", "113037", [rejected.SOPInstanceUID])
    part = b"--B\r\nContent-Type: application/dicom\r\n\r\n" + _bytes(rejected) + \
        b"\r\n--B--\r\n"
    status, _, body = curl(*post, *admin, "-H", "Accept: application/dicom+json", url,
                           data=part)
    assert status == 409, body
    assert cat.instance(rejected.SOPInstanceUID) is None and leftovers() == []


def test_stow_read_timeout(node: Node) -> None:
    """A client that stops sending mid-body is dropped after dicomweb_read_timeout."""
    import socket

    port = node.running.ports["api"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"X-API-Key: {node.admin}\r\nContent-Length: 100000\r\n"
                   'Content-Type: multipart/related; type="application/dicom"; boundary=B'
                   "\r\n\r\n--B\r\n").encode())
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]


# -- access from other origins -------------------------------------------------------------
def test_cors_only_for_listed_origins(node: Node) -> None:
    url = f"{node.base}/dicom-web/studies"
    pre = ["-X", "OPTIONS", "-H", "Access-Control-Request-Method: GET", "-H",
           "Access-Control-Request-Headers: x-api-key"]
    status, headers, _ = curl(*pre, "-H", f"Origin: {ORIGIN}", url)
    assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in headers["access-control-allow-headers"].lower()
    status, headers, _ = curl(*pre, "-H", "Origin: http://evil.example", url)
    assert status == 403 and "access-control-allow-origin" not in headers
    status, headers, _ = curl("-H", f"Origin: {ORIGIN}", "-H", f"X-API-Key: {node.read}", url)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = curl("-H", "Origin: http://evil.example", "-H",
                              f"X-API-Key: {node.read}", url)
    assert status == 200 and "access-control-allow-origin" not in headers
    # the admin API itself never grants CORS
    status, headers, _ = curl("-H", f"Origin: {ORIGIN}", "-H", f"X-API-Key: {node.read}",
                              f"{node.base}/api/v1/status")
    assert "access-control-allow-origin" not in headers


def test_audit_entries_name_uids_only(node: Node) -> None:
    c = node.client()
    c.search_for_studies(search_filters={"PatientID": node.study.patient_id})
    c.retrieve_series(node.study.study_uid, node.study.series_uids[0])
    trail = node.running.audit
    assert trail is not None and trail.flush()
    entries = list(read_entries(node.running.node.data / AUDIT_DIR))
    text = json.dumps(entries)
    queries = [e for e in entries if e["action"] == "query" and e["actor"].startswith("api:")]
    assert any(e.get("keys") == ["PatientID"] and e.get("level") == "STUDY" for e in queries)
    retrieved = [e for e in entries if e["action"] == "retrieved"
                 and e["actor"].startswith("api:")]
    assert any(e.get("instances") == 3 and e.get("studies") == [node.study.study_uid]
               for e in retrieved)
    received = [e for e in entries if e["action"] == "received" and e["actor"].startswith("api:")]
    assert received
    assert node.study.patient_id not in text and "TEST^" not in text


def test_frames_of_large_instances_are_read_from_the_file(node: Node,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Over the in-memory limit, frames come from their offsets in the verified file (the
    limit is lowered here so that small test files take that path)."""
    from syncnode.dicomweb import wado

    monkeypatch.setattr(wado, "IN_MEMORY", 1024)
    c = node.client()
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    assert c.retrieve_instance_frames(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                      ct.SOPInstanceUID, [1]) == [ct.PixelData]
    rle = pydicom.dcmread(TEST_FILES / "SC_rgb_rle_2frame.dcm")
    stored = list(pydicom.encaps.generate_frames(rle.PixelData, number_of_frames=2))
    assert c.retrieve_instance_frames(
        rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.SOPInstanceUID, [2],
        media_types=(("image/dicom-rle", "1.2.840.10008.1.2.5"),)) == [stored[1]]
    meta = c.retrieve_instance_metadata(rle.StudyInstanceUID, rle.SeriesInstanceUID,
                                        rle.SOPInstanceUID)
    assert meta["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
    # whole instances stream a verified piece at a time: the same bytes
    resp = requests.get(f"{node.base}/dicom-web/studies/{ct.StudyInstanceUID}",
                        headers={"X-API-Key": node.read}, timeout=30)
    assert [p for _, p in _parts(resp)] == [blob_bytes(node, ct.SOPInstanceUID)]


def test_stow_on_a_full_disk_stores_nothing(node: Node, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """The disk filling while a body is spooled: 507, nothing stored, no temp file left."""
    import errno

    from syncnode.dicomweb import stow

    def full(self: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stow._Spool, "_flush", full)
    ds = _new_instance()
    body = (b"--B\r\nContent-Type: application/dicom\r\n\r\n" + _bytes(ds)
            + b"\r\n--B--\r\n")
    status, _, out = curl("-X", "POST", "--data-binary", "@-", "-H",
                          'Content-Type: multipart/related; type="application/dicom"; '
                          "boundary=B", "-H", f"X-API-Key: {node.admin}",
                          f"{node.base}/dicom-web/studies", data=body)
    assert status == 507 and b"nothing stored" in out
    assert node.running.node.catalog.instance(ds.SOPInstanceUID) is None
    assert not [p for p in node.running.node.store.tmp_dir.iterdir()
                if p.name.startswith("blob-")]


def test_known_good_instances_go_by_sendfile(node: Node, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """On plain HTTP a known-good blob goes from its file to the socket (sendfile), the
    stored bytes exactly (the size threshold is lowered so that the small test files take
    that path)."""
    from syncnode.dicomweb import wado

    monkeypatch.setattr(wado, "SENDFILE_MIN", 1)
    sources: list[int] = []  # the inode of every file sent from
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, *a: int) -> int:
        sources.append(os.fstat(in_fd).st_ino)
        return real(out_fd, in_fd, *a)

    monkeypatch.setattr(os, "sendfile", counting)
    st = node.study
    with requests.Session() as session:  # twice on one connection: the framing holds
        for _ in range(2):
            resp = session.get(f"{node.base}/dicom-web/studies/{st.study_uid}",
                               headers={"X-API-Key": node.read}, timeout=30)
            assert resp.status_code == 200
            assert sorted(p for _, p in _parts(resp)) == sorted(blob_bytes(node, s)
                                                                for s in st.sop_uids)
    store = node.running.node.store
    assert {store.path(node.running.node.catalog.instance(s).blob).stat().st_ino
            for s in st.sop_uids} == set(sources)
    # large instances (each prepared at its turn, not read ahead) go the same way
    monkeypatch.setattr(wado, "IN_MEMORY", 1024)
    sources.clear()
    resp = requests.get(f"{node.base}/dicom-web/studies/{st.study_uid}/series/"
                        f"{st.series_uids[1]}", headers={"X-API-Key": node.read}, timeout=30)
    assert sorted(p for _, p in _parts(resp)) == sorted(blob_bytes(node, s)
                                                        for s in st.sop_uids[1::2])
    assert len(set(sources)) == 3
    # a connection that cannot take sendfile (TLS): every part read and written
    monkeypatch.setattr(wado, "IN_MEMORY", 16 << 20)
    real_prepare = wado.prepare_group
    monkeypatch.setattr(wado, "prepare_group",
                        lambda store, group, files: real_prepare(store, group, False))
    sources.clear()
    resp = requests.get(f"{node.base}/dicom-web/studies/{st.study_uid}",
                        headers={"X-API-Key": node.read}, timeout=30)
    assert sorted(p for _, p in _parts(resp)) == sorted(blob_bytes(node, s)
                                                        for s in st.sop_uids)
    assert sources == []


def test_a_damaged_blob_is_never_sent(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Altered in place, same size, its modification time put back: the file is no longer
    the one found intact, so it is verified again and refused, whichever way it would
    have gone out (sendfile included)."""
    from syncnode.dicomweb import wado

    monkeypatch.setattr(wado, "SENDFILE_MIN", 1)
    ds = _new_instance()
    node.client(node.admin).store_instances([ds])
    inst = node.running.node.catalog.instance(ds.SOPInstanceUID)
    assert inst is not None
    path = node.running.node.store.path(inst.blob)
    assert inst.blob in node.running.node.store.known_good  # hashed as it was stored
    alter_in_place(path, -100)  # one pixel byte flipped on disk, mtime set back
    data = path.read_bytes()
    url = (f"{node.base}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
           f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    for suffix in ("", "/frames/1", "/metadata", "/rendered"):
        status, _, body = curl("-H", f"X-API-Key: {node.read}", url + suffix)
        assert status == 500 and b"verify --repair" in body, (suffix, status)
        assert bytes(data[-2000:]) not in body
