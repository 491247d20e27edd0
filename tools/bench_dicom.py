#!/usr/bin/env python3
"""Benchmark the DICOM bridge against Orthanc, with real processes on loopback.

1. Ingest throughput: DCMTK ``storescu`` (``TCP_NODELAY=1``) sends the same N files
   (512 x 512 CT, ~525 KB each) into a ``syncnode run`` node and into a fresh Orthanc,
   alternating, ``--rounds`` times each; reports files/s (median) and node/Orthanc.
   Both make instances durable before answering (Orthanc: ``SyncStorageArea``).
2. Time to available: a study of ``--study`` images is stored into node A by storescu;
   node A syncs to node B (mutual TLS, ``--sync-interval``), node B exports to Orthanc B.
   Reported: the raw transfer time (storescu's run) and the time from the last C-STORE
   answered by node A until Orthanc B holds the whole study.
3. C-MOVE: a study of ``--study`` images held by a node and by a source Orthanc is moved
   (DCMTK ``movescu``) to a destination Orthanc, node->Orthanc then Orthanc->Orthanc,
   ``--rounds`` times each (the destination emptied in between); reports images/s
   (median), node/Orthanc, and the sender's CPU time per instance (median; /proc, all
   threads: unlike the rate, it hardly moves with the machine's load). Then C-GET: DCMTK
   ``getscu`` takes the study from the node into a folder, ``--rounds`` times; reports
   images/s and MB/s (median).

4. First C-FIND: ``syncnode import`` of ``--find-files`` instances (one study, CT of
   ``--find-size`` squared pixels) into a running node, then DCMTK ``findscu`` (STUDY
   level, PatientName=*) at once and again; reports the import time and both query times.

Usage: python3 tools/bench_dicom.py [--files 300] [--rounds 3] [--study 500] [--json out]
Every process started here is stopped at the end (also on errors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dicom_testkit as kit

SYNCNODE = [sys.executable, "-m", "syncnode.cli"]


class Node:
    """``syncnode run`` in its own process group."""

    def __init__(self, data: Path, *flags: str) -> None:
        self.data = data
        subprocess.run([*SYNCNODE, "init", "--data", str(data)], check=True,
                       capture_output=True)
        (data / "ports.json").unlink(missing_ok=True)
        self.log = open(data / "run.log", "ab")  # noqa: SIM115 - held by the child
        self.proc = subprocess.Popen(
            [*SYNCNODE, "run", "--data", str(data), "--peer-host", "127.0.0.1",
             "--peer-port", "0", "--api-port", "0", "--no-discovery", "--log-level",
             "warning", *flags],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env=kit.tool_env({"SYNCNODE_DICOM_HOST": "127.0.0.1"}))
        self.ports = self._wait_ports()

    def _wait_ports(self, timeout: float = 30) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"syncnode run exited: see {self.data / 'run.log'}")
            try:
                ports = json.loads((self.data / "ports.json").read_text())
                if "dicom" in ports:
                    return {k: int(v) for k, v in ports.items()}
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise TimeoutError("node did not start")

    def node_id(self) -> str:
        out = subprocess.run([*SYNCNODE, "id", "--data", str(self.data), "--json"],
                             check=True, capture_output=True, text=True).stdout
        return str(json.loads(out)["node_id"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.log.close()


def storescu(port: int, aec: str, folder: Path) -> float:
    t = time.perf_counter()
    kit.run_tool([kit.dcmtk("storescu"), "-aec", aec, "127.0.0.1", str(port), "+sd",
                  str(folder)], timeout=1800)
    return time.perf_counter() - t


def bench_ingest(work: Path, files: int, rounds: int) -> dict[str, Any]:
    src = work / "ingest-files"
    kit.make_study(src, files, seed="bench-ingest", rows=512, cols=512, series=2)
    node_rates, orthanc_rates = [], []
    for r in range(rounds):
        for target in ("node", "orthanc"):
            d = work / f"{target}-{r}"
            if target == "node":
                node = Node(d, "--dicom-port", "0", "--ae-title", "SYNCNODE")
                try:
                    secs = storescu(node.ports["dicom"], "SYNCNODE", src)
                finally:
                    node.stop()
                node_rates.append(files / secs)
            else:
                orth = kit.Orthanc(d, aet="ORTHANC")
                orth.start()
                try:
                    secs = storescu(orth.dicom_port, "ORTHANC", src)
                finally:
                    orth.stop()
                orthanc_rates.append(files / secs)
            print(f"  round {r + 1}: {target:8s} {files / secs:7.1f} files/s", flush=True)
            shutil.rmtree(d, ignore_errors=True)
    node_fps, orth_fps = statistics.median(node_rates), statistics.median(orthanc_rates)
    return {"files": files, "file_bytes": (src / "im00001.dcm").stat().st_size,
            "rounds": rounds, "node_files_per_s": round(node_fps, 1),
            "orthanc_files_per_s": round(orth_fps, 1),
            "ratio": round(node_fps / orth_fps, 3),
            "node_runs": [round(x, 1) for x in node_rates],
            "orthanc_runs": [round(x, 1) for x in orthanc_rates]}


def bench_available(work: Path, images: int, interval: float) -> dict[str, Any]:
    src = work / "study-files"
    study = kit.make_study(src, images, seed="bench-available", rows=512, cols=512, series=2)
    orth_b = kit.Orthanc(work / "orthanc-b", aet="ORTHANCB")
    orth_b.start()
    a = b = None
    try:
        a = Node(work / "node-a", "--dicom-port", "0", "--ae-title", "NODEA",
                 "--sync-interval", str(interval))
        b = Node(work / "node-b", "--dicom-port", "0", "--ae-title", "NODEB",
                 "--sync-interval", str(interval), "--export", orth_b.address)
        for me, other in ((a, b), (b, a)):
            subprocess.run([*SYNCNODE, "peer", "add", other.node_id(),
                            f"https://127.0.0.1:{other.ports['peer']}", "--data",
                            str(me.data)], check=True, capture_output=True)
        t0 = time.perf_counter()
        transfer = storescu(a.ports["dicom"], "NODEA", src)
        t_last = t0 + transfer
        deadline = time.monotonic() + 600
        while True:
            count = int(orth_b.get("/statistics")["CountInstances"])
            if count >= images:
                t_done = time.perf_counter()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc B has {count} of {images} after 600 s")
            time.sleep(0.02)
        assert set(orth_b.sop_uids()) == set(study.sop_uids)
        return {"images": images, "sync_interval": interval,
                "transfer_seconds": round(transfer, 2),
                "available_after_last_store_seconds": round(t_done - t_last, 2),
                "first_store_to_available_seconds": round(t_done - t0, 2)}
    finally:
        for n in (a, b):
            if n is not None:
                n.stop()
        orth_b.stop()


def movescu(port: int, aec: str, dest: str, study_uid: str) -> float:
    t = time.perf_counter()
    kit.run_tool([kit.dcmtk("movescu"), "-S", "-aec", aec, "-aem", dest,
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                  "127.0.0.1", str(port)], timeout=1800)
    return time.perf_counter() - t


def getscu(port: int, aec: str, study_uid: str, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    kit.run_tool([kit.dcmtk("getscu"), "-S", "-aec", aec, "-od", str(out),
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                  "127.0.0.1", str(port)], timeout=1800)
    return time.perf_counter() - t


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_move(work: Path, images: int, rounds: int) -> dict[str, Any]:
    src = work / "move-files"
    study = kit.make_study(src, images, seed="bench-move", rows=512, cols=512, series=2)
    dest = kit.Orthanc(work / "orthanc-dest", aet="DEST")
    dest.start()
    source = node = None
    try:
        source = kit.Orthanc(work / "orthanc-source", aet="SOURCE",
                             modalities={"dest": ("DEST", "127.0.0.1", dest.dicom_port)},
                             check_called_aet=False,
                             extra_config={"DicomAlwaysAllowMove": True})
        source.start()
        storescu(source.dicom_port, "SOURCE", src)
        d = work / "move-node"
        os.environ["SYNCNODE_DICOM_DESTINATIONS"] = json.dumps(
            {"DEST": f"127.0.0.1:{dest.dicom_port}"})
        try:
            node = Node(d, "--dicom-port", "0", "--ae-title", "SYNCNODE")
        finally:
            del os.environ["SYNCNODE_DICOM_DESTINATIONS"]
        storescu(node.ports["dicom"], "SYNCNODE", src)
        node_rates, orthanc_rates, get_rates = [], [], []
        cpu: dict[str, list[float]] = {"node": [], "orthanc": []}  # ms per instance sent
        for r in range(rounds):
            for target in ("node", "orthanc"):
                for oid in dest.instance_ids():
                    dest.request("DELETE", f"/instances/{oid}")
                port, aec = ((node.ports["dicom"], "SYNCNODE") if target == "node"
                             else (source.dicom_port, "SOURCE"))
                sender = node.proc.pid if target == "node" else source.proc.pid
                cpu0 = cpu_seconds(sender)
                secs = movescu(port, aec, "DEST", study.study_uid)
                cpu[target].append((cpu_seconds(sender) - cpu0) * 1000 / images)
                held = len(dest.instance_ids())
                if held != images:
                    raise RuntimeError(f"{target}: destination holds {held} of {images}")
                (node_rates if target == "node" else orthanc_rates).append(images / secs)
                print(f"  round {r + 1}: {target:8s} {images / secs:7.1f} images/s, "
                      f"sender CPU {cpu[target][-1]:.2f} ms/instance", flush=True)
            out = work / f"get-{r}"
            secs = getscu(node.ports["dicom"], "SYNCNODE", study.study_uid, out)
            got = len(list(out.iterdir()))
            if got != images:
                raise RuntimeError(f"C-GET: {got} of {images} received")
            get_rates.append(images / secs)
            print(f"  round {r + 1}: C-GET    {images / secs:7.1f} images/s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if node is not None:
            node.stop()
        if source is not None:
            source.stop()
        dest.stop()
    node_ips, orth_ips = statistics.median(node_rates), statistics.median(orthanc_rates)
    file_bytes = (src / "im00001.dcm").stat().st_size
    get_ips = statistics.median(get_rates)
    return {"images": images, "file_bytes": file_bytes,
            "get_images_per_s": round(get_ips, 1),
            "get_mb_per_s": round(get_ips * file_bytes / 1e6, 1),
            "get_runs": [round(x, 1) for x in get_rates],
            "rounds": rounds, "node_images_per_s": round(node_ips, 1),
            "orthanc_images_per_s": round(orth_ips, 1), "ratio": round(node_ips / orth_ips, 3),
            "node_runs": [round(x, 1) for x in node_rates],
            "node_cpu_ms_per_instance": round(statistics.median(cpu["node"]), 2),
            "orthanc_cpu_ms_per_instance": round(statistics.median(cpu["orthanc"]), 2),
            "orthanc_runs": [round(x, 1) for x in orthanc_rates]}


def findscu(port: int, aec: str) -> float:
    t = time.perf_counter()
    kit.run_tool([kit.dcmtk("findscu"), "-S", "-aec", aec, "-k", "QueryRetrieveLevel=STUDY",
                  "-k", "PatientName=*", "-k", "StudyInstanceUID", "-k", "StudyDescription",
                  "127.0.0.1", str(port)], timeout=1800)
    return time.perf_counter() - t


def bench_find(work: Path, files: int, size: int) -> dict[str, Any]:
    """First C-FIND after ``syncnode import`` of ``files`` instances into a running node."""
    src = work / "find-files"
    kit.make_study(src, files, seed="bench-find", series=2, rows=size, cols=size)
    node = Node(work / "find-node", "--dicom-port", "0", "--ae-title", "SYNCNODE")
    try:
        t = time.perf_counter()
        subprocess.run([*SYNCNODE, "import", "--data", str(node.data), str(src)], check=True,
                       capture_output=True, env=kit.tool_env())
        import_s = time.perf_counter() - t
        db = sqlite3.connect(node.data / "catalog.db")
        indexed = int(db.execute("SELECT count(*) FROM find_attrs").fetchone()[0])
        db.close()
        first = findscu(node.ports["dicom"], "SYNCNODE")
        second = findscu(node.ports["dicom"], "SYNCNODE")
    finally:
        node.stop()
    return {"instances": files, "rows_cols": size,
            "import_seconds": round(import_s, 2), "indexed_before_first_query": indexed,
            "first_query_seconds": round(first, 3), "second_query_seconds": round(second, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--study", type=int, default=500)
    ap.add_argument("--sync-interval", type=float, default=0.2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-available", action="store_true")
    ap.add_argument("--skip-move", action="store_true")
    ap.add_argument("--find-files", type=int, default=3000)
    ap.add_argument("--find-size", type=int, default=256, help="rows = columns of the "
                    "instances imported before the first C-FIND")
    ap.add_argument("--skip-find", action="store_true")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dicom-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "load": os.getloadavg()}
    try:
        if not args.skip_ingest:
            print(f"ingest: storescu of {args.files} files, node vs Orthanc", flush=True)
            result["ingest"] = bench_ingest(work, args.files, args.rounds)
            i = result["ingest"]
            print(f"ingest: node {i['node_files_per_s']} files/s, Orthanc "
                  f"{i['orthanc_files_per_s']} files/s, ratio {i['ratio']}x", flush=True)
        if not args.skip_available:
            print(f"time to available: {args.study} images, node A -> node B -> Orthanc B",
                  flush=True)
            result["available"] = bench_available(work, args.study, args.sync_interval)
            v = result["available"]
            print(f"available: transfer {v['transfer_seconds']} s; in Orthanc B "
                  f"{v['available_after_last_store_seconds']} s after the last C-STORE",
                  flush=True)
        if not args.skip_move:
            print(f"C-MOVE: {args.study} images to an Orthanc, node vs Orthanc", flush=True)
            result["move"] = bench_move(work, args.study, args.rounds)
            m = result["move"]
            print(f"move: node {m['node_images_per_s']} images/s, Orthanc "
                  f"{m['orthanc_images_per_s']} images/s, ratio {m['ratio']}x; sender CPU "
                  f"node {m['node_cpu_ms_per_instance']} ms/instance, Orthanc "
                  f"{m['orthanc_cpu_ms_per_instance']}", flush=True)
            print(f"get: node {m['get_images_per_s']} images/s, {m['get_mb_per_s']} MB/s "
                  "(getscu into a folder)", flush=True)
        if not args.skip_find:
            print(f"C-FIND: first query after importing {args.find_files} instances",
                  flush=True)
            result["find"] = f = bench_find(work, args.find_files, args.find_size)
            print(f"find: import {f['import_seconds']} s, first query "
                  f"{f['first_query_seconds']} s ({f['indexed_before_first_query']} of "
                  f"{f['instances']} indexed before it), second "
                  f"{f['second_query_seconds']} s", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
