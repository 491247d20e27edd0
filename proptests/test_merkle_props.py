"""Properties of the Merkle index over arbitrary id sets (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from syncnode import merkle
from syncnode.merkle import EMPTY_NODE, FANOUT, LEAF_LEVEL, MemoryMerkle

SETTINGS = settings(max_examples=60, deadline=None)

# Ids spread over the whole space, and ids crowded under a few prefixes (so that leaves
# and inner nodes hold several ids, and the first and last nodes of each level are used).
_random_id = st.binary(min_size=32, max_size=32)
_crowded_id = st.builds(
    lambda head, tail: bytes.fromhex(head) + tail,
    st.sampled_from(["0000", "0001", "00ff", "7fff", "8000", "abcd", "fff0", "ffff"]),
    st.binary(min_size=30, max_size=30),
)
ids_strategy = st.sets(st.one_of(_random_id, _crowded_id), max_size=120)


def recombined(tree: MemoryMerkle, level: int, idx: int) -> merkle.NodeDigest:
    """A node's digest rebuilt bottom-up from leaf id lists only, via inner_digest."""
    if level == LEAF_LEVEL:
        return merkle.leaf_digest(tree.ids_under(level, idx))
    if not tree.ids_under(level, idx):
        return EMPTY_NODE
    return merkle.inner_digest([recombined(tree, level + 1, idx * FANOUT + i)
                                for i in range(FANOUT)])


@SETTINGS
@given(ids_strategy)
def test_root_equals_recombination_of_children(ids: set[bytes]) -> None:
    tree = MemoryMerkle(ids)
    root = tree.root()
    assert root == recombined(tree, 0, 0)
    assert root == merkle.inner_digest([tree.node(1, i) for i in range(FANOUT)])


@SETTINGS
@given(ids_strategy)
def test_count_equals_set_size(ids: set[bytes]) -> None:
    tree = MemoryMerkle(ids)
    assert tree.root().count == len(ids)
    assert tree.ids_under(0, 0) == sorted(ids)
    assert sum(tree.node(1, i).count for i in range(FANOUT)) == len(ids)
    assert (tree.root().digest == bytes(32)) == (not ids)


@SETTINGS
@given(ids_strategy, st.one_of(_random_id, _crowded_id))
def test_adding_an_id_changes_the_root(ids: set[bytes], new: bytes) -> None:
    before = MemoryMerkle(ids).root()
    after = MemoryMerkle([*ids, new]).root()
    if new in ids:
        assert after == before
    else:
        assert after.digest != before.digest
        assert after.count == before.count + 1


@SETTINGS
@given(ids_strategy, st.randoms(use_true_random=False))
def test_root_independent_of_order_and_duplicates(ids: set[bytes], rng) -> None:
    ordered = sorted(ids)
    shuffled = list(ids) + ordered[: len(ordered) // 2]
    rng.shuffle(shuffled)
    assert MemoryMerkle(ordered).root() == MemoryMerkle(shuffled).root()


@SETTINGS
@given(ids_strategy)
def test_every_id_is_in_the_node_its_prefix_names(ids: set[bytes]) -> None:
    tree = MemoryMerkle(ids)
    for eid in list(ids)[:10]:
        for level in range(LEAF_LEVEL + 1):
            level_, idx = merkle.index_of(eid.hex()[:level])
            assert level_ == level
            lo, hi = merkle.id_range(level, idx)
            assert lo <= eid and (hi is None or eid < hi)
            assert eid in tree.ids_under(level, idx)
