"""Ingest benchmark for syncnode (a benchmark, not a test): three figures in one run.

What it measures, and how
-------------------------
1. **Import throughput.** ``tools/gen_dataset.py`` writes a synthetic CT/MR set
   (``--scale 0.1`` of the ~6 GB / 7,767-file set by default, about 600 MB). The set is read
   once before anything is timed (a *warm* page cache: dropping caches needs privileges, so
   every contender reads from memory instead). Then, ``--repeat`` times, each of these is
   timed by wall clock, the order being reversed on every other repeat so that a noisy,
   shared machine does not favour the one that always runs first:

   - ``syncnode import``: the real CLI, as a subprocess, into a freshly ``syncnode init``-ed
     data folder (the init is not timed). Its time includes interpreter start-up and the
     per-blob fsyncs syncnode makes for durability.
   - ``cp -r`` of the same folder into a fresh folder on the same filesystem (no fsync).
   - ``cp -r`` then ``sync`` (timed together: the honest comparison for a durable copy;
     ``sync`` flushes the whole machine, other users' dirty pages included).
   - BLAKE3 alone: python ``blake3`` over every file, read in 1 MiB blocks, in-process.

   After each measurement its output is deleted and ``sync`` is run (not timed), so the next
   one does not pay for the previous one's write-back. The median of the repeats is
   reported, as files/s, MB/s (10**6 bytes) and as ratios of syncnode's throughput to each
   contender's (ratio = contender time / import time; 1.0 = as fast).

2. **Catalog insert rate with Merkle maintenance.** ``--events`` (default 1,000,000)
   synthetic put events (a study/series/instance hierarchy of random ``2.25.`` UIDs, random
   blob and chunk hashes, three origins, each event signed by its origin's key as real
   nodes sign theirs; ``--unsigned`` for the unsigned legacy form, taken without
   verification, as a baseline) are generated, signed and encoded *before* the clock
   starts; they are then applied with ``Catalog.apply`` in batches of ``--batch`` (default
   2,000; one transaction each, as a peer sync would) into a fresh catalog, timing only the
   ``apply`` calls. The rate is reported per ``--window`` (default 100,000) events; the rate
   of the last window is the figure "at 1M events". At the end the incremental Merkle root
   must equal ``Catalog.recompute_merkle()``.

3. **Peak memory of a large import.** One multi-frame instance of ``--multiframe-gb`` GB
   (default 2.0, from the generator's multiframe option) is imported by the real CLI into a
   fresh node. Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the per-child form of
   ``getrusage(RUSAGE_CHILDREN)``, unaffected by earlier children), taken by a small launcher
   process (see ``LAUNCHER``: a direct child would inherit this process's own peak), and
   cross-checked by polling ``VmHWM`` in ``/proc/PID/status`` every 20 ms. The same is done
   for a single small file, as the baseline of interpreter and imports.

Targets (printed with PASS/MISS): import >= 50 % of ``cp -r`` throughput; >= 5,000 events/s
at 1M events; peak memory of the large import < 150 MB (10**6 bytes).

Everything happens in a work folder (``--workdir``, default a new temp folder under the
system temp dir), removed at the end unless ``--keep``. ``--json FILE`` writes every figure
and the environment.

``--scratch-fs GB`` runs everything in a fresh, journaled ext4 in a loop device instead
(root only; gone at the end, ``--keep`` or not). Use it on a machine whose own filesystem is
an ext4 without a journal: there, every file created in the seconds after a mass delete
first scans past the inodes just freed, so each contender pays for the deletion of the one
before it (in one run here, ``cp -r`` took 0.18-0.72 s and the import 1.1-1.6 s; on the
scratch filesystem 0.17-0.18 s and 0.92-1.01 s). Usage::

    python tools/bench_ingest.py                      # full run, 10-20 minutes
    python tools/bench_ingest.py --scratch-fs 16      # the same, on a journaled ext4
    python tools/bench_ingest.py --scale 0.01 --events 50000 --multiframe-gb 0.2 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    REPO,
    SCRATCH_FS_HELP,
    dicom_files,
    load_generator,
    log,
    remove,
    run,
    scratch_fs,
    sync_fs,
)

MB = 1_000_000
MIB = 1 << 20
READ_BLOCK = 1 << 20

TARGET_IMPORT_VS_CP = 0.50
TARGET_EVENTS_PER_S = 5_000
TARGET_EVENTS_AT = 1_000_000
TARGET_PEAK_BYTES = 150 * MB

DEFAULTS: dict[str, Any] = {
    "scale": 0.1, "seed": 0, "repeat": 3, "events": 1_000_000, "batch": 2_000,
    "window": 100_000, "multiframe_gb": 2.0,
}




# -- helpers ------------------------------------------------------------------------------




def find_syncnode() -> list[str]:
    """The ``syncnode`` console script next to this interpreter (no pyenv shim in between)."""
    beside = Path(sys.executable).parent / "syncnode"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("syncnode")
    if found is None:
        raise SystemExit("the syncnode command is not installed (pip install -e .)")
    return [found]




def read_all(files: Sequence[Path]) -> int:
    """Read every file once (warms the page cache); return the byte count."""
    total = 0
    buf = bytearray(READ_BLOCK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def blake3_files(files: Sequence[Path]) -> int:
    """Hash every file with BLAKE3, read in 1 MiB blocks like the importer does."""
    total = 0
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    for f in files:
        h = blake3.blake3()
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
                total += n
        h.digest()
    return total








def children_cpu() -> float:
    """User + system CPU seconds of all waited-for children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_io() -> dict[str, int]:
    """This process's /proc/self/io counters (bytes that reached the block layer etc.)."""
    out: dict[str, int] = {}
    with open("/proc/self/io") as fh:
        for line in fh:
            key, value = line.split(":")
            out[key] = int(value)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


# -- environment --------------------------------------------------------------------------


def environment(workdir: Path) -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError as exc:
        cpu_model = f"unknown ({exc.strerror})"
    mem_total = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError as exc:
        log(f"cannot read /proc/meminfo: {exc}")
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         check=False, capture_output=True, text=True)
    df = subprocess.run(["df", "-PT", str(workdir)], check=False, capture_output=True,
                        text=True)
    fs = df.stdout.splitlines()[-1].split() if df.returncode == 0 else []
    try:
        from importlib.metadata import version
        syncnode_version = version("syncnode")
    except ImportError as exc:
        syncnode_version = f"unknown ({exc})"
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "blake3": getattr(blake3, "__version__", "unknown"),
        "syncnode": syncnode_version,
        "git": git.stdout.strip() if git.returncode == 0 else "unknown",
        "workdir": str(workdir),
        "workdir_fs": {"device": fs[0], "type": fs[1]} if len(fs) >= 2 else {},
        "loadavg_start": os.getloadavg(),
        "cache": "warm: each data set is read once before measuring (no drop_caches)",
    }


# -- part 1: import throughput -------------------------------------------------------------


@dataclass
class ImportResults:
    files: int
    bytes: int
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # CPU s (user + sys)
    loadavg: list[float] = field(default_factory=list)  # 1-min load before each measurement
    orders: list[list[str]] = field(default_factory=list)
    sync_part: list[float] = field(default_factory=list)  # the sync share of cp+sync
    cli_startup: list[float] = field(default_factory=list)


CONTENDERS = ("syncnode import", "cp -r", "cp -r + sync", "blake3 only")


def bench_import(gen: ModuleType, work: Path, syncnode: list[str], scale: float, seed: int,
                 repeat: int) -> ImportResults:
    gen_dir = work / "gen"
    log(f"generating the data set (scale {scale}, seed {seed}) into {gen_dir}")
    t0 = time.perf_counter()
    gen.generate(gen_dir, scale=scale, seed=seed)
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    # Only DICOM files in the measured folder: manifest.json would be rejected by import.
    dataset = gen_dir
    for extra in [p for p in gen_dir.iterdir() if p.is_file()]:
        extra.rename(work / extra.name)
    files = dicom_files(dataset)
    if not files:
        raise RuntimeError(f"the generator wrote no .dcm files under {dataset}")
    total = read_all(files)  # warm the page cache
    log(f"data set: {len(files)} files, {total / MB:.1f} MB (read once: warm cache)")
    res = ImportResults(files=len(files), bytes=total, times={c: [] for c in CONTENDERS},
                        cpu={c: [] for c in CONTENDERS})
    sync_fs()

    # Each action returns (wall seconds, CPU seconds of the work measured).
    def do_import(dst: Path) -> tuple[float, float]:
        run([*syncnode, "init", "--data", str(dst), "--json"])
        sync_fs()
        c, t = children_cpu(), time.perf_counter()
        proc = run([*syncnode, "import", "--data", str(dst), "--json", str(dataset)])
        elapsed, cpu = time.perf_counter() - t, children_cpu() - c
        report = json.loads(proc.stdout)
        if report["imported"] != len(files) or report["failed"]:
            raise RuntimeError(f"import did not take every file: {proc.stdout[:2000]}")
        return elapsed, cpu

    def do_cp(dst: Path) -> tuple[float, float]:
        c, t = children_cpu(), time.perf_counter()
        run(["cp", "-r", str(dataset), str(dst)])
        return time.perf_counter() - t, children_cpu() - c

    def do_cp_sync(dst: Path) -> tuple[float, float]:
        c, t = children_cpu(), time.perf_counter()
        run(["cp", "-r", str(dataset), str(dst)])
        t_cp = time.perf_counter()
        sync_fs()
        end = time.perf_counter()
        res.sync_part.append(end - t_cp)
        return end - t, children_cpu() - c

    def do_blake3(_dst: Path) -> tuple[float, float]:
        c, t = time.process_time(), time.perf_counter()
        n = blake3_files(files)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        if n != total:
            raise RuntimeError(f"blake3 pass read {n} bytes, expected {total}")
        return elapsed, cpu

    actions: dict[str, Callable[[Path], tuple[float, float]]] = {
        "syncnode import": do_import, "cp -r": do_cp, "cp -r + sync": do_cp_sync,
        "blake3 only": do_blake3,
    }
    for i in range(repeat):
        order = list(CONTENDERS) if i % 2 == 0 else list(reversed(CONTENDERS))
        res.orders.append(order)
        for name in order:
            dst = work / f"out-{i}"
            remove(dst)
            res.loadavg.append(os.getloadavg()[0])
            elapsed, cpu = actions[name](dst)
            res.times[name].append(elapsed)
            res.cpu[name].append(cpu)
            log(f"repeat {i + 1}/{repeat}: {name:<16} {elapsed:7.2f} s "
                f"({total / MB / elapsed:6.1f} MB/s), CPU {cpu:6.2f} s, "
                f"load {res.loadavg[-1]:.1f}")
            remove(dst)
            sync_fs()  # the next measurement starts with no write-back pending
        t = time.perf_counter()
        run([*syncnode, "--version"])
        res.cli_startup.append(time.perf_counter() - t)
    return res


def import_summary(res: ImportResults) -> dict[str, Any]:
    med = {name: median(ts) for name, ts in res.times.items()}
    t_imp = med["syncnode import"]
    rows = {}
    for name, t in med.items():
        rows[name] = {
            "seconds_median": t, "seconds_all": res.times[name],
            "seconds_min": min(res.times[name]), "seconds_max": max(res.times[name]),
            "cpu_seconds_median": median(res.cpu[name]), "cpu_seconds_all": res.cpu[name],
            "files_per_s": res.files / t, "mb_per_s": res.bytes / MB / t,
            "import_throughput_ratio": t / t_imp,
        }
    ratio_cp = med["cp -r"] / t_imp
    return {
        "files": res.files, "bytes": res.bytes, "repeat": len(res.orders),
        "orders": res.orders, "contenders": rows,
        "sync_share_of_cp_sync_seconds": res.sync_part,
        "cli_startup_seconds_median": median(res.cli_startup),
        "loadavg_before_each": res.loadavg,
        "ratio_vs_cp_cpu": median(res.cpu["cp -r"]) / median(res.cpu["syncnode import"]),
        "ratio_vs_cp": ratio_cp,
        "ratio_vs_cp_sync": med["cp -r + sync"] / t_imp,
        "ratio_vs_blake3": med["blake3 only"] / t_imp,
        "target": f"import >= {TARGET_IMPORT_VS_CP:.0%} of cp -r throughput",
        "pass": ratio_cp >= TARGET_IMPORT_VS_CP,
    }


# -- part 2: catalog inserts --------------------------------------------------------------

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def make_events(n: int, seed: int, signers: list[Any] | None = None
                ) -> list[tuple[str, bytes]]:
    """``n`` put events as (hex id, body): studies of 1-6 series of 10-400 instances,
    signed by ``signers`` (``originkit.FakeOrigin``), or unsigned without them."""
    from syncnode import events as ev

    rng = random.Random(seed)

    def uid() -> str:
        return f"2.25.{rng.getrandbits(125)}"

    by_origin = {s.id: s for s in signers or []}
    origins = (list(by_origin) if signers
               else [f"bench-peer-{k}-{rng.randbytes(8).hex()}" for k in range(3)])
    hlc0 = 1_760_000_000_000 << ev.HLC_COUNTER_BITS
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        modality = rng.choice(("CT", "MR"))
        patient = f"P{rng.randrange(1_000_000):06d}"
        study = uid()
        date = f"20{rng.randrange(10, 26)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
        for _ in range(rng.randint(1, 6)):
            series = uid()
            for _ in range(rng.randint(10, 400)):
                if len(out) >= n:
                    break
                event = ev.PutEvent(
                    origin=rng.choice(origins), hlc=hlc0 + len(out),
                    blob=rng.randbytes(32).hex(), size=rng.randrange(50_000, 4_000_000),
                    chunks=rng.randbytes(32).hex(), sop_class_uid=SOP_CLASSES[modality],
                    sop_instance_uid=uid(), series_instance_uid=series,
                    study_instance_uid=study, patient_id=patient, modality=modality,
                    study_date=date, transfer_syntax_uid=EXPLICIT_LE)
                if signers:
                    out.append(by_origin[event.origin].sign(event))
                else:
                    body = ev.encode(event)
                    out.append((ev.event_id(body), body))
    return out


def bench_events(work: Path, n: int, batch: int, window: int, seed: int,
                 unsigned: bool = False) -> dict[str, Any]:
    from originkit import FakeOrigin

    from syncnode.authority import PERMISSIVE
    from syncnode.catalog import Catalog

    signers = None if unsigned else [FakeOrigin(f"bench-{k}") for k in range(3)]
    log(f"generating {n:,} {'unsigned' if unsigned else 'signed'} put events (not timed)")
    t0 = time.perf_counter()
    events = make_events(n, seed, signers)
    gen_s = time.perf_counter() - t0
    log(f"generated in {gen_s:.1f} s")
    gc.collect()
    gc.freeze()  # the event list must not make the collector slower during apply

    db_path = work / "events" / "catalog.db"
    db_path.parent.mkdir(parents=True)
    catalog = Catalog(db_path, node_id="bench-ingest-node",
                      policy=PERMISSIVE if unsigned else None)
    catalog.offer_certificates(s.cert_der for s in signers or [])
    windows: list[dict[str, Any]] = []
    applied = 0
    w_start, w_time, w_cpu, total_time = 0, 0.0, 0.0, 0.0
    w_io = self_io()
    next_edge = window
    try:
        for start in range(0, n, batch):
            chunk = events[start:start + batch]
            c, t = time.process_time(), time.perf_counter()
            result = catalog.apply(chunk)
            dt = time.perf_counter() - t
            w_cpu += time.process_time() - c
            if result.rejected or len(result.inserted) != len(chunk):
                some = dict(list(result.rejected.items())[:3])
                raise RuntimeError(f"apply inserted {len(result.inserted)} of {len(chunk)} "
                                   f"events; rejected: {some}")
            applied += len(chunk)
            w_time += dt
            total_time += dt
            if applied >= next_edge or applied == n:
                count = applied - w_start
                io = self_io()
                written = io["write_bytes"] - w_io["write_bytes"]
                windows.append({"events_from": w_start, "events_to": applied,
                                "seconds": w_time, "events_per_s": count / w_time,
                                "cpu_seconds": w_cpu, "events_per_cpu_s": count / w_cpu,
                                "disk_write_bytes": written,
                                "write_syscalls": io["syscw"] - w_io["syscw"],
                                "loadavg": os.getloadavg()[0]})
                log(f"events {w_start:>9,}-{applied:>9,}: {count / w_time:8,.0f} events/s "
                    f"(per CPU second: {count / w_cpu:,.0f}; {written / count / 1024:.1f} KiB "
                    f"written per event; load {windows[-1]['loadavg']:.1f})")
                w_start, w_time, w_cpu, w_io = applied, 0.0, 0.0, io
                while next_edge <= applied:
                    next_edge += window
        t = time.perf_counter()
        root = catalog.merkle_root()
        recomputed = catalog.recompute_merkle()
        check_s = time.perf_counter() - t
        stored = catalog.event_count()
    finally:
        catalog.close()
        gc.unfreeze()
    del events
    db_bytes = sum(p.stat().st_size for p in db_path.parent.iterdir() if p.is_file())
    last = windows[-1]["events_per_s"] if windows else float("nan")
    merkle_ok = root == recomputed and root.count == n
    log(f"Merkle check: {'OK' if merkle_ok else 'MISMATCH'} ({check_s:.1f} s)")
    return {
        "events": n, "batch": batch, "window": window, "generation_seconds": gen_s,
        "apply_seconds": total_time, "events_per_s_overall": n / total_time,
        "windows": windows, "events_per_s_last_window": last,
        "events_per_cpu_s_last_window": windows[-1]["events_per_cpu_s"] if windows else 0.0,
        "events_in_catalog": stored, "catalog_bytes": db_bytes,
        "merkle_root": root.digest.hex(), "merkle_count": root.count,
        "merkle_recomputed": recomputed.digest.hex(), "merkle_ok": merkle_ok,
        "merkle_check_seconds": check_s,
        "target": f">= {TARGET_EVENTS_PER_S:,} events/s at {TARGET_EVENTS_AT:,} events",
        "pass": last >= TARGET_EVENTS_PER_S and merkle_ok,
        "at_target_size": n >= TARGET_EVENTS_AT,
    }


# -- part 3: peak memory ------------------------------------------------------------------


# A tiny launcher between this (large) process and the measured one. Linux records the
# high-water RSS of the address space a process had *before* exec into its ru_maxrss, and
# subprocess spawns with vfork (sharing this process's address space), so measuring a
# direct child would report at least this process's own peak RSS. The launcher forks the
# command from a ~10 MB interpreter instead and reports the child's wait4 ru_maxrss.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def measure_child(cmd: Sequence[str], out_dir: Path, tag: str) -> dict[str, Any]:
    """Run ``cmd`` via the launcher: wall time, ru_maxrss (wait4) and polled VmHWM."""
    stdout_path, stderr_path = out_dir / f"{tag}.stdout", out_dir / f"{tag}.stderr"
    rss_path = out_dir / f"{tag}.maxrss"
    vm_hwm_kb = 0
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(rss_path), *cmd],
                                stdout=so, stderr=se)
        children = f"/proc/{proc.pid}/task/{proc.pid}/children"
        target = 0
        while proc.poll() is None:
            try:
                if not target:
                    with open(children) as fh:
                        pids = fh.read().split()
                    target = int(pids[0]) if pids else 0
                if target:
                    vm_hwm_kb = max(vm_hwm_kb, _vm_hwm_kb(target))
            except (FileNotFoundError, ProcessLookupError):
                pass  # the process ended between poll() and the read: poll() sees it next
            time.sleep(0.02)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n"
                           f"{stderr_path.read_text()[-2000:]}")
    maxrss_kb = int(rss_path.read_text())
    return {"seconds": wall, "maxrss_bytes": maxrss_kb * 1024,
            "vmhwm_polled_bytes": vm_hwm_kb * 1024, "stdout": stdout_path.read_text()}


def bench_memory(gen: ModuleType, work: Path, syncnode: list[str], gb: float,
                 seed: int) -> dict[str, Any]:
    gen_dir = work / "multiframe"
    log(f"generating one {gb} GB multi-frame instance into {gen_dir}")
    t0 = time.perf_counter()
    # The smallest set the generator makes (one study at a tiny scale: a single small file)
    # plus the multi-frame instance; the small file gives the baseline.
    gen.generate(gen_dir, scale=0.001, seed=seed, studies=1, multiframe_gb=gb)
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    files = sorted(dicom_files(gen_dir), key=lambda p: p.stat().st_size)
    if len(files) < 2:
        raise RuntimeError(f"expected a small file and a multi-frame file in {gen_dir}")
    small, big = files[0], files[-1]
    results: dict[str, Any] = {"multiframe_gb": gb}
    for tag, path in (("baseline_small_file", small), ("multiframe", big)):
        size = read_all([path])  # warm cache, like part 1
        data = work / f"mem-{tag}"
        run([*syncnode, "init", "--data", str(data), "--json"])
        sync_fs()
        m = measure_child([*syncnode, "import", "--data", str(data), "--json", str(path)],
                          work, tag)
        report = json.loads(m.pop("stdout"))
        if report["imported"] != 1 or report["failed"]:
            raise RuntimeError(f"import of {path} failed: {report}")
        m.update(file=str(path.relative_to(gen_dir)), file_bytes=size,
                 mb_per_s=size / MB / m["seconds"])
        results[tag] = m
        log(f"{tag}: {size / MB:.1f} MB file, peak RSS {m['maxrss_bytes'] / MB:.1f} MB "
            f"(VmHWM {m['vmhwm_polled_bytes'] / MB:.1f} MB), {m['seconds']:.1f} s")
        remove(data)
        sync_fs()
    peak = results["multiframe"]["maxrss_bytes"]
    results.update(peak_bytes=peak,
                   growth_over_baseline_bytes=peak - results["baseline_small_file"]
                   ["maxrss_bytes"],
                   target=f"peak RSS < {TARGET_PEAK_BYTES / MB:.0f} MB",
                   **{"pass": peak < TARGET_PEAK_BYTES})
    return results


# -- report -------------------------------------------------------------------------------


def repro_command(args: argparse.Namespace) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve().relative_to(REPO)),
           "--scale", str(args.scale), "--seed", str(args.seed), "--repeat", str(args.repeat),
           "--events", str(args.events), "--batch", str(args.batch),
           "--window", str(args.window), "--multiframe-gb", str(args.multiframe_gb)]
    for flag in ("skip_import", "skip_events", "skip_memory", "keep"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.workdir is not None:
        cmd += ["--workdir", str(args.workdir)]
    if args.scratch_fs is not None:
        cmd += ["--scratch-fs", f"{args.scratch_fs:g}"]
    if args.json is not None:
        cmd += ["--json", str(args.json)]
    return f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}"


def render(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    env = doc["environment"]
    lines.append("syncnode ingest benchmark")
    lines.append(f"  machine: {env['cpu_count']} CPUs ({env['cpu_model']}), "
                 f"{env['mem_total_bytes'] / 2**30:.1f} GiB RAM, "
                 f"load {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}")
    lines.append(f"  python {env['python']}, sqlite {env['sqlite']}, blake3 {env['blake3']}, "
                 f"syncnode {env['syncnode']} (git {env['git']})")
    fs = env.get("workdir_fs", {})
    lines.append(f"  workdir: {env['workdir']} ({fs.get('type', '?')} on "
                 f"{fs.get('device', '?')}); cache: {env['cache']}")
    imp = doc.get("import")
    if imp:
        lines.append("")
        lines.append(f"1. Import throughput: {imp['files']} files, {imp['bytes'] / MB:.1f} MB "
                     f"(scale {doc['config']['scale']}), median of {imp['repeat']} "
                     "(order reversed every other repeat)")
        lines.append(f"  {'':<17}{'median s':>9}{'min s':>8}{'max s':>8}{'files/s':>9}"
                     f"{'MB/s':>8}{'CPU s':>8}  {'import/this':>11}")
        for name, r in imp["contenders"].items():
            lines.append(f"  {name:<17}{r['seconds_median']:>9.2f}{r['seconds_min']:>8.2f}"
                         f"{r['seconds_max']:>8.2f}{r['files_per_s']:>9.1f}{r['mb_per_s']:>8.1f}"
                         f"{r['cpu_seconds_median']:>8.2f}  {r['import_throughput_ratio']:>11.2f}")
        lines.append(f"  import vs cp -r: {imp['ratio_vs_cp']:.0%}   vs cp -r + sync: "
                     f"{imp['ratio_vs_cp_sync']:.0%}   vs blake3 only: "
                     f"{imp['ratio_vs_blake3']:.0%}")
        lines.append(f"  (syncnode CLI start-up alone, `syncnode --version`: "
                     f"{imp['cli_startup_seconds_median']:.2f} s, included in import time; "
                     f"1-min load before measurements: {min(imp['loadavg_before_each']):.1f}-"
                     f"{max(imp['loadavg_before_each']):.1f})")
        lines.append(f"  target: {imp['target']:<40} {imp['ratio_vs_cp']:>6.0%}  "
                     f"{status(imp['pass'])}")
    evs = doc.get("events")
    if evs:
        lines.append("")
        lines.append(f"2. Catalog.apply with Merkle maintenance: {evs['events']:,} put events, "
                     f"batches of {evs['batch']:,} (generation, {evs['generation_seconds']:.0f} "
                     "s, not timed)")
        lines.append(f"  {'events':>21}{'seconds':>10}{'events/s':>11}{'CPU s':>8}"
                     f"{'ev/CPU s':>10}{'KiB written/ev':>16}{'load':>6}")
        for w in evs["windows"]:
            n_w = w["events_to"] - w["events_from"]
            lines.append(f"  {w['events_from']:>9,}-{w['events_to']:>11,}{w['seconds']:>10.1f}"
                         f"{w['events_per_s']:>11,.0f}{w['cpu_seconds']:>8.1f}"
                         f"{w['events_per_cpu_s']:>10,.0f}"
                         f"{w['disk_write_bytes'] / n_w / 1024:>16.1f}{w['loadavg']:>6.1f}")
        lines.append(f"  overall: {evs['events_per_s_overall']:,.0f} events/s over "
                     f"{evs['apply_seconds']:.1f} s; catalog {evs['catalog_bytes'] / MB:.0f} MB")
        lines.append(f"  Merkle root == recompute_merkle(): "
                     f"{'yes' if evs['merkle_ok'] else 'NO'} (root count "
                     f"{evs['merkle_count']:,}, check {evs['merkle_check_seconds']:.1f} s)")
        note = "" if evs["at_target_size"] else f" (only {evs['events']:,} events run)"
        lines.append(f"  target: {evs['target']:<40} {evs['events_per_s_last_window']:>6,.0f}  "
                     f"{status(evs['pass'])}{note}")
    mem = doc.get("memory")
    if mem:
        lines.append("")
        lines.append("3. Peak memory of `syncnode import` (child max RSS via wait4; "
                     "VmHWM polled every 20 ms)")
        lines.append(f"  {'':<22}{'file MB':>9}{'seconds':>9}{'MB/s':>8}{'max RSS MB':>12}"
                     f"{'VmHWM MB':>10}")
        for tag, label in (("baseline_small_file", "one small file"),
                           ("multiframe", f"{mem['multiframe_gb']} GB multi-frame")):
            m = mem[tag]
            lines.append(f"  {label:<22}{m['file_bytes'] / MB:>9.1f}{m['seconds']:>9.1f}"
                         f"{m['mb_per_s']:>8.1f}{m['maxrss_bytes'] / MB:>12.1f}"
                         f"{m['vmhwm_polled_bytes'] / MB:>10.1f}")
        lines.append(f"  target: {mem['target']:<40} {mem['peak_bytes'] / MB:>6.1f}  "
                     f"{status(mem['pass'])}")
    lines.append("")
    lines.append("Summary:")
    for part, label in (("import", "import >= 50% of cp -r"),
                        ("events", ">= 5,000 events/s at 1M events"),
                        ("memory", "peak memory < 150 MB")):
        if doc.get(part):
            lines.append(f"  {label:<34} {status(doc[part]['pass'])}")
        else:
            lines.append(f"  {label:<34} skipped")
    lines.append(f"Total time: {doc['total_seconds']:.0f} s")
    lines.append(f"Reproduce: {doc['command']}")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"],
                   help="data set scale for the import part (default 0.1, ~600 MB)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="generator seed")
    p.add_argument("--repeat", type=int, default=DEFAULTS["repeat"],
                   help="repeats of each import-part measurement; the median is reported")
    p.add_argument("--events", type=int, default=DEFAULTS["events"],
                   help="catalog events to apply (default 1,000,000)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"],
                   help="events per Catalog.apply call (default 2,000)")
    p.add_argument("--window", type=int, default=DEFAULTS["window"],
                   help="events per reported rate window (default 100,000)")
    p.add_argument("--multiframe-gb", type=float, default=DEFAULTS["multiframe_gb"],
                   help="size of the multi-frame instance for the memory part (default 2.0)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for all temporary files (default: a new temp folder)")
    p.add_argument("--scratch-fs", type=float, default=None, metavar="GB",
                   help=SCRATCH_FS_HELP + "; the work folder goes in it (and --workdir "
                        "holds its image file)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this file")
    p.add_argument("--skip-import", action="store_true")
    p.add_argument("--skip-events", action="store_true")
    p.add_argument("--unsigned", action="store_true",
                   help="catalog insert rate of unsigned events, not verified (baseline)")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.events < 1 or args.batch < 1 or args.window < 1:
        p.error("--repeat, --events, --batch and --window must be positive")
    if args.window % args.batch:
        p.error("--window must be a multiple of --batch")
    if args.scale <= 0 or args.multiframe_gb <= 0:
        p.error("--scale and --multiframe-gb must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.scratch_fs is None:
        return run_bench(args, None)
    with scratch_fs(args.scratch_fs, args.workdir) as mnt:
        return run_bench(args, mnt)


def run_bench(args: argparse.Namespace, scratch: Path | None) -> int:
    started = time.perf_counter()
    created_workdir = False
    if scratch is not None:
        work = Path(tempfile.mkdtemp(prefix="bench_ingest-", dir=scratch))
    elif args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="bench_ingest-"))
    else:
        created_workdir = not args.workdir.exists()
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="bench_ingest-", dir=args.workdir))
    if os.stat(work).st_dev != os.stat(REPO).st_dev:
        log(f"note: {work} is not on the repository's filesystem")
    log(f"work folder: {work}")
    syncnode = find_syncnode()
    gen = None if args.skip_import and args.skip_memory else load_generator()
    doc: dict[str, Any] = {
        "config": {k: getattr(args, k) for k in DEFAULTS} | {
            "syncnode_command": syncnode,
            "skipped": [s for s in ("import", "events", "memory")
                        if getattr(args, f"skip_{s}")]},
        "environment": environment(work),
        "command": repro_command(args),
    }
    try:
        if not args.skip_import:
            assert gen is not None
            res = bench_import(gen, work, syncnode, args.scale, args.seed, args.repeat)
            doc["import"] = import_summary(res)
            remove(work / "gen")
        if not args.skip_events:
            doc["events"] = bench_events(work, args.events, args.batch, args.window, args.seed,
                                         args.unsigned)
            remove(work / "events")
        if not args.skip_memory:
            assert gen is not None
            doc["memory"] = bench_memory(gen, work, syncnode, args.multiframe_gb, args.seed)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=False)
            if created_workdir and not any(args.workdir.iterdir()):
                args.workdir.rmdir()
    doc["environment"]["loadavg_end"] = os.getloadavg()
    doc["total_seconds"] = time.perf_counter() - started
    print(render(doc))
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        log(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
