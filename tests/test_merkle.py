"""The Merkle index (pure): tree shape, prefix math, digests, the in-memory reference tree."""

from __future__ import annotations

import random

import blake3
import pytest

from syncnode import merkle
from syncnode.merkle import EMPTY, EMPTY_NODE, FANOUT, LEAF_LEVEL, MemoryMerkle, NodeDigest

HEX = "0123456789abcdef"


def raw_id(prefix_hex: str, rng: random.Random) -> bytes:
    """A random 32-byte id whose hex form starts with ``prefix_hex``."""
    rest = rng.randbytes(32).hex()
    return bytes.fromhex((prefix_hex + rest[len(prefix_hex):])[:64])


def in_range(eid: bytes, lo: bytes, hi: bytes | None) -> bool:
    return lo <= eid and (hi is None or eid < hi)


def test_shape() -> None:
    assert FANOUT == 16
    assert bytes(32) == EMPTY and NodeDigest(bytes(32), 0) == EMPTY_NODE
    assert LEAF_LEVEL >= 1


def test_leaf_index() -> None:
    rng = random.Random(1)
    assert merkle.leaf_index(bytes(32)) == 0
    assert merkle.leaf_index(b"\xff" * 32) == FANOUT ** LEAF_LEVEL - 1
    for _ in range(200):
        eid = rng.randbytes(32)
        idx = merkle.leaf_index(eid)
        assert 0 <= idx < FANOUT ** LEAF_LEVEL
        # the leaf is named by the first LEAF_LEVEL hex digits of the id
        assert merkle.prefix_of(LEAF_LEVEL, idx) == eid.hex()[:LEAF_LEVEL]


def test_prefix_index_roundtrip_at_every_level() -> None:
    assert merkle.prefix_of(0, 0) == ""
    assert merkle.index_of("") == (0, 0)
    for level in range(LEAF_LEVEL + 1):
        last = FANOUT ** level - 1
        for idx in {i for i in (0, 1, last // 2, last - 1, last) if 0 <= i <= last}:
            prefix = merkle.prefix_of(level, idx)
            assert len(prefix) == level
            assert merkle.index_of(prefix) == (level, idx)
        assert merkle.prefix_of(level, last) == "f" * level


@pytest.mark.parametrize("bad", ["g", "A", "0" * (LEAF_LEVEL + 1), " ", "-1", "0x"])
def test_invalid_prefixes(bad: str) -> None:
    with pytest.raises(ValueError):
        merkle.index_of(bad)
    with pytest.raises(ValueError):
        merkle.check_prefix(bad)


def test_id_range_every_node_of_the_first_levels() -> None:
    """Exhaustive for levels 0-2: bounds are the prefix, the last node is open-ended, and
    consecutive nodes tile the id space without gap or overlap."""
    for level in range(min(3, LEAF_LEVEL) + 1):
        n = FANOUT ** level
        prev_hi: bytes | None = None
        for idx in range(n):
            lo, hi = merkle.id_range(level, idx)
            prefix = merkle.prefix_of(level, idx)
            assert lo.hex().startswith(prefix) and set(lo.hex()[len(prefix):]) <= {"0"}
            if idx:
                assert lo == prev_hi
            else:
                assert lo == bytes(len(lo))
            if idx == n - 1:
                assert hi is None, (level, idx)
            else:
                assert hi is not None and hi == merkle.id_range(level, idx + 1)[0]
            prev_hi = hi


@pytest.mark.parametrize("level", range(LEAF_LEVEL + 1))
def test_id_range_contains_exactly_the_ids_with_its_prefix(level: int) -> None:
    rng = random.Random(level)
    last = FANOUT ** level - 1
    for idx in sorted({i for i in (0, 1, last // 3, last - 1, last) if 0 <= i <= last}):
        prefix = merkle.prefix_of(level, idx)
        lo, hi = merkle.id_range(level, idx)
        inside = [raw_id(prefix, rng) for _ in range(20)]
        inside += [bytes.fromhex((prefix + "0" * 64)[:64]), bytes.fromhex((prefix + "f" * 64)[:64])]
        for eid in inside:
            assert in_range(eid, lo, hi), (level, idx, eid.hex())
            assert merkle.leaf_index(eid) >> (4 * (LEAF_LEVEL - level)) == idx
        # the ids just outside, on both sides
        if idx > 0:
            before = merkle.prefix_of(level, idx - 1)
            assert not in_range(bytes.fromhex((before + "f" * 64)[:64]), lo, hi)
        if idx < last:
            after = merkle.prefix_of(level, idx + 1)
            assert not in_range(bytes.fromhex((after + "0" * 64)[:64]), lo, hi)


def test_last_leaf_holds_the_greatest_id() -> None:
    top = b"\xff" * 32
    lo, hi = merkle.id_range(LEAF_LEVEL, FANOUT ** LEAF_LEVEL - 1)
    assert hi is None and lo <= top
    tree = MemoryMerkle([top])
    assert tree.ids_under(LEAF_LEVEL, FANOUT ** LEAF_LEVEL - 1) == [top]
    assert tree.root().count == 1


# -- digests -------------------------------------------------------------------------------


def test_empty_tree_root_is_zero() -> None:
    root = MemoryMerkle().root()
    assert root.digest == bytes(32) and root.count == 0
    assert merkle.leaf_digest([]) == EMPTY_NODE
    assert merkle.inner_digest([EMPTY_NODE] * FANOUT) == EMPTY_NODE


def test_inner_digest_needs_sixteen_children() -> None:
    with pytest.raises(ValueError):
        merkle.inner_digest([EMPTY_NODE] * (FANOUT - 1))
    with pytest.raises(ValueError):
        merkle.inner_digest([EMPTY_NODE] * (FANOUT + 1))


def test_single_id_by_hand() -> None:
    """The documented formulas, computed here from scratch for a one-id tree."""
    eid = bytes.fromhex("a3c5" + "7" * 60)
    digest = blake3.blake3(eid).digest()
    for level in range(LEAF_LEVEL - 1, -1, -1):
        position = int(eid.hex()[level], 16)  # this child's place among its 16 siblings
        h = blake3.blake3()
        for i in range(FANOUT):
            if i == position:
                h.update(digest + (1).to_bytes(8, "big"))
            else:
                h.update(bytes(32) + bytes(8))
        digest = h.digest()
    assert MemoryMerkle([eid]).root() == NodeDigest(digest, 1)


def test_leaf_digest_is_hash_of_sorted_ids() -> None:
    rng = random.Random(2)
    ids = sorted(raw_id("beef", rng) for _ in range(5))
    want = blake3.blake3(b"".join(ids)).digest()
    assert merkle.leaf_digest(ids) == NodeDigest(want, 5)
    tree = MemoryMerkle(reversed(ids))
    assert tree.node(LEAF_LEVEL, int("beef", 16)) == NodeDigest(want, 5)


def test_digest_independent_of_insertion_order() -> None:
    rng = random.Random(3)
    ids = [rng.randbytes(32) for _ in range(300)]
    ids += [raw_id("00", rng) for _ in range(20)] + [raw_id("ffff", rng) for _ in range(5)]
    roots = set()
    for seed in range(5):
        shuffled = ids[:]
        random.Random(seed).shuffle(shuffled)
        tree = MemoryMerkle()
        for eid in shuffled + shuffled[:50]:  # duplicates change nothing
            tree.add(eid)
        roots.add(tree.root())
    assert len(roots) == 1
    (root,) = roots
    assert root.count == len(set(ids))
    assert root.digest != EMPTY


def test_root_recombines_from_children_at_every_level() -> None:
    rng = random.Random(4)
    ids = [rng.randbytes(32) for _ in range(500)] + [raw_id("1234", rng) for _ in range(3)]
    tree = MemoryMerkle(ids)
    # walk every non-empty inner node of the path towards two leaves
    for target in (merkle.leaf_index(ids[0]), int("1234", 16)):
        for level in range(LEAF_LEVEL):
            idx = target >> (4 * (LEAF_LEVEL - level))
            children = [tree.node(level + 1, idx * FANOUT + i) for i in range(FANOUT)]
            assert merkle.inner_digest(children) == tree.node(level, idx)
            assert sum(c.count for c in children) == len(tree.ids_under(level, idx))


def test_any_change_changes_the_root() -> None:
    rng = random.Random(5)
    ids = [rng.randbytes(32) for _ in range(100)]
    base = MemoryMerkle(ids).root()
    one_more = MemoryMerkle([*ids, rng.randbytes(32)]).root()
    one_less = MemoryMerkle(ids[1:]).root()
    swapped = MemoryMerkle([*ids[1:], bytes([ids[0][0]]) + bytes(31)]).root()
    assert len({base.digest, one_more.digest, one_less.digest, swapped.digest}) == 4
    assert (one_more.count, one_less.count, swapped.count) == (101, 99, 100)


def test_ids_under() -> None:
    rng = random.Random(6)
    ids = [rng.randbytes(32) for _ in range(200)]
    tree = MemoryMerkle(ids)
    assert tree.ids_under(0, 0) == sorted(ids)
    for eid in ids[:10]:
        for level in range(LEAF_LEVEL + 1):
            idx = merkle.leaf_index(eid) >> (4 * (LEAF_LEVEL - level))
            under = tree.ids_under(level, idx)
            assert eid in under
            assert under == sorted(under)
            assert all(e.hex().startswith(merkle.prefix_of(level, idx)) for e in under)
            assert tree.node(level, idx).count == len(under)
