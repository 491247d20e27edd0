#!/usr/bin/env python3
"""Benchmark the audit trail on this machine's disk.

1. ``write``: one entry appended and fsynced per call (what a CLI command pays): entries/s.
2. ``record``: entries queued from one thread and appended by the writer thread in batches
   (what ``run``'s services pay): the caller's cost per entry (µs) and entries/s until all
   are durable.
3. Two processes appending at once (the CLI beside ``run``): entries/s together.
4. ``verify`` over everything written: entries/s.

Usage: python3 tools/bench_audit.py [--entries 20000] [--dir DIR] [--json out]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from syncnode.audit import QUEUE_MAX, AuditLog, verify

STUDY = "1.2.826.0.1.3680043.8.498.1234567890"
WRITER = """
import sys
from syncnode.audit import AuditLog
t = AuditLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    t.write("query", "dicom:BENCH@127.0.0.1", keys=["StudyDate", "ModalitiesInStudy"], count=i)
t.close()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.entries
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "audit"
        out: dict[str, float] = {}

        trail = AuditLog(folder)
        sync_n = max(200, n // 20)
        t0 = time.perf_counter()
        for i in range(sync_n):
            trail.write("downloaded", "api:read", studies=[STUDY], instances=i)
        out["write_fsync_per_entry_per_s"] = sync_n / (time.perf_counter() - t0)

        # in bursts of half the queue (a faster producer than the disk overflows it: then
        # the overflow is counted, not waited for)
        burst = QUEUE_MAX // 2
        queued = 0.0
        t0 = time.perf_counter()
        for start in range(0, n, burst):
            t1 = time.perf_counter()
            for i in range(start, min(n, start + burst)):
                trail.record("peer-sent", "peer:" + "A" * 56, peer="A" * 56, instances=i,
                             studies=[STUDY])
            queued += time.perf_counter() - t1
            assert trail.flush(600)
        total = time.perf_counter() - t0
        assert trail.dropped == 0, trail.dropped
        out["record_caller_us_per_entry"] = queued / n * 1e6
        out["record_durable_per_s"] = n / total
        trail.close()

        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(sync_n)],
                                  cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise SystemExit("a writer process failed")
        out["two_processes_write_per_s"] = 2 * sync_n / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        report = verify(folder)
        assert report.ok, report
        assert report.entries == sync_n + n + 2 * sync_n, report.entries
        out["verify_entries"] = report.entries
        out["verify_per_s"] = report.entries / (time.perf_counter() - t0)
        out["bytes_per_entry"] = sum(p.stat().st_size for p in folder.glob("audit*.log")) \
            / report.entries
    for k, v in out.items():
        print(f"{k:32} {v:12.1f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
