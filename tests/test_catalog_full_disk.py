"""The catalog on a disk that fills up during a write: nothing of the failed transaction
shows, in SQLite or in memory, and the next write works once space returns.

The catalog lives on a small tmpfs the test mounts (root only) and unmounts; a filler file
takes every free byte before the write. With the default page cache the transaction's pages
stay in memory until ``COMMIT``, which must grow the write-ahead log and fails with
SQLITE_FULL there (SQLite then rolls the transaction back itself); with a tiny cache the
pages spill into the log mid-transaction and a statement fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from syncsupport import fill_disk
from test_catalog import check_merkle, foreign_put, new_catalog

from syncnode import merkle
from syncnode.blobstore import BlobStore, StoreFull
from syncnode.catalog import Catalog, CatalogError, CatalogFull

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a tmpfs needs root")


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mnt = tmp_path_factory.mktemp("catalog-disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=30)


def state(c: Catalog) -> tuple[object, ...]:
    """Everything a reader of the catalog sees (events, live view, Merkle index, origins)."""
    eids = c.all_event_ids()
    return (eids, c.merkle_root(), c.recompute_merkle(), c.check_derived(),
            sorted(i.sop_instance_uid for i in c.instances()), c.counts(),
            sorted(c.certificates_for(eids)))


@pytest.mark.parametrize("cache_pages", [None, 4], ids=["at-commit", "mid-transaction"])
def test_a_write_that_fills_the_disk_changes_nothing_and_the_next_one_works(
        small_disk: Path, cache_pages: int | None) -> None:
    folder = small_disk / f"cache-{cache_pages}"
    folder.mkdir()
    c = new_catalog(folder / "catalog.db")
    try:
        c.apply([foreign_put("NODEA", 1000 + i, f"1.2.3.{i}") for i in range(20)])
        if cache_pages is not None:  # pages spill into the log before COMMIT
            c._db.execute(f"PRAGMA cache_size={cache_pages}")
        before = state(c)
        # NODEB's first events: its certificate is stored with them (and its key cached)
        batch = [foreign_put("NODEB", 5000 + i, f"1.2.4.{i}") for i in range(300)]
        filler = fill_disk(small_disk)
        try:
            with pytest.raises(CatalogFull, match="no space left") as failed:
                c.apply(batch)
            assert isinstance(failed.value, StoreFull) and isinstance(failed.value, CatalogError)
            assert str(folder) in str(failed.value)
            assert not c._db.in_transaction  # no transaction left open to block the next
            assert state(c) == before  # in memory too: the root shows no event not stored
        finally:
            filler.unlink()
        more = [foreign_put("NODEC", 9000 + i, f"1.2.5.{i}") for i in range(5)]
        assert len(c.apply(more).inserted) == 5
        check_merkle(c)  # incremental == recomputed, every inner node from its children
        assert c.event_count() == 25
        assert len(c.apply(batch).inserted) == 300  # the failed batch, sent again
        check_merkle(c)
        eids = [e for e, _ in batch]
        # NODEB's certificate is stored again with its events: served with them to others
        assert len(c.certificates_for(eids[:1])) == 1
        reference = merkle.MemoryMerkle(bytes.fromhex(e) for e in c.all_event_ids()).root()
        assert c.merkle_root() == reference and reference.count == 325
    finally:
        c.close()


def test_room_promised_to_transfers_under_way_is_not_promised_twice(small_disk: Path) -> None:
    """Pulls check the free space before they write; those under way have not written yet,
    so what they were promised counts as taken, or together they eat the reserve the
    catalog's commits need (and the disk fills during a commit)."""
    store = BlobStore(small_disk / "node")
    other = BlobStore(small_disk / "node")  # e.g. the DICOM SCP's object on the same folder
    free = store.free_bytes()
    first = store.promise_room(free - 100_000, reserve=0)
    assert other.promised_bytes == free - 100_000
    with pytest.raises(StoreFull, match="promised to transfers under way"):
        other.promise_room(200_000, reserve=0)
    with pytest.raises(StoreFull):
        store.ensure_room(200_000, reserve=0)
    store.ensure_room(50_000, reserve=0)
    first.release()
    first.release()  # once only
    assert store.promised_bytes == 0
    other.promise_room(200_000, reserve=0).release()
    assert store.promised_bytes == 0
