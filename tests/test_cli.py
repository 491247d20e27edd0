"""The ``syncnode`` console script, run as a real subprocess on a data folder in tmp_path.

The import test feeds it every file of pydicom's bundled test folder and checks the outcome
file by file against :func:`syncnode.dicomfile.inspect_file`, so it follows the inspection
rules as they evolve.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import pydicom
import pytest

from syncnode.blobstore import BlobStore
from syncnode.dicomfile import InstanceInfo, InvalidDicom, inspect_file
from syncnode.importer import iter_files

SYNCNODE = shutil.which("syncnode")
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CORE_COMMANDS = ["init", "id", "import", "ls", "rm", "status", "verify", "gc"]

pytestmark = pytest.mark.skipif(SYNCNODE is None, reason="the syncnode script is not installed")


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SYNCNODE_")}
    e["NO_COLOR"] = "1"
    return e


def run(*args: str | Path, check: int | None = 0, timeout: float = 120,
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([SYNCNODE, *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout, check=False)
    if check is not None:
        assert proc.returncode == check, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def run_json(*args: str | Path, check: int | None = 0) -> object:
    return json.loads(run(*args, "--json", check=check).stdout)


def one_line(text: str) -> str:
    return " ".join(text.split())


def b3(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the import of every test file, done once ----------------------------------------------


@dataclass
class Expected:
    """What the import must have done, derived from inspect_file on every source file."""

    order: list[Path] = field(default_factory=list)  # every file, in import order
    accepted: dict[Path, InstanceInfo] = field(default_factory=dict)
    rejected: dict[Path, str] = field(default_factory=dict)
    hashes: dict[Path, str] = field(default_factory=dict)
    live: dict[str, Path] = field(default_factory=dict)  # SOP UID -> file of the live version
    new_events: int = 0  # files that made a new put event
    unchanged: int = 0  # files whose instance already had a version with these bytes

    def files_of(self, sop: str) -> list[Path]:
        return [p for p, i in self.accepted.items() if i.sop_instance_uid == sop]

    def blobs(self) -> set[str]:
        return {self.hashes[p] for p in self.accepted}


def make_extras(folder: Path) -> None:
    """Files whose names a shell or a terminal might mangle, and a duplicate."""
    folder.mkdir()
    src = (TEST_FILES / "CT_small.dcm").read_bytes()
    (folder / "cut [bold]x.dcm").write_bytes(src[:1000])  # rich markup in a name
    (folder / "empty é.dcm").write_bytes(b"")
    (folder / "copy of CT_small.dcm").write_bytes(src)  # same bytes, same instance


def expectations(paths: list[Path]) -> Expected:
    exp = Expected()
    versions: set[tuple[str, str]] = set()  # (SOP UID, blob) already imported
    for p in iter_files(paths):  # the order the importer walks folders in
        exp.order.append(p)
        try:
            info = inspect_file(p)
        except InvalidDicom as e:
            exp.rejected[p] = e.reason
            continue
        exp.accepted[p] = info
        exp.hashes[p] = b3(p)
        sop = info.sop_instance_uid
        if (sop, exp.hashes[p]) in versions:
            exp.unchanged += 1
        else:
            exp.new_events += 1
            versions.add((sop, exp.hashes[p]))
            exp.live[sop] = p  # a later version gets a later clock: it is live
    return exp


@dataclass
class Imported:
    data: Path
    sources: list[Path]
    exp: Expected
    init_out: str
    first: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    base = tmp_path_factory.mktemp("cli")
    data = base / "node"
    extras = base / "extras"
    make_extras(extras)
    sources = [TEST_FILES, extras]
    init = run("init", "--data", data)
    first = run("import", "--data", data, *sources, check=None)
    return Imported(data, sources, expectations(sources), init.stdout, first)


@pytest.fixture
def node(imported: Imported, tmp_path: Path) -> Path:
    """A private copy of the imported node, for tests that change it."""
    dest = tmp_path / "node"
    shutil.copytree(imported.data, dest)
    return dest


def test_the_test_data_covers_the_interesting_cases(imported: Imported) -> None:
    exp = imported.exp
    assert len(exp.order) > 150
    assert len(exp.accepted) > 50 and len(exp.rejected) > 50
    assert exp.unchanged >= 2  # the duplicate file (and pydicom's own identical pair)
    assert any(len({exp.hashes[p] for p in exp.files_of(sop)}) > 1 for sop in exp.live)


def test_import_reports_every_rejected_file_with_its_reason(imported: Imported) -> None:
    exp, proc = imported.exp, imported.first
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    failed_lines = [ln for ln in lines if ln.startswith("  FAILED ")]
    assert sorted(failed_lines) == sorted(f"  FAILED {p}: {r}" for p, r in exp.rejected.items())
    summary = f"{len(exp.order)} files: {exp.new_events} imported, {exp.unchanged} already " \
              f"present, {len(exp.rejected)} failed"
    assert lines[0].startswith(summary), (lines[0], summary)
    for p in exp.accepted:
        assert str(p) not in proc.stdout
    assert "Traceback" not in proc.stderr


def test_import_stores_every_accepted_file_byte_for_byte(imported: Imported) -> None:
    exp = imported.exp
    store = BlobStore(imported.data)
    stored = set(store.iter_hashes())
    assert stored == exp.blobs()
    for p in exp.accepted:
        blob = store.path(exp.hashes[p])
        assert blob.is_file(), p
        assert sha256(blob) == sha256(p), p
        assert blob.stat().st_size == p.stat().st_size
    leftovers = [f.name for f in (imported.data / "tmp").iterdir()]
    assert leftovers == []


def test_ls_lists_the_live_version_of_every_accepted_instance(imported: Imported) -> None:
    exp = imported.exp
    rows = run_json("ls", "--data", imported.data)
    assert isinstance(rows, list)
    by_sop = {r["sop_instance_uid"]: r for r in rows}
    assert len(by_sop) == len(rows)
    assert set(by_sop) == {i.sop_instance_uid for i in exp.accepted.values()}
    for sop, row in by_sop.items():
        src = exp.live[sop]
        info = exp.accepted[src]
        assert row["blob"] == exp.hashes[src], (sop, src)
        assert row["blob"] in {exp.hashes[p] for p in exp.files_of(sop)}
        assert row["size"] == src.stat().st_size
        for key, value in info.to_dict().items():
            assert row[key] == value, (src, key)
    # the plain listing has one line per live instance
    plain = run("ls", "--data", imported.data).stdout.splitlines()
    assert len(plain) == len(rows)
    assert {ln.split()[2] for ln in plain} == set(by_sop)


def test_ls_study(imported: Imported) -> None:
    exp = imported.exp
    studies: dict[str, set[str]] = defaultdict(set)
    for sop, p in exp.live.items():
        studies[exp.accepted[p].study_instance_uid].add(sop)
    study, sops = max(studies.items(), key=lambda kv: (len(kv[1]), kv[0]))
    assert len(sops) > 1
    rows = run_json("ls", "--data", imported.data, "--study", study)
    assert {r["sop_instance_uid"] for r in rows} == sops
    assert all(r["study_instance_uid"] == study for r in rows)
    assert run_json("ls", "--data", imported.data, "--study", "1.2.3.4.5.6.7.8.9") == []


def test_status_json(imported: Imported) -> None:
    exp = imported.exp
    st = run_json("status", "--data", imported.data)
    assert isinstance(st, dict)
    node_id = run("id", "--data", imported.data).stdout.strip()
    live_files = list(exp.live.values())
    assert st["node_id"] == node_id
    assert re.fullmatch(r"[0-9a-f]{64}", st["merkle_root"]) and st["merkle_root"] != "0" * 64
    assert st["events"] == st["put_events"] == exp.new_events
    assert st["delete_events"] == 0
    assert st["instances"] == len(exp.live)
    assert st["studies"] == len({exp.accepted[p].study_instance_uid for p in live_files})
    assert st["series"] == len({exp.accepted[p].series_instance_uid for p in live_files})
    assert st["instance_bytes"] == sum(p.stat().st_size for p in live_files)
    assert st["blobs"] == len(exp.blobs())
    assert st["blob_bytes"] == sum({exp.hashes[p]: p.stat().st_size
                                    for p in exp.accepted}.values())
    plain = run("status", "--data", imported.data).stdout
    assert st["merkle_root"] in plain and f"{st['instances']} in {st['studies']} studies" in plain


def test_reimport_adds_nothing(node: Path, imported: Imported) -> None:
    before = run_json("status", "--data", node)
    proc = run("import", "--data", node, *imported.sources, "--json", check=1)
    report = json.loads(proc.stdout)
    exp = imported.exp
    assert report["imported"] == 0
    assert report["unchanged"] == len(exp.accepted)
    assert {f["path"] for f in report["failed"]} == {str(p) for p in exp.rejected}
    after = run_json("status", "--data", node)
    assert after == before
    assert list((node / "tmp").iterdir()) == []


def test_init_prints_the_id_that_id_repeats(imported: Imported, tmp_path: Path) -> None:
    m = re.search(r"Node id: (\S+)", imported.init_out)
    assert m, imported.init_out
    assert run("id", "--data", imported.data).stdout.strip() == m.group(1)
    assert run_json("id", "--data", imported.data) == {"node_id": m.group(1)}
    other = run_json("init", "--data", tmp_path / "other")
    assert other["node_id"] != m.group(1)
    assert run("id", "--data", tmp_path / "other").stdout.strip() == other["node_id"]
    # init refuses to replace an identity
    again = run("init", "--data", tmp_path / "other", check=2)
    assert "already" in one_line(again.stderr)
    assert run("id", "--data", tmp_path / "other").stdout.strip() == other["node_id"]


def test_data_folder_from_the_environment(imported: Imported) -> None:
    proc = subprocess.run([SYNCNODE, "id"], capture_output=True, text=True, timeout=60,
                          env={**env(), "SYNCNODE_DATA": str(imported.data)}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == run("id", "--data", imported.data).stdout.strip()


# -- help ----------------------------------------------------------------------------------


def listed_commands(help_text: str) -> list[str]:
    section = help_text.split("Commands:", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  ([a-z][a-z-]*)\s", section, re.MULTILINE)]


def check_help(cmd: list[str]) -> list[list[str]]:
    """Check one command's --help (in this process: the script itself is run by the
    test for the top level); return its subcommands."""
    from typer.testing import CliRunner

    from syncnode.cli import app

    result = CliRunner().invoke(app, [*cmd, "--help"], prog_name="syncnode",
                                env={"NO_COLOR": "1"})
    assert result.exit_code == 0, (cmd, result.output)
    text = result.stdout  # a note about the data folder may go to stderr
    assert text.startswith(f"Usage: syncnode {' '.join(cmd)}"), (cmd, text)
    # a sentence explaining the command, beyond the usage line and the option list
    body = text.split("\n\n", 2)[1] if "\n\n" in text else ""
    assert len(body.split()) >= 4, (cmd, text)
    if "Commands:" in text:
        return [[*cmd, sub] for sub in listed_commands(text)]
    if cmd[0] in CORE_COMMANDS:
        assert "--data" in text, cmd
    return []


def test_help_of_every_command() -> None:
    top = run("--help")
    commands = listed_commands(top.stdout)
    assert set(CORE_COMMANDS) <= set(commands), commands
    todo = [[c] for c in commands]
    seen = 0
    while todo:
        results = [check_help(cmd) for cmd in todo]
        seen += len(todo)
        todo = [sub for subs in results for sub in subs]
    assert seen >= len(CORE_COMMANDS)


# -- rm ------------------------------------------------------------------------------------


def single_version_sop(exp: Expected) -> tuple[str, Path]:
    """An instance imported from exactly one file whose bytes no other file has."""
    counts = defaultdict(int)
    for p in exp.accepted:
        counts[exp.hashes[p]] += 1
    for sop, p in sorted(exp.live.items()):
        if exp.files_of(sop) == [p] and counts[exp.hashes[p]] == 1:
            return sop, p
    raise AssertionError("no single-version instance in the test files")


def live_sops(data: Path) -> set[str]:
    return {r["sop_instance_uid"] for r in run_json("ls", "--data", data)}


def test_rm_instance_and_reimport(node: Path, imported: Imported) -> None:
    exp = imported.exp
    sop, src = single_version_sop(exp)
    blob = BlobStore(node).path(exp.hashes[src])
    before = run_json("status", "--data", node)
    out = run_json("rm", "--data", node, sop)
    assert len(out["tombstones"]) == 1 and out["freed_blobs"] == [exp.hashes[src]]
    assert not blob.exists()
    assert sop not in live_sops(node)
    after = run_json("status", "--data", node)
    assert after["delete_events"] == 1 and after["events"] == before["events"] + 1
    assert after["instances"] == before["instances"] - 1
    assert after["merkle_root"] != before["merkle_root"]
    run("verify", "--data", node)
    # deleting it again finds nothing
    again = run("rm", "--data", node, sop, check=1)
    assert "nothing matched" in one_line(again.stderr)
    # importing the file again makes it live again
    proc = run("import", "--data", node, src)
    assert "1 imported" in proc.stdout
    assert sop in live_sops(node)
    assert blob.is_file() and sha256(blob) == sha256(src)
    final = run_json("status", "--data", node)
    assert final["instances"] == before["instances"]
    assert final["events"] == before["events"] + 2


def test_rm_study(node: Path, imported: Imported) -> None:
    exp = imported.exp
    by_study: dict[str, set[str]] = defaultdict(set)
    for info in exp.accepted.values():
        by_study[info.study_instance_uid].add(info.sop_instance_uid)
    # a study whose instances have several versions, none of them in another study
    clean = {s: sops for s, sops in by_study.items()
             if not any(exp.accepted[p].study_instance_uid != s
                        for sop in sops for p in exp.files_of(sop))}
    study = max(clean, key=lambda s: (sum(len(exp.files_of(x)) for x in clean[s]), s))
    sops = clean[study]
    files = [p for sop in sops for p in exp.files_of(sop)]
    assert len(sops) >= 1 and len(files) >= 2
    kept_elsewhere = {exp.hashes[p] for p, i in exp.accepted.items()
                      if i.sop_instance_uid not in sops}
    freed = {exp.hashes[p] for p in files} - kept_elsewhere
    before = run_json("status", "--data", node)
    out = run_json("rm", "--data", node, "--study", study)
    assert len(out["tombstones"]) == len(sops)
    assert set(out["freed_blobs"]) == freed
    store = BlobStore(node)
    assert not any(store.has(h) for h in freed)
    assert all(store.has(h) for h in kept_elsewhere)
    assert run_json("ls", "--data", node, "--study", study) == []
    assert live_sops(node) == set(exp.live) - sops
    after = run_json("status", "--data", node)
    assert after["instances"] == before["instances"] - len(sops)
    assert after["delete_events"] == len(sops)
    run("verify", "--data", node)
    # a re-import brings the study back, every version of it
    run("import", "--data", node, *files)
    assert live_sops(node) == set(exp.live)
    assert all(store.has(h) for h in freed)


# -- verify --------------------------------------------------------------------------------


def test_verify_clean(imported: Imported) -> None:
    proc = run("verify", "--data", imported.data)
    assert "OK" in proc.stdout
    report = run_json("verify", "--data", imported.data)
    assert report["ok"] is True and report["damaged"] == [] and report["missing"] == []
    assert report["blobs_checked"] == len(imported.exp.blobs())
    assert report["bytes_checked"] == sum({imported.exp.hashes[p]: p.stat().st_size
                                           for p in imported.exp.accepted}.values())


def test_verify_finds_a_flipped_byte(node: Path, imported: Imported) -> None:
    exp = imported.exp
    _, src = single_version_sop(exp)
    victim = exp.hashes[src]
    path = BlobStore(node).path(victim)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    proc = run("verify", "--data", node, check=1)
    assert f"DAMAGED {victim}" in proc.stdout
    assert "PROBLEMS FOUND" in proc.stdout
    report = run_json("verify", "--data", node, check=1)
    assert report["ok"] is False
    assert [d["blob"] for d in report["damaged"]] == [victim]
    assert report["missing"] == []


def test_verify_finds_a_deleted_blob(node: Path, imported: Imported) -> None:
    exp = imported.exp
    _, src = single_version_sop(exp)
    victim = exp.hashes[src]
    BlobStore(node).path(victim).unlink()
    proc = run("verify", "--data", node, check=1)
    assert f"MISSING {victim}" in proc.stdout
    report = run_json("verify", "--data", node, check=1)
    assert report["missing"] == [victim] and report["damaged"] == []


def test_gc_removes_strays_and_keeps_referenced_blobs(node: Path, imported: Imported) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = node / "tmp" / f"blob-{dead.pid}-0123456789abcdef.tmp"
    stale.write_bytes(b"left by a crash")
    stray = BlobStore(node).put_bytes(b"bytes no event refers to").hash
    proc = run("gc", "--data", node)
    assert "1 blobs removed" in proc.stdout
    assert not stale.exists()
    assert not BlobStore(node).has(stray)
    assert set(BlobStore(node).iter_hashes()) == imported.exp.blobs()
    run("verify", "--data", node)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["id"], ["ls"], ["status"], ["verify"], ["gc"], ["rm", "1.2.3"],
    ["import", str(TEST_FILES / "CT_small.dcm")],
])
def test_uninitialised_data_folder(tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "no node here"
    proc = run(*args, "--data", missing, check=2)
    message = one_line(proc.stderr)
    assert "syncnode init" in message, message
    assert str(missing) in message
    assert "Traceback" not in proc.stderr
    assert not missing.exists()


INVALID_UID_ARGS = [
    ["rm", "../../etc/passwd"],
    ["rm", "1.2.03"],
    ["rm", "1.2.3", "1.2.x"],
    ["rm", "--study", "1..2"],
    ["rm", "--study", "'; DROP TABLE events; --"],
    ["ls", "--study", "abc"],
    ["ls", "--series", "1.2." + "3" * 70],
]


def test_invalid_uid_arguments(node: Path) -> None:
    before = run_json("status", "--data", node)

    def attempt(args: list[str]) -> None:
        proc = run(*args, "--data", node, check=2)
        message = one_line(proc.stderr)
        assert "invalid" in message and "UID" in message.upper(), (args, message)
        assert "Traceback" not in proc.stderr

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(attempt, INVALID_UID_ARGS))
    assert run_json("status", "--data", node) == before  # nothing was written


def test_rm_without_arguments(node: Path) -> None:
    proc = run("rm", "--data", node, check=2)
    assert "study" in one_line(proc.stderr).lower()


def test_import_of_a_missing_path(node: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing [here]"
    proc = run("import", "--data", node, missing, check=2)
    assert str(missing) in one_line(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_a_key_that_does_not_match_the_certificate_is_reported_where_the_key_is_needed(
        tmp_path: Path) -> None:
    """The node id comes from node.crt alone (no X.509 parsing at start-up); commands that
    use the key or the trust list still load and check the identity first and refuse a
    mismatched pair with the reason. Import signs its events with the key: it is refused
    too, before it stores anything."""
    a, b = tmp_path / "a", tmp_path / "b"
    node_id = run_json("init", "--data", a)["node_id"]  # type: ignore[index]
    run("init", "--data", b)
    shutil.copy(b / "node.key", a / "node.key")  # a's certificate, b's key
    for args in (("id",), ("peer", "list"), ("import", TEST_FILES / "CT_small.dcm")):
        proc = run(*args, "--data", a, check=2)
        assert "does not belong" in one_line(proc.stderr), proc.stderr
    assert not list((a / "blobs").rglob("*"))
    from syncnode.local import LocalNode
    from syncnode.nodeid import NodeId
    node = LocalNode(a)
    try:
        assert str(node.node_id) == node_id
        assert NodeId.from_certificate_pem((a / "node.crt").read_bytes()) == node.node_id
    finally:
        node.close()
    assert NodeId.from_certificate_pem(b"no certificate here") is None
    assert NodeId.from_certificate_pem(
        b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n") is None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_no_idle_blas_threads_once_pydicom_loads_numpy() -> None:
    """numpy comes with pydicom; syncnode keeps OpenBLAS from starting its thread pool
    (threads that spin after import in a node that does no linear algebra)."""
    pytest.importorskip("numpy")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = ("import os, syncnode, pydicom, numpy; "
            "print(len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "1"
    # and an operator's own setting is kept
    env["OPENBLAS_NUM_THREADS"] = "2"
    code = "import os, syncnode; print(os.environ['OPENBLAS_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    assert out.stdout.strip() == "2"
