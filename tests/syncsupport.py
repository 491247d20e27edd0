"""Helpers shared by the sync tests (tests/test_sync.py, tests/e2e/test_sync_e2e.py).

DICOM files are made here with pydicom (header) plus streamed random Pixel Data, so a test
can ask for a file of any size without holding it in memory. Nodes run in-process
(:class:`syncnode.node.RunningNode` on 127.0.0.1 port 0) or as ``syncnode run`` processes;
every wait is a bounded poll.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from syncnode import protocol
from syncnode.catalog import Catalog
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.protocol import RemoteNode
from syncnode.sync import walk_diff

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_ROOT = "1.2.826.0.1.3680043.10.1999"  # test UIDs: digits and dots, well under 64 chars
SYNCNODE = [sys.executable, "-m", "syncnode.cli"]


FAULTPROXY = Path(__file__).resolve().parent.parent / "tools" / "faultproxy.py"


def load_faultproxy() -> ModuleType:
    """``tools/faultproxy.py`` as a module (by path: ``tools`` is not a package), once."""
    name = "syncnode_tools_faultproxy"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FAULTPROXY)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the module up while being defined
        spec.loader.exec_module(module)
    return sys.modules[name]


def uid(*parts: int | str) -> str:
    return ".".join([UID_ROOT, *(str(p) for p in parts)])


def make_dicom(path: Path, *, sop: str, study: str, series: str, pixel_bytes: int = 2048,
               seed: int = 0, patient_id: str = "TEST", compressible: bool = False) -> Path:
    """Write a valid CT Part-10 file whose Pixel Data holds ``pixel_bytes`` random bytes
    (rounded up to whole 512x512 16-bit frames above 512 KiB). ``compressible``: random
    6-bit pixel values in 16-bit words instead (zstd shrinks them about 2.5x, like CT)."""
    if pixel_bytes > 512 * 512 * 2:
        rows = cols = 512
        frames = -(-pixel_bytes // (rows * cols * 2))
    else:
        rows, cols, frames = 1, max(1, pixel_bytes // 2), 1
    total = rows * cols * 2 * frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, total))
        left = total
        while left:
            n = min(left, 8 << 20)
            if compressible:
                f.write(rng.integers(0, 64, n // 2, dtype="<u2").tobytes())
            else:
                f.write(rng.bytes(n))
            left -= n
    os.replace(tmp, path)
    return path


def import_files(node: LocalNode, *paths: Path) -> None:
    from syncnode.importer import import_paths

    report = import_paths(node, list(paths))
    assert not report.failed, report.failed
    assert report.imported == len(paths), report


# -- the page cache ----------------------------------------------------------------------


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux ``fincore`` (mincore) reports."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def why_no_page_cache(folder: Path) -> str:
    """Why page-cache residency cannot be tested in ``folder`` ("" if it can): not Linux,
    or tmpfs/ramfs, where the cache is the file."""
    if sys.platform != "linux":
        return "page-cache residency is read with Linux fincore"
    fstype = subprocess.run(["findmnt", "--noheadings", "--output", "FSTYPE", "--target",
                             str(folder)], check=True, capture_output=True,
                            text=True).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        return f"needs a disk-backed filesystem ({folder} is on {fstype})"
    return ""


def skip_without_page_cache(folder: Path) -> None:
    """Skip a test of page-cache residency where ``folder`` has no page cache of its own."""
    why = why_no_page_cache(folder)
    if why:
        pytest.skip(why)


# -- views of a node ---------------------------------------------------------------------


def live_view(node: LocalNode) -> list[dict[str, Any]]:
    return [i.to_dict() for i in node.catalog.instances()]


def blob_set(node: LocalNode) -> set[str]:
    return set(node.store.iter_hashes())


def root(node: LocalNode) -> str:
    return node.catalog.merkle_root().digest.hex()


def assert_blobs_intact(node: LocalNode) -> None:
    """Every stored blob re-hashes to its name, and ``verify`` finds nothing."""
    for h, damage in node.store.verify_all():
        assert damage is None, (h, damage)
    report = node.verify()
    assert report.ok, report


def peer_state(node: LocalNode, peer: LocalNode) -> dict[str, Any]:
    return node.catalog.peer_states().get(peer.node_id.compact, {})


def _round_done_since(node: LocalNode, peer: LocalNode, since: float) -> bool:
    return peer_state(node, peer).get("last_success", 0.0) > since


async def settled_state(node: LocalNode, peer: LocalNode, timeout: float = 10.0
                        ) -> dict[str, Any]:
    """The peer state once a sync round has succeeded after this call: counters are saved
    in full at the end of a round (in between, at most every 0.5 s)."""
    since = time.time()
    await wait_for(lambda: _round_done_since(node, peer, since), timeout,
                   f"a successful round of {node.node_id.short} with {peer.node_id.short}")
    return peer_state(node, peer)


def settled_state_sync(node: LocalNode, peer: LocalNode, timeout: float = 10.0
                       ) -> dict[str, Any]:
    """:func:`settled_state` for code without an event loop (nodes in other processes)."""
    since = time.time()
    deadline = time.monotonic() + timeout
    while not _round_done_since(node, peer, since):
        if time.monotonic() > deadline:
            raise AssertionError(f"no successful sync round of {node.node_id.short} with "
                                 f"{peer.node_id.short} within {timeout}s")
        time.sleep(0.05)
    return peer_state(node, peer)


# -- trust -------------------------------------------------------------------------------
def pin(node: LocalNode, other: LocalNode) -> None:
    node.trust.pin((other.data / "node.crt").read_bytes(), other.node_id)


def add_peer(node: LocalNode, other: LocalNode, url: str, push: str = "auto") -> None:
    """Trust ``other`` (pinned from its certificate file) and sync with it at ``url``."""
    pin(node, other)
    node.catalog.add_peer(other.node_id.compact, url, push)


def pull_from(node: LocalNode, running: RunningNode, other: LocalNode, url: str) -> None:
    """``node`` (running as ``running``) pulls from ``other`` at ``url`` and never pushes;
    ``other`` trusts it. The usual set-up of a one-way transfer test."""
    add_peer(node, other, url, push="never")
    pin(other, node)
    running.peers_changed()


# -- in-process nodes --------------------------------------------------------------------
async def start_node(node: LocalNode, interval: float = 0.5, **flags: Any) -> RunningNode:
    """Run ``node`` in this process on loopback ports the system picks, no discovery;
    ``flags`` override any of these settings."""
    settings: dict[str, Any] = dict(peer_host="127.0.0.1", peer_port=0, api_host="127.0.0.1",
                                    api_port=0, dicom_host="127.0.0.1", dicom_port=0,
                                    sync_interval=interval, discovery=False)
    running = RunningNode(node, node.settings(**{**settings, **flags}))
    await running.start()
    return running


async def start_new_node(data: Path, interval: float = 0.5, **flags: Any) -> RunningNode:
    """``syncnode init`` a node in ``data`` and :func:`start_node` it."""
    return await start_node(LocalNode.init(data), interval, **flags)


def url_of(running: RunningNode) -> str:
    return f"https://127.0.0.1:{running.ports['peer']}"


async def wait_for(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
                   step: float = 0.1, describe: Callable[[], Any] | None = None) -> float:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds. Returns the wait."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            detail = f": {describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        await asyncio.sleep(step)


def converged(nodes: list[LocalNode]) -> bool:
    roots = {root(n) for n in nodes}
    if len(roots) != 1:
        return False
    views = [live_view(n) for n in nodes]
    blobs = [blob_set(n) for n in nodes]
    return all(v == views[0] for v in views) and all(b == blobs[0] for b in blobs)


def describe_nodes(nodes: list[LocalNode]) -> list[dict[str, Any]]:
    return [{"root": root(n)[:12], "events": n.catalog.event_count(),
             "live": len(live_view(n)), "blobs": len(blob_set(n)),
             "peers": {k[:7]: {f: v.get(f) for f in ("state", "last_error", "bytes_received",
                                                     "integrity_errors")}
                       for k, v in n.catalog.peer_states().items()}} for n in nodes]


# -- `syncnode` as a process -------------------------------------------------------------
def cli(*args: str | Path, data: Path | None = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [*SYNCNODE, *(str(a) for a in args)]
    if data is not None:
        cmd += ["--data", str(data)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def run_cli(*args: str | Path, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """``syncnode ARGS`` as an operator runs it: no ``SYNCNODE_*`` settings inherited from
    this environment, no colour, a wide terminal; the result is returned unchecked."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    clean.update({"NO_COLOR": "1", "COLUMNS": "300"}, **(env or {}))
    return subprocess.run([*SYNCNODE, *map(str, args)], capture_output=True, text=True,
                          env=clean, timeout=timeout, check=False)


def cli_json(*args: str | Path, data: Path) -> Any:
    return json.loads(cli(*args, "--json", data=data).stdout)


# Every ``syncnode run`` log a test started, in order: a failed test's report ends with
# their tails (tests/conftest.py), so a failure under load can be read without re-running.
NODE_LOGS: list[Path] = []


def log_tails(logs: list[Path], lines: int = 40) -> str:
    """The last ``lines`` lines of each log that exists, under its path."""
    parts = []
    for log in dict.fromkeys(logs):  # one section per file, in order
        if log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


class NodeProcess:
    """``syncnode run`` in its own process group; ``kill()`` SIGKILLs the whole group."""

    def __init__(self, data: Path, log: Path, interval: float = 0.5) -> None:
        self.data, self.log_path = data, log
        NODE_LOGS.append(log)
        (data / "ports.json").unlink(missing_ok=True)
        self._log = open(log, "ab")  # open as long as the process runs
        self.proc = subprocess.Popen(
            [*SYNCNODE, "run", "--data", str(data), "--peer-host", "127.0.0.1",
             "--peer-port", "0", "--api-port", "0", "--dicom-port", "0", "--no-discovery",
             "--sync-interval", str(interval)],
            env={**os.environ, "SYNCNODE_DICOM_HOST": "127.0.0.1"},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        ports = self.data / "ports.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"syncnode run exited with {self.proc.returncode}:\n"
                                     f"{self.log_path.read_text(errors='replace')[-3000:]}")
            if ports.is_file():
                try:
                    return int(json.loads(ports.read_text())["peer"])
                except (ValueError, KeyError):
                    pass  # being written: read it again
            time.sleep(0.05)
        raise AssertionError(f"syncnode run did not write {ports} within {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass  # exited between poll() and killpg()
        try:
            self.proc.wait(10)
        finally:
            self._log.close()

    def stop(self) -> None:
        """SIGTERM (clean stop), then SIGKILL if it does not end within 10 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.kill()


@contextmanager
def node_processes() -> Iterator[list[NodeProcess]]:
    """Collects the processes a test starts; kills any still running at the end."""
    procs: list[NodeProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


# -- catalogs without DICOM files (for many events) --------------------------------------
def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def tiny_dicom(sop: str, study: str, series: str, note: str) -> bytes:
    """A minimal valid Part-10 CT instance (one pixel), encoded by hand: thousands of
    them cost milliseconds. ``note`` (Image Comments) makes the bytes differ per node."""
    from syncnode.dicom.scp import file_meta_bytes

    body = b"".join([
        _element(0x00080016, b"UI", CT_IMAGE_STORAGE.encode()),
        _element(0x00080018, b"UI", sop.encode()),
        _element(0x0020000D, b"UI", study.encode()),
        _element(0x0020000E, b"UI", series.encode()),
        _element(0x00204000, b"LT", note.encode()),
        _element(0x00280002, b"US", struct.pack("<H", 1)),  # one 1x1 16-bit pixel
        _element(0x00280004, b"CS", b"MONOCHROME2"),
        _element(0x00280010, b"US", struct.pack("<H", 1)),
        _element(0x00280011, b"US", struct.pack("<H", 1)),
        _element(0x00280100, b"US", struct.pack("<H", 16)),
        _element(0x00280101, b"US", struct.pack("<H", 16)),
        _element(0x00280102, b"US", struct.pack("<H", 15)),
        _element(0x00280103, b"US", struct.pack("<H", 0)),
        struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 2) + b"\0\0",
    ])
    return file_meta_bytes(CT_IMAGE_STORAGE, sop, str(ExplicitVRLittleEndian)) + body


def add_instances(node: LocalNode, sops: list[str], study: str | None = None) -> list[str]:
    """Put one small DICOM instance per SOP Instance UID (:func:`tiny_dicom`); return the
    put event ids."""
    from syncnode.dicomfile import inspect_bytes

    study = study or uid(99)
    items = []
    for sop in sops:
        data = tiny_dicom(sop, study, study + ".1", f"instance of {node.node_id.compact}")
        info = node.store.put_bytes(data, sync_dir=False)
        items.append((inspect_bytes(data).to_dict(), info))
    node.store.flush_dirs()
    return [eid for eid, _new in node.catalog.add_local_puts(items, blob_present=node.store.has)]


def fill_disk(disk: Path) -> Path:
    """Take every free byte of the filesystem at ``disk`` (a small tmpfs the test mounted)
    with a file; return its path (deleting it gives the space back)."""
    import errno
    import shutil

    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    assert shutil.disk_usage(disk).free < 4096
    return filler


def catalog_fetch(catalog: Catalog) -> Callable[[str], Awaitable[RemoteNode]]:
    """What ``GET /peer/v1/merkle?prefix=P`` would answer from ``catalog`` (the server's
    own :func:`syncnode.protocol.read_merkle`, through the wire format), without a
    network."""

    async def fetch(prefix: str) -> RemoteNode:
        with catalog.snapshot():
            answer = protocol.read_merkle(catalog, prefix)
        return protocol.parse_merkle(protocol.merkle_response(prefix, answer), prefix)

    return fetch


async def walk_batches(local: LocalNode, remote: Catalog) -> list[tuple[list[str], list[str]]]:
    """The batches :func:`syncnode.sync.walk_diff` yields for ``local`` against ``remote``."""
    return [batch async for batch in walk_diff(local, catalog_fetch(remote))]


def alter_in_place(path: Path, offset: int = -10) -> None:
    """Flip one byte of a stored blob without changing its size, then put its modification
    time back (what a careless tool, or someone hiding a change, would do): only the change
    time tells, which the known-good record must catch. ``offset`` < 0 counts from the end
    (a pixel byte in the test instances)."""
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else st.st_size + offset)
        pos = f.tell()
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    path.chmod(st.st_mode & 0o777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def count_verified_reads(monkeypatch: Any) -> list[str]:
    """The blob hashes read through ``BlobStore.read_verified`` from now on (the test's
    ``monkeypatch`` undoes it), in order."""
    from syncnode.blobstore import BlobStore

    verified: list[str] = []
    real = BlobStore.read_verified

    def counting(self: BlobStore, blob_hash: str, *args: Any, **kwargs: Any) -> Any:
        verified.append(blob_hash)
        return real(self, blob_hash, *args, **kwargs)

    monkeypatch.setattr(BlobStore, "read_verified", counting)
    return verified
