"""What an operator reads about peers: the status, the dashboard's data and /metrics agree.

Two in-process nodes over real mutual TLS on 127.0.0.1: A holds a study, B pulls it. The
regressions checked: ``peer_lacks`` returns to 0 once the peer caught up (equal roots);
``bytes_sent`` in the status counts what the peer server served, and equals the
``syncnode_peer_bytes_sent`` counter of ``/metrics``; the throughput samples and the
per-study arrival times the dashboard draws are in the status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from syncsupport import (
    add_peer,
    converged,
    describe_nodes,
    make_dicom,
    peer_state,
    pin,
    settled_state,
    uid,
    url_of,
    wait_for,
)

from syncnode.apikeys import KeyStore
from syncnode.cli import status_lines
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.service import NodeService

StartNode = Callable[..., Awaitable[RunningNode]]


def metric(text: str, name: str, peer: str) -> float:
    m = re.search(rf'^{name}{{peer="{re.escape(peer)}"}} (\S+)$', text, re.M)
    assert m, f"{name} for {peer} not in /metrics"
    return float(m[1])


async def test_peer_lacks_resets_and_bytes_sent_matches_metrics(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    study = uid(77, 1)
    files = [make_dicom(tmp_path / f"f{i}.dcm", sop=uid(77, 1, 1, i), study=study,
                        series=uid(77, 1, 1), pixel_bytes=60_000, seed=i) for i in range(6)]
    NodeService(a).import_paths(files)
    ra, rb = await running(a), await running(b)
    # A syncs with B but never pushes; B trusts A but does not pull yet: A sees what B lacks
    add_peer(a, b, url_of(rb), push="never")
    pin(b, a)
    ra.peers_changed()
    await wait_for(lambda: peer_state(a, b).get("peer_lacks", 0) > 0, 20,
                   "A to count the events B lacks")
    add_peer(b, a, url_of(ra), push="never")
    rb.peers_changed()
    await wait_for(lambda: converged([a, b]), 30, "B to pull A's study",
                   describe=lambda: describe_nodes([a, b]))
    st = await settled_state(a, b)
    assert st["remote_root"] == st["local_root"]
    assert st["peer_lacks"] == 0, st  # it caught up: nothing lacking any more
    size = sum(f.stat().st_size for f in files)
    assert st["bytes_sent"] >= size and st["bytes_served"] >= size  # served by A's server
    assert peer_state(b, a)["bytes_received"] >= size

    await wait_for(lambda: any(peer_state(a, b)["throughput"]["out"]), 10,
                   "a throughput sample of what A sent")
    key = KeyStore(a.data).rotate("read")
    async with aiohttp.ClientSession(headers={"X-API-Key": key}) as http:
        base = f"http://127.0.0.1:{ra.ports['api']}"
        async with http.get(f"{base}/api/v1/status") as r:
            status = await r.json()
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    row = next(p for p in status["peers"] if p["node_id"] == str(b.node_id))
    assert row["peer_lacks"] == 0
    assert metric(text, "syncnode_peer_bytes_sent_total", str(b.node_id)) == row["bytes_sent"]
    assert metric(text, "syncnode_peer_bytes_received_total", str(b.node_id)) \
        == row["bytes_received"]
    # the sparkline's samples: A sent bytes/s to B at some point
    assert any(v > 0 for v in row["throughput"]["out"]), row["throughput"]
    # per-study arrival: here, and confirmed at B once the roots were equal
    arrival = {s["study_instance_uid"]: s for s in status["arrivals"]}
    assert arrival[study]["arrived"] > 0
    assert arrival[study]["at_peers"][str(b.node_id)] >= arrival[study]["arrived"]
    # the terminal shows the same: arrival here and at B, the throughput sparkline
    lines = status_lines(status)
    assert any(line.startswith(f"arrived     {study}  6 instances  here ")
               and f"at peers: {str(b.node_id)[:7]}" in line for line in lines), lines
    assert any(line.startswith("  out ") and "peak" in line for line in lines), lines


async def test_metrics_and_status_show_the_dicom_side(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """SCP associations and instances by status (DCMTK storescu), the export outbox by
    destination and state, import-from polls and errors; an import-from source that does
    not answer is in the status at once, with what the PACS administrator must check."""
    import asyncio
    import socket
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import dicom_testkit as kit

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    a = new_node("a")
    ra = await running(a, export=[f"PACS@127.0.0.1:{dead}"],
                       import_from=[f"PACS@127.0.0.1:{dead}"])
    study = kit.make_study(tmp_path / "s", 2, seed="metrics")
    await asyncio.to_thread(kit.run_tool, [
        kit.dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SYNCNODE", "127.0.0.1",
        str(ra.ports["dicom"]), *map(str, study.files)])
    await asyncio.to_thread(kit.run_tool, [   # the same again: duplicates
        kit.dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SYNCNODE", "127.0.0.1",
        str(ra.ports["dicom"]), str(study.files[0])])
    source = f"PACS@127.0.0.1:{dead}"
    await wait_for(lambda: NodeService(a, ra).status()["dicom"]["import_from"][source]
                   ["errors"] > 0, 20, "the first import-from poll to fail")
    st = NodeService(a, ra).status()
    imp = st["dicom"]["import_from"][source]
    assert imp["state"] == "error" and "'SYNCNODE'" in imp["last_error"]
    assert "modality" in imp["last_error"]
    key = KeyStore(a.data).rotate("read")
    async with aiohttp.ClientSession(headers={"X-API-Key": key}) as http, \
            http.get(f"http://127.0.0.1:{ra.ports['api']}/metrics") as r:
        text = await r.text()
    assert 'syncnode_dicom_associations_total{outcome="accepted"} 2.0' in text
    assert 'syncnode_dicom_instances_received_total{status="stored"} 2.0' in text
    assert 'syncnode_dicom_instances_received_total{status="duplicate"} 1.0' in text
    assert re.search(rf'syncnode_import_errors_total{{source="{source}"}} [1-9]', text)
    assert f'syncnode_import_runs_total{{source="{source}"}}' in text
    assert f'syncnode_import_instances_total{{source="{source}"}} 0.0' in text
    # what was stored here is delivered to the local PACS (down): pending or failing
    assert re.search(rf'syncnode_export_outbox{{destination="{source}",state="pending"}}',
                     text)
    lines = status_lines(st)
    assert any(line.startswith(f"import from {source}  error:") and "\n  ERROR " in line
               and "AE title 'SYNCNODE'" in line for line in lines), lines
    assert any(line.startswith("dicom scp   SYNCNODE port ")
               and "2 associations (0 rejected), 2 stored, 1 duplicates" in line
               for line in lines), lines


async def test_an_untrusted_peer_is_refused_with_its_address_id_and_what_to_do(
        new_node: Callable[[str], LocalNode], running: StartNode,
        caplog: pytest.LogCaptureFixture) -> None:
    """The refusing node says who knocked (address at the handshake, node id when the peer
    introduces itself) and what to type; "trusts no peer yet" only while that is true,
    checked when the refusal happens (not when the TLS context was built)."""
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    ra, rb = await running(a), await running(b)
    add_peer(b, a, url_of(ra))  # B trusts A; A does not know B
    caplog.set_level(logging.INFO)
    rb.peers_changed()

    def logged(*fragments: str) -> bool:
        return any(all(f in r.getMessage() for f in fragments) for r in caplog.records)
    await wait_for(lambda: logged("refused a peer connection from 127.0.0.1:",
                                  "this node trusts no peer yet", "syncnode peer add"),
                   20, "A to log the refused handshake")
    await wait_for(lambda: logged(f"refused node {b.node_id} from 127.0.0.1:",
                                  f"syncnode peer add {b.node_id}"), 20,
                   "A to name B when it introduces itself")
    # A now trusts C by id only (nothing pinned): not "trusts no peer" any more
    a.catalog.add_peer(c.node_id.compact, "https://127.0.0.1:9", "auto")
    ra.peers_changed()
    await wait_for(lambda: len(ra.engine.peers) == 1, 10, "A's loop with C")
    rb.engine.peers[a.node_id.compact].backoff.reset()
    rb.engine.notified(a.node_id.compact)
    await wait_for(lambda: logged("refused a peer connection from 127.0.0.1:",
                                  "not one of the 1 trusted peers'"), 30,
                   "A to log the refusal against its trust list")
