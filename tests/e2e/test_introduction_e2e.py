"""Sites that know each other by node id alone, end to end: `syncnode run` processes, the CLI.

Chain A - B - C, no certificate file copied between sites (no ``peer add --cert``):

- B trusts A by node id only, and A's URL at B is a closed port (A is behind NAT: B can never
  dial it); A trusts B by id with B's URL. B and C trust each other by id with URLs.
- A fourth node D trusts B and dials it, but B has never heard of D.

A, B and C must converge to one Merkle root holding everything the three had; B pins A's
certificate when A introduces itself; D is refused (no event in either direction, no peer
data in its state) and B's log names D's node id and address. Every process runs in its own
process group and is killed at the end of the test.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from syncsupport import (
    NodeProcess,
    add_instances,
    cli,
    cli_json,
    node_processes,
    peer_state,
    root,
    uid,
)

from syncnode.local import LocalNode
from syncnode.nodeid import NodeId

pytestmark = pytest.mark.e2e


@pytest.fixture
def procs() -> Iterator[list[NodeProcess]]:
    with node_processes() as started:
        yield started


def start(procs: list[NodeProcess], *datas: Path) -> list[int]:
    """Start a node per data folder, all at once (their start-ups overlap), then wait for
    each to be ready; their peer ports."""
    started = [NodeProcess(d, d.parent / f"{d.name}.log", interval=0.5) for d in datas]
    procs.extend(started)
    return [p.wait_ready() for p in started]


def poll(check: object, timeout: float, what: str, describe: object = None) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            detail = f": {describe()}" if callable(describe) else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(0.2)


def peer_add(data: Path, node_id: str, url: str) -> subprocess.CompletedProcess[str]:
    res = cli("peer", "add", node_id, url, data=data)
    assert "--cert" not in " ".join(map(str, res.args))
    return res


@pytest.mark.timeout(150)
def test_chain_converges_by_node_ids_alone_and_a_stranger_learns_nothing(
        tmp_path: Path, procs: list[NodeProcess], closed_port: int) -> None:
    dirs = {n: tmp_path / n for n in "abcd"}
    with ThreadPoolExecutor(4) as pool:  # four `syncnode init` side by side
        ids = dict(zip(dirs, pool.map(lambda d: cli_json("init", data=d)["node_id"],
                                      dirs.values()), strict=True))
    nodes = {n: LocalNode(d) for n, d in dirs.items()}
    for i, n in enumerate("abcd"):
        add_instances(nodes[n], [uid(9, i, k) for k in range(3)], study=uid(9, i))
    d_root = root(nodes["d"])
    d_events = nodes["d"].catalog.event_count()

    # B trusts A by id alone; A's address is a closed port, so B can never fetch A's cert.
    res = peer_add(dirs["b"], ids["a"], f"https://127.0.0.1:{closed_port}")
    assert "pinned on first contact" in " ".join(res.stderr.split()), res.stderr
    b_port, c_port = start(procs, dirs["b"], dirs["c"])
    peer_add(dirs["b"], ids["c"], f"https://127.0.0.1:{c_port}")  # fetches C's certificate
    # then, side by side (B already trusts all but D, which it must never learn of):
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: peer_add(dirs[n], ids["b"], f"https://127.0.0.1:{b_port}"),
                      "cad"))
    start(procs, dirs["a"], dirs["d"])

    abc = [nodes[n] for n in "abc"]

    def describe() -> object:
        return {n: {"root": root(nodes[n])[:12], "events": nodes[n].catalog.event_count(),
                    "peers": {k[:7]: (v.get("state"), v.get("last_error", "")[:120])
                              for k, v in nodes[n].catalog.peer_states().items()}}
                for n in "abcd"}

    poll(lambda: len({root(n) for n in abc}) == 1 and nodes["b"].catalog.event_count() == 9,
         90, "A, B and C to converge", describe)
    assert all(n.catalog.event_count() == 9 for n in abc)
    a_id = NodeId.parse(ids["a"])
    assert nodes["b"].trust.certificate(a_id) == nodes["a"].identity.cert_der
    b_log = (tmp_path / "b.log").read_text(errors="replace")
    assert "introduced from 127.0.0.1" in b_log, b_log[-3000:]

    # D: refused. It holds only its own events and learned nothing of B's catalog; nothing
    # of D reached A, B or C; B named D's id and address in its log.
    d_id = NodeId.parse(ids["d"])
    poll(lambda: f"refused node {d_id} from 127.0.0.1" in
         (tmp_path / "b.log").read_text(errors="replace"), 30, "B to log D's refusal")
    assert root(nodes["d"]) == d_root and nodes["d"].catalog.event_count() == d_events
    poll(lambda: "does not trust this node" in peer_state(nodes["d"], nodes["b"]).get(
        "last_error", ""), 30, "D to record B's refusal", describe)
    d_view = peer_state(nodes["d"], nodes["b"])
    assert d_view["remote_root"] == "" and d_view["last_success"] == 0, d_view
    assert "does not trust this node" in d_view["last_error"], d_view
    assert nodes["b"].trust.certificate(d_id) is None
    assert all(n.catalog.event_count() == 9 for n in abc)

    for n in "abcd":
        log = (tmp_path / f"{n}.log").read_text(errors="replace")
        assert "trust list" not in log and "every peer is refused" not in log, log[-2000:]

    # B's audit trail: A's pin by introduction (one entry), D's refusals, an intact chain.
    def trail(action: str) -> list[dict[str, object]]:
        return list(cli_json("audit", "--action", action, data=dirs["b"]))

    pins = [e for e in trail("trust-add") if e["actor"] == "node"]
    assert len(pins) == 1, pins
    assert pins[0]["subject"] == a_id.compact and str(pins[0]["remote"]).startswith(
        "127.0.0.1:") and "introduction" in str(pins[0]["reason"]), pins
    refused = trail("connection-refused")
    assert any(e["actor"] == f"peer:{d_id.compact}" and e["outcome"] == "failure"
               and "not trusted" in str(e["reason"]) for e in refused), refused
    assert any(e["actor"] == "peer:?" and "TLS handshake" in str(e["reason"])
               for e in refused), refused
    friends = {f"peer:{NodeId.parse(ids[n]).compact}" for n in "ac"}
    assert not any(e["actor"] in friends for e in refused), refused  # nobody trusted refused
    assert cli("audit", "verify", data=dirs["b"]).returncode == 0
