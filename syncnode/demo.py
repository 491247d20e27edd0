"""``syncnode demo``: three nodes on this machine, one study, watch it arrive everywhere.

Everything happens on loopback, in a temporary folder that is removed afterwards: three
node identities are created and pinned to each other, a small synthetic CT study is
generated and imported at the first node, and the other two pull it, verified chunk by
chunk. LAN discovery stays off.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

from .importer import import_paths
from .local import LocalNode
from .node import RunningNode

NAMES = ("hospital", "clinic", "cloud")


def _phantom_rows(size: int, z: float, rng: random.Random, noisy: dict[int, list[array]]
                  ) -> Iterator[array]:
    """Rows of one CT slice (stored values, Hounsfield + 1024): air, an elliptic body and
    an organ in it, with noise. Built from row segments cut out of pre-drawn noisy rows,
    so a 256x256 slice costs a few hundred slices of arrays, not 65,536 random draws."""
    b = 0.6 - 0.1 * z * z
    for r in range(size):
        y = -1 + 2 * r / max(size - 1, 1)
        spans = []  # (value, x from, x to) inside the body, the organ on top
        if abs(y) < b:
            half = 0.8 * math.sqrt(1 - (y / b) ** 2)
            spans.append((40, -half, half))
            oy = (y + 0.1 * z) / 0.2
            if abs(oy) < 1:
                ohalf = 0.25 * math.sqrt(1 - oy * oy)
                spans.append((100, max(0.2 - ohalf, -half), min(0.2 + ohalf, half)))
        values = [-1000] * size
        for value, x0, x1 in spans:
            c0 = max(0, math.ceil((x0 + 1) * (size - 1) / 2))
            c1 = min(size, math.floor((x1 + 1) * (size - 1) / 2) + 1)
            values[c0:c1] = [value] * max(0, c1 - c0)
        row = array("H")
        start = 0
        while start < size:  # runs of one value, each from a random noisy row
            end = start
            while end < size and values[end] == values[start]:
                end += 1
            row.extend(rng.choice(noisy[values[start]])[start:end])
            start = end
        yield row


def make_study(folder: Path, images: int = 40, size: int = 256, seed: int = 7) -> int:
    """Write a synthetic CT series (a body-like phantom with noise); return bytes written.
    Pure Python (no numpy): the demo needs nothing beyond syncnode's own dependencies."""
    rng = random.Random(seed)
    root = f"2.25.{rng.randrange(1, 2**62)}"
    study, series = f"{root}.1", f"{root}.2"
    def noisy_row(value: int) -> array:
        return array("H", [min(65535, max(0, round(value + 1024 + rng.gauss(0, 12))))
                           for _ in range(size)])

    noisy = {v: [noisy_row(v) for _ in range(32)] for v in (-1000, 40, 100)}
    total = 0
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        z = i / max(images - 1, 1) - 0.5
        pixels = array("H")
        for row in _phantom_rows(size, z, rng, noisy):
            pixels.extend(row)
        if sys.byteorder != "little":
            pixels.byteswap()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{root}.3.{i + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "DEMO^PHANTOM", "DEMO0001"
        ds.Modality, ds.StudyDate, ds.InstanceNumber = "CT", "20260101", i + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels.tobytes()
        path = folder / f"im{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


DEFAULT_TIMEOUT = 300.0  # seconds: a demo that has not converged by then has failed
STOP_SECONDS = 15.0


async def _demo(workdir: Path, duration: float | None, console: Console,
                timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Run the three nodes until they converge (or ``timeout`` passes); with ``duration``,
    keep them running that long in all (to watch the dashboards). True if converged."""
    nodes = [LocalNode.init(workdir / name) for name in NAMES]
    for a in nodes:
        for b in nodes:
            if a is not b:
                a.trust.pin(b.identity.cert_pem, b.node_id)
    running = []
    for n in nodes:
        r = RunningNode(n, n.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                      dicom_port=0, discovery=False, sync_interval=1.0))
        await r.start()
        running.append(r)
    for a, ra in zip(nodes, running, strict=True):
        for b, rb in zip(nodes, running, strict=True):
            if a is not b:
                a.catalog.add_peer(b.node_id.compact, f"https://127.0.0.1:{rb.ports['peer']}")
        ra.peers_changed()
    for name, r in zip(NAMES, running, strict=True):
        console.print(f"  {name:9} node {r.node.node_id.short}  dashboard "
                      f"http://127.0.0.1:{r.ports['api']}/  read key "
                      f"{r.node.new_api_keys.get('read', '(see syncnode apikey)')}")
    study = workdir / "study"
    size = await asyncio.to_thread(make_study, study)
    report = await asyncio.to_thread(import_paths, nodes[0], [study])
    running[0].local_change()
    console.print(f"  imported {report.imported} CT images ({size / 1e6:.1f} MB) at "
                  f"{NAMES[0]}; watch them arrive:")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    deadline = started + (duration if duration else timeout)
    target = nodes[0].catalog.counts()
    converged = False
    with Progress(TextColumn("  {task.description:9}"), BarColumn(), DownloadColumn(),
                  TextColumn("{task.fields[instances]} of " + str(target["instances"])
                             + " instances"), console=console) as progress:
        tasks = {n.node_id: progress.add_task(name, total=target["blob_bytes"], instances=0)
                 for name, n in zip(NAMES[1:], nodes[1:], strict=True)}
        while not stop.is_set() and time.monotonic() < deadline \
                and not (converged and not duration):
            for n in nodes[1:]:
                c = n.catalog.counts()
                progress.update(tasks[n.node_id], completed=c["blob_bytes"],
                                instances=c["instances"])
            roots = {n.catalog.merkle_root() for n in nodes}
            if len(roots) == 1 and not converged:
                converged = True
                progress.stop()
                console.print("  all three nodes hold the same catalog (Merkle root "
                              f"{next(iter(roots)).digest.hex()[:16]}…)")
                if duration:
                    console.print(f"  nodes keep running until {duration:.0f} s; open a "
                                  "dashboard above. Ctrl-C stops.")
                continue
            try:
                async with asyncio.timeout(0.2):
                    await stop.wait()
            except TimeoutError:
                pass
    for r in running:  # bounded: the demo ends even if a node is slow to stop
        try:
            async with asyncio.timeout(STOP_SECONDS):
                await r.stop()
        except TimeoutError:
            console.print(f"  node {r.node.node_id.short} did not stop within {STOP_SECONDS:.0f} s")
    for n in nodes:
        n.close()
    return converged


def run_demo(duration: float | None = None, keep: Path | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> bool:
    console = Console(highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="syncnode-demo-")) if keep is None else keep
    console.print(f"syncnode demo: three nodes on loopback in {workdir}")
    try:
        ok = asyncio.run(_demo(workdir, duration, console, timeout))
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print("demo finished: " + ("converged" if ok else "did NOT converge"))
    return ok
