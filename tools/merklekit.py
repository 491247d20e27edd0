"""An in-memory :class:`syncnode.protocol.MerkleSource` over a plain set of event ids, for
tests of the Merkle walk and of hello's lacking ids: the reference tree
(:class:`syncnode.merkle.MemoryMerkle`), with no catalog behind it."""

from __future__ import annotations

import random

from syncnode import merkle


class _Memo(merkle.MemoryMerkle):
    """The reference tree, each node computed once and empty subtrees known up front (the
    ids never change here): the reference recomputes from every leaf at each node."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(bytes.fromhex(i) for i in ids)
        self._memo: dict[tuple[int, int], merkle.NodeDigest] = {}
        self._occupied = {(level, li >> 4 * (merkle.LEAF_LEVEL - level))
                          for li in self.leaves for level in range(merkle.LEAF_LEVEL + 1)}

    def node(self, level: int, index: int) -> merkle.NodeDigest:
        found = self._memo.get((level, index))
        if found is None:
            if level == merkle.LEAF_LEVEL:
                found = merkle.leaf_digest(sorted(self.leaves.get(index, ())))
            elif (level, index) not in self._occupied:
                found = merkle.EMPTY_NODE
            else:
                found = merkle.inner_digest([self.node(level + 1, index * merkle.FANOUT + i)
                                             for i in range(merkle.FANOUT)])
            self._memo[level, index] = found
        return found


class MemorySource:
    """A :class:`protocol.MerkleSource` over a plain set of ids."""

    def __init__(self, ids: set[str]) -> None:
        self.tree = _Memo(ids)
        self._nodes: dict[str, merkle.NodeDigest] = {}  # the reference tree recomputes

    def merkle_node(self, prefix: str = "") -> merkle.NodeDigest:
        if prefix not in self._nodes:
            self._nodes[prefix] = self.tree.node(*merkle.index_of(prefix))
        return self._nodes[prefix]

    def merkle_children(self, prefix: str) -> list[merkle.NodeDigest]:
        return [self.merkle_node(prefix + c) for c in "0123456789abcdef"]

    def ids_under(self, prefix: str, limit: int | None = None) -> list[str]:
        return [e.hex() for e in self.tree.ids_under(*merkle.index_of(prefix))][:limit]


def random_ids(rng: random.Random, n: int) -> set[str]:
    return {rng.randbytes(32).hex() for _ in range(n)}
