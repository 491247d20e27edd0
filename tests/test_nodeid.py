"""Node id formatting and parsing (syncnode.nodeid)."""

from __future__ import annotations

import hashlib
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncnode.nodeid import InvalidNodeId, NodeId

# Syncthing's published device-id test vectors (lib/protocol/deviceid_test.go): the same id in
# many typed forms, all of which must parse to the canonical display form.
CANONICAL = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2"
SAME_ID_TYPED = [
    CANONICAL,
    "P56IOI-7MZJNU-2IQGDR-EYDM2M-GTMGL3-BXNPQ6-W5BTBB-Z4TJXZ-WICQ",
    "P56IOI-7MZJNU2Y-IQGDR-EYDM2M-GTI-MGL3-BXNPQ6-W5BM-TBB-Z4TJXZ-WICQ2",
    "P56IOI7 MZJNU2I QGDREYD M2MGTMGL 3BXNPQ6W 5BTB BZ4T JXZWICQ",
    "P56IOI7 MZJNU2Y IQGDREY DM2MGTI MGL3BXN PQ6W5BM TBBZ4TJ XZWICQ2",
    "P56IOI7MZJNU2IQGDREYDM2MGTMGL3BXNPQ6W5BTBBZ4TJXZWICQ",
    "p56ioi7mzjnu2iqgdreydm2mgtmgl3bxnpq6w5btbbz4tjxzwicq",
    "P56IOI7MZJNU2YIQGDREYDM2MGTIMGL3BXNPQ6W5BMTBBZ4TJXZWICQ2",
    "P561017MZJNU2YIQGDREYDM2MGTIMGL3BXNPQ6W5BMT88Z4TJXZWICQ2",
    "p56ioi7mzjnu2yiqgdreydm2mgtimgl3bxnpq6w5bmtbbz4tjxzwicq2",
    "p561017mzjnu2yiqgdreydm2mgtimgl3bxnpq6w5bmt88z4tjxzwicq2",
    "  P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2\n",
]


@pytest.mark.parametrize("text", SAME_ID_TYPED)
def test_forgiving_parse_matches_syncthing_vectors(text: str) -> None:
    assert str(NodeId.parse(text)) == CANONICAL


def test_formats() -> None:
    node_id = NodeId.parse(CANONICAL)
    assert node_id.compact == CANONICAL.replace("-", "")
    assert len(node_id.compact) == 56
    assert node_id.short == "P56IOI7"
    groups = str(node_id).split("-")
    assert len(groups) == 8
    assert all(len(g) == 7 for g in groups)
    assert repr(node_id) == f"NodeId({CANONICAL!r})"


def test_from_certificate_der_is_sha256() -> None:
    der = b"\x30\x03\x02\x01\x01"  # any bytes: the id is only a hash of them
    node_id = NodeId.from_certificate_der(der)
    assert node_id.digest == hashlib.sha256(der).digest()
    assert NodeId.parse(str(node_id)) == node_id
    with pytest.raises(ValueError):
        NodeId.from_certificate_der(b"")


def test_equality_hash_order_pickle() -> None:
    a = NodeId(bytes(32))
    b = NodeId(bytes(32))
    c = NodeId(bytes(31) + b"\x01")
    assert a == b and hash(a) == hash(b)
    assert a != c and len({a, b, c}) == 2
    assert sorted([c, a]) == [a, c]
    assert a != a.compact  # never equal to its text form
    assert pickle.loads(pickle.dumps(c)) == c
    with pytest.raises(AttributeError):
        a._digest = b"x"  # type: ignore[misc]


def test_constructor_checks_digest() -> None:
    with pytest.raises(ValueError):
        NodeId(b"short")
    with pytest.raises(TypeError):
        NodeId("A" * 32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # one wrong check character (2nd group's last char Y -> Z)
        ("P56IOI7-MZJNU2Z-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2", "check character 1"),
        # last check character wrong
        ("P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ3", "check character 4"),
        # a typo inside a block is caught by that block's check character
        ("P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICA2", "check character 4"),
        # check characters appended to the 52-char form but wrong
        ("P56IOI7MZJNU2IQGDREYDM2MGTMGL3BXNPQ6W5BTBBZ4TJXZWICQCCCC", "check character"),
        ("P56IOI7-MZJNU2Y-IQGDREY", "truncated"),
        ("", "0 characters"),
        ("P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWIC92", "'9'"),
        ("P56IOI7MZJNU2IQGDREYDM2MGTMGL3BXNPQ6W5BTBBZ4TJXZWICR", "'A' or 'Q'"),
    ],
)
def test_rejects_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidNodeId, match=message):
        NodeId.parse(text)


def test_invalid_node_id_is_value_error() -> None:
    assert issubclass(InvalidNodeId, ValueError)
    with pytest.raises(TypeError):
        NodeId.parse(b"P56IOI7")  # type: ignore[arg-type]


def test_every_single_character_typo_is_detected() -> None:
    node_id = NodeId.parse(CANONICAL)
    compact = node_id.compact
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    for pos in range(len(compact)):
        for ch in alphabet:
            if ch == compact[pos]:
                continue
            typo = compact[:pos] + ch + compact[pos + 1 :]
            with pytest.raises(InvalidNodeId):
                NodeId.parse(typo)


def _presentations(node_id: NodeId) -> st.SearchStrategy[str]:
    def render(lower: bool, sep: str, with_check: bool) -> str:
        text = node_id.compact if with_check else _without_check_chars(node_id)
        text = sep.join(text[i : i + 7] for i in range(0, len(text), 7))
        return text.lower() if lower else text

    return st.builds(render, st.booleans(), st.sampled_from(["", "-", " "]), st.booleans())


def _without_check_chars(node_id: NodeId) -> str:
    c = node_id.compact
    return "".join(c[i : i + 13] for i in range(0, 56, 14))


@given(st.binary(min_size=32, max_size=32), st.data())
def test_roundtrip_property(digest: bytes, data: st.DataObject) -> None:
    node_id = NodeId(digest)
    assert NodeId.parse(str(node_id)) == node_id
    assert NodeId.parse(node_id.compact) == node_id
    assert NodeId.parse(data.draw(_presentations(node_id))) == node_id
    assert str(node_id).count("-") == 7
    assert str(node_id).replace("-", "") == node_id.compact
