"""Event signatures: the signed format, one encoding per signature, verification."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from syncnode import events as ev
from syncnode import signing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from originkit import FakeOrigin, tamper

A, B = FakeOrigin("a"), FakeOrigin("b")


def put(origin: FakeOrigin = A, **over: object) -> ev.PutEvent:
    fields: dict[str, object] = dict(
        origin=origin.id, hlc=5 << 16, blob="ab" * 32, size=10, chunks="cd" * 32,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3", study_instance_uid="1.2")
    fields.update(over)
    return ev.PutEvent(**fields)  # type: ignore[arg-type]


def test_signed_event_roundtrips_and_its_id_covers_the_signature() -> None:
    eid, body = A.sign(put())
    obj = json.loads(body)
    assert obj["v"] == ev.EVENT_VERSION and len(obj["sig"]) == ev.SIG_HEX_LEN
    event = ev.decode_checked(eid, body)
    assert event.sig == obj["sig"] and signing.verify(event, signing.key_for_certificate(
        A.id, A.cert_der))
    # the same content signed again: another signature, another id (ECDSA is randomised)
    eid2, _ = A.sign(put())
    assert eid2 != eid


def test_signature_is_over_every_field() -> None:
    _, body = A.sign(put())
    event = ev.decode(body)
    key = signing.key_for_certificate(A.id, A.cert_der)
    for change in ({"hlc": event.hlc + 1}, {"blob": "ef" * 32}, {"patient_id": "X"},
                   {"sop_instance_uid": "1.2.3.5"}, {"size": 11}):
        assert not signing.verify(dataclasses.replace(event, **change), key), change


def test_a_tampered_signature_does_not_verify() -> None:
    eid, body = tamper(A.sign(put()))
    event = ev.decode_checked(eid, body)  # still well formed...
    assert not signing.verify(event, signing.key_for_certificate(A.id, A.cert_der))


def test_high_s_twin_of_a_valid_signature_is_refused_by_the_format() -> None:
    """(r, n - s) verifies too in plain ECDSA: a relay could make a second id for the same
    signed content. Only the low-s form decodes."""
    _, body = A.sign(put())
    obj = json.loads(body)
    r, s = int(obj["sig"][:64], 16), int(obj["sig"][64:], 16)
    assert s <= ev.P256_ORDER // 2
    obj["sig"] = f"{r:064x}{ev.P256_ORDER - s:064x}"
    twin = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ev.InvalidEvent, match="low-s"):
        ev.decode(twin)


@pytest.mark.parametrize("sig", ["", "00" * 64, "AB" * 64, "ab" * 63, "ab" * 65, 5, None])
def test_malformed_signatures_are_refused(sig: object) -> None:
    _, body = A.sign(put())
    obj = json.loads(body)
    obj["sig"] = sig
    with pytest.raises(ev.InvalidEvent):
        ev.decode(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def test_a_signed_body_without_its_signature_is_not_a_legacy_event() -> None:
    _, body = A.sign(put())
    obj = json.loads(body)
    del obj["sig"]
    with pytest.raises(ev.InvalidEvent):  # version 2 needs 'sig'
        ev.decode(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
    obj["v"] = ev.LEGACY_VERSION  # the legacy form of the same content decodes, unsigned
    assert not ev.is_signed(ev.decode(json.dumps(obj, sort_keys=True,
                                                 separators=(",", ":")).encode()))


def test_a_certificate_proves_only_its_own_origin() -> None:
    assert signing.certificate_origin(A.cert_der) == A.id
    with pytest.raises(signing.OriginCertificateError, match="does not belong"):
        signing.key_for_certificate(B.id, A.cert_der)
    with pytest.raises(signing.OriginCertificateError, match="not a node id"):
        signing.key_for_certificate("NODEA", A.cert_der)
    # the forger's own key does not verify an event claiming another origin
    eid, body = A.forge(put(B), as_origin=B.id)
    event = ev.decode_checked(eid, body)
    assert event.origin == B.id
    assert not signing.verify(event, signing.key_for_certificate(B.id, B.cert_der))


def test_signer_refuses_events_of_another_origin() -> None:
    with pytest.raises(ValueError, match="cannot sign"):
        A.signer.sign(put(B))


def test_origin_keys_are_bounded() -> None:
    keys = signing.OriginKeys(capacity=2)
    others = [FakeOrigin(str(i)) for i in range(3)]
    for o in others:
        keys.add(o.id, o.cert_der)
    assert keys.get(others[0].id) is None and keys.get(others[2].id) is not None
