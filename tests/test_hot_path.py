"""Work done once on the hot path: a pulled event's body is decoded once on the pulling
node (planning, the put-truth check and the catalog's admission share the decoded event,
:class:`syncnode.events.Checked`), not once per step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import StartNode
from syncsupport import converged, import_files, make_dicom, pull_from, uid, url_of, wait_for

from syncnode import events as ev
from syncnode.local import LocalNode

N = 12


@pytest.mark.timeout(120)
async def test_each_pulled_event_is_decoded_once(tmp_path: Path,
                                                 new_node: Callable[[str], LocalNode],
                                                 running: StartNode,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = new_node("a"), new_node("b")
    files = [make_dicom(tmp_path / f"{i}.dcm", sop=uid(8, 1, i), study=uid(8),
                        series=uid(8, 1), pixel_bytes=2000, seed=i) for i in range(N)]
    import_files(a, *files)
    decoded: list[str] = []
    real = ev.decode

    def counting(body: bytes) -> ev.Event:
        event = real(body)
        decoded.append(ev.event_id(body))
        return event

    monkeypatch.setattr(ev, "decode", counting)
    ra = await running(a)
    rb = await running(b)
    pull_from(b, rb, a, url_of(ra))  # b pulls, a only serves
    await wait_for(lambda: converged([a, b]), 60, "b to hold a's study")
    assert b.catalog.event_count() == N
    # every event decoded, and each once (a serves stored bodies without decoding them)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == N, len(decoded)
