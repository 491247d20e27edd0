"""Bandwidth caps (syncnode.ratelimit): schedules read as documented, buckets that hold
their rate, and on a real sync over loopback a cap that holds and a new schedule set
through the admin API that applies without a restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from syncsupport import cli, cli_json, import_files, make_dicom, pull_from, uid, url_of, wait_for

from syncnode.apikeys import KeyStore
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.ratelimit import (
    Limiter,
    Schedule,
    ScheduleError,
    TokenBucket,
    check_caps,
    in_force,
    parse_rate,
)
from syncnode.service import NodeService

StartNode = Callable[..., Awaitable[RunningNode]]
MON_8 = dt.datetime(2026, 12, 7, 8, 0)  # a Monday
SAT_8 = dt.datetime(2026, 12, 12, 8, 0)
MON_20 = dt.datetime(2026, 12, 7, 20, 0)


def test_rates() -> None:
    assert parse_rate("2MB/s") == 2e6
    assert parse_rate("500 KiB/s") == 500 * 1024
    assert parse_rate("20Mbit/s") == 2.5e6
    assert parse_rate("unlimited") is None
    for bad in ("fast", "2 parsecs", "10B/s", ""):
        with pytest.raises(ScheduleError):
            parse_rate(bad)


def test_schedules_by_time_of_day_and_weekday() -> None:
    s = Schedule.parse("2MB/s 07:00-19:00 Mon-Fri, unlimited otherwise")
    assert s.rate_at(MON_8) == 2e6
    assert s.rate_at(SAT_8) is None and s.rate_at(MON_20) is None
    night = Schedule.parse("1MB/s 19:00-07:00, 8MB/s")  # over midnight
    assert night.rate_at(MON_20) == 1e6
    assert night.rate_at(MON_8.replace(hour=3)) == 1e6
    assert night.rate_at(MON_8) == 8e6
    days = Schedule.parse("500KB/s 08:00-18:00 Mon,Wed,Fri, 4MB/s Sat-Sun")
    assert days.rate_at(MON_8) == 5e5
    assert days.rate_at(MON_8 + dt.timedelta(days=1)) is None  # Tuesday: no rule
    assert days.rate_at(SAT_8) == 4e6
    for bad in ("2MB/s 7-19", "2MB/s Funday", "unlimited otherwise, 2MB/s", "2MB/s,,1MB/s"):
        with pytest.raises(ScheduleError):
            Schedule.parse(bad)


def test_scopes_and_status_view() -> None:
    with pytest.raises(ScheduleError):
        check_caps({"sideways": "1MB/s"})
    with pytest.raises(ScheduleError):
        check_caps({"NOTANODEID:in": "1MB/s"})
    caps = {"in": "2MB/s 07:00-19:00 Mon-Fri", "out": "5MB/s"}
    assert in_force(caps, when=MON_8) == {"in": "2MB/s", "out": "5MB/s"}
    assert in_force(caps, when=SAT_8) == {"in": "unlimited", "out": "5MB/s"}


async def test_bucket_holds_its_rate_and_follows_a_change() -> None:
    t = [0.0]
    bucket = TokenBucket(lambda: t[0])
    bucket.set_rate(1e6)
    moved = 0
    while t[0] < 10:  # a taker that moves 64 KiB whenever the bucket lets it
        mark = bucket.take(65536)
        moved += 65536
        t[0] += bucket.wait_time(mark)
    assert abs(moved / t[0] - 1e6) < 0.03 * 1e6
    # three takers at once go one after another, each when its own bytes are paid
    marks = [bucket.take(100_000) for _ in range(3)]
    waits = [bucket.wait_time(m) for m in marks]
    assert waits[0] < waits[1] < waits[2] and abs(waits[2] - waits[1] - 0.1) < 1e-6
    bucket.set_rate(4e6)  # debt is kept, the new rate pays it faster
    assert bucket.wait_time(marks[2]) == pytest.approx(waits[2] / 4)
    limiter = Limiter({"in": "unlimited"})
    await asyncio.wait_for(limiter.consume("x", "in", 1 << 30), 1)  # never waits


def _files(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir()
    return [make_dicom(folder / f"{i}.dcm", sop=uid(8, 1, i), study=uid(8), series=uid(8, 1),
                       pixel_bytes=size, seed=i) for i in range(count)]


async def test_a_cap_holds_on_a_real_sync_and_a_new_schedule_applies_at_once(
        tmp_path: Path, new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    a, b = new_node("a"), new_node("b")
    # 84 MB: 20 s at 2 MB/s, then a few seconds at 6 MB/s, with room to spare
    import_files(a, *_files(tmp_path / "files", 40, 2 << 20))
    ra = await running(a)
    rb = await running(b, bandwidth_caps={"in": "2MB/s"})
    pull_from(b, rb, a, url_of(ra))
    peer = a.node_id.compact

    def received() -> int:
        return rb.engine.bytes.get(peer, {}).get("in", 0)

    await wait_for(lambda: received() > 1 << 20, 20, "the pull to start")
    t0, n0 = time.monotonic(), received()
    await asyncio.sleep(20)
    t1, n1 = time.monotonic(), received()
    rate = (n1 - n0) / (t1 - t0)
    assert 1.8e6 <= rate <= 2.2e6, f"{rate / 1e6:.2f} MB/s under a 2 MB/s cap"

    # a schedule whose window holds the present hour: 6 MB/s now, through the admin API
    hour = dt.datetime.now().hour
    schedule = f"6MB/s {hour:02d}:00-{(hour + 2) % 24:02d}:00, 1MB/s otherwise"
    key = KeyStore(b.data).rotate("admin")
    api = f"http://127.0.0.1:{rb.ports['api']}/api/v1/limits/in"
    async with aiohttp.ClientSession() as http:
        async with http.put(api, json={"schedule": schedule},
                            headers={"X-API-Key": key}) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        async with http.put(api, json={"schedule": "2 parsecs"},
                            headers={"X-API-Key": key}) as resp:
            assert resp.status == 400
        reader = KeyStore(b.data).rotate("read")
        async with http.put(api, json={"schedule": "1MB/s"},
                            headers={"X-API-Key": reader}) as resp:
            assert resp.status == 403  # changing a cap needs the admin role
        async with http.get(api.removesuffix("/in"), headers={"X-API-Key": reader}) as resp:
            assert resp.status == 200 and (await resp.json())["in_force"]["in"] == "6MB/s"
    assert answer["in_force"]["in"] == "6MB/s"
    await asyncio.sleep(1.5)  # "within a second or two"
    t2, n2 = time.monotonic(), received()
    await asyncio.sleep(3)
    t3, n3 = time.monotonic(), received()
    faster = (n3 - n2) / (t3 - t2)
    window = rb.engine.peers[peer].pull_gate.window
    assert 4.5e6 <= faster <= 6.6e6, (f"{faster / 1e6:.2f} MB/s after the change to 6 MB/s",
                                      window)
    status = rb.service.status()
    assert status["bandwidth"]["in"] == "6MB/s"
    assert status["peers"][0]["cap"] == {"in": "unlimited", "out": "unlimited"}
    assert (b.data / "config.toml").read_text().count("6MB/s") == 1  # persisted


async def test_limiter_follows_its_schedule_on_an_injected_clock() -> None:
    t, when = [0.0], [MON_8.replace(hour=18, minute=59)]
    limiter = Limiter({"in": "2MB/s 07:00-19:00 Mon-Fri, unlimited otherwise",
                       "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2:out":
                           "1MB/s"},
                      clock=lambda: t[0], local_time=lambda: when[0])
    peer = "P56IOI7MZJNU2YIQGDREYDM2MGTIMGL3BXNPQ6W5BMTBBZ4TJXZWICQ2"
    await limiter.consume(peer, "in", 0)
    assert limiter.buckets[("", "in")].rate == 2e6
    assert limiter.in_force([peer])[f"{peer}:out"] == "1MB/s"
    when[0] = when[0].replace(hour=19, minute=0)  # the window ends
    t[0] += 1.0  # schedules are looked at once a second
    await limiter.consume(peer, "in", 0)
    assert limiter.buckets[("", "in")].rate is None
    assert limiter.in_force()["in"] == "unlimited"


def test_limit_commands(new_node: Callable[[str], LocalNode]) -> None:
    node = new_node("n")
    cli("limit", "set", "in", "2MB/s 00:00-24:00 Mon-Sun", data=node.data)
    bad = cli("limit", "set", "sideways", "2MB/s", data=node.data, check=False)
    assert bad.returncode == 2 and "scope" in bad.stderr
    shown = cli_json("limit", "show", data=node.data)
    assert shown["caps"] == {"in": "2MB/s 00:00-24:00 Mon-Sun"}
    assert shown["in_force"] == {"in": "2MB/s", "out": "unlimited"}
    assert NodeService(node).status()["bandwidth"] == {"in": "2MB/s", "out": "unlimited"}
    assert cli("limit", "clear", "out", data=node.data, check=False).returncode == 1


async def test_a_cap_set_beside_a_running_node_applies_without_restart(
        new_node: Callable[[str], LocalNode], running: StartNode) -> None:
    node = new_node("n")
    r = await running(node)
    assert r.limiter.in_force()["out"] == "unlimited"
    # what `syncnode limit set` does: the service without the running node, config.toml
    await asyncio.to_thread(NodeService(node).set_limit, "out", "3MB/s")
    await wait_for(lambda: r.limiter.in_force()["out"] == "3MB/s", 5,
                   "the running node to take the cap from config.toml")
    assert r.settings.bandwidth_caps == {"out": "3MB/s"}
