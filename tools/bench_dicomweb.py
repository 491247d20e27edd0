#!/usr/bin/env python3
"""Benchmark DICOMweb: a syncnode node against Orthanc's DICOMweb plugin, same run, same data.

1. STOW-RS ingest: the same study of ``--images`` images (512 x 512 CT, ~525 KB each) is
   stored by one ``curl`` POST per ``--batch`` images (``multipart/related;
   type="application/dicom"``, bodies built on disk beforehand) into a fresh ``syncnode run``
   node and into a fresh Orthanc (``orthanc-dicomweb`` plugin). Reported: seconds, MB/s,
   images/s and node/Orthanc. Both answer only once the instances are durable (Orthanc:
   ``SyncStorageArea``, its default).
2. WADO-RS retrieval: the whole study (``GET /dicom-web/studies/{uid}``, ``Accept:
   multipart/related; type="application/dicom"; transfer-syntax=*``) read by ``curl`` into
   /dev/null, node and Orthanc alternating, ``--rounds`` times; medians of seconds and
   MB/s, and node/Orthanc (target >= 1.5), plus the server's CPU seconds per retrieval
   (from /proc: on a shared machine wall time also counts waiting for a core).

Usage: python3 tools/bench_dicomweb.py [--images 500] [--rounds 3] [--batch 50] [--json out]
Every process started here is stopped at the end (also on errors). Nothing here runs in
the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_testkit as kit
from bench_dicom import Node

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ACCEPT = 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'


def plugin_path() -> str:
    if Path(DICOMWEB_PLUGIN).exists():
        return DICOMWEB_PLUGIN
    out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        if line.endswith(".so") and "DicomWeb" in line:
            return line
    raise SystemExit("the orthanc-dicomweb plugin is not installed (apt install "
                     "orthanc-dicomweb)")


def build_bodies(files: list[Path], batch: int, out: Path) -> list[tuple[Path, str]]:
    """multipart/related bodies of ``batch`` files each: (file, boundary)."""
    bodies = []
    for i in range(0, len(files), batch):
        boundary = "bench-" + secrets.token_hex(8)
        path = out / f"stow-{i // batch:04d}.multipart"
        with open(path, "wb") as f:
            for p in files[i:i + batch]:
                f.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                f.write(p.read_bytes())
                f.write(b"\r\n")
            f.write(f"--{boundary}--\r\n".encode())
        bodies.append((path, boundary))
    return bodies


def curl(args: list[str], timeout: float = 1800) -> tuple[int, int, float]:
    """(HTTP status, bytes downloaded, seconds) of one curl run."""
    res = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w",
                          "%{http_code} %{size_download} %{time_total}", *args],
                         capture_output=True, text=True, timeout=timeout,
                         env=kit.tool_env(), check=True)
    code, size, secs = res.stdout.split()
    return int(code), int(size), float(secs)


def stow(url: str, bodies: list[tuple[Path, str]], headers: list[str]) -> float:
    t = time.perf_counter()
    for path, boundary in bodies:
        code, _, _ = curl(["-X", "POST", *headers, "-H",
                           f'Content-Type: multipart/related; type="application/dicom"; '
                           f"boundary={boundary}", "--data-binary", f"@{path}", url])
        if code != 200:
            raise RuntimeError(f"STOW to {url} answered {code}")
    return time.perf_counter() - t


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wado(url: str, headers: list[str], expect: int, pid: int) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) of one whole-study retrieval. The CPU time is
    the fairer figure on a shared machine: it does not count time spent waiting for a
    core another process holds."""
    cpu = cpu_seconds(pid)
    code, size, secs = curl([*headers, "-H", ACCEPT, url])
    if code != 200 or size < expect:
        raise RuntimeError(f"WADO from {url}: {code}, {size} bytes (expected >= {expect})")
    return secs, cpu_seconds(pid) - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=50, help="images per STOW request")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    node = orth = None
    try:
        study = kit.make_study(work / "files", args.images, seed="bench-dicomweb",
                               rows=512, cols=512, series=2)
        total = sum(p.stat().st_size for p in study.files)
        bodies = build_bodies(study.files, args.batch, work)
        key = secrets.token_urlsafe(24)
        os.environ["SYNCNODE_API_KEY"] = key  # an admin key given in clear, this run only
        try:
            node = Node(work / "node", "--dicom-port", "0")
        finally:
            del os.environ["SYNCNODE_API_KEY"]
        node_base = f"http://127.0.0.1:{node.ports['api']}/dicom-web"
        node_h = ["-H", f"X-API-Key: {key}"]
        orth = kit.Orthanc(work / "orthanc", extra_config={
            "Plugins": [plugin_path()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}})
        orth.start()
        orth_base = f"{orth.url}/dicom-web"
        mb = total / 1e6
        print(f"study: {args.images} images, {mb:.1f} MB", flush=True)
        t_node = stow(f"{node_base}/studies", bodies, node_h)
        print(f"  STOW node    {t_node:6.2f} s  {mb / t_node:7.1f} MB/s", flush=True)
        t_orth = stow(f"{orth_base}/studies", bodies, [])
        print(f"  STOW orthanc {t_orth:6.2f} s  {mb / t_orth:7.1f} MB/s", flush=True)
        node_runs, orth_runs, node_cpu, orth_cpu = [], [], [], []
        assert node.proc.pid and orth.proc is not None
        for r in range(args.rounds):
            secs, cpu = wado(f"{node_base}/studies/{study.study_uid}", node_h, total,
                             node.proc.pid)
            node_runs.append(secs)
            node_cpu.append(cpu)
            secs, cpu = wado(f"{orth_base}/studies/{study.study_uid}", [], total,
                             orth.proc.pid)
            orth_runs.append(secs)
            orth_cpu.append(cpu)
            print(f"  round {r + 1}: WADO node {node_runs[-1]:6.2f} s "
                  f"({mb / node_runs[-1]:7.1f} MB/s, cpu {node_cpu[-1]:.2f} s), orthanc "
                  f"{orth_runs[-1]:6.2f} s ({mb / orth_runs[-1]:7.1f} MB/s, cpu "
                  f"{orth_cpu[-1]:.2f} s)", flush=True)
        wn, wo = statistics.median(node_runs), statistics.median(orth_runs)
        cn, co = statistics.median(node_cpu), statistics.median(orth_cpu)
        result: dict[str, Any] = {
            "images": args.images, "study_bytes": total, "stow_batch": args.batch,
            "load_average": os.getloadavg()[0],
            "stow": {"node_seconds": round(t_node, 2), "orthanc_seconds": round(t_orth, 2),
                     "node_mb_s": round(mb / t_node, 1), "orthanc_mb_s": round(mb / t_orth, 1),
                     "node_images_s": round(args.images / t_node, 1),
                     "orthanc_images_s": round(args.images / t_orth, 1),
                     "ratio": round(t_orth / t_node, 2)},
            "wado": {"rounds": args.rounds, "node_seconds": round(wn, 3),
                     "orthanc_seconds": round(wo, 3), "node_mb_s": round(mb / wn, 1),
                     "orthanc_mb_s": round(mb / wo, 1), "ratio": round(wo / wn, 2),
                     "node_cpu_seconds": round(cn, 3), "orthanc_cpu_seconds": round(co, 3),
                     "cpu_ratio": round(co / cn, 2) if cn else None,
                     "node_runs": [round(x, 3) for x in node_runs],
                     "orthanc_runs": [round(x, 3) for x in orth_runs]}}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    finally:
        if node is not None:
            node.stop()
        if orth is not None:
            orth.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
