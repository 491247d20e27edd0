"""Write a small catalog with the code of an earlier release, for the migration tests.

The catalog module of release ``--rev`` is taken from git history and run against the
current events/Merkle code (its event format is the current one): it records local
puts, a newer version of one instance, a local delete, a peer's put and delete, and a
tombstone naming a put not received. The file is checkpointed and switched out of WAL
mode so that it is self-contained, e.g.:

    python3 tools/make_old_catalog.py --rev 75aa76d --out tests/data/catalog-75aa76d.db
"""

from __future__ import annotations

import argparse
import importlib.util
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncnode import events as ev  # noqa: E402
from syncnode.blobstore import BlobInfo  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY, SERIES = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.1.1"


def h(text: str) -> str:
    return blake3.blake3(text.encode()).hexdigest()


def old_catalog_module(rev: str) -> object:
    """``syncnode/catalog.py`` as it was at ``rev``, loaded inside the syncnode package."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:syncnode/catalog.py"],
                            check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp())
    path = folder / "old_catalog.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"syncnode._catalog_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "syncnode"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def attrs(sop: str) -> dict[str, str]:
    return {"sop_instance_uid": sop, "sop_class_uid": CT, "study_instance_uid": STUDY,
            "series_instance_uid": SERIES, "patient_id": "SYNTH-1", "modality": "CT",
            "study_date": "20240101", "transfer_syntax_uid": "1.2.840.10008.1.2.1"}


def blob(tag: str) -> BlobInfo:
    return BlobInfo(h("blob:" + tag), 1000 + len(tag), (h("chunk:" + tag),), created=True)


def build(out: Path, rev: str) -> None:
    old = old_catalog_module(rev)
    out.unlink(missing_ok=True)
    cat = old.Catalog(out, node_id="OLDNODE")  # type: ignore[attr-defined]
    sops = [f"{STUDY}.{i}" for i in range(1, 9)]
    cat.add_local_puts([(attrs(s), blob(s)) for s in sops])
    cat.add_local_puts([(attrs(sops[0]), blob(sops[0] + "/v2"))])  # a newer version
    cat.delete_instances([sops[1]])
    peer_put = ev.encode(ev.PutEvent(
        origin="PEERNODE", hlc=ev.hlc_tick(0), blob=h("peer blob"), size=2000,
        chunks=h("peer chunks"), sop_class_uid=CT, sop_instance_uid=f"{STUDY}.100",
        series_instance_uid=SERIES, study_instance_uid=STUDY, patient_id="SYNTH-2",
        modality="MR"))
    peer_delete = ev.encode(ev.DeleteEvent(
        origin="PEERNODE", hlc=ev.hlc_tick(0) + 5, sop_instance_uid=f"{STUDY}.101",
        removes=(h("a put never received"),)))
    cat.apply([(ev.event_id(b), b) for b in (peer_put, peer_delete)])
    cat.add_peer("PEERNODE", "https://peer.example:8443")
    cat.close()
    db = sqlite3.connect(out)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("VACUUM")
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="75aa76d", help="git revision of the old release")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    build(args.out, args.rev)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
