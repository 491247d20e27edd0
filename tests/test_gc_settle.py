"""A running node freezes what it made while starting and collects young objects less
often (``syncnode.node.settle_gc``), yet reference cycles made afterwards are still
collected: the collector is spared, not switched off."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from syncnode.node import GC_YOUNG_THRESHOLD, settle_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settle_gc_freezes_startup_objects_and_still_collects_cycles(restored_gc: None
                                                                     ) -> None:
    gc.unfreeze()
    made_at_start = [_Cycle() for _ in range(100)]
    settle_gc()
    assert gc.get_freeze_count() >= len(made_at_start)
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    start_ids = {id(c) for c in made_at_start}
    # frozen: out of the generations the collector walks
    assert not any(id(o) in start_ids for o in gc.get_objects())
    later = _Cycle()
    gone = weakref.ref(later)
    del later
    assert gone() is not None  # a cycle: reference counting alone does not free it
    gc.collect()
    assert gone() is None  # the collector still frees cycles made after settling
