"""The peer server's answers by error type, over real mutual TLS on 127.0.0.1.

A request that breaks the protocol is 400 and changes nothing (no file written); a fault
of the server itself is 500 with its traceback in the log, never 400; a full disk is 507.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from syncnode import protocol
from syncnode.blobstore import CHUNK_SIZE, StoreFull
from syncnode.local import LocalNode
from syncnode.node import RunningNode
from syncnode.tls.contexts import client_ssl_context


@dataclass
class Served:
    node: LocalNode
    running: RunningNode
    session: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.running.ports['peer']}{protocol.PREFIX}"

    async def post(self, path: str, body: Any = None, data: bytes | None = None
                   ) -> tuple[int, Any]:
        kw: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        async with self.session.post(self.base + path, **kw) as r:
            return r.status, await r.json()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    a = LocalNode.init(tmp_path / "a")
    b = LocalNode.init(tmp_path / "b")  # a trusted client
    a.trust.pin(b.identity.cert_der, b.node_id)
    b.trust.pin(a.identity.cert_der, a.node_id)
    running = RunningNode(a, a.settings(peer_host="127.0.0.1", peer_port=0, api_port=0,
                                        dicom_port=0, discovery=False))
    await running.start()
    ctx = client_ssl_context(b.identity, b.trust, expected=a.node_id)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            yield Served(a, running, s)
    finally:
        await running.stop()
        a.close()
        b.close()


def tmp_files(node: LocalNode) -> list[str]:
    return sorted(p.name for p in node.store.tmp_dir.iterdir())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body", [
    {"blobs": ["x"]},
    {"blobs": [{"hash": "ab" * 32, "size": 2**62, "chunks": "00"}]},
    {"blobs": [{"hash": "ab" * 32, "size": 2**70, "chunks": "00"}]},
    {"blobs": [{"hash": "ab" * 32, "size": 3 * CHUNK_SIZE, "chunks": "zz" * 96}]},
    {"blobs": [{"hash": "../../etc", "size": 1, "chunks": "00" * 32}]},
])
async def test_malformed_offers_are_400_and_leave_no_files(served: Served, body: Any) -> None:
    before = tmp_files(served.node)
    status, answer = await served.post("/push/offer", body)
    assert status == 400, answer
    assert answer["error"]
    assert tmp_files(served.node) == before


@pytest.mark.timeout(60)
async def test_bad_json_and_bad_ids_are_400(served: Served) -> None:
    status, answer = await served.post("/events", data=b"{not json")
    assert status == 400 and "JSON" in answer["error"]
    status, answer = await served.post("/events", {"ids": ["nothex"]})
    assert status == 400 and "event id" in answer["error"]
    async with served.session.get(served.base + "/merkle", params={"prefix": "XYZ"}) as r:
        assert r.status == 400 and "prefix" in (await r.json())["error"]


@pytest.mark.timeout(60)
async def test_a_fault_of_the_server_is_500_with_a_traceback_not_400(
        served: Served, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(ids: Any) -> Any:
        raise ValueError("a bug, not the client's fault")

    monkeypatch.setattr(served.node.catalog, "get_events", broken)
    with caplog.at_level(logging.ERROR, logger="syncnode.peer_server"):
        status, answer = await served.post("/events", {"ids": ["ab" * 32]})
    assert status == 500, answer
    assert "a bug" not in answer["error"]  # internals stay in the log
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None
    assert "a bug, not the client's fault" in str(failed[0].exc_info[1])


@pytest.mark.timeout(60)
async def test_a_full_disk_is_507(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(pairs: Any) -> Any:
        raise StoreFull("no space left for the blob store")

    monkeypatch.setattr(served.node, "apply", full)
    status, answer = await served.post("/push/events", {"events": []})
    assert status == 507 and "full" in answer["error"]
