"""Wrong API keys are rate-limited per client address: ten a minute are checked and
audited one by one; beyond that the address is answered 429 with Retry-After, unchecked
and unaudited (counted in /metrics), until its allowance refills. A guessing client cannot
fill the audit trail; a right key from another address is never slowed down."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from syncsupport import start_new_node

from syncnode.admin.auth import WRONG_KEYS_PER_MINUTE, WrongKeyLimiter
from syncnode.apikeys import KeyStore
from syncnode.audit import read_entries

WRONG = "snk-admin-" + "B" * 43


def test_the_limiter_refills_at_its_rate() -> None:
    now = [1000.0]
    limiter = WrongKeyLimiter(per_minute=6, clock=lambda: now[0])
    for _ in range(6):
        assert limiter.wait_for("10.0.0.1") == 0.0
        limiter.failed("10.0.0.1")
    wait = limiter.wait_for("10.0.0.1")
    assert wait == pytest.approx(10.0)  # one try per 10 s at 6 a minute
    assert limiter.wait_for("10.0.0.2") == 0.0  # another address is not affected
    now[0] += 10.0
    assert limiter.wait_for("10.0.0.1") == 0.0
    assert limiter.refused == 1


async def test_a_guessing_client_is_told_to_wait_and_not_audited_each_time(
        tmp_path: Path) -> None:
    node = await start_new_node(tmp_path / "a")
    base = f"http://127.0.0.1:{node.ports['api']}"
    admin = KeyStore(node.node.data).rotate("admin")
    statuses: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(WRONG_KEYS_PER_MINUTE + 5):
                async with http.get(f"{base}/api/v1/status",
                                    headers={"X-API-Key": WRONG}) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        retry_after = int(r.headers["Retry-After"])
                        assert "too many wrong API keys" in (await r.json())["error"]
            # a session cannot be opened from there either, meanwhile
            async with http.post(f"{base}/api/v1/session",
                                 headers={"X-API-Key": admin}) as r:
                assert r.status == 429
            async with http.get(f"{base}/metrics") as r:
                metrics = await r.text()
    finally:
        await node.stop()
    assert statuses == [403] * WRONG_KEYS_PER_MINUTE + [429] * 5
    assert 1 <= retry_after <= 60 // WRONG_KEYS_PER_MINUTE + 1
    assert "syncnode_api_wrong_key_refusals_total 6.0" in metrics
    wrong = [e for e in read_entries(node.node.data / "audit")
             if e["action"] == "login" and e["outcome"] == "failure"]
    assert len(wrong) == WRONG_KEYS_PER_MINUTE  # the refused ones were not audited
