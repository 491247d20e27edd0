"""A running node stops promptly, whatever it was doing.

On Python 3.11 ``asyncio.wait_for`` returns the result instead of raising when the task
is cancelled just as the awaited thing finishes; the peer-refresh loop waited that way,
so a node told "peers changed" right before ``stop()`` could loop on and ``stop()`` never
returned. The node's loops wait with ``asyncio.timeout`` (ruff bans ``wait_for``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from syncsupport import add_peer, import_files, make_dicom, start_node, uid, url_of

from syncnode.local import LocalNode


@pytest.mark.timeout(120)
async def test_stop_right_after_start_and_a_peer_change_returns_promptly(
        tmp_path: Path, new_node: Callable[[str], LocalNode]) -> None:
    files = [make_dicom(tmp_path / f"{k}.dcm", sop=uid(11, 1, k), study=uid(11),
                        series=uid(11, 1), pixel_bytes=20000, seed=k) for k in range(20)]
    slowest = 0.0
    for i in range(4):
        a, b = new_node(f"a{i}"), new_node(f"b{i}")
        import_files(a, *files)
        ra, rb = await start_node(a), await start_node(b)
        add_peer(b, a, url_of(ra))
        add_peer(a, b, url_of(rb))
        ra.peers_changed()
        rb.peers_changed()
        await asyncio.sleep(0.02 * i)  # stop at different points of the first round
        started = time.monotonic()
        stopping = asyncio.ensure_future(asyncio.gather(ra.stop(), rb.stop()))
        done, _ = await asyncio.wait([stopping], timeout=15)
        assert done, f"stop() did not return within 15 s (attempt {i})"
        stopping.result()
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 15
