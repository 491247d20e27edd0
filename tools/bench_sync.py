"""Sync benchmark for syncnode (a benchmark, not a test): syncnode vs Orthanc vs raw TLS.

What it measures, and how
-------------------------
Everything runs on loopback, in one work folder, in one run, in this order (a shared, noisy
machine favours nobody: each contender reads a warm page cache and ``sync`` flushes pending
write-back before every timed section).

1. **syncnode, node A -> node B.** ``tools/gen_dataset.py`` writes the seed-shaped CT/MR set
   (``--scale 0.25`` of the 6 GB / 7,767-file set by default: about 1.5 GB, 1,940 files).
   ``syncnode init`` makes nodes A and B; the set is imported into A (``syncnode import``,
   not timed: import is measured by ``tools/bench_ingest.py``). Trust is set up with the real
   CLI, both ways (``syncnode peer add ID https://127.0.0.1:PORT``; B runs briefly, with no
   peer, so that A can fetch and pin its certificate). Then A runs (``syncnode run
   --no-discovery --sync-interval 0.5`` on its own loopback ports) and the clock starts when
   B's ``run`` is started. B is polled every 0.05 s (its catalog, read-only, in this
   process: one Merkle root read, far cheaper than a ``syncnode status --json`` subprocess;
   a coarser poll adds half its period to every time on average) until B's
   Merkle root equals A's and B has A's instance count and bytes. The headline time is from
   B *listening* (its ``ports.json`` appears, right after its sync loop is scheduled) to
   done; the time from starting B's process (interpreter start-up included) is reported too.
   Peak memory of each node process: ``VmHWM`` (and the largest ``VmRSS`` seen) polled from
   ``/proc/PID/status`` every 0.1 s; CPU seconds of each node over the timed window from
   ``/proc/PID/stat``.

2. **Raw aiohttp over TLS 1.3 with mutual TLS on loopback: the ceiling.** A server process
   and this process as client, each with a syncnode identity (``tls.create_identity``) and
   syncnode's own TLS contexts (``server_ssl_context`` / ``client_ssl_context``: same
   protocol, cipher and certificate checks as the nodes), pinned to each other. (a) one GET
   streaming the data set's total byte count from a 1 MiB in-memory buffer in 1 MiB writes;
   (b) one GET per data-set file, files read from disk by the server in 1 MiB pieces (in a
   thread, like the peer server), 4 at a time (syncnode's default ``max_pulls``). The
   client discards what it receives. The ceiling is the faster of (a) and (b). (c) as (b),
   but the client also does the least a verified, durable copy must: each file hashed
   (BLAKE3) and written to a new file in a worker thread, one file-system flush at the end.
   Its CPU seconds per GB are the floor of this stack (Python, asyncio, aiohttp, OpenSSL)
   for any sync that checks and keeps what it receives.

3. **Orthanc, given its best configuration.** Two Orthanc servers (Debian build) with their
   own JSON configurations, storage in the work folder and loopback ports, both started with
   ``TCP_NODELAY=1`` in their environment (without it this build keeps Nagle's algorithm on
   in DCMTK and stalls about 40 ms per instance). The same files are uploaded to Orthanc A
   by ``POST /instances`` (not timed). Then, timed from the job request until every job is
   ``Success`` (jobs polled every 0.1 s): (a) A -> B by DICOM C-STORE (``POST
   /modalities/B/store``, asynchronous job) and (b) A -> B by Orthanc's HTTP peers (``POST
   /peers/B/store``), each with one job and with ``--orthanc-jobs`` concurrent jobs (the
   instances split round-robin; ``ConcurrentJobs`` set to match). After each run B's
   instance count is checked and B is restarted on fresh, empty storage. Settings are listed
   in ``ORTHANC_TUNING`` and printed with the results; ``SyncStorageArea`` stays true by
   default (syncnode fsyncs every blob and commits with ``synchronous=FULL``: same
   durability), ``--no-orthanc-sync-storage`` turns it off.

4. **Memory with one 2 GB multi-frame instance** (``--multiframe-gb``, skipped with
   ``--skip-multiframe``): the generator's Enhanced CT file is synced A -> B exactly as in 1,
   on fresh nodes; peak RSS of each node and the transfer rate are reported.

5. **Over WAN links, syncnode (wire compression off and on) and Orthanc (C-STORE and HTTP
   peers) through the same link** (``--skip-wan`` to skip): for each link of ``--wan-links``
   (``LATENCY_MS:MB_PER_S``, default 40 ms/12.5 MB/s, 40 ms/50 MB/s, 10 ms/100 MB/s and
   150 ms/12.5 MB/s), the first ``--wan-mb`` MB of the data set go A -> B through
   ``tools/faultproxy.py`` with that one-way delay each way and that rate in each direction
   shared by all connections through the proxy (``--shared-rate``: one token bucket per
   direction, so parallel connections cannot beat the link). syncnode: B pulls from A as
   in 1 through the proxy, A not pushing (a push would bypass the link); once with
   ``SYNCNODE_COMPRESSION=off``, once ``on``. Orthanc: the same files uploaded to A, then
   ``/modalities/B/store`` and ``/peers/B/store`` with A's modality and peer entries
   pointing at proxies in front of B's DICOM and HTTP ports (1 and ``--orthanc-jobs``
   jobs, the faster kept). Reports MB/s of instances, % of the link, the share of bytes
   that crossed it, the ratio of syncnode to each Orthanc path, and the proxy's CPU share
   (if it nears one core, the proxy and not the link is the limit).

Targets (PASS/MISS): syncnode >= 4x the faster Orthanc path (MB/s); syncnode >= 50 % of the
raw TLS ceiling; peak RSS of every node process < 300 MB (10**6 bytes) in both syncs.

MB = 10**6 bytes. ``--json FILE`` writes every figure and the environment; the exact command
to reproduce is printed. The work folder (``--workdir``, default a new folder under the
system temp dir) is removed at the end unless ``--keep``. Every process started here runs
in its own process group and is stopped at the end, also on error or Ctrl-C.

The report also gives the disk's commit cost (4 KiB write + fsync in the work folder, median
of 50), the CPU it costs to write new bytes into the page cache (every receiver pays it for
every byte it keeps; on a VM that backs guest memory only on first touch it can be a third of
a receiver's CPU), the load average before and after, and, if node A pushed data to B while
B pulled it, how much (both directions run by default: ``peer add --push auto``).

``--profile`` attaches ``py-spy record --idle --threads`` (``pip install py-spy``) to both
nodes during the syncnode syncs and prints where their threads spend wall time (event loop:
idle share and busiest frames; executor threads: average number busy in each frame); it
perturbs the timing (the profiler shares the machine's CPUs), so profile in a separate run.
``--node-env KEY=VALUE`` passes settings to both ``syncnode run`` processes for experiments
(e.g. ``SYNCNODE_MAX_PULLS=16``). Usage::

    python tools/bench_sync.py                         # full run, about 5-25 minutes
    python tools/bench_sync.py --scale 0.02 --multiframe-gb 0.2 --keep
    python tools/bench_sync.py --skip-orthanc --skip-raw --skip-multiframe --profile
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import mmap
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

TARGET_VS_ORTHANC = 4.0
TARGET_VS_RAW = 0.50
TARGET_PEAK_BYTES = 300 * MB

SYNC_POLL_S = 0.05
JOB_POLL_S = 0.1
RSS_POLL_S = 0.1
RAW_CONCURRENCY = 4

# Orthanc settings common to both servers (ports, names, folders and peers are added per
# server). The reasons are printed with the results.
ORTHANC_TUNING: dict[str, Any] = {
    "StorageCompression": False,        # no zlib on write/read
    "StoreMD5ForAttachments": False,    # no MD5 pass over each file
    "SaveJobs": False,                  # no job registry serialised into the index
    "JobsHistorySize": 100,
    "OverwriteInstances": False,        # B starts empty: nothing to overwrite
    "HttpCompressionEnabled": False,    # no gzip on HTTP answers
    "KeepAlive": True,                  # persistent HTTP connections
    "TcpNoDelay": True,                 # Nagle off on the HTTP sockets (CivetWeb)
    "HttpThreadsCount": 50,
    "DicomThreadsCount": 4,
    "MaximumPduLength": 131072,         # the largest PDU Orthanc allows (default 16 KB)
    "DicomAssociationCloseDelay": 5,    # (only used by Lua; one association per job anyway)
    "DicomScuTimeout": 120,
    "DicomScpTimeout": 120,
    "HttpTimeout": 300,
    "StableAge": 3600,                  # no "stable series" processing during the runs
    "LimitFindResults": 0,
    "LimitFindInstances": 0,
    "LogExportedResources": False,
    "MetricsEnabled": False,
    "CheckRevisions": False,
    "MaximumStorageSize": 0,
    "MaximumPatientCount": 0,
    "StoreDicom": True,
    "DicomCheckCalledAet": False,
    "DicomAlwaysAllowStore": True,
    "DicomAlwaysAllowEcho": True,
    "DicomCheckModalityHost": False,
    "RemoteAccessAllowed": False,       # loopback only
    "AuthenticationEnabled": False,
    "SslEnabled": False,
    "OrthancExplorerEnabled": False,
    "WebDavEnabled": False,
    "Plugins": [],
    "DicomScuPreferredTransferSyntax": "1.2.840.10008.1.2.1",  # the files' own: no transcoding
}

DEFAULTS: dict[str, Any] = {
    "scale": 0.25, "seed": 0, "multiframe_gb": 2.0, "sync_interval": 0.5,
    "orthanc_jobs": 2, "timeout": 1800.0,
    "wan_links": "40:12.5,40:50,10:100,150:12.5", "wan_mb": 150.0,
}




# -- helpers -----------------------------------------------------------------------------




def find_tool(name: str) -> str:
    """A console script next to this interpreter (no pyenv shim in between), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed")
    return found




def read_all(files: Sequence[Path]) -> int:
    """Read every file once (warms the page cache); return the byte count."""
    total = 0
    buf = bytearray(MIB)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total








def free_port() -> int:
    """A loopback port free right now (the kernel's choice; a tiny race is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02,
             alive: subprocess.Popen[bytes] | None = None, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if alive is not None and alive.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"{what}: the process exited with {alive.returncode}\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


def start_link(procs: Processes, name: str, port: int, upstream_port: int, rate: float,
               latency_ms: float, log_path: Path) -> subprocess.Popen[bytes]:
    """A WAN link on loopback: ``tools/faultproxy.py`` listening on ``port`` in front of
    ``upstream_port``, ``latency_ms`` of delay each way and ``rate`` bytes/s in each
    direction shared by all its connections (one token bucket per direction)."""
    proc = procs.start(name, [
        sys.executable, str(REPO / "tools" / "faultproxy.py"),
        "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}",
        "--shared-rate", str(int(rate)), "--latency-ms", str(latency_ms),
        "--log-level", "WARNING"], log_path)
    wait_for(lambda: _port_open(port), 20, "the link proxy to listen", alive=proc,
             log_path=log_path)
    return proc


def parse_links(text: str) -> list[tuple[float, float]]:
    """``"40:12.5,10:100"`` -> [(one-way latency ms, MB/s), ...]."""
    links = []
    for item in text.split(","):
        latency, _, rate = item.strip().partition(":")
        try:
            links.append((float(latency), float(rate)))
        except ValueError:
            raise SystemExit(f"--wan-links: {item!r} is not LATENCY_MS:MB_PER_S") from None
    return links


def status_word(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def proc_status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------------


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group we started; False if it has no process left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False  # every process of the group has exited already: nothing to signal
    return True


class Processes:
    """Every long-running process this benchmark starts, each in its own process group."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, cmd: Sequence[str], log_path: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        with open(log_path, "ab") as fh:
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        self.procs[name] = proc
        self.logs[name] = log_path
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 20.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {proc.pid}) did not stop in {grace:.0f} s: SIGKILL")
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(10)
        else:  # it ended by itself: make sure nothing it started is left in its group
            _signal_group(proc.pid, signal.SIGKILL)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name)
            except (OSError, subprocess.SubprocessError) as exc:
                log(f"cannot stop {name}: {exc}")


class ProcSampler(threading.Thread):
    """Polls VmRSS/VmHWM of the watched processes every ``interval`` seconds."""

    def __init__(self, interval: float = RSS_POLL_S) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peak_rss_kb: dict[str, int] = {}
        self.hwm_kb: dict[str, int] = {}
        self.ended: set[str] = set()
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid
            self.ended.discard(name)
        self.sample(name)

    def sample(self, name: str) -> None:
        with self._lock:
            pid = self.pids.get(name)
            if pid is None:
                return
            try:
                kb = proc_status_kb(pid)
            except (FileNotFoundError, ProcessLookupError):
                self.ended.add(name)  # exited: its last sample stands
                del self.pids[name]
                return
            self.peak_rss_kb[name] = max(self.peak_rss_kb.get(name, 0), kb.get("VmRSS", 0))
            self.hwm_kb[name] = max(self.hwm_kb.get(name, 0), kb.get("VmHWM", 0))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            for name in list(self.pids):
                self.sample(name)

    def close(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)

    def peak_bytes(self, name: str) -> int:
        return max(self.hwm_kb.get(name, 0), self.peak_rss_kb.get(name, 0)) * 1024


# -- py-spy ------------------------------------------------------------------------------


PYSPY_RATE = 100
IDLE_LEAVES = ("select (selectors.py", "_worker (concurrent/futures/thread.py")


def _frame_label(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)``."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1]}" if where else func


def summarise_pyspy(raw: Path, top: int = 12, on_cpu: bool = False) -> dict[str, Any]:
    """Where each node's threads spend wall time, from ``py-spy record --idle --threads``;
    with ``on_cpu`` (recorded without ``--idle``), where they spend CPU time: the busiest
    three-frame stacks, in CPU seconds.

    The event-loop thread (``MainThread``): share of its samples idle in ``select`` and the
    busiest leaf frames. Executor threads (``asyncio_N``): for each leaf frame, the average
    number of threads in it (samples / event-loop samples), idle waits for work excluded.
    A leaf in a C call (``os.fsync``, SQLite ``COMMIT``, BLAKE3) shows as the Python line
    that made it.
    """
    main: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    worker_threads: set[str] = set()
    main_total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if len(frames) < 2 or not frames[0].startswith("thread ("):
            continue
        tid, _, name = frames[0].partition(": ")
        leaf = frames[-1]
        idle = any(marker in leaf for marker in IDLE_LEAVES)
        label = "idle" if idle else " <- ".join(_frame_label(f) for f in frames[:0:-1][:2])
        if name == "MainThread":
            main_total += n
            main[label] += n
        elif name.startswith("asyncio"):
            worker_threads.add(tid)
            if not idle:
                workers[label] += n
    wall = main_total or 1
    if on_cpu:  # no --idle: every sample is a thread on a CPU (GIL and I/O waits excluded)
        cpu: Counter[str] = Counter()
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [f.strip() for f in stack.split(";") if f.strip()]
            if count.isdigit() and len(frames) >= 2:
                cpu[" <- ".join(_frame_label(f) for f in frames[:0:-1][:3])] += int(count)
        return {"rate_hz": PYSPY_RATE, "cpu_seconds": sum(cpu.values()) / PYSPY_RATE,
                "cpu_top": [(f, c / PYSPY_RATE) for f, c in cpu.most_common(top)]}
    return {
        "rate_hz": PYSPY_RATE, "wall_seconds": main_total / PYSPY_RATE,
        "event_loop_idle_share": main["idle"] / wall,
        "event_loop_top": [(f, c / wall) for f, c in main.most_common(top + 1)
                           if f != "idle"][:top],
        "executor_threads": len(worker_threads),
        "executor_busy_threads_avg": sum(workers.values()) / wall,
        "executor_top": [(f, c / wall) for f, c in workers.most_common(top)],
    }


# -- syncnode ----------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    data: Path
    peer_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.peer_port}"


class Syncnode:
    """Drives the real ``syncnode`` CLI."""

    def __init__(self, procs: Processes, sampler: ProcSampler, work: Path,
                 sync_interval: float, profile: bool, node_env: dict[str, str],
                 on_cpu: bool = False) -> None:
        self.exe = find_tool("syncnode")
        self.node_env = node_env
        self.procs, self.sampler, self.work = procs, sampler, work
        self.sync_interval = sync_interval
        self.pyspy = find_tool("py-spy") if profile or on_cpu else None
        self.on_cpu = on_cpu
        self.links: dict[str, subprocess.Popen[bytes]] = {}  # tag -> its link proxy

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([self.exe, *args])

    def init(self, node: Node) -> None:
        out = json.loads(self.cli("init", "--data", str(node.data), "--json").stdout)
        node.node_id = out["node_id"]

    def start(self, node: Node, tag: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        (node.data / "ports.json").unlink(missing_ok=True)
        cmd = [self.exe, "run", "--data", str(node.data), "--peer-host", "127.0.0.1",
               "--peer-port", str(node.peer_port), "--dicom-port", str(node.dicom_port),
               "--api-port", str(node.api_port), "--no-discovery",
               "--sync-interval", str(self.sync_interval)]
        return self.procs.start(f"{tag}-{node.name}", cmd, self.work / f"{tag}-{node.name}.log",
                                env={**self.node_env, **(env or {})})

    def wait_ready(self, node: Node, proc: subprocess.Popen[bytes], tag: str,
                   timeout: float = 60) -> None:
        wait_for((node.data / "ports.json").is_file, timeout,
                 f"syncnode {node.name} start", alive=proc,
                 log_path=self.work / f"{tag}-{node.name}.log")

    def peer_add(self, node: Node, peer: Node, url: str | None = None,
                 push: str = "auto") -> None:
        out = self.cli("peer", "add", peer.node_id, url or peer.url, "--push", push,
                       "--data", str(node.data)).stdout
        if "not contacted" in out:
            raise RuntimeError(f"peer add on {node.name} did not pin {peer.name}: {out}")

    def start_link(self, tag: str, upstream: Node, rate: float, latency_ms: float) -> str:
        """A WAN link (:func:`start_link`) in front of ``upstream``'s peer port. Returns the
        URL to dial through it."""
        port = free_port()
        self.links[tag] = start_link(self.procs, f"{tag}-link", port, upstream.peer_port,
                                     rate, latency_ms, self.work / f"{tag}-link.log")
        return f"https://127.0.0.1:{port}"

    def sync_pair(self, tag: str, files: Sequence[Path], timeout: float,
                  link: tuple[float, float] | None = None,
                  env: dict[str, str] | None = None) -> dict[str, Any]:
        """Import ``files`` into a fresh node A, then time the sync to a fresh node B.
        ``link=(bytes_per_s, latency_ms)``: B pulls through a capped, delayed proxy (and A
        does not push, which would bypass it). ``env``: extra settings for both nodes."""
        from syncnode.catalog import Catalog

        a = Node("A", self.work / f"{tag}-nodeA")
        b = Node("B", self.work / f"{tag}-nodeB")
        self.init(a)
        self.init(b)
        log(f"[{tag}] importing {len(files)} files into node A (not timed)")
        t = time.perf_counter()
        report = json.loads(self.cli("import", "--data", str(a.data), "--json", "--quiet",
                                     *map(str, files)).stdout)
        import_s = time.perf_counter() - t
        if report["failed"] or report["imported"] != len(files):
            raise RuntimeError(f"import into A did not take every file: {report}")
        cat_a = Catalog(a.data / "catalog.db")
        try:
            root_a = cat_a.merkle_root().digest.hex()
            counts_a = cat_a.counts()
        finally:
            cat_a.close()
        log(f"[{tag}] imported in {import_s:.1f} s: {counts_a['instances']} instances, "
            f"{counts_a['instance_bytes'] / MB:.1f} MB, root {root_a[:16]}")

        # Trust, both ways, with the real CLI. B runs briefly with no peer so that
        # `peer add` on A can fetch and pin its certificate.
        name_a, name_b = f"{tag}-A", f"{tag}-B"
        proc_b = self.start(b, tag, env)
        self.wait_ready(b, proc_b, tag)
        self.peer_add(a, b, push="never" if link else "auto")
        self.procs.stop(name_b)
        proc_a = self.start(a, tag, env)
        self.sampler.watch(name_a, proc_a.pid)
        self.wait_ready(a, proc_a, tag)
        self.peer_add(b, a, url=self.start_link(tag, a, *link) if link else None)
        sync_fs()

        result: dict[str, Any] = {
            "files": len(files), "instances": counts_a["instances"],
            "bytes": counts_a["instance_bytes"], "import_seconds_untimed": import_s,
            "merkle_root": root_a, "node_ids": {"A": a.node_id, "B": b.node_id},
            "sync_interval": self.sync_interval, "node_env": self.node_env,
        }
        spies: dict[str, subprocess.Popen[bytes]] = {}
        cat_b: Catalog | None = None
        try:
            t_start = time.perf_counter()
            proc_b = self.start(b, tag, env)
            self.sampler.watch(name_b, proc_b.pid)
            self.wait_ready(b, proc_b, tag)
            t_ready = time.perf_counter()
            cpu0 = {"A": proc_cpu_seconds(proc_a.pid), "B": proc_cpu_seconds(proc_b.pid)}
            link_proc = self.links.get(tag) if link else None
            link_cpu0 = proc_cpu_seconds(link_proc.pid) if link_proc else 0.0
            if self.pyspy:
                for n, p in (("A", proc_a), ("B", proc_b)):
                    spies[n] = self.procs.start(
                        f"{tag}-pyspy-{n}",
                        [self.pyspy, "record", "--pid", str(p.pid), "--rate", str(PYSPY_RATE),
                         "--format", "raw", "--nonblocking", "--threads",
                         *([] if self.on_cpu else ["--idle"]),
                         "--output", str(self.work / f"{tag}-pyspy-{n}.txt")],
                        self.work / f"{tag}-pyspy-{n}.log")
            cat_b = Catalog(b.data / "catalog.db")
            done = False
            last: dict[str, Any] = {}
            deadline = t_ready + timeout
            while time.perf_counter() < deadline:
                if proc_b.poll() is not None or proc_a.poll() is not None:
                    raise RuntimeError(f"[{tag}] a node exited during the sync; see "
                                       f"{self.work}/{tag}-*.log")
                if cat_b.merkle_root().digest.hex() == root_a:
                    last = cat_b.counts()
                    if (last["instances"] == counts_a["instances"]
                            and last["instance_bytes"] == counts_a["instance_bytes"]):
                        done = True
                        break
                time.sleep(SYNC_POLL_S)
            t_done = time.perf_counter()
            cpu1 = {"A": proc_cpu_seconds(proc_a.pid), "B": proc_cpu_seconds(proc_b.pid)}
            link_cpu = (proc_cpu_seconds(link_proc.pid) - link_cpu0) if link_proc else 0.0
            for n in (name_a, name_b):
                self.sampler.sample(n)
            last = cat_b.counts()
            states_b = cat_b.peer_states()
        finally:
            if cat_b is not None:
                cat_b.close()
            for n in spies:
                self.procs.stop(f"{tag}-pyspy-{n}", signal.SIGINT, grace=60)
            self.procs.stop(name_b)
            self.procs.stop(name_a)
            if link:
                self.procs.stop(f"{tag}-link")
        cat_a = Catalog(a.data / "catalog.db")
        try:
            states_a = cat_a.peer_states()
        finally:
            cat_a.close()
        seconds = t_done - t_ready
        result.update({
            "completed": done, "seconds": seconds,
            "seconds_from_process_start": t_done - t_start,
            "startup_seconds": t_ready - t_start,
            "mb_per_s": result["bytes"] / MB / seconds,
            "files_per_s": result["instances"] / seconds,
            "mb_per_s_from_process_start": result["bytes"] / MB / (t_done - t_start),
            "b_counts_at_end": last,
            "cpu_seconds": {n: cpu1[n] - cpu0[n] for n in cpu0},
            "cpu_seconds_per_gb": sum(cpu1[n] - cpu0[n] for n in cpu0) / (result["bytes"] / 1e9),
            "cpu_share": {n: (cpu1[n] - cpu0[n]) / seconds for n in cpu0},
            "link_cpu_share": link_cpu / seconds,
            "peak_rss_bytes": {"A": self.sampler.peak_bytes(name_a),
                               "B": self.sampler.peak_bytes(name_b)},
            "vmhwm_bytes": {"A": self.sampler.hwm_kb.get(name_a, 0) * 1024,
                            "B": self.sampler.hwm_kb.get(name_b, 0) * 1024},
            "peer_state_on_B": next(iter(states_b.values()), {}),
            "peer_state_on_A": next(iter(states_a.values()), {}),
        })
        # bytes_sent counts what A's peer server served to B's pulls as well; bytes_pushed
        # is what A's own loop pushed (it bypasses a link: B's pulls go through it)
        pushed = result["peer_state_on_A"].get("bytes_pushed", 0)
        if pushed:
            log(f"[{tag}] note: A also pushed {pushed / MB:.1f} MB to B")
        if self.pyspy:
            result["profile"] = {}
            for n in ("A", "B"):
                raw = self.work / f"{tag}-pyspy-{n}.txt"
                if raw.is_file():
                    result["profile"][n] = summarise_pyspy(raw, on_cpu=self.on_cpu)
                else:
                    log(f"[{tag}] py-spy wrote no profile for {n}; see "
                        f"{self.work}/{tag}-pyspy-{n}.log")
        state = "done" if done else "NOT DONE (timeout)"
        log(f"[{tag}] sync {state}: {seconds:.2f} s from B listening "
            f"({t_done - t_start:.2f} s from its start), {result['mb_per_s']:.1f} MB/s, "
            f"{result['files_per_s']:.1f} files/s; peak RSS A "
            f"{result['peak_rss_bytes']['A'] / MB:.0f} MB, B "
            f"{result['peak_rss_bytes']['B'] / MB:.0f} MB; CPU A "
            f"{result['cpu_share']['A']:.0%}, B {result['cpu_share']['B']:.0%}")
        return result


# -- raw aiohttp over TLS ----------------------------------------------------------------


def raw_tls_server_main(argv: Sequence[str]) -> int:
    """Child mode: ``--raw-tls-server IDENTITY_DIR PORT_FILE FILE_LIST``."""
    identity_dir, port_file, file_list = map(Path, argv)
    files = [Path(p) for p in file_list.read_text().splitlines() if p]
    asyncio.run(_raw_tls_server(identity_dir, port_file, files))
    return 0


async def _raw_tls_server(identity_dir: Path, port_file: Path, files: list[Path]) -> None:
    from aiohttp import web

    from syncnode.tls.contexts import server_ssl_context
    from syncnode.tls.identity import load_identity
    from syncnode.tls.truststore import TrustStore

    identity = load_identity(identity_dir)
    ctx = server_ssl_context(identity, TrustStore(identity_dir))
    buf = memoryview(os.urandom(MIB))
    loop = asyncio.get_running_loop()

    async def stream(request: web.Request) -> web.StreamResponse:
        n = int(request.query["bytes"])
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        resp = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(n),
            "X-TLS": f"{tls.version()} {tls.cipher()[0]}" if tls else "none"})
        await resp.prepare(request)
        while n > 0:
            take = min(n, MIB)
            await resp.write(buf[:take])
            n -= take
        await resp.write_eof()
        return resp

    async def one_file(request: web.Request) -> web.StreamResponse:
        path = files[int(request.match_info["index"])]
        fh = await loop.run_in_executor(None, open, path, "rb")
        try:
            size = os.fstat(fh.fileno()).st_size
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(size)})
            await resp.prepare(request)
            while piece := await loop.run_in_executor(None, fh.read, MIB):
                await resp.write(piece)
            await resp.write_eof()
            return resp
        finally:
            fh.close()

    app = web.Application()
    app.add_routes([web.get("/stream", stream), web.get("/file/{index}", one_file)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(server.sockets[0].getsockname()[1]))
    os.replace(tmp, port_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


async def _raw_tls_client(client_dir: Path, server_id: str, port: int, total: int,
                          n_files: int, server_pid: int) -> dict[str, Any]:
    import aiohttp

    from syncnode.nodeid import NodeId
    from syncnode.tls.contexts import client_ssl_context
    from syncnode.tls.identity import load_identity
    from syncnode.tls.truststore import TrustStore

    identity = load_identity(client_dir)
    ctx = client_ssl_context(identity, TrustStore(client_dir), expected=NodeId.parse(server_id))
    base = f"https://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
                                     timeout=timeout) as session:
        async with session.get(f"{base}/stream", params={"bytes": "1"}) as resp:  # handshake
            await resp.read()
            out["tls_version"], _, out["cipher"] = resp.headers["X-TLS"].partition(" ")

        def cpu_now() -> float:  # this process (the client) and the server, together
            return time.process_time() + proc_cpu_seconds(server_pid)

        t, cpu = time.perf_counter(), cpu_now()
        got = 0
        async with session.get(f"{base}/stream", params={"bytes": str(total)}) as resp:
            resp.raise_for_status()
            async for data in resp.content.iter_chunked(MIB):
                got += len(data)
        dt = time.perf_counter() - t
        if got != total:
            raise RuntimeError(f"raw stream: got {got} of {total} bytes")
        cpu = cpu_now() - cpu
        out["stream"] = {"seconds": dt, "bytes": got, "mb_per_s": got / MB / dt,
                         "cpu_seconds": cpu, "cpu_seconds_per_gb": cpu / (got / 1e9)}

        sem = asyncio.Semaphore(RAW_CONCURRENCY)

        async def fetch(i: int) -> int:
            n = 0
            async with sem, session.get(f"{base}/file/{i}") as r:
                r.raise_for_status()
                async for data in r.content.iter_chunked(MIB):
                    n += len(data)
            return n

        t, cpu = time.perf_counter(), cpu_now()
        sizes = await asyncio.gather(*(fetch(i) for i in range(n_files)))
        dt, cpu = time.perf_counter() - t, cpu_now() - cpu
        got = sum(sizes)
        if got != total:
            raise RuntimeError(f"raw per-file: got {got} of {total} bytes")
        out["per_file"] = per_file_figures(dt, got, n_files, cpu)

        # The least any verified, durable copy does on top of the transport: each file
        # hashed (BLAKE3, as syncnode verifies) and written to a new file by a worker thread
        # while the next arrives, then one flush of the file system at the end.
        import blake3

        store = client_dir.parent / "stored"
        store.mkdir(exist_ok=True)
        loop = asyncio.get_running_loop()

        def keep(path: Path, pieces: list[bytes]) -> None:
            hasher = blake3.blake3()
            with open(path, "xb") as fh:
                for piece in pieces:
                    hasher.update(piece)
                    fh.write(piece)
            hasher.digest()

        async def fetch_and_keep(i: int) -> int:
            pieces: list[bytes] = []
            async with sem, session.get(f"{base}/file/{i}") as r:
                r.raise_for_status()
                async for data in r.content.iter_chunked(MIB):
                    pieces.append(data)
            await loop.run_in_executor(None, keep, store / str(i), pieces)
            return sum(map(len, pieces))

        t, cpu = time.perf_counter(), cpu_now()
        sizes = await asyncio.gather(*(fetch_and_keep(i) for i in range(n_files)))
        await loop.run_in_executor(None, sync_fs)
        dt, cpu = time.perf_counter() - t, cpu_now() - cpu
        got = sum(sizes)
        if got != total:
            raise RuntimeError(f"raw per-file, stored: got {got} of {total} bytes")
        out["per_file_stored"] = per_file_figures(dt, got, n_files, cpu)
        shutil.rmtree(store, ignore_errors=True)
    return out


def per_file_figures(seconds: float, got: int, files: int, cpu: float) -> dict[str, Any]:
    """A raw per-file contender's figures: ``got`` bytes in ``files`` files."""
    return {"seconds": seconds, "bytes": got, "files": files, "concurrency": RAW_CONCURRENCY,
            "mb_per_s": got / MB / seconds, "files_per_s": files / seconds,
            "cpu_seconds": cpu, "cpu_seconds_per_gb": cpu / (got / 1e9)}


def bench_raw_tls(procs: Processes, work: Path, files: Sequence[Path],
                  total: int) -> dict[str, Any]:
    from syncnode.tls.identity import create_identity
    from syncnode.tls.truststore import TrustStore

    base = work / "rawtls"
    server_dir, client_dir = base / "server", base / "client"
    server, client = create_identity(server_dir), create_identity(client_dir)
    TrustStore(server_dir).pin(client.cert_der, client.node_id)
    TrustStore(client_dir).pin(server.cert_der, server.node_id)
    file_list = base / "files.txt"
    file_list.write_text("".join(f"{p}\n" for p in files))
    port_file = base / "port"
    proc = procs.start("rawtls-server",
                       [sys.executable, str(Path(__file__).resolve()), "--raw-tls-server",
                        str(server_dir), str(port_file), str(file_list)],
                       work / "rawtls-server.log")
    try:
        wait_for(port_file.is_file, 60, "raw TLS server start", alive=proc,
                 log_path=work / "rawtls-server.log")
        port = int(port_file.read_text())
        sync_fs()
        log(f"raw TLS: streaming {total / MB:.1f} MB, then {len(files)} files "
            f"({RAW_CONCURRENCY} at a time)")
        res = asyncio.run(_raw_tls_client(client_dir, str(server.node_id), port, total,
                                          len(files), proc.pid))
    finally:
        procs.stop("rawtls-server")
    res["ceiling_mb_per_s"] = max(res["stream"]["mb_per_s"], res["per_file"]["mb_per_s"])
    log(f"raw TLS ({res['tls_version']}, {res['cipher']}): 1 stream "
        f"{res['stream']['mb_per_s']:.1f} MB/s, per file x{RAW_CONCURRENCY} "
        f"{res['per_file']['mb_per_s']:.1f} MB/s")
    return res


# -- Orthanc -----------------------------------------------------------------------------


class OrthancREST:
    """A persistent HTTP/1.1 connection to one Orthanc."""

    def __init__(self, port: int, timeout: float = 600) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
            try:
                headers = {"Content-Type": content_type} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self.close()  # a kept-alive connection the server closed: retry once
                if attempt == 2:
                    raise RuntimeError(f"Orthanc :{self.port} {method} {path}: {exc}") from exc
                continue
            if resp.status >= 400:
                raise RuntimeError(f"Orthanc :{self.port} {method} {path}: HTTP {resp.status}: "
                                   f"{data[:500]!r}")
            return json.loads(data) if data else None
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, obj: Any) -> Any:
        return self.request("POST", path, json.dumps(obj).encode())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Orthanc:
    name: str
    aet: str
    folder: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)

    @property
    def tag(self) -> str:
        return f"orthanc-{self.name}"

    def config(self, tuning: dict[str, Any], peer: Orthanc | None,
               via: tuple[int, int] | None = None) -> dict[str, Any]:
        """``via``: (DICOM port, HTTP port) to reach ``peer`` at instead of its own (the
        ports of link proxies in front of it)."""
        cfg = {**tuning, "Name": f"bench-{self.name}",
               "StorageDirectory": str(self.folder / "storage"),
               "IndexDirectory": str(self.folder / "index"),
               "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet}
        if peer is not None:
            dicom, http = via or (peer.dicom_port, peer.http_port)
            cfg["DicomModalities"] = {peer.name: [peer.aet, "127.0.0.1", dicom]}
            cfg["OrthancPeers"] = {peer.name: {"Url": f"http://127.0.0.1:{http}/"}}
        return cfg

    def start(self, procs: Processes, tuning: dict[str, Any], peer: Orthanc | None,
              fresh: bool = False, via: tuple[int, int] | None = None
              ) -> subprocess.Popen[bytes]:
        if fresh:
            remove(self.folder / "storage")
            remove(self.folder / "index")
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg_path = self.folder / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(tuning, peer, via), indent=2))
        log_path = self.folder / "orthanc.log"
        proc = procs.start(self.tag, ["Orthanc", str(cfg_path)], log_path,
                           env={"TCP_NODELAY": "1"})
        rest = OrthancREST(self.http_port, timeout=5)

        def up() -> bool:
            try:
                rest.get("/system")
                return True
            except (OSError, RuntimeError):
                rest.close()  # not listening yet
                return False

        try:
            wait_for(up, 60, f"Orthanc {self.name} start", interval=0.1, alive=proc,
                     log_path=log_path)
        finally:
            rest.close()
        return proc


def orthanc_version() -> str:
    out = subprocess.run(["Orthanc", "--version"], check=False, capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"


def run_jobs(rest: OrthancREST, path: str, ids: list[str], jobs: int,
             timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """Start ``jobs`` asynchronous store jobs on ``path`` (ids round-robin), wait for all."""
    parts = [ids[i::jobs] for i in range(jobs)]
    t = time.perf_counter()
    job_ids = [rest.post(path, {"Resources": part, "Asynchronous": True})["ID"]
               for part in parts if part]
    pending = set(job_ids)
    infos: dict[str, dict[str, Any]] = {}
    deadline = t + timeout
    while pending:
        for j in list(pending):
            info = rest.get(f"/jobs/{j}")
            if info["State"] in ("Success", "Failure"):
                infos[j] = info
                pending.discard(j)
        if pending:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"Orthanc jobs {sorted(pending)} not done after {timeout} s")
            time.sleep(JOB_POLL_S)
    dt = time.perf_counter() - t
    failed = [i for i in infos.values() if i["State"] != "Success"]
    if failed:
        why = {k: failed[0].get(k) for k in ("ErrorCode", "ErrorDescription", "ErrorDetails",
                                             "Type")}
        raise RuntimeError(f"Orthanc job failed: {json.dumps(why)}")
    return dt, list(infos.values())


def bench_orthanc(procs: Processes, sampler: ProcSampler, work: Path, files: Sequence[Path],
                  total: int, jobs: int, sync_storage: bool, timeout: float) -> dict[str, Any]:
    tuning = {**ORTHANC_TUNING, "ConcurrentJobs": max(2, jobs), "SyncStorageArea": sync_storage}
    a = Orthanc("A", "BENCHA", work / "orthanc-A")
    b = Orthanc("B", "BENCHB", work / "orthanc-B")
    result: dict[str, Any] = {"version": orthanc_version(), "environment": {"TCP_NODELAY": "1"},
                              "tuning": tuning, "runs": {}}
    try:
        proc_a = a.start(procs, tuning, peer=b, fresh=True)
        sampler.watch(a.tag, proc_a.pid)
        proc_b = b.start(procs, tuning, peer=None, fresh=True)
        sampler.watch(b.tag, proc_b.pid)
        rest_a = OrthancREST(a.http_port)
        log(f"Orthanc: uploading {len(files)} files to A (not timed)")
        t = time.perf_counter()
        for f in files:
            answer = rest_a.request("POST", "/instances", f.read_bytes(), "application/dicom")
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc A refused {f}: {answer}")
        result["upload_seconds_untimed"] = time.perf_counter() - t
        ids = rest_a.get("/instances")
        if len(ids) != len(files):
            raise RuntimeError(f"Orthanc A holds {len(ids)} instances, uploaded {len(files)}")
        log(f"Orthanc: uploaded in {result['upload_seconds_untimed']:.1f} s")
        variants = [("dicom", "C-STORE", "/modalities/B/store"),
                    ("peers", "HTTP peers", "/peers/B/store")]
        counts = sorted({1, jobs})
        for key, label, path in variants:
            for k in counts:
                name = f"{key}_{k}job{'s' if k > 1 else ''}"
                sync_fs()
                cpu0 = proc_cpu_seconds(proc_a.pid) + proc_cpu_seconds(proc_b.pid)
                dt, infos = run_jobs(rest_a, path, ids, k, timeout)
                cpu = proc_cpu_seconds(proc_a.pid) + proc_cpu_seconds(proc_b.pid) - cpu0
                rest_b = OrthancREST(b.http_port)
                try:
                    stats = rest_b.get("/statistics")
                finally:
                    rest_b.close()
                got = int(stats["CountInstances"])
                if got != len(ids):
                    raise RuntimeError(f"Orthanc {label}: B holds {got} of {len(ids)} instances")
                sampler.sample(b.tag)
                run_res = {"label": f"Orthanc {label}, {k} job{'s' if k > 1 else ''}",
                           "seconds": dt, "jobs": k, "instances": got,
                           "mb_per_s": total / MB / dt, "files_per_s": len(ids) / dt,
                           "cpu_seconds": cpu, "cpu_seconds_per_gb": cpu / (total / 1e9),
                           "b_disk_size_mb": int(stats.get("TotalDiskSizeMB", 0)),
                           "b_peak_rss_bytes_so_far": sampler.peak_bytes(b.tag),
                           "job_types": sorted({i.get("Type", "?") for i in infos})}
                result["runs"][name] = run_res
                log(f"{run_res['label']}: {dt:.2f} s, {run_res['mb_per_s']:.1f} MB/s, "
                    f"{run_res['files_per_s']:.1f} files/s")
                procs.stop(b.tag)
                proc_b = b.start(procs, tuning, peer=None, fresh=True)
                sampler.watch(b.tag, proc_b.pid)
        rest_a.close()
        sampler.sample(a.tag)
        result["peak_rss_bytes"] = {"A": sampler.peak_bytes(a.tag)}
    finally:
        procs.stop(b.tag)
        procs.stop(a.tag)
    best = max(result["runs"].items(), key=lambda kv: kv[1]["mb_per_s"])
    result["fastest"] = best[0]
    return result


# -- report ------------------------------------------------------------------------------


def fsync_latency(folder: Path, n: int = 50) -> dict[str, float]:
    """Seconds per (4 KiB write + fsync) of a new file in ``folder``: the disk's commit cost."""
    times = []
    buf = os.urandom(4096)
    for i in range(n):
        path = folder / f".fsync-probe-{i}"
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - t)
        path.unlink()
    times.sort()
    return {"median_s": times[n // 2], "p90_s": times[int(n * 0.9)], "n": n}


def page_cache_write(folder: Path, mb: int = 256, *, direct: bool = False
                     ) -> dict[str, Any]:
    """CPU seconds (user + system, this process) per GB to write ``mb`` MB of new bytes into
    a new file in ``folder``, without fsync: what every receiver pays for the bytes it keeps
    (syncnode, Orthanc and the raw contenders alike) before any work of its own. Mostly the
    kernel's copy into fresh page-cache pages; on a VM whose host backs guest memory only on
    first touch (e.g. with free page reporting) it is several times the bare-metal cost.

    ``direct``: the same bytes with ``O_DIRECT`` from one reused, page-aligned buffer (no
    page-cache page, no kernel copy): what bypassing the cache would save. Filesystems
    without ``O_DIRECT`` (tmpfs) give ``{"error": ...}``."""
    size = 1 << 20
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(size))
    path = folder / ".page-cache-probe"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        buf.close()
        return {"error": f"{type(exc).__name__}: {exc.strerror}"}
    try:
        for _ in range(mb * MB // size):
            os.write(fd, buf)
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc.strerror}"}
    finally:
        os.close(fd)
        after = resource.getrusage(resource.RUSAGE_SELF)
        path.unlink()
        buf.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    written = (mb * MB // size) * size
    return {"cpu_s_per_gb": cpu / (written / 1e9), "bytes": written}


def environment(work: Path) -> dict[str, Any]:
    cpu_model = ""
    mem_total = 0
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in fh
                              if ln.startswith("model name")), "")
        with open("/proc/meminfo") as fh:
            mem_total = next((int(ln.split()[1]) * 1024 for ln in fh
                              if ln.startswith("MemTotal:")), 0)
    except OSError as exc:
        log(f"cannot read /proc for the environment: {exc}")
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         check=False, capture_output=True, text=True)
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    storescu = subprocess.run(["storescu", "--version"], check=False, capture_output=True,
                              text=True)
    dcmtk = next((ln.strip() for ln in storescu.stdout.splitlines() if "OFFIS" in ln
                  or "dcmtk" in ln.lower()), "unknown")
    return {
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model, "mem_total_bytes": mem_total,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "openssl": ssl.OPENSSL_VERSION, "sqlite": sqlite3.sqlite_version,
        "aiohttp": ver("aiohttp"), "syncnode": ver("syncnode"), "orthanc": orthanc_version(),
        "dcmtk": dcmtk, "git": git.stdout.strip() if git.returncode == 0 else "unknown",
        "workdir": str(work), "loadavg_start": os.getloadavg(),
        "fsync_4k": fsync_latency(work),
        # as found (pages the host may back only on first touch), then into the pages
        # the first probe just freed
        "page_cache_write": page_cache_write(work, 512),
        "page_cache_rewrite": page_cache_write(work, 512),
        "direct_write": page_cache_write(work, 512, direct=True),
        "cache": "warm: the data set is read once before anything is timed",
        "orthanc_dcmtk_env": "TCP_NODELAY=1",
    }


def _wan_subset(files: Sequence[Path], mb: float) -> list[Path]:
    subset: list[Path] = []
    size = 0
    for f in files:
        if size >= mb * MB:
            break
        subset.append(f)
        size += f.stat().st_size
    return subset


def bench_wan(sn: Syncnode, procs: Processes, files: Sequence[Path],
              args: argparse.Namespace) -> dict[str, Any]:
    """syncnode (zstd off, then on) and Orthanc (C-STORE, HTTP peers) through the same
    capped, delayed links (:func:`start_link`), one link after another."""
    subset = _wan_subset(files, args.wan_mb)
    size = sum(f.stat().st_size for f in subset)
    links = parse_links(args.wan_links)
    out: dict[str, Any] = {"files": len(subset), "bytes": size, "links": []}
    orthanc = None if args.skip_orthanc else WanOrthanc(procs, sn.work, subset, args)
    try:
        for latency, mbps in links:
            entry: dict[str, Any] = {"latency_ms": latency, "mb_per_s_link": mbps}
            link = (mbps * MB, latency)
            for mode in ("off", "on"):
                tag = f"wan-{latency:g}ms-{mbps:g}-{mode}"
                log(f"[{tag}] syncnode: {len(subset)} files, {size / MB:.1f} MB over a "
                    f"{mbps:g} MB/s, {latency:g} ms link, compression {mode}")
                r = sn.sync_pair(tag, subset, args.timeout, link=link,
                                 env={"SYNCNODE_COMPRESSION": mode})
                for d in ("nodeA", "nodeB"):
                    remove(sn.work / f"{tag}-{d}")
                state = r.get("peer_state_on_B", {})
                entry[mode] = {"seconds": r["seconds"], "mb_per_s": r["mb_per_s"],
                               "completed": r["completed"], "cpu_share": r["cpu_share"],
                               "link_cpu_share": r["link_cpu_share"],
                               "cpu_seconds_per_gb": r["cpu_seconds_per_gb"],
                               "bytes_received": state.get("bytes_received", 0),
                               "wire_bytes_received": state.get("wire_bytes_received", 0)}
                log(f"[{tag}] {r['seconds']:.2f} s, {r['mb_per_s']:.1f} MB/s of instances "
                    f"({r['mb_per_s'] / mbps:.0%} of the link); proxy CPU "
                    f"{r['link_cpu_share']:.0%}")
            if orthanc is not None:
                entry["orthanc"] = orthanc.run_link(latency, mbps)
            out["links"].append(entry)
    finally:
        if orthanc is not None:
            orthanc.close()
    return out


class WanOrthanc:
    """Orthanc A -> B through link proxies in front of B's DICOM and HTTP ports (fixed
    ports written into A's configuration; the proxies are restarted per link)."""

    def __init__(self, procs: Processes, work: Path, files: Sequence[Path],
                 args: argparse.Namespace) -> None:
        self.procs, self.work, self.args = procs, work, args
        self.files = files
        self.total = sum(f.stat().st_size for f in files)
        self.tuning = {**ORTHANC_TUNING, "ConcurrentJobs": max(2, args.orthanc_jobs),
                       "SyncStorageArea": args.orthanc_sync_storage}
        self.a = Orthanc("A", "BENCHA", work / "wan-orthanc-A")
        self.b = Orthanc("B", "BENCHB", work / "wan-orthanc-B")
        self.via = (free_port(), free_port())
        self.proc_a = self.a.start(procs, self.tuning, peer=self.b, fresh=True, via=self.via)
        self.proc_b = self.b.start(procs, self.tuning, peer=None, fresh=True)
        self.rest_a = OrthancREST(self.a.http_port)
        log(f"[wan-orthanc] uploading {len(files)} files to Orthanc A (not timed)")
        for f in files:
            answer = self.rest_a.request("POST", "/instances", f.read_bytes(),
                                         "application/dicom")
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise RuntimeError(f"Orthanc A refused {f}: {answer}")
        self.ids = self.rest_a.get("/instances")

    def run_link(self, latency: float, mbps: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, label, path in (("dicom", "C-STORE", "/modalities/B/store"),
                                 ("peers", "HTTP peers", "/peers/B/store")):
            best: dict[str, Any] | None = None
            for k in sorted({1, self.args.orthanc_jobs}):
                tag = f"wan-{latency:g}ms-{mbps:g}-orthanc-{key}-{k}"
                upstream = self.b.dicom_port if key == "dicom" else self.b.http_port
                port = self.via[0] if key == "dicom" else self.via[1]
                proxy = start_link(self.procs, f"{tag}-link", port, upstream, mbps * MB,
                                   latency, self.work / f"{tag}-link.log")
                try:
                    sync_fs()
                    cpu0 = proc_cpu_seconds(proxy.pid)
                    try:
                        dt, _ = run_jobs(self.rest_a, path, self.ids, k, self.args.timeout)
                    except RuntimeError as exc:  # seen once on a loaded machine: log, retry
                        log(f"[{tag}] {exc}; restarting B and trying once more")
                        self.procs.stop(self.b.tag)
                        self.proc_b = self.b.start(self.procs, self.tuning, peer=None,
                                                   fresh=True)
                        cpu0 = proc_cpu_seconds(proxy.pid)
                        dt, _ = run_jobs(self.rest_a, path, self.ids, k, self.args.timeout)
                    link_cpu = proc_cpu_seconds(proxy.pid) - cpu0
                finally:
                    self.procs.stop(f"{tag}-link")
                rest_b = OrthancREST(self.b.http_port)
                try:
                    got = int(rest_b.get("/statistics")["CountInstances"])
                finally:
                    rest_b.close()
                if got != len(self.ids):
                    raise RuntimeError(f"Orthanc {label}: B holds {got} of {len(self.ids)}")
                r = {"label": f"Orthanc {label}, {k} job{'s' if k > 1 else ''}",
                     "seconds": dt, "jobs": k, "mb_per_s": self.total / MB / dt,
                     "link_cpu_share": link_cpu / dt}
                log(f"[{tag}] {dt:.2f} s, {r['mb_per_s']:.1f} MB/s "
                    f"({r['mb_per_s'] / mbps:.0%} of the link); proxy CPU "
                    f"{r['link_cpu_share']:.0%}")
                if best is None or r["mb_per_s"] > best["mb_per_s"]:
                    best = r
                self.procs.stop(self.b.tag)
                self.proc_b = self.b.start(self.procs, self.tuning, peer=None, fresh=True)
            out[key] = best
        return out

    def close(self) -> None:
        self.rest_a.close()
        self.procs.stop(self.b.tag)
        self.procs.stop(self.a.tag)
        remove(self.a.folder)
        remove(self.b.folder)


def repro_command(args: argparse.Namespace) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve().relative_to(REPO)),
           "--scale", str(args.scale), "--seed", str(args.seed),
           "--multiframe-gb", str(args.multiframe_gb), "--sync-interval", str(args.sync_interval),
           "--orthanc-jobs", str(args.orthanc_jobs), "--timeout", str(args.timeout)]
    if not args.orthanc_sync_storage:
        cmd.append("--no-orthanc-sync-storage")
    for kv in args.node_env:
        cmd += ["--node-env", kv]
    cmd += ["--wan-links", args.wan_links, "--wan-mb", str(args.wan_mb)]
    for flag in ("skip_multiframe", "skip_orthanc", "skip_raw", "skip_wan", "profile",
                 "profile_cpu", "keep"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.workdir is not None:
        cmd += ["--workdir", str(args.workdir)]
    if args.scratch_fs is not None:
        cmd += ["--scratch-fs", f"{args.scratch_fs:g}"]
    if args.json is not None:
        cmd += ["--json", str(args.json)]
    return f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}"


def evaluate(doc: dict[str, Any]) -> dict[str, Any]:
    sn = doc.get("syncnode")
    targets: dict[str, Any] = {}
    sn_rate = sn["mb_per_s"] if sn and sn["completed"] else 0.0
    orth = doc.get("orthanc")
    if sn and orth:
        best = orth["runs"][orth["fastest"]]
        ratio = sn_rate / best["mb_per_s"]
        targets["vs_orthanc"] = {"ratio": ratio, "against": best["label"],
                                 "target": f">= {TARGET_VS_ORTHANC:g}x",
                                 "pass": ratio >= TARGET_VS_ORTHANC}
    raw = doc.get("raw_tls")
    if sn and raw:
        ratio = sn_rate / raw["ceiling_mb_per_s"]
        targets["vs_raw_tls"] = {"ratio": ratio, "target": f">= {TARGET_VS_RAW:.0%}",
                                 "pass": ratio >= TARGET_VS_RAW}
    peaks = {}
    for key in ("syncnode", "multiframe"):
        part = doc.get(key)
        if part:
            for n, v in part["peak_rss_bytes"].items():
                peaks[f"{key}:{n}"] = v
    if peaks:
        worst = max(peaks.values())
        targets["peak_rss"] = {"per_node": peaks, "max": worst,
                               "target": f"< {TARGET_PEAK_BYTES / MB:.0f} MB",
                               "pass": 0 < worst < TARGET_PEAK_BYTES,
                               "multiframe_measured": "multiframe" in doc}
    for key in ("syncnode", "multiframe"):
        part = doc.get(key)
        if part and not part["completed"]:
            targets[f"{key}_completed"] = {"pass": False, "target": "sync completes"}
    return targets


def render(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    cfg = doc["config"]
    lines = ["syncnode sync benchmark (loopback; MB = 10**6 bytes)",
             (f"  machine: {env['cpu_count']} CPUs ({env['cpu_model']}), "
              f"{env['mem_total_bytes'] / 2**30:.1f} GiB RAM, load "
              f"{env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}"),
             (f"  python {env['python']}, {env['openssl']}, aiohttp {env['aiohttp']}, "
              f"syncnode {env['syncnode']} (git {env['git']}), {env['orthanc']}")]
    fs = env["fsync_4k"]
    lines.append(f"  disk: 4 KiB write + fsync in the work folder: median "
                 f"{fs['median_s'] * 1e3:.2f} ms, p90 {fs['p90_s'] * 1e3:.2f} ms")
    pc, again = env.get("page_cache_write"), env.get("page_cache_rewrite")
    if pc and again:
        lines.append(f"  writing new bytes into the page cache ({pc['bytes'] / MB:.0f} MB, no "
                     f"fsync), paid by every receiver below before any work of its own: "
                     f"{pc['cpu_s_per_gb']:.2f} CPU s per GB into free memory as found, "
                     f"{again['cpu_s_per_gb']:.2f} into pages just freed")
    direct = env.get("direct_write")
    if direct:
        lines.append("  the same bytes bypassing the page cache (O_DIRECT, one reused buffer): "
                     + (f"{direct['cpu_s_per_gb']:.2f} CPU s per GB" if "error" not in direct
                        else f"not possible here ({direct['error']})"))
    data = doc.get("dataset", {})
    if data:
        lines.append(f"  data set: {data['files']} files, {data['bytes'] / MB:.1f} MB "
                     f"(gen_dataset --scale {cfg['scale']} --seed {cfg['seed']}), warm cache")
    lines.append("")
    lines.append(f"  {'path':<46}{'seconds':>9}{'MB/s':>9}{'files/s':>9}"
                 f"{'peak RSS A/B (MB)':>20}")

    def row(label: str, secs: float, mbs: float, fps: float | None, rss: str = "") -> None:
        fps_s = f"{fps:>9.1f}" if fps is not None else f"{'-':>9}"
        lines.append(f"  {label:<46}{secs:>9.2f}{mbs:>9.1f}{fps_s}{rss:>20}")

    def rss_pair(part: dict[str, Any]) -> str:
        p = part["peak_rss_bytes"]
        return f"{p['A'] / MB:.0f} / {p['B'] / MB:.0f}"

    sn = doc.get("syncnode")
    if sn:
        label = "syncnode A -> B (mTLS pull)" + ("" if sn["completed"] else " NOT DONE")
        row(label, sn["seconds"], sn["mb_per_s"], sn["files_per_s"], rss_pair(sn))
        row("  same, timed from starting B's process", sn["seconds_from_process_start"],
            sn["mb_per_s_from_process_start"], sn["instances"] / sn["seconds_from_process_start"])
    raw = doc.get("raw_tls")
    if raw:
        lines.append(f"  (raw TLS: {raw['tls_version']} {raw['cipher']}, syncnode's own TLS "
                     "contexts and identities; the client discards the bytes)")
        row("raw aiohttp TLS 1.3 mTLS, 1 stream", raw["stream"]["seconds"],
            raw["stream"]["mb_per_s"], None)
        row(f"raw aiohttp TLS 1.3 mTLS, per file x{RAW_CONCURRENCY}",
            raw["per_file"]["seconds"], raw["per_file"]["mb_per_s"],
            raw["per_file"]["files_per_s"])
        kept = raw.get("per_file_stored")
        if kept:
            row("  same, each file hashed and written, one sync", kept["seconds"],
                kept["mb_per_s"], kept["files_per_s"])
    orth = doc.get("orthanc")
    if orth:
        for name, r in orth["runs"].items():
            row(r["label"] + (" *" if name == orth["fastest"] else ""), r["seconds"],
                r["mb_per_s"], r["files_per_s"])
    mf = doc.get("multiframe")
    if mf:
        label = (f"syncnode multi-frame {mf['bytes'] / 1e9:.2f} GB, 1 file"
                 + ("" if mf["completed"] else " NOT DONE"))
        row(label, mf["seconds"], mf["mb_per_s"], None, rss_pair(mf))
    for part_key in ("syncnode", "multiframe"):
        part = doc.get(part_key)
        pushed = part["peer_state_on_A"].get("bytes_pushed", 0) if part else 0
        if pushed:
            lines.append(f"  note ({part_key}): A also pushed {pushed / MB:.1f} MB to B while B "
                         "pulled it (B's peer state counts "
                         f"{part['peer_state_on_B'].get('bytes_received', 0) / MB:.1f} MB "
                         "received): push and pull of the same blob ran side by side")
    lines.append("")
    t = doc["targets"]
    if "vs_orthanc" in t:
        x = t["vs_orthanc"]
        lines.append(f"  syncnode / fastest Orthanc ({x['against']}): {x['ratio']:.2f}x"
                     f"   target {x['target']}   {status_word(x['pass'])}")
    if "vs_raw_tls" in t:
        x = t["vs_raw_tls"]
        lines.append(f"  syncnode / raw TLS ceiling ({raw['ceiling_mb_per_s']:.1f} MB/s): "
                     f"{x['ratio']:.0%}   target {x['target']}   {status_word(x['pass'])}")
    if "peak_rss" in t:
        x = t["peak_rss"]
        per = ", ".join(f"{k} {v / MB:.0f}" for k, v in x["per_node"].items())
        extra = "" if x["multiframe_measured"] else " (multi-frame sync skipped)"
        lines.append(f"  peak RSS per node process: max {x['max'] / MB:.0f} MB ({per})"
                     f"   target {x['target']}{extra}   {status_word(x['pass'])}")
    for key in ("syncnode_completed", "multiframe_completed"):
        if key in t:
            lines.append(f"  {key.split('_')[0]} sync did not complete within the timeout   MISS")
    if sn:
        lines.append(f"  syncnode CPU over the sync: A {sn['cpu_share']['A']:.0%}, "
                     f"B {sn['cpu_share']['B']:.0%} of one core; B started in "
                     f"{sn['startup_seconds']:.2f} s; sync interval {sn['sync_interval']} s"
                     + (f"; node environment {sn['node_env']}" if sn["node_env"] else ""))
    cpu_rows = []  # CPU seconds of sender and receiver together, per GB moved
    if sn and "cpu_seconds_per_gb" in sn:
        cpu_rows.append(f"syncnode {sn['cpu_seconds_per_gb']:.2f}")
    if raw and "cpu_seconds_per_gb" in raw["stream"]:
        cpu_rows.append(f"raw TLS per file {raw['per_file']['cpu_seconds_per_gb']:.2f}, "
                        f"one stream {raw['stream']['cpu_seconds_per_gb']:.2f}")
        if "per_file_stored" in raw:
            cpu_rows.append("raw TLS per file, hashed and written "
                            f"{raw['per_file_stored']['cpu_seconds_per_gb']:.2f}")
    if orth:
        cpu_rows += [f"{r['label']} {r['cpu_seconds_per_gb']:.2f}"
                     for r in orth["runs"].values() if "cpu_seconds_per_gb" in r]
    if cpu_rows:
        ncpu = len(os.sched_getaffinity(0))
        lines.append(f"  CPU seconds per GB moved, both ends together ({ncpu} CPUs here: at "
                     f"X CPU s/GB no transfer can beat {ncpu} / X GB/s): " + "; ".join(cpu_rows))
    if orth:
        tun = orth["tuning"]
        lines.append("  Orthanc and DCMTK ran with TCP_NODELAY=1 in their environment. Orthanc "
                     "settings: " + ", ".join(
                         f"{k}={json.dumps(tun[k])}" for k in (
                             "StorageCompression", "StoreMD5ForAttachments", "SaveJobs",
                             "OverwriteInstances", "HttpCompressionEnabled", "KeepAlive",
                             "TcpNoDelay", "ConcurrentJobs", "MaximumPduLength",
                             "DicomAssociationCloseDelay", "SyncStorageArea", "StableAge",
                             "MetricsEnabled", "CheckRevisions")) + "; no plugins. * = fastest.")
    wan = doc.get("wan")
    if wan:
        lines += ["", render_wan(wan)]
    for part_key in ("syncnode", "multiframe"):
        prof = (doc.get(part_key) or {}).get("profile")
        if not prof:
            continue
        lines.append("")
        lines.append(f"  py-spy, {part_key} sync (wall-clock samples incl. idle; the profiler "
                     "perturbs the timing above):")
        for n in ("B", "A"):
            p = prof.get(n)
            if not p:
                continue
            if "cpu_top" in p:
                lines.append(f"  node {n}: {p['cpu_seconds']:.1f} CPU s sampled (on-CPU "
                             "samples, all threads); busiest stacks, CPU s:")
                for f, sec in p["cpu_top"]:
                    lines.append(f"    {sec:6.2f}  {f[:120]}")
                continue
            lines.append(f"  node {n}: event loop idle {p['event_loop_idle_share']:.0%} of "
                         f"{p['wall_seconds']:.1f} s; busiest event-loop frames:")
            for f, share in p["event_loop_top"][:8]:
                lines.append(f"    {share:6.1%}  {f[:110]}")
            lines.append(f"    executor: {p['executor_threads']} threads, on average "
                         f"{p['executor_busy_threads_avg']:.2f} busy; average threads in:")
            for f, avg in p["executor_top"][:8]:
                lines.append(f"    {avg:6.2f}  {f[:110]}")
    return "\n".join(lines)


def render_wan(wan: dict[str, Any]) -> str:
    """One row per link: MB/s of instances, % of the link, syncnode / each Orthanc path."""
    lines = [f"  WAN links (tools/faultproxy.py; {wan['files']} files, {wan['bytes'] / MB:.1f} MB; "
             "MB/s of instances, % of the link rate; zstd: share of the bytes on the wire; "
             "proxy: its CPU share, near 100% it is the limit)",
             f"  {'link':<16}{'zstd off':>16}{'zstd on':>22}{'Orthanc C-STORE':>18}"
             f"{'Orthanc peers':>16}   syncnode off / on vs C-STORE; vs peers"]
    for e in wan["links"]:
        rate = e["mb_per_s_link"]
        off, on = e["off"], e["on"]
        wire = on["wire_bytes_received"] / on["bytes_received"] if on["bytes_received"] else 0
        cells = [f"{e['latency_ms']:g} ms {rate:g} MB/s",
                 f"{off['mb_per_s']:.1f} ({off['mb_per_s'] / rate:.0%})"
                 + ("" if off["completed"] else "!"),
                 f"{on['mb_per_s']:.1f} ({on['mb_per_s'] / rate:.0%}, w {wire:.0%})"
                 + ("" if on["completed"] else "!")]
        orth = e.get("orthanc")
        ratios = ""
        if orth:
            d, p = orth["dicom"], orth["peers"]
            cells += [f"{d['mb_per_s']:.1f} ({d['mb_per_s'] / rate:.0%})",
                      f"{p['mb_per_s']:.1f} ({p['mb_per_s'] / rate:.0%})"]
            ratios = (f"   {off['mb_per_s'] / d['mb_per_s']:.1f}x / "
                      f"{on['mb_per_s'] / d['mb_per_s']:.1f}x; "
                      f"{off['mb_per_s'] / p['mb_per_s']:.1f}x / "
                      f"{on['mb_per_s'] / p['mb_per_s']:.1f}x")
        else:
            cells += ["-", "-"]
        lines.append(f"  {cells[0]:<16}{cells[1]:>16}{cells[2]:>22}{cells[3]:>18}"
                     f"{cells[4]:>16}{ratios}")
        proxies = [f"syncnode off {off['link_cpu_share']:.0%}, on {on['link_cpu_share']:.0%}"]
        if orth:
            proxies.append(f"Orthanc {orth['dicom']['link_cpu_share']:.0%} / "
                           f"{orth['peers']['link_cpu_share']:.0%}")
        lines.append(f"  {'':<16}proxy CPU: " + "; ".join(proxies)
                     + (f"; Orthanc best of {orth['dicom']['jobs']}/{orth['peers']['jobs']} "
                        "jobs" if orth else ""))
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=DEFAULTS["scale"],
                   help="gen_dataset scale (default 0.25: about 1.5 GB, 1,940 files)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--multiframe-gb", type=float, default=DEFAULTS["multiframe_gb"],
                   help="size of the multi-frame instance for the memory check (default 2)")
    p.add_argument("--skip-multiframe", action="store_true")
    p.add_argument("--skip-orthanc", action="store_true")
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--skip-wan", action="store_true")
    p.add_argument("--wan-links", default=DEFAULTS["wan_links"],
                   help="links as LATENCY_MS:MB_PER_S, comma-separated (default %(default)s)")
    p.add_argument("--wan-mb", type=float, default=DEFAULTS["wan_mb"],
                   help="MB of the data set sent over each link, by each contender "
                        "(default 150)")
    p.add_argument("--sync-interval", type=float, default=DEFAULTS["sync_interval"],
                   help="syncnode run --sync-interval (default 0.5)")
    p.add_argument("--orthanc-jobs", type=int, default=DEFAULTS["orthanc_jobs"],
                   help="also run each Orthanc transfer as this many concurrent jobs (default 2)")
    p.add_argument("--orthanc-sync-storage", action=argparse.BooleanOptionalAction,
                   default=True, help="Orthanc SyncStorageArea (default true: fsync, like "
                                      "syncnode)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy both nodes during the syncnode syncs (perturbs the timing)")
    p.add_argument("--profile-cpu", action="store_true",
                   help="py-spy both nodes without --idle: where the CPU time goes, by stack")
    p.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for both `syncnode run` processes, for experiments "
                        "(e.g. SYNCNODE_MAX_PULLS=16); repeatable; default: none")
    p.add_argument("--timeout", type=float, default=DEFAULTS["timeout"],
                   help="seconds allowed for each sync or Orthanc transfer (default 1800)")
    p.add_argument("--scratch-fs", type=float, default=None, metavar="GB",
                   help=SCRATCH_FS_HELP + "; the work folder goes in it (and --workdir holds "
                        "its image file); about 6 GB per GB of data set, 12 with the "
                        "multi-frame part")
    p.add_argument("--workdir", type=Path, default=None,
                   help="work folder (default: a new folder in the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    if args.orthanc_jobs < 1:
        p.error("--orthanc-jobs must be >= 1")
    for kv in args.node_env:
        if "=" not in kv or not kv.split("=", 1)[0]:
            p.error(f"--node-env {kv!r}: expected KEY=VALUE")
    return args


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if args.scratch_fs is None:
        return run_bench(args, None)
    with scratch_fs(args.scratch_fs, args.workdir) as mnt:
        return run_bench(args, mnt)


def run_bench(args: argparse.Namespace, scratch: Path | None) -> int:
    if scratch is not None:
        work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=scratch))
    elif args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if any(args.workdir.iterdir()):
            raise SystemExit(f"--workdir {args.workdir} is not empty")
        work = args.workdir.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    log(f"work folder {work}")
    doc: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v)
                                      for k, v in vars(args).items()},
                           "environment": environment(work)}
    procs = Processes()
    sampler = ProcSampler()
    sampler.start()
    failed = False
    try:
        gen = load_generator()
        gen_dir = work / "dataset"
        log(f"generating the data set (scale {args.scale}, seed {args.seed})")
        t = time.perf_counter()
        gen.generate(gen_dir, scale=args.scale, seed=args.seed)
        (gen_dir / "manifest.json").rename(work / "manifest.json")  # not DICOM: keep it aside
        files = dicom_files(gen_dir)
        total = read_all(files)
        doc["dataset"] = {"files": len(files), "bytes": total,
                          "generate_seconds": time.perf_counter() - t}
        log(f"data set: {len(files)} files, {total / MB:.1f} MB")

        sn = Syncnode(procs, sampler, work, args.sync_interval, args.profile,
                      dict(kv.split("=", 1) for kv in args.node_env), args.profile_cpu)
        doc["syncnode"] = sn.sync_pair("sync", files, args.timeout)
        if not args.skip_raw:
            doc["raw_tls"] = bench_raw_tls(procs, work, files, total)
        if not args.skip_wan:
            doc["wan"] = bench_wan(sn, procs, files, args)
        if not args.skip_orthanc:
            doc["orthanc"] = bench_orthanc(procs, sampler, work, files, total,
                                           args.orthanc_jobs, args.orthanc_sync_storage,
                                           args.timeout)
            remove(work / "orthanc-A")
            remove(work / "orthanc-B")
        if not args.skip_multiframe:
            for d in ("sync-nodeA", "sync-nodeB"):
                remove(work / d)  # free the disk before the big file
            mf_dir = work / "multiframe"
            log(f"generating a {args.multiframe_gb} GB multi-frame instance")
            gen.generate(mf_dir, scale=0.001, seed=args.seed, studies=1,
                         multiframe_gb=args.multiframe_gb)
            big = max(dicom_files(mf_dir), key=lambda p: p.stat().st_size)
            read_all([big])
            doc["multiframe"] = sn.sync_pair("multiframe", [big], args.timeout)
    except BaseException:
        failed = True
        raise
    finally:
        procs.stop_all()
        sampler.close()
        doc["environment"]["loadavg_end"] = os.getloadavg()
        doc["targets"] = evaluate(doc)
        if args.json is not None and "targets" in doc:
            args.json.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
        if args.keep or failed:
            log(f"work folder kept: {work}" + (" (run failed: logs are there)" if failed
                                                else ""))
        else:
            shutil.rmtree(work, ignore_errors=False)
    doc["reproduce"] = repro_command(args)
    print(render(doc))
    print(f"\nreproduce: {doc['reproduce']}")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str))
        print(f"figures and environment: {args.json}")
    return 0 if all(t.get("pass") for t in doc["targets"].values()) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--raw-tls-server":
        sys.exit(raw_tls_server_main(sys.argv[2:]))
    sys.exit(main())
