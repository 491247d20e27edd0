"""The fault matrix: one ~200 MB data set synced between `syncnode run` processes through
link cuts, SIGKILLs of the receiver, a full disk and bit rot, with counts.

Nodes: A holds the data set (``tools/gen_dataset.py``, imported with ``syncnode import``);
B, C and D pull it from A, each through a different fault (3 and 4 run in a thread while
2 kills C: they involve other nodes, and A serving all of them at once is one more load):

1. **cuts** — B pulls through ``tools/faultproxy.py``, which cuts the link (RST) every
   ``total / (CUTS + 1)`` bytes downstream;
2. **kills** — C pulls through a bandwidth-capped proxy (so the sync lasts long enough) and
   is SIGKILLed ``KILLS`` times at seeded random moments after it starts, then restarted;
3. **disk full** — D's data folder is a tmpfs the test mounts, too small for the data set:
   sync pauses, the tmpfs is grown (``mount -o remount,size=``) and D, never restarted,
   finishes;
4. **bit rot** — ``FLIPS`` single bits are flipped in distinct blob files of B (B stopped);
   ``syncnode verify`` exits 1 and lists exactly those blobs, ``verify --repair`` fetches them
   again from A, and B, restarted, stays in sync.

After each phase: every SOP Instance UID of the data set is live at the receiver (0 lost),
``syncnode verify`` is clean and every blob re-hashes to its name (0 damaged), and every node
reports one Merkle root in ``syncnode status --json``. The counts (cuts, kills, flips found
and repaired, instances, bytes, seconds per phase) go to the terminal summary (see
``fault_matrix_summary`` in tests/conftest.py) and to the test's JUnit properties.

Randomness (kill moments, flipped blobs and bits, the proxy's seed) comes from one seed,
printed in the summary; ``SYNCNODE_FAULT_SEED=N`` repeats a run. Needs root (tmpfs mount).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from syncsupport import (
    NodeProcess,
    cli,
    cli_json,
    load_faultproxy,
    node_processes,
    pin,
)

from syncnode.blobstore import FREE_RESERVE
from syncnode.importer import import_paths
from syncnode.local import LocalNode

pytestmark = pytest.mark.e2e

MB = 10**6
REPO = Path(__file__).resolve().parents[2]
GEN_DATASET = REPO / "tools" / "gen_dataset.py"
SCALE = 0.033  # of the 6 GB reference set: 257 files, ~199 MB
CUTS = 25
KILLS = 20  # SIGKILLs that land while bytes are arriving (more are made if needed)
FLIPS = 50
KILL_RATE = 8 * MB  # bytes/s to C (all connections) during the kills: the sync outlasts them
TMPFS_SMALL = "48m"  # D's data folder first: full after about a fifth of the data set
TMPFS_LARGE = "400m"
SEED = int(os.environ.get("SYNCNODE_FAULT_SEED") or random.SystemRandom().randrange(2**31))


class Matrix:
    """The nodes, the data set's SOP UIDs and the counts reported at the end."""

    def __init__(self, tmp: Path, procs: list[NodeProcess], report: Callable[[str], None],
                 record: Callable[[str, object], None]) -> None:
        self.tmp, self.procs, self.report, self.record = tmp, procs, report, record
        self.rng = random.Random(SEED)
        self.dirs: dict[str, Path] = {}
        self.ids: dict[str, str] = {}
        self.running: dict[str, NodeProcess] = {}
        self.sops: set[str] = set()
        self.total_bytes = 0

    def init(self, name: str, data: Path) -> None:
        self.dirs[name] = data
        self.ids[name] = cli_json("init", data=data)["node_id"]

    def start(self, name: str) -> int:
        data = self.dirs[name]
        p = NodeProcess(data, self.tmp / f"{name}.log")
        self.procs.append(p)
        self.running[name] = p
        return p.wait_ready()

    def stop(self, name: str) -> None:
        self.running.pop(name).stop()

    def pull_from_a(self, name: str, url: str) -> None:
        cli("peer", "add", self.ids["a"], url, "--cert", self.dirs["a"] / "node.crt",
            "--push", "never", data=self.dirs[name])

    # -- what every phase must leave --------------------------------------------------------
    def live_sops(self, name: str) -> set[str]:
        node = LocalNode(self.dirs[name])
        try:
            return {i.sop_instance_uid for i in node.catalog.instances()}
        finally:
            node.close()

    def check(self, phase: str, names: list[str]) -> None:
        """0 lost, 0 damaged, one Merkle root over ``names`` (the CLI runs for all nodes at
        once: on a small machine most of its cost is starting Python)."""
        with ThreadPoolExecutor(len(names)) as pool:
            verified = dict(zip(names, pool.map(
                lambda n: cli("verify", "--json", data=self.dirs[n], check=False), names),
                strict=True))
            roots = dict(zip(names, pool.map(
                lambda n: cli_json("status", data=self.dirs[n])["merkle_root"], names),
                strict=True))
        for name in names:
            lost = self.sops - self.live_sops(name)
            assert not lost, f"{phase}: {len(lost)} instances lost at {name}, e.g. {min(lost)}"
            # verify re-hashes every blob file against its name (and every chunk list).
            report = json.loads(verified[name].stdout)
            assert verified[name].returncode == 0 and report["ok"], (
                f"{phase}: verify of {name}: {report}")
            assert not report["damaged"] and not report["missing"], report
            assert report["blobs_checked"] >= len(self.sops), report
        assert len(set(roots.values())) == 1, f"{phase}: Merkle roots differ: {roots}"

    def wait_converged(self, name: str, timeout: float, what: str,
                       describe: Callable[[], object] | None = None) -> float:
        """Poll (bounded) until ``name`` shows A's Merkle root; return the seconds waited."""
        start = time.monotonic()
        a_root = cli_json("status", data=self.dirs["a"])["merkle_root"]
        node = LocalNode(self.dirs[name])
        try:
            while True:
                if node.catalog.merkle_root().digest.hex() == a_root:
                    return time.monotonic() - start
                if time.monotonic() - start > timeout:
                    detail = describe() if describe else ""
                    raise AssertionError(
                        f"timed out after {timeout:.0f}s waiting for {what}: "
                        f"{node.catalog.counts()} {node.catalog.peer_states()} {detail}")
                time.sleep(0.25)
        finally:
            node.close()

    def phase(self, name: str, seconds: float, **counts: object) -> None:
        text = ", ".join(f"{k}={v}" for k, v in counts.items())
        self.report(f"{name}: {text}, {seconds:.1f} s")
        for k, v in counts.items():
            self.record(f"{name}.{k}", v)
        self.record(f"{name}.seconds", round(seconds, 1))


@contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(mountpoint)], check=True, capture_output=True, timeout=30)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True,
                       timeout=30)


def flip_bit(path: Path, rng: random.Random) -> tuple[int, int]:
    """Flip one random bit of the file in place; return (offset, bit)."""
    size = path.stat().st_size
    offset, bit = rng.randrange(size), rng.randrange(8)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    return offset, bit


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_fault_matrix(tmp_path: Path, fault_matrix_summary: Callable[[str], None],
                      record_property: Callable[[str, object], None]) -> None:
    fp = load_faultproxy()
    t_all = time.monotonic()
    # Nodes are killed (inner block) before the tmpfs under D is unmounted (outer block).
    with tmpfs(tmp_path / "dfs", TMPFS_SMALL) as dfs, node_processes() as procs:
        m = Matrix(tmp_path, procs, fault_matrix_summary, record_property)
        m.report(f"seed {SEED} (repeat with SYNCNODE_FAULT_SEED={SEED})")

        # -- set-up: the data set on A; B, C, D trusted by A --------------------------------
        t0 = time.monotonic()
        ds = tmp_path / "ds"
        subprocess.run([sys.executable, str(GEN_DATASET), "--out", str(ds), "--scale",
                        str(SCALE), "--seed", "11", "--quiet"], check=True, capture_output=True,
                       timeout=120)
        manifest = json.loads((ds / "manifest.json").read_text())
        t_gen = time.monotonic() - t0
        m.sops = {sop for study in manifest["studies"] for series in study["series"]
                  for _path, sop, _size in series["instances"]}
        m.total_bytes = manifest["bytes"]
        assert len(m.sops) == manifest["files"] >= 200 and m.total_bytes >= 190 * MB
        with ThreadPoolExecutor(4) as pool:  # four `syncnode init` processes at once
            list(pool.map(lambda nd: m.init(*nd), [(n, tmp_path / n) for n in "abc"]
                          + [("d", dfs / "d")]))
        a = LocalNode(m.dirs["a"])
        try:
            report = import_paths(a, sorted(p for p in ds.iterdir() if p.is_dir()))
            assert report.imported == len(m.sops) and not report.failed, report
            for name in "bcd":
                other = LocalNode(m.dirs[name])
                pin(a, other)
                other.close()
        finally:
            a.close()
        t_ready = time.monotonic() - t0
        a_port = m.start("a")
        m.check("set-up", ["a"])
        m.phase("set-up", time.monotonic() - t0, instances=len(m.sops),
                bytes=m.total_bytes, generated_s=round(t_gen, 1),
                imported_s=round(t_ready, 1))

        # -- 1: link cuts during the sync A -> B --------------------------------------------
        t0 = time.monotonic()
        cut_cfg = fp.FaultConfig(cut_every_bytes=m.total_bytes // (CUTS + 1), max_cuts=CUTS,
                                 seed=SEED)
        with fp.ThreadedFaultProxy(("127.0.0.1", a_port), config=cut_cfg) as cut_proxy, \
                fp.ThreadedFaultProxy(("127.0.0.1", a_port),
                                      config=fp.FaultConfig(shared_rate_down=KILL_RATE,
                                                            seed=SEED)) as slow_proxy:
            m.pull_from_a("b", f"https://127.0.0.1:{cut_proxy.port}")
            m.start("b")
            m.wait_converged("b", 120, "B to pull the data set through the cuts",
                             describe=cut_proxy.snapshot)
            stats = cut_proxy.snapshot()
            assert stats["cuts"] >= 20, stats
            m.check("cuts", ["a", "b"])
            m.phase("cuts", time.monotonic() - t0, cuts=stats["cuts"],
                    bytes_down=stats["bytes_down"], instances=len(m.live_sops("b")))
            m.stop("b")  # idle from here on: its CPU goes to the next phases

            # -- 3 and 4 run beside 2: D and B are other nodes, A serves all three -----------
            # (their own random streams keep a seed's flips and kill moments reproducible)
            side_pool = ThreadPoolExecutor(1)
            side = side_pool.submit(disk_full_then_bit_flips, m, dfs, a_port)
            side_pool.shutdown(wait=False)  # the thread ends with its phases (bounded waits)
            # -- 2: SIGKILLs of the receiver C while it pulls and applies -------------------
            t0 = time.monotonic()
            m.pull_from_a("c", f"https://127.0.0.1:{slow_proxy.port}")
            kills, mid_pull, with_applies, progress = 0, 0, 0, [0]
            while mid_pull < KILLS:
                assert kills < 2 * KILLS, (
                    f"only {mid_pull} of {kills} kills landed while C was pulling")
                m.start("c")
                time.sleep(m.rng.uniform(0.2, 1.4))
                before = slow_proxy.snapshot()["bytes_down"]
                time.sleep(0.2)
                pulling = slow_proxy.snapshot()["bytes_down"] > before
                p = m.running.pop("c")
                assert p.proc.poll() is None, "C exited by itself"
                p.kill(signal.SIGKILL)
                kills += 1
                mid_pull += pulling  # bytes were arriving in the last 0.2 s before the kill
                progress.append(len(m.live_sops("c")))
                with_applies += progress[-1] > progress[-2]
            # The kills landed while there was still data to move: C is not done yet.
            assert progress[-1] < len(m.sops), progress
            slow_proxy.config.shared_rate_down = None
            m.start("c")
            m.wait_converged("c", 120, "C to finish after its restarts",
                             describe=slow_proxy.snapshot)
            m.check("kills", ["a", "c"])
            m.phase("kills", time.monotonic() - t0, kills=kills, kills_mid_pull=mid_pull,
                    runs_with_applies=with_applies,
                    instances_at_kills="/".join(map(str, progress[1:])),
                    instances=len(m.live_sops("c")))
            m.stop("c")
            side_phases = side.result(timeout=300)
            for name, seconds, counts in side_phases:
                m.phase(name, seconds, **counts)
            m.check("all", ["a", "b", "c", "d"])

        for name in list(m.running):  # stopped and waited for: their CPU time is counted
            m.stop(name)
        own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
        cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
        m.report(f"all phases (3 and 4 beside 2): {len(m.sops)} instances, "
                 f"{m.total_bytes / MB:.0f} MB, "
                 f"0 lost, 0 damaged, one Merkle root on 4 nodes, "
                 f"{time.monotonic() - t_all:.0f} s wall, {cpu:.0f} s CPU (the test, its nodes "
                 f"and CLI calls)")


def disk_full_then_bit_flips(m: Matrix, dfs: Path, a_port: int
                             ) -> list[tuple[str, float, dict[str, object]]]:
    """Phases 3 and 4, run in a thread while phase 2 kills C: D pulls from A until its tmpfs
    is full, resumes when it grows; then bits are flipped in B's (stopped) blobs, found by
    verify and repaired from A. Returns each phase's (name, seconds, counts)."""
    rng = random.Random(SEED + 1)
    phases: list[tuple[str, float, dict[str, object]]] = []
    # -- 3: disk full, then freed, on D (never restarted) ---------------------------
    t0 = time.monotonic()
    m.pull_from_a("d", f"https://127.0.0.1:{a_port}")
    m.start("d")
    d_proc = m.running["d"]
    full_at = wait_disk_full(dfs, d_proc, 60)
    held = len(list((m.dirs["d"] / "blobs").rglob("*")))
    # The pause is visible in D's log; D holds part of the data set.
    log_text = d_proc.log_path.read_text(errors="replace")
    assert re.search(r"StoreFull|No space left|disk is full", log_text), log_text
    paused = cli_json("status", data=m.dirs["d"])
    assert paused["instances"] < len(m.sops), paused
    (d_view_of_a,) = paused["peers"]
    remount(dfs, TMPFS_LARGE)
    resumed = m.wait_converged("d", 90, "D to resume after space came back (without a restart)")
    assert d_proc.proc.poll() is None and m.running["d"] is d_proc
    m.check("disk-full", ["a", "d"])
    phases.append(("disk-full", time.monotonic() - t0, dict(
        full_after_s=round(full_at, 1), files_in_store_when_full=held,
        instances_when_full=paused["instances"],
        status_when_full=f"{d_view_of_a.get('state')}/"
                         f"{d_view_of_a.get('last_error') or '-'}"[:80],
        resumed_after_s=round(resumed, 1), instances=len(m.live_sops("d")))))

    # -- 4: bit flips in B's blobs, found by verify, repaired from A ---------------
    t0 = time.monotonic()
    b = LocalNode(m.dirs["b"])
    try:
        hashes = sorted(b.store.iter_hashes())
        flipped = {h: flip_bit(b.store.path(h), rng) for h in rng.sample(hashes, FLIPS)}
    finally:
        b.close()
    res = cli("verify", "--json", data=m.dirs["b"], check=False)
    found = json.loads(res.stdout)
    assert res.returncode == 1 and not found["ok"], found
    assert {d["blob"] for d in found["damaged"]} == set(flipped), found["damaged"]
    res = cli("verify", "--repair", "--json", data=m.dirs["b"], check=False, timeout=120)
    repaired = json.loads(res.stdout)
    assert res.returncode == 0 and repaired["ok"], repaired
    fixed = {h for h, how in repaired["repair"].items() if how.startswith("repaired")}
    assert fixed == set(flipped), repaired["repair"]
    m.start("b")
    m.check("bit-flips", ["a", "b", "d"])
    phases.append(("bit-flips", time.monotonic() - t0, dict(
        flipped=len(flipped), found=len(found["damaged"]), repaired=len(fixed))))
    return phases


def wait_disk_full(mount: Path, proc: NodeProcess, timeout: float) -> float:
    """Seconds until the tmpfs is as full as the node lets it get and stays so for 2 s, the
    node still up. The node keeps ``FREE_RESERVE`` free and refuses a blob that would cut
    into it, so it stops somewhere below the reserve plus one blob (a few MB)."""
    start = time.monotonic()
    full_since: float | None = None
    while True:
        assert proc.proc.poll() is None, (
            f"D exited on a full disk: {proc.log_path.read_text(errors='replace')[-2000:]}")
        st = os.statvfs(mount)
        free = st.f_bavail * st.f_frsize
        now = time.monotonic()
        if free < FREE_RESERVE + 4 * MB:
            full_since = full_since or now
            if now - full_since >= 2:
                return full_since - start
        else:
            full_since = None
        if now - start > timeout:
            raise AssertionError(f"D's tmpfs did not fill within {timeout}s ({free} bytes free)")
        time.sleep(0.1)


def remount(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True,
                   capture_output=True, timeout=30)
