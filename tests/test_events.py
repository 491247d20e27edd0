"""Catalog events: canonical encoding, strict decoding, ids, the hybrid logical clock."""

from __future__ import annotations

import itertools
import json
from typing import Any

import blake3
import pytest

from syncnode import events as ev
from syncnode.ids import InvalidHash


def h(tag: str) -> str:
    return blake3.blake3(tag.encode()).hexdigest()


def put_event(**over: Any) -> ev.PutEvent:
    fields: dict[str, Any] = {
        "origin": "NODEA", "hlc": 123456789 << 16, "blob": h("blob"), "size": 4242,
        "chunks": h("chunks"),
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "sop_instance_uid": "1.2.3.4.5.6",
        "series_instance_uid": "1.2.3.4.5", "study_instance_uid": "1.2.3.4",
        "patient_id": "PAT-1", "modality": "CT", "study_date": "20240131",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
    }
    fields.update(over)
    return ev.PutEvent(**fields)


def delete_event(**over: Any) -> ev.DeleteEvent:
    fields: dict[str, Any] = {"origin": "NODEB", "hlc": 987654321 << 16,
                              "sop_instance_uid": "1.2.3.4.5.6",
                              "removes": (h("put2"), h("put1"), h("put3"))}
    fields.update(over)
    return ev.DeleteEvent(**fields)


def canon(obj: dict[str, Any]) -> bytes:
    """The canonical form, written independently of the module: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def put_obj(**over: Any) -> dict[str, Any]:
    obj = json.loads(ev.encode(put_event()))
    obj.update(over)
    return obj


def delete_obj(**over: Any) -> dict[str, Any]:
    obj = json.loads(ev.encode(delete_event()))
    obj.update(over)
    return obj


# -- encoding ------------------------------------------------------------------------------


def test_put_roundtrip() -> None:
    e = put_event()
    body = ev.encode(e)
    assert ev.decode(body) == e
    assert ev.event_id(body) == blake3.blake3(body).hexdigest()
    assert ev.decode_checked(ev.event_id(body), body) == e
    obj = json.loads(body)
    assert obj["kind"] == "put" and obj["v"] == ev.LEGACY_VERSION  # unsigned: the legacy form
    assert body == canon(obj)


def test_delete_roundtrip_sorts_and_dedups_removes() -> None:
    e = delete_event(removes=(h("b"), h("a"), h("b")))
    body = ev.encode(e)
    assert json.loads(body)["removes"] == sorted({h("a"), h("b")})
    decoded = ev.decode(body)
    assert isinstance(decoded, ev.DeleteEvent)
    assert decoded.removes == tuple(sorted({h("a"), h("b")}))
    assert ev.encode(decoded) == body
    # the order a delete was built in does not change its id
    assert ev.encode(delete_event(removes=(h("a"), h("b")))) == body


def test_non_ascii_is_escaped_and_roundtrips() -> None:
    e = put_event(patient_id="Müller^Zoë 山田 \U0001f600")  # an astral character too
    body = ev.encode(e)
    assert body.isascii()
    assert b"\\ud83d\\ude00" in body  # a surrogate *pair* in JSON is one character
    assert ev.decode(body) == e


def test_ids_differ_for_different_content() -> None:
    a, b = ev.encode(put_event()), ev.encode(put_event(hlc=put_event().hlc + 1))
    assert ev.event_id(a) != ev.event_id(b)


def test_both_kinds_accepted_as_canonical() -> None:
    # control for the rejection tests below: the hand-made canonical bodies are accepted
    assert ev.decode(canon(put_obj())) == put_event()
    assert ev.decode(canon(delete_obj())) == ev.decode(ev.encode(delete_event()))


# -- rejection -----------------------------------------------------------------------------


def reordered(obj: dict[str, Any]) -> bytes:
    return json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")).encode()


NON_CANONICAL = {
    "reordered keys": reordered(put_obj()),
    "spaces after separators": json.dumps(put_obj(), sort_keys=True).encode(),
    "indented": json.dumps(put_obj(), sort_keys=True, indent=1).encode(),
    "trailing newline": canon(put_obj()) + b"\n",
    "leading space": b" " + canon(put_obj()),
    "raw UTF-8 instead of escapes": json.dumps(put_obj(patient_id="Zoë"), sort_keys=True,
                                               separators=(",", ":"),
                                               ensure_ascii=False).encode(),
    "escaped ASCII": canon(put_obj()).replace(b'"CT"', b'"\\u0043T"'),
    "unsorted removes": canon(delete_obj(removes=sorted(delete_obj()["removes"],
                                                        reverse=True))),
    "duplicate removes": canon(delete_obj(removes=sorted([h("a"), h("a"), h("b")]))),
    "float hlc": canon(put_obj()).replace(b'"hlc":' + str(put_event().hlc).encode(),
                                          b'"hlc":' + str(put_event().hlc).encode() + b".0"),
    "duplicate key": canon(put_obj())[:-1] + b',"v":1}',
}


@pytest.mark.parametrize("body", NON_CANONICAL.values(), ids=NON_CANONICAL.keys())
def test_non_canonical_rejected(body: bytes) -> None:
    with pytest.raises(ev.InvalidEvent):
        ev.decode(body)


INVALID = {
    "extra field": canon(put_obj(extra=1)),
    "extra field on delete": canon(delete_obj(note="x")),
    "missing patient_id": canon({k: v for k, v in put_obj().items() if k != "patient_id"}),
    "missing hlc": canon({k: v for k, v in put_obj().items() if k != "hlc"}),
    "delete with put fields": canon(delete_obj(blob=h("x"))),
    "bad SOP UID letters": canon(put_obj(sop_instance_uid="1.2.abc")),
    "bad SOP UID leading zero": canon(put_obj(sop_instance_uid="1.2.03")),
    "bad SOP UID empty component": canon(put_obj(sop_instance_uid="1..2")),
    "bad SOP UID trailing dot": canon(put_obj(sop_instance_uid="1.2.")),
    "bad SOP UID too long": canon(put_obj(sop_instance_uid="1." + "2" * 63)),
    "bad SOP UID empty": canon(put_obj(sop_instance_uid="")),
    "bad SOP UID number": canon(put_obj(sop_instance_uid=123)),
    "bad study UID": canon(put_obj(study_instance_uid="1.2.3 ")),
    "bad series UID": canon(put_obj(series_instance_uid="../1")),
    "bad class UID": canon(put_obj(sop_class_uid=None)),
    "bad delete UID": canon(delete_obj(sop_instance_uid="x")),
    "negative hlc": canon(put_obj(hlc=-1)),
    "hlc too big": canon(put_obj(hlc=2**63)),
    "bool hlc": canon(put_obj(hlc=True)),
    "string hlc": canon(put_obj(hlc="5")),
    "null hlc": canon(put_obj(hlc=None)),
    "bool size": canon(put_obj(size=False)),
    "negative size": canon(put_obj(size=-5)),
    "uppercase blob hash": canon(put_obj(blob=h("blob").upper())),
    "short blob hash": canon(put_obj(blob=h("blob")[:63])),
    "path as blob hash": canon(put_obj(blob="../../etc/passwd")),
    "bad chunks hash": canon(put_obj(chunks="00")),
    "empty origin": canon(put_obj(origin="")),
    "long origin": canon(put_obj(origin="N" * 81)),
    "control char in patient id": canon(put_obj(patient_id="A\tB")),
    "long patient id": canon(put_obj(patient_id="P" * 65)),
    # valid JSON and canonical, but a lone surrogate cannot be stored as UTF-8 (SQLite):
    # such an event would make every batch that carries it fail on insert
    "lone surrogate in patient id": canon(put_obj(patient_id="A\ud800")),
    "lone surrogate in origin": canon(delete_obj(origin="\udc00N")),
    "non-string modality": canon(put_obj(modality=["CT"])),
    "unknown kind": canon(put_obj(kind="update")),
    "no kind": canon({k: v for k, v in put_obj().items() if k != "kind"}),
    "version 2": canon(put_obj(v=2)),
    "no version": canon({k: v for k, v in put_obj().items() if k != "v"}),
    "removes empty": canon(delete_obj(removes=[])),
    "removes not a list": canon(delete_obj(removes=h("a"))),
    "removes bad id": canon(delete_obj(removes=[h("a"), "zz"])),
    "oversize": canon(delete_obj(removes=sorted(h(str(i)) for i in range(1000)))),
    "oversize padding": canon(put_obj()) + b" " * ev.MAX_EVENT_BYTES,
    "not JSON": b"put blob=abc",
    "JSON array": b"[1,2,3]",
    "JSON string": b'"put"',
    "empty": b"",
    "invalid UTF-8": canon(put_obj())[:-2] + b"\xff\xfe}",
}


@pytest.mark.parametrize("body", INVALID.values(), ids=INVALID.keys())
def test_invalid_rejected(body: bytes) -> None:
    with pytest.raises(ev.InvalidEvent):
        ev.decode(body)


def test_oversize_limit_is_exact() -> None:
    assert len(INVALID["oversize"]) > ev.MAX_EVENT_BYTES
    # the largest delete that fits is accepted
    n = 1
    while len(canon(delete_obj(removes=sorted(h(str(i)) for i in range(n + 1))))) \
            <= ev.MAX_EVENT_BYTES:
        n += 1
    body = canon(delete_obj(removes=sorted(h(str(i)) for i in range(n))))
    assert len(body) <= ev.MAX_EVENT_BYTES
    assert len(ev.decode(body).removes) == n  # type: ignore[union-attr]


def test_decode_checked_rejects_wrong_id() -> None:
    body = ev.encode(put_event())
    other = ev.encode(put_event(size=1))
    with pytest.raises(ev.InvalidEvent):
        ev.decode_checked(ev.event_id(other), body)
    with pytest.raises(ev.InvalidEvent):
        ev.decode_checked(h("anything"), body)
    # an id that is not a hash at all never reaches a lookup
    for bad in ("../etc", ev.event_id(body).upper(), ev.event_id(body)[:63]):
        with pytest.raises(InvalidHash):
            ev.decode_checked(bad, body)


def test_decode_checked_rejects_invalid_body_under_its_own_hash() -> None:
    body = json.dumps(put_obj(), sort_keys=True).encode()  # not canonical
    with pytest.raises(ev.InvalidEvent):
        ev.decode_checked(ev.event_id(body), body)


# -- live key ------------------------------------------------------------------------------


def test_live_key_order() -> None:
    assert ev.live_key(2, "A", h("0")) > ev.live_key(1, "Z", h("9"))
    assert ev.live_key(1, "B", h("0")) > ev.live_key(1, "A", h("9"))
    lo, hi = sorted([h("x"), h("y")])
    assert ev.live_key(1, "A", hi) > ev.live_key(1, "A", lo)


# -- hybrid logical clock ------------------------------------------------------------------


def test_hlc_layout() -> None:
    assert ev.hlc_tick(0, now_ms=5) == 5 << ev.HLC_COUNTER_BITS
    assert ev.hlc_tick(5 << 16, now_ms=5) == (5 << 16) + 1
    assert ev.hlc_tick((5 << 16) + 1, now_ms=6) == 6 << 16


def test_hlc_monotonic_when_the_clock_goes_backwards() -> None:
    wall = [1_000, 1_001, 1_001, 900, 900, 500, 0, 1_002, 1_000_000, 10, 1_000_001]
    clock, seen = 0, []
    for now in wall:
        clock = ev.hlc_tick(clock, now_ms=now)
        seen.append(clock)
    assert all(b > a for a, b in itertools.pairwise(seen))
    # physical time is used again once it overtakes the clock
    assert seen[-1] == 1_000_001 << 16


def test_hlc_real_clock_is_monotonic() -> None:
    clock, seen = 0, []
    for _ in range(10_000):
        clock = ev.hlc_tick(clock)
        seen.append(clock)
    assert all(b > a for a, b in itertools.pairwise(seen))


def test_hlc_after_observing_a_remote_clock_far_ahead() -> None:
    now = 1_700_000_000_000
    local = ev.hlc_tick(0, now_ms=now)
    remote = (now + 10 * 365 * 86_400_000) << 16  # ten years ahead
    clock = ev.hlc_observe(local, remote)
    assert clock >= remote
    after = [ev.hlc_tick(clock, now_ms=now + i) for i in range(3)]
    clock2 = clock
    for _ in range(3):
        clock2 = ev.hlc_tick(clock2, now_ms=now)
        assert clock2 > remote
    assert all(t > remote for t in after)
    # observing an older remote clock does not move it back
    assert ev.hlc_observe(clock2, local) == clock2
    # and once wall time passes the remote clock, physical time takes over again
    later = (now + 11 * 365 * 86_400_000)
    assert ev.hlc_tick(clock2, now_ms=later) == later << 16
