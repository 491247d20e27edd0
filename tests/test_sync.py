"""The sync engine between in-process nodes over real mutual TLS on 127.0.0.1.

Each node is a :class:`syncnode.node.RunningNode` started in the test's event loop (peer port
0); links that must misbehave go through ``tools/faultproxy.py`` (cuts, bit flips). What is
checked is what an operator relies on: equal Merkle roots, equal live views, equal blob sets,
every stored blob re-hashing to its name, and errors visible in the peer state.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from syncsupport import (
    add_instances,
    add_peer,
    assert_blobs_intact,
    blob_set,
    cli,
    cli_json,
    converged,
    describe_nodes,
    import_files,
    live_view,
    load_faultproxy,
    make_dicom,
    peer_state,
    pin,
    pull_from,
    root,
    settled_state,
    uid,
    url_of,
    wait_for,
    walk_batches,
)

from syncnode import protocol, sync
from syncnode.blobstore import CHUNK_SIZE
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.sync import PeerSync, SyncEngine

MiB = 1 << 20




fp = load_faultproxy()

StartNode = Callable[..., Awaitable[RunningNode]]


def mesh(pairs: list[tuple[LocalNode, RunningNode]]) -> None:
    """Every node trusts and syncs with every other one."""
    for node, r in pairs:
        for other, other_r in pairs:
            if other is not node:
                add_peer(node, other, url_of(other_r))
        r.peers_changed()


# ----------------------------------------------------------------------------------------
# Convergence


@pytest.mark.timeout(90)
async def test_three_nodes_converge_with_deletes_and_two_versions_of_one_uid(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    study, series = uid(1), uid(1, 1)
    files = tmp_path / "files"
    files.mkdir()

    def f(name: str, sop: str, seed: int, size: int = 3000) -> Path:
        return make_dicom(files / f"{name}.dcm", sop=sop, study=study, series=series,
                          pixel_bytes=size, seed=seed)

    sops = {n: uid(1, 1, i) for i, n in enumerate(["a1", "a2", "a3", "a4", "b1", "b2", "c1",
                                                   "c2", "x"])}
    import_files(a, f("a1", sops["a1"], 1), f("a2", sops["a2"], 2, 3 * MiB),
                 f("a3", sops["a3"], 3))
    import_files(b, f("b1", sops["b1"], 4), f("b2", sops["b2"], 5, 2 * MiB))
    import_files(c, f("c1", sops["c1"], 6), f("c2", sops["c2"], 7))
    # Same SOP Instance UID, different bytes, imported on two nodes.
    x_on_a, x_on_b = f("x-a", sops["x"], 100), f("x-b", sops["x"], 200)
    import_files(a, x_on_a)
    import_files(b, x_on_b)
    assert a.catalog.instance(sops["x"]).blob != b.catalog.instance(sops["x"]).blob
    # Deletes made before the nodes ever met.
    assert a.delete_instances([sops["a3"]]).inserted
    assert c.delete_instances([sops["c2"]]).inserted

    # Each site lets the others delete what it made (the default lets only a put's origin).
    def colleagues(n: LocalNode) -> list[str]:
        return [o.node_id.compact for o in (a, b, c) if o is not n]

    ra, rb, rc = [await running(n, may_delete=colleagues(n)) for n in (a, b, c)]
    nodes = [a, b, c]
    mesh([(a, ra), (b, rb), (c, rc)])
    await wait_for(lambda: converged(nodes), 40, "three nodes to converge",
                   describe=lambda: describe_nodes(nodes))

    # Deletes on different nodes of instances that came from elsewhere, and a new import,
    # while everything runs.
    assert b.delete_instances([sops["a1"]]).inserted
    assert c.delete_instances([sops["b1"]]).inserted
    import_files(a, f("a4", sops["a4"], 8))
    ra.local_change()
    rb.local_change()
    rc.local_change()
    await wait_for(lambda: converged(nodes) and len(live_view(a)) == 5, 40,
                   "convergence after deletes on B and C and an import on A",
                   describe=lambda: describe_nodes(nodes))

    views = [await asyncio.to_thread(cli_json, "ls", data=n.data) for n in nodes]
    assert views[0] == views[1] == views[2]
    assert sorted(r["sop_instance_uid"] for r in views[0]) == sorted(
        sops[k] for k in ("a2", "a4", "b2", "c1", "x"))
    assert len({root(n) for n in nodes}) == 1
    # Both versions of x are events everywhere, one is live (the same one everywhere), and
    # both blobs are kept (the older version is not removed, only not live).
    x_puts = {e for n in nodes for e in n.catalog.all_event_ids()
              if (p := n.catalog.put_event(e)) is not None and p.sop_instance_uid == sops["x"]}
    assert len(x_puts) == 2
    for n in nodes:
        assert set(n.catalog.all_event_ids()) >= x_puts
        assert blob_set(n) == n.catalog.referenced_blobs() == blob_set(a)
        assert_blobs_intact(n)
    assert {a.catalog.put_event(e).blob for e in x_puts} <= blob_set(a)
    deleted = {sops[k] for k in ("a1", "a3", "b1", "c2")}
    for n in nodes:
        assert not deleted & {r["sop_instance_uid"] for r in live_view(n)}
        st = await asyncio.to_thread(cli_json, "status", data=n.data)
        assert len(st["peers"]) == 2
        assert all(p["state"] == "in_sync" and not p["last_error"] for p in st["peers"]), st


# ----------------------------------------------------------------------------------------
# Resume after connection cuts


@pytest.mark.timeout(150)
async def test_resume_through_twenty_five_cuts_retransfers_under_a_chunk_per_cut(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"big{i}.dcm", sop=uid(2, i), study=uid(2),
                        series=uid(2, 0), pixel_bytes=70 * MiB, seed=i) for i in range(3)]
    import_files(b, *files)
    total = sum(f.stat().st_size for f in files)
    assert total >= 200 * MiB
    cuts = 25
    ra, rb = await running(a), await running(b)
    # cuts close after flushing (FIN): every byte the proxy forwards reaches the receiver,
    # so the wire count below is what the resume itself costs. With RST the receiver's
    # unread socket buffer is dropped too (megabytes on loopback, more the busier the
    # machine): the fault matrix cuts that way.
    config = fp.FaultConfig(cut_every_bytes=total // (cuts + 1), max_cuts=cuts, seed=7,
                            cut_reset=False)
    async with fp.FaultProxy(("127.0.0.1", rb.ports["peer"]), config=config) as proxy:
        pull_from(a, ra, b, f"https://127.0.0.1:{proxy.port}")  # A pulls from B
        await wait_for(lambda: converged([a, b]), 120, "A to pull 210 MB through the cuts",
                       step=0.2, describe=lambda: (describe_nodes([a, b]),
                                                   proxy.stats.snapshot()))
        stats = proxy.stats.snapshot()
        state = await settled_state(a, b)  # (through the proxy: inside its block)
    # Nothing lost, nothing duplicated.
    assert stats["cuts"] == cuts
    assert len(live_view(a)) == 3 and a.catalog.event_count() == 3
    assert blob_set(a) == blob_set(b) == a.catalog.referenced_blobs()
    assert_blobs_intact(a)
    assert not list(a.store.tmp_dir.glob("*.part"))
    assert state["integrity_errors"] == 0
    assert state["bytes_resumed"] > 0
    # Re-transferred bytes per cut. Application level: bytes handed to the receiver beyond
    # the blobs themselves (the unverified tail of a chunk dropped at each cut) must stay
    # below one chunk per cut. On the wire: everything the proxy forwarded downstream beyond
    # the blobs, less TLS record framing (22 bytes per 16 KiB record), per cut; allowed one
    # chunk plus 64 KiB of handshakes and HTTP requests of a retry round.
    app_per_cut = (state["bytes_received"] - total) / cuts
    wire_per_cut = (stats["bytes_down"] - total * (1 + 22 / 16384)) / cuts
    print(f"\nresume: {total / MiB:.0f} MiB, {cuts} cuts: re-transferred per cut "
          f"{wire_per_cut / MiB:.3f} MiB on the wire (proxy), {app_per_cut / MiB:.3f} MiB "
          f"of blob bytes (receiver)")
    assert 0 <= app_per_cut <= CHUNK_SIZE
    assert wire_per_cut <= CHUNK_SIZE + 64 * 1024


# ----------------------------------------------------------------------------------------
# Corruption


@pytest.mark.timeout(90)
async def test_bit_flips_on_the_link_never_store_a_damaged_blob_and_heal(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"f{i}.dcm", sop=uid(3, i), study=uid(3), series=uid(3, 0),
                        pixel_bytes=3 * MiB, seed=i) for i in range(3)]
    import_files(b, *files)
    ra, rb = await running(a), await running(b)
    # A flip every 256 KiB: no 1 MiB chunk can cross the link intact.
    config = fp.FaultConfig(corrupt_every_bytes_down=256 * 1024, seed=3)
    async with fp.FaultProxy(("127.0.0.1", rb.ports["peer"]), config=config) as proxy:
        pull_from(a, ra, b, f"https://127.0.0.1:{proxy.port}")
        errors: set[str] = set()

        def corruption_reported() -> bool:
            err = peer_state(a, b).get("last_error", "")
            if err:
                errors.add(err)
            return proxy.stats.bytes_corrupted >= 5 and bool(errors)

        await wait_for(corruption_reported, 30, "flipped bits and an error in A's peer state",
                       describe=lambda: (describe_nodes([a]), proxy.stats.snapshot()))
        status = await asyncio.to_thread(cli_json, "status", data=a.data)
        assert status["peers"][0]["last_error"], status
        # TLS refuses the altered records: nothing reaches the store.
        assert any("BAD_RECORD_MAC" in e or "bad record mac" in e.lower() for e in errors), errors
        assert blob_set(a) == set() and a.catalog.event_count() == 0
        for part in a.store.tmp_dir.glob("*.part"):
            assert part.stat().st_size % CHUNK_SIZE == 0  # only verified chunks
        proxy.config.heal()
        await wait_for(lambda: converged([a, b]), 40, "A to converge once the link is clean",
                       describe=lambda: describe_nodes([a, b]))
    assert_blobs_intact(a)
    assert blob_set(a) == a.catalog.referenced_blobs()
    report = await asyncio.to_thread(cli_json, "verify", data=a.data)
    assert report["ok"] and report["blobs_checked"] == 3, report


@pytest.mark.timeout(90)
async def test_damaged_bytes_from_a_peer_are_refused_and_another_peer_supplies_them(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose bytes change above TLS (bad memory, a bug, malice) is caught by the chunk
    hashes; a second peer with the same data over a clean link completes the sync."""
    a, b, c = new_node("a"), new_node("b"), new_node("c")
    files = [make_dicom(tmp_path / f"f{i}.dcm", sop=uid(4, i), study=uid(4), series=uid(4, 0),
                        pixel_bytes=3 * MiB, seed=i) for i in range(2)]
    import_files(b, *files)
    rb, rc = await running(b), await running(c)
    mesh([(b, rb), (c, rc)])
    await wait_for(lambda: converged([b, c]), 30, "C to get B's data over a clean link")

    served = b.store.read_range  # what the peer server hands out (not re-hashed)
    flips = [0]

    def damaged(blob: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        pos = start
        for piece in served(blob, start, end):
            out = piece
            if pos // CHUNK_SIZE == 1:  # the blob's second chunk leaves B altered
                flips[0] += 1
                out = bytes([piece[0] ^ 0x01]) + piece[1:]
            pos += len(piece)
            yield out

    monkeypatch.setattr(b.store, "read_range", damaged)
    ra = await running(a)
    pin(b, a)
    pin(c, a)
    add_peer(a, b, url_of(rb), push="never")
    ra.peers_changed()
    seen: set[str] = set()

    def reported() -> bool:
        st = peer_state(a, b)
        if st.get("last_error"):
            seen.add(st["last_error"])
        return st.get("integrity_errors", 0) >= 2 and any("does not match" in e for e in seen)

    await wait_for(reported, 30, "integrity errors from B in A's peer state",
                   describe=lambda: describe_nodes([a]))
    assert flips[0] >= 2
    assert blob_set(a) == set() and a.catalog.event_count() == 0
    for part in a.store.tmp_dir.glob("*.part"):
        assert part.stat().st_size == CHUNK_SIZE  # the verified first chunk, nothing more

    add_peer(a, c, url_of(rc), push="never")
    ra.peers_changed()
    await wait_for(lambda: converged([a, b, c]), 30, "A to get the blobs from C",
                   describe=lambda: describe_nodes([a, b, c]))
    assert_blobs_intact(a)
    report = await asyncio.to_thread(cli_json, "verify", data=a.data)
    assert report["ok"] and report["blobs_checked"] == 2, report
    from_b, from_c = await settled_state(a, b), await settled_state(a, c)
    assert from_b["integrity_errors"] >= 2
    assert from_c["integrity_errors"] == 0
    assert from_c["bytes_resumed"] > 0  # C's pull resumed from B's verified first chunk
    status = await asyncio.to_thread(cli_json, "status", data=a.data)
    by_id = {p["node_id"]: p for p in status["peers"]}
    assert by_id[str(b.node_id)]["integrity_errors"] >= 2


# ----------------------------------------------------------------------------------------
# Deleted instances whose put and tombstone travel in different batches


async def _put_before_its_tombstone(node: LocalNode, other: LocalNode, side: int,
                                    tag: int) -> list[str]:
    """Add and delete instances on ``node`` until one put comes in an earlier batch than its
    tombstone in the sync walk. ``side`` 0: ``other`` pulls from ``node`` (batches of the
    walk); 1: ``node`` pushes to ``other`` (events one by one, in walk order). Returns the
    SOP UIDs deleted."""
    sops: list[str] = []
    for i in range(32):
        sop = uid(tag, 0, i)
        sops.append(sop)
        (put,) = add_instances(node, [sop], study=uid(tag))
        (tombstone,) = node.delete_instances([sop]).inserted
        if side == 0:
            order = [ids for ids, _ in await walk_batches(other, node.catalog)]
        else:
            order = [[i] for _, ids in await walk_batches(node, other.catalog) for i in ids]
        where = {e: n for n, ids in enumerate(order) for e in ids}
        if where[put] < where[tombstone]:
            return sops
    raise AssertionError("no put came before its tombstone in 32 tries")


@pytest.mark.timeout(60)
async def test_pull_skips_a_deleted_instance_whose_tombstone_comes_later_in_the_walk(
        new_node: Callable[[str], LocalNode], running: StartNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer frees the blob of a deleted instance. A puller that meets the put before the
    tombstone (another Merkle leaf: any catalog of more than INLINE_IDS events) must not
    stop there (the peer answers 404 for that blob, every round, forever)."""
    monkeypatch.setattr(protocol, "INLINE_IDS", 1)  # one batch per Merkle node, as at scale
    a, b = new_node("a"), new_node("b")
    deleted = await _put_before_its_tombstone(b, a, side=0, tag=7)
    add_instances(b, [uid(7, 1, i) for i in range(5)], study=uid(7))
    ra, rb = await running(a), await running(b)
    pull_from(a, ra, b, url_of(rb))
    await wait_for(lambda: converged([a, b]), 20, "A to pull B's catalog with its deletes",
                   describe=lambda: describe_nodes([a, b]))
    assert len(live_view(a)) == 5 and a.catalog.event_count() == 5 + 2 * len(deleted)
    assert blob_set(a) == a.catalog.referenced_blobs()
    assert (await settled_state(a, b))["in_sync"]


@pytest.mark.timeout(60)
async def test_push_of_a_deleted_instance_before_its_tombstone_converges(
        new_node: Callable[[str], LocalNode], running: StartNode,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pushing side of the same case: the peer refuses a put with no blob until it holds
    the tombstone, which a later batch carries (batches of 1 stand for > EVENT_BATCH)."""
    monkeypatch.setattr(sync, "EVENT_BATCH", 1)
    a, b = new_node("a"), new_node("b")
    deleted = await _put_before_its_tombstone(a, b, side=1, tag=8)
    add_instances(a, [uid(8, 1, i) for i in range(3)], study=uid(8))
    ra, rb = await running(a), await running(b)
    add_peer(a, b, url_of(rb), push="always")  # B never dials A
    pin(b, a)
    ra.peers_changed()
    await wait_for(lambda: converged([a, b]), 20, "A to push its catalog with its deletes",
                   describe=lambda: describe_nodes([a, b]))
    assert len(live_view(b)) == 3 and b.catalog.event_count() == 3 + 2 * len(deleted)
    assert (await settled_state(a, b))["events_sent"] == b.catalog.event_count()


@pytest.mark.timeout(60)
async def test_a_failed_group_install_is_reported_and_the_next_round_completes(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """Pulled blobs wait in verified part files for a group install. If that fails (here:
    the disk is full once), no put becomes live, the error is in the peer's state, and the
    next round installs them from the part files without fetching them again."""
    from syncnode.blobstore import StoreFull

    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"g{i}.dcm", sop=uid(9, i), study=uid(9), series=uid(9, 0),
                        pixel_bytes=(3 * MiB if i == 0 else 100_000), seed=i)
             for i in range(4)]
    import_files(b, *files)
    total = sum(f.stat().st_size for f in files)
    real_install = a.store.install_staged
    failures: list[int] = []

    def full_once(staged: list[Any]) -> Any:
        if not failures:
            failures.append(len(staged))
            raise StoreFull("no space left for the blob store")
        return real_install(staged)

    a.store.install_staged = full_once  # type: ignore[method-assign]
    ra, rb = await running(a), await running(b)
    pull_from(a, ra, b, url_of(rb))
    errors: list[str] = []

    def error_seen() -> bool:
        if err := peer_state(a, b).get("last_error", ""):
            errors.append(err)
        return bool(errors)

    await wait_for(error_seen, 20, "the failed install in A's peer state")
    assert "StoreFull" in errors[0] and "no space" in errors[0], errors
    await wait_for(lambda: converged([a, b]), 30, "A to install the blobs in a later round",
                   describe=lambda: describe_nodes([a, b]))
    state = await settled_state(a, b)
    assert failures and failures[0] >= 1
    assert_blobs_intact(a)
    assert not list(a.store.tmp_dir.glob("*.part"))
    # the multi-chunk blob resumed from its complete part file; nothing was lost or doubled
    assert state["bytes_resumed"] >= 3 * MiB
    assert total <= state["bytes_received"] <= 2 * total


@pytest.mark.timeout(60)
async def test_status_shows_what_each_study_still_needs_while_pulling(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """Per peer, the studies being pulled with the instances and bytes each still needs
    (counting down as blobs are installed), in the peer state and in `syncnode status`."""
    a, b = new_node("a"), new_node("b")
    studies = {uid(10, 1): 6, uid(10, 2): 3}
    files = [make_dicom(tmp_path / f"s{k}-{i}.dcm", sop=uid(10, k, 0, i), study=study,
                        series=uid(10, k, 0), pixel_bytes=100_000, seed=10 * k + i)
             for k, (study, n) in enumerate(studies.items(), 1) for i in range(n)]
    import_files(b, *files)
    size_of = {s: sum(f.stat().st_size for f in files if f.name.startswith(f"s{k}-"))
               for k, s in enumerate(studies, 1)}
    # one blob after another (max_pulls is only where the adaptive window starts)
    ra, rb = await running(a, max_pulls=1, max_window=1), await running(b)
    seen: list[dict[str, list[int]]] = []
    texts: list[str] = []
    config = fp.FaultConfig(shared_rate_down=150_000)  # ~6 s for the 0.9 MB
    async with fp.FaultProxy(("127.0.0.1", rb.ports["peer"]), config=config) as proxy:
        pull_from(a, ra, b, f"https://127.0.0.1:{proxy.port}")

        async def watch() -> bool:
            needed = peer_state(a, b).get("studies_needed") or {}
            if needed:
                seen.append({k: list(v) for k, v in needed.items()})
                if len(texts) < 2:
                    texts.append((await asyncio.to_thread(cli, "status", data=a.data)).stdout)
            return converged([a, b])

        await wait_for(watch, 40, "A to pull both studies through the slow link", step=0.2,
                       describe=lambda: describe_nodes([a, b]))
        state = await settled_state(a, b)
    assert state["studies_needed"] == {}
    assert seen, "no per-study progress was ever recorded"
    first = seen[0]
    assert set(first) <= set(studies)
    for study, (instances, nbytes) in first.items():
        assert 0 < instances <= studies[study] and 0 < nbytes <= size_of[study]
    counts = [s.get(uid(10, 1), [0, 0])[0] for s in seen]
    assert counts == sorted(counts, reverse=True), counts  # only ever counts down
    assert len(set(counts)) > 1, counts  # and it did count down
    assert any(re.search(rf"study {re.escape(s)}: \d+ instances, \S+ \S+ to go", t)
               for t in texts for s in studies), texts


@pytest.mark.timeout(60)
async def test_a_full_local_disk_reads_as_store_full_not_as_an_unreachable_peer(
        new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    """The peer is fine; our disk is full. The state says so (``store_full``, kind
    ``local``), and the loop goes on: once space returns, the sync completes by itself."""
    from syncnode.blobstore import StoreFull

    a, b = new_node("a"), new_node("b")
    add_instances(b, [uid(12, i) for i in range(5)], study=uid(12))
    real_install = a.store.install_staged
    full = [True]

    def install(staged: list[Any]) -> Any:
        if full[0]:
            raise StoreFull("no space left for the blob store")
        return real_install(staged)

    a.store.install_staged = install  # type: ignore[method-assign]
    ra, rb = await running(a), await running(b)
    pull_from(a, ra, b, url_of(rb))
    await wait_for(lambda: peer_state(a, b).get("state") == "store_full", 20,
                   "A's peer state to say store_full", describe=lambda: peer_state(a, b))
    state = peer_state(a, b)
    assert state["error_kind"] == "local" and "StoreFull" in state["last_error"], state
    assert not state["in_sync"]
    full[0] = False
    await wait_for(lambda: converged([a, b]), 30, "A to finish once the disk has room",
                   describe=lambda: describe_nodes([a, b]))
    state = await settled_state(a, b)
    assert state["state"] == "in_sync" and state["error_kind"] == ""


# ----------------------------------------------------------------------------------------
# Retry policy


def test_a_round_that_made_progress_retries_at_the_first_backoff_step(
        new_node: Callable[[str], LocalNode]) -> None:
    a, b = new_node("a"), new_node("b")
    ps = PeerSync(a, SyncEngine(a), b.node_id, "https://127.0.0.1:1")
    for _ in range(6):  # no progress: the delay grows towards the cap
        delay = ps._retry_delay(ps._progress())
    assert ps.backoff.failures == 6 and delay >= 16
    before = ps._progress()
    ps.state.bytes_received += 1
    assert ps._retry_delay(before) <= 1.0
    assert ps.backoff.failures == 1
