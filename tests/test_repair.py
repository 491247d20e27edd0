"""`syncnode verify --repair`: a damaged blob is quarantined and fetched again from a peer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from syncsupport import resident_bytes, why_no_page_cache

from syncnode.demo import make_study
from syncnode.importer import import_paths
from syncnode.local import LocalNode
from syncnode.node import RunningNode


async def cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncnode.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_verify_repair_from_peer(tmp_path: Path) -> None:
    a = LocalNode.init(tmp_path / "a")
    b = LocalNode.init(tmp_path / "b")
    make_study(tmp_path / "study", images=3, size=900)  # 1.6 MB each: two chunks
    import_paths(a, [tmp_path / "study"])
    import_paths(b, [tmp_path / "study"])  # same bytes at both
    a.trust.pin(b.identity.cert_pem, b.node_id)
    b.trust.pin(a.identity.cert_pem, a.node_id)
    running = RunningNode(a, a.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                        dicom_port=0, discovery=False))
    await running.start()
    try:
        b.catalog.add_peer(a.node_id.compact, f"https://127.0.0.1:{running.ports['peer']}")
        victim = b.catalog.instances()[1].blob
        path = b.store.path(victim)
        original = path.read_bytes()
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:  # one flipped bit in the second chunk
            f.seek(1_200_000)
            byte = f.read(1)
            f.seek(1_200_000)
            f.write(bytes([byte[0] ^ 0x10]))
        code, out = await cli("verify", "--data", str(b.data), "--json")
        assert code == 1 and json.loads(out)["damaged"][0]["blob"] == victim
        code, out = await cli("verify", "--data", str(b.data), "--repair", "--json")
        report = json.loads(out)
        assert code == 0, out
        assert report["repair"][victim] == f"repaired from {a.node_id.short}"
        if not why_no_page_cache(tmp_path):  # a peer's bytes: on disk, out of the cache
            assert resident_bytes(path) == 0
        assert path.read_bytes() == original
        assert (b.data / "damaged" / victim).exists()  # kept aside for inspection
        code, out = await cli("verify", "--data", str(b.data))
        assert code == 0 and "OK" in out
    finally:
        await running.stop()


async def test_repair_without_peers_says_so(tmp_path: Path) -> None:
    b = LocalNode.init(tmp_path / "b")
    make_study(tmp_path / "study", images=1, size=64)
    import_paths(b, [tmp_path / "study"])
    victim = b.catalog.instances()[0].blob
    b.store.path(victim).unlink()
    code, out = await cli("verify", "--data", str(b.data), "--repair", "--json")
    report = json.loads(out)
    assert code == 1 and report["missing"] == [victim]
    assert report["repair"][victim] == "not repaired: no trusted peers"
