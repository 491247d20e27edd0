"""Crash safety: ``syncnode import`` killed with SIGKILL at random moments never leaves a
damaged blob, a catalog row pointing at a missing or partial blob, or a stale Merkle index;
a final re-run completes and the catalog holds exactly the expected instances."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from syncnode import merkle
from syncnode.blobstore import CHUNK_SIZE, BlobStore
from syncnode.catalog import Catalog
from syncnode.dicomfile import inspect_file

SYNCNODE = shutil.which("syncnode")
CT = "1.2.840.10008.5.1.4.1.1.2"
N_SMALL = 200  # 64 x 64 CT slices, ~8 KB each
N_LARGE = 3  # 1024 x 1024 x 1-2 frames: 2-4 MiB, several chunks each
MIN_KILLS = 20
SEED = 20241125

pytestmark = pytest.mark.skipif(SYNCNODE is None, reason="the syncnode script is not installed")


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}


def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNCNODE, *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout, check=False)


def write_instance(path: Path, study: int, series: int, number: int, rows: int, cols: int,
                   frames: int, rng: random.Random) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = f"2.25.{SEED}.{study}.{series}.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = f"2.25.{SEED}.{study}"
    ds.SeriesInstanceUID = f"2.25.{SEED}.{study}.{series}"
    ds.PatientID = f"CRASH{study}"
    ds.Modality = "CT"
    ds.StudyDate = "20240102"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = rng.randbytes(rows * cols * 2 * frames)
    ds.save_as(path, enforce_file_format=True)


@dataclass
class DataSet:
    folder: Path
    expected: dict[str, str]  # SOP Instance UID -> BLAKE3 of the file
    template: Path  # an initialised, empty node


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DataSet:
    base = tmp_path_factory.mktemp("crash")
    folder = base / "dicom"
    rng = random.Random(SEED)
    for i in range(N_SMALL):
        study, series = 1 + i // 70, i // 20
        d = folder / f"study{study}" / f"series{series:02d}"
        d.mkdir(parents=True, exist_ok=True)
        write_instance(d / f"im{i:04d}.dcm", study, series, i, 64, 64, 1, rng)
    big = folder / "study9" / "series90"
    big.mkdir(parents=True)
    for j in range(N_LARGE):
        write_instance(big / f"big{j}.dcm", 9, 90, 1000 + j, 1024, 1024, 1 + j % 2, rng)
    expected = {}
    for f in folder.rglob("*.dcm"):
        expected[inspect_file(f).sop_instance_uid] = blake3.blake3(f.read_bytes()).hexdigest()
    assert len(expected) == N_SMALL + N_LARGE
    assert sum(f.stat().st_size > 2 * CHUNK_SIZE for f in big.iterdir()) == N_LARGE
    template = base / "template"
    proc = run("init", "--data", template)
    assert proc.returncode == 0, proc.stderr
    return DataSet(folder, expected, template)


def fresh_node(ds: DataSet, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ds.template, dest)
    return dest


def check_consistent(data: Path, ds: DataSet) -> int:
    """Everything the principles promise after a crash. Returns the number of instances."""
    cat = Catalog(data / "catalog.db")
    try:
        rows = cat._db.execute(
            "SELECT sop_instance_uid, blob, size, chunks FROM puts WHERE removed=0").fetchall()
        store = BlobStore(data)
        for sop, blob, size, chunks_root in rows:
            # the catalog only ever records the right bytes for an instance
            assert ds.expected.get(sop) == blob, sop
            path = store.path(blob)
            assert path.is_file(), f"catalog row for {sop} points at a missing blob"
            content = path.read_bytes()
            assert len(content) == size, f"blob of {sop}: {len(content)} bytes, not {size}"
            assert blake3.blake3(content).hexdigest() == blob, f"blob of {sop} is not whole"
            digests = b"".join(blake3.blake3(content[i:i + CHUNK_SIZE]).digest()
                               for i in range(0, len(content), CHUNK_SIZE))
            assert store.chunk_digests(blob) == digests, f"chunk list of {sop}"
            assert store.chunks_path(blob).exists() == (size > CHUNK_SIZE), sop
            assert blake3.blake3(digests).hexdigest() == chunks_root, f"chunks root of {sop}"
        # every blob in the store is whole, referenced or not
        for h in store.iter_hashes():
            actual = blake3.blake3(store.path(h).read_bytes()).hexdigest()
            assert actual == h, f"stored blob {h} is not whole (hashes to {actual})"
        ids = [r[0] for r in cat._db.execute("SELECT id FROM events")]
        root = cat.merkle_root()
        assert root == cat.recompute_merkle() == merkle.MemoryMerkle(ids).root(), "Merkle"
        assert root.count == len(ids) == len(rows), (root.count, len(ids), len(rows))
        live = {i.sop_instance_uid: i.blob for i in cat.instances()}
        assert live == {sop: blob for sop, blob, _, _ in rows}, "live view"
        return len(live)
    finally:
        cat.close()


def timed_import(data: Path, ds: DataSet) -> float:
    start = time.monotonic()
    proc = run("import", "--data", data, "--quiet", ds.folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return time.monotonic() - start


@pytest.mark.timeout(240)
def test_import_survives_sigkill_at_any_moment(dataset: DataSet, tmp_path: Path) -> None:
    ds = dataset
    # one full run first, to spread the kills over the whole duration of an import
    reference = fresh_node(ds, tmp_path / "reference")
    duration = timed_import(reference, ds)
    assert check_consistent(reference, ds) == len(ds.expected)

    rng = random.Random(SEED)
    data = tmp_path / "node"
    kills = completed = 0
    progress = []  # share of the blobs stored when a run that started empty was killed
    for attempt in range(3 * MIN_KILLS):
        if kills >= MIN_KILLS:
            break
        fresh = attempt % 2 == 0  # every other run starts from an empty node, the others
        if fresh:  # resume from what the previous kill left
            fresh_node(ds, data)
        delay = rng.uniform(0.0, duration)
        log = open(tmp_path / "import.log", "ab")
        started = time.monotonic()
        proc = subprocess.Popen([SYNCNODE, "import", "--data", str(data), "--quiet",
                                 str(ds.folder)], stdout=log, stderr=log, env=env())
        try:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=60)
            elapsed = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        # (an import may finish between the check and the signal: then it exits 0)
        killed = rc == -signal.SIGKILL
        if killed:
            kills += 1
        else:
            assert rc == 0, (rc, (tmp_path / "import.log").read_text()[-5000:])
            completed += 1
        # check_consistent re-hashes every blob after every kill; the CLI's own verify (a
        # Python start each time) runs after every fourth
        if attempt % 4 == 3:
            verify = run("verify", "--data", data)
            assert verify.returncode == 0, verify.stdout + verify.stderr
        check_consistent(data, ds)
        if fresh:
            # follow the speed of the machine (other work on it changes the import time),
            # so that the kills keep covering the whole import
            # blobs already installed, plus those written and waiting in tmp/ for their
            # batch to be made durable (the import installs a batch at a time)
            stored = len(list(BlobStore(data).iter_hashes()))
            staged = len(list((data / "tmp").glob("blob-*.tmp")))
            done = min(1.0, (stored + staged) / len(ds.expected))
            if killed:
                progress.append(round(done, 2))
            if not killed:
                duration = (duration + elapsed) / 2
            elif done > 0.2:
                duration = (duration + delay / done) / 2
    assert kills >= MIN_KILLS, f"only {kills} kills landed ({completed} imports finished first)"
    # the kills hit the import early and late, not only while the program was starting
    assert min(progress) < 0.3 and max(progress) > 0.5, progress

    # a final run completes and leaves exactly the expected catalog
    timed_import(data, ds)
    assert check_consistent(data, ds) == len(ds.expected)
    verify = run("verify", "--data", data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    listed = json.loads(run("ls", "--data", data, "--json").stdout)
    assert {r["sop_instance_uid"]: r["blob"] for r in listed} == ds.expected
    status = json.loads(run("status", "--data", data, "--json").stdout)
    assert status["events"] == status["put_events"] == len(ds.expected)
    # temp files left by the killed runs are collected, and no blob is orphaned
    gc = run("gc", "--data", data)
    assert gc.returncode == 0 and "0 blobs removed" in gc.stdout, gc.stdout
    assert not list((data / "tmp").glob("*.tmp"))
    assert set(BlobStore(data).iter_hashes()) == set(ds.expected.values())
