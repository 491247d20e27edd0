"""Real DICOM peers for syncnode's DICOM tests and benchmarks: Orthanc, DCMTK, test studies.

- :func:`dcmtk` finds a DCMTK tool (``storescu``, ``findscu``, ...). pynetdicom installs
  Python scripts with the same names that may come first on ``PATH``; they are skipped
  (a DCMTK binary prints ``$dcmtk`` in its ``--version``).
- :func:`tool_env` is the environment every DCMTK tool and Orthanc runs with:
  ``TCP_NODELAY=1`` (this Debian build keeps Nagle's algorithm on otherwise, ~40 ms lost
  per instance on loopback).
- :class:`Orthanc` starts a private Orthanc (own config, storage, index, free loopback
  ports, no remote access, no authentication), waits for its REST API and stops it.
  ``stop()`` is idempotent; ``start()`` again reuses the same storage (restart).
- :func:`make_study` writes a synthetic CT study with pydicom (explicit VR little endian,
  deterministic UIDs from a seed and noise pixels), returning the file paths.

Every process started here is stopped by its owner: use the context managers or call
``stop()`` in a ``finally``. Loops are bounded by deadlines.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_DCMTK_DIRS = ("/usr/bin", "/usr/local/bin", "/bin")


def dcmtk(name: str) -> str:
    """Absolute path of the DCMTK tool ``name``; raises FileNotFoundError if absent."""
    candidates = [os.path.join(d, name) for d in _DCMTK_DIRS]
    found = shutil.which(name)
    if found:
        candidates.append(found)
    for path in candidates:
        if not os.access(path, os.X_OK):
            continue
        try:
            head = subprocess.run([path, "--version"], check=False, capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in head.lower():
            return path
    raise FileNotFoundError(f"DCMTK tool {name!r} not found (apt-get install dcmtk)")


def have_orthanc() -> bool:
    return shutil.which("Orthanc") is not None or os.path.exists("/usr/sbin/Orthanc")


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not os.path.exists(found):
        raise FileNotFoundError("Orthanc not found (apt-get install orthanc)")
    return found


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


@dataclass
class Orthanc:
    """A private Orthanc on loopback. ``modalities``: name -> (AE, host, port)."""

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    check_called_aet: bool = True
    dicom_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def address(self) -> str:
        """``AE@HOST:PORT`` as syncnode's settings take it."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "SaveJobs": False,
            "DicomAssociationCloseDelay": 0,
            "HttpsVerifyPeers": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            return
        for d in ("storage", "index", "tmp"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "orthanc.json"
        conf.write_text(json.dumps(self.config(), indent=1))
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - held by the child
        try:
            self.proc = subprocess.Popen([orthanc_binary(), str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, env=tool_env(),
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"Orthanc exited with {code}; see {self.workdir}/orthanc.log")
            try:
                self.get("/system", timeout=1.0)
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("Orthanc did not answer GET /system") from None
                time.sleep(0.1)

    def stop(self) -> None:
        stop_all([self])

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST --------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0,
                raw: bool = False) -> Any:
        data = None
        headers = {}
        if body is not None:
            if isinstance(body, bytes):
                data = body
                headers["Content-Type"] = "application/dicom"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, timeout: float = 300.0) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def upload(self, path: Path) -> dict[str, Any]:
        return self.post("/instances", path.read_bytes())

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances"))

    def sop_uids(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance id, for every stored instance."""
        out: dict[str, str] = {}
        found = self.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        for item in found:
            out[item["MainDicomTags"]["SOPInstanceUID"]] = item["ID"]
        return out

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.request("GET", f"/instances/{orthanc_id}/file", raw=True)

    def pixel_hash(self, orthanc_id: str) -> str:
        """SHA-256 of the instance's Pixel Data element value (7FE0,0010)."""
        import io

        from pydicom import dcmread

        ds = dcmread(io.BytesIO(self.instance_file(orthanc_id)))
        return hashlib.sha256(ds.PixelData).hexdigest()


def stop_all(orthancs: Sequence[Orthanc], *, discard: bool = False) -> None:
    """Stop these Orthancs: all are told to stop first, then each is waited for (an Orthanc
    takes ~3 s to shut down: theirs overlap), killed after 20 s. ``discard``: SIGKILL at
    once, for test instances whose storage is thrown away next (nothing to shut down
    cleanly for)."""
    procs = []
    for o in orthancs:
        proc, o.proc = o.proc, None
        if proc is not None:
            if discard:
                proc.kill()
            else:
                proc.terminate()
            procs.append(proc)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

def dicom_basic_auth(user: str, password: str) -> str:  # pragma: no cover - helper
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------------------------
# Test studies


def uid_from(seed: str) -> str:
    return "2.25." + str(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:16], "big"))


@dataclass
class StudyFiles:
    study_uid: str
    patient_id: str
    study_date: str
    modality: str
    series_uids: list[str]
    files: list[Path]
    sop_uids: list[str]


def make_study(out: Path, n: int, *, seed: str = "s", rows: int = 64, cols: int = 64,
               series: int = 1, patient_id: str = "PAT-1", study_date: str = "20200115",
               modality: str = "CT", transfer_syntax: str | None = None) -> StudyFiles:
    """Write ``n`` CT/MR-like images of one study into ``out`` (created)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ts = transfer_syntax or ExplicitVRLittleEndian
    study_uid = uid_from(f"{seed}/study")
    series_uids = [uid_from(f"{seed}/series/{k}") for k in range(series)]
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4],
                                               "big"))
    files, sops = [], []
    for i in range(n):
        se = i % series
        sop = uid_from(f"{seed}/sop/{i}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.999.1"
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop
        ds.StudyDate = study_date
        ds.StudyTime = "101500"
        ds.AccessionNumber = f"ACC{seed[-6:]}"
        ds.Modality = modality
        ds.PatientName = f"TEST^{seed[-8:]}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[se]
        ds.StudyID = "1"
        ds.SeriesNumber = se + 1
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
        path = out / f"im{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        sops.append(sop)
    return StudyFiles(study_uid, patient_id, study_date, modality, series_uids, files, sops)


def dataset_bytes(data: bytes) -> bytes:
    """The bytes of a Part-10 file after its file meta information (the data set)."""
    import struct

    if data[128:132] != b"DICM":
        raise ValueError("not a Part-10 file")
    pos = 132
    while pos + 8 <= len(data):
        group = struct.unpack("<H", data[pos:pos + 2])[0]
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = struct.unpack("<I", data[pos + 8:pos + 12])[0]
            pos += 12 + length
        else:
            length = struct.unpack("<H", data[pos + 6:pos + 8])[0]
            pos += 8 + length
    return data[pos:]


def run_tool(args: Sequence[str], timeout: float = 300.0, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), check=False, capture_output=True, text=True,
                          timeout=timeout, env=tool_env(), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def findscu_sops(port: int, key: str, value: str, host: str = "127.0.0.1",
                 called: str = "SYNCNODE") -> list[str]:
    """SOP Instance UIDs DCMTK's ``findscu`` gets at IMAGE level (Study Root) for one
    matching key, e.g. ``findscu_sops(port, "PatientID", "P1")``."""
    res = run_tool([dcmtk("findscu"), "-S", "-aec", called, "-k", "QueryRetrieveLevel=IMAGE",
                    "-k", f"{key}={value}", "-k", "SOPInstanceUID", host, str(port)],
                   timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return [line.split("[", 1)[1].split("]", 1)[0].rstrip("\0")
            for line in res.stderr.splitlines() if "(0008,0018)" in line and "[" in line]


@contextmanager
def orthanc(workdir: Path, **kw: Any) -> Iterator[Orthanc]:
    server = Orthanc(workdir, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# Sending exact bytes (pynetdicom SCU)


def send_raw(host: str, port: int, items: Sequence[tuple[str, str, str, bytes]], *,
             called: str = "SYNCNODE", calling: str = "TESTSCU",
             contexts: Sequence[tuple[str, str]] | None = None) -> list[int | None]:
    """Send data sets as given, without decoding: ``items`` are (SOP class, SOP instance,
    transfer syntax, data set bytes). Returns each C-STORE status (None: not sent, e.g.
    no accepted context). One association for all."""
    import io as _io

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.presentation import build_context

    from syncnode.dicom.exporter import _accepted, _exchange
    from syncnode.dicom.transport import set_nodelay

    pairs = list(dict.fromkeys(contexts or [(c, t) for c, _i, t, _d in items]))
    ae = AE(calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(host, port, contexts=[build_context(c, [t]) for c, t in pairs],
                         ae_title=called)
    if not assoc.is_established:
        raise ConnectionError("association not accepted")
    set_nodelay(assoc.dul.socket.socket)
    out: list[int | None] = []
    try:
        for n, (sop_class, sop, ts, data) in enumerate(items):
            cx = _accepted(assoc, sop_class, ts)
            if cx is None:
                out.append(None)
                continue
            req = C_STORE()
            req.MessageID = n + 1
            req.Priority = 2
            req.AffectedSOPClassUID = sop_class
            req.AffectedSOPInstanceUID = sop
            req.DataSet = _io.BytesIO(data)
            status = _exchange(assoc, req, cx.context_id)
            out.append(None if status is None else int(status.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def file_item(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, SOP instance, transfer syntax, data set bytes) of a Part-10 file, read
    from its file meta without decoding the data set."""
    from pydicom import dcmread

    data = Path(path).read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID), dataset_bytes(data))


def echo(host: str, port: int, called: str = "SYNCNODE", calling: str = "TESTSCU") -> int | None:
    from pynetdicom import AE

    ae = AE(calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def rss_kib(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), in KiB."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")
