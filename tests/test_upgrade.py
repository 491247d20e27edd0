"""A data folder written by the previous release (75aa76d) works with this one.

``tests/data/datafolder-75aa76d.tar.gz`` was made with the CLI of release 75aa76d
(``git archive 75aa76d``, then ``init``, ``import`` of five small CT instances made by
``syncsupport.make_dicom(uid(42, 1, i), …, pixel_bytes=2000, seed=i)`` and ``rm`` of the
first). What that release's ``status`` and ``ls`` printed is recorded below; this
release's ``status``, ``ls``, ``verify`` and ``backup`` on the same folder must agree
(the catalog is migrated on first open, see test_catalog_schema.py).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from syncsupport import run_cli as cli

from syncnode.backup import backup, restore

FOLDER = Path(__file__).parent / "data" / "datafolder-75aa76d.tar.gz"
# as release 75aa76d printed them (status --json, ls --json)
OLD_ROOT = "b69034a914388e10d0a4de1e04a2bdfd7158ebc0be9b2746d9b59950836730e2"
OLD_BLOBS = ["03dc919acd5c38d6d81f49e4e7709ff420447fc446f2003e726e44e1c869d17f",
             "215fb6292350f4de97f8fab9d5257e99672f62e86a9330dbe1fd7feecd3061d6",
             "855009f5b7413464e69e035591624fc0727eb39f2be0c3f43f453c716b2b9519",
             "9b268b972af52eb06ccf8f59546ecd16fa901d2f245ce360464cd79b1033f97e"]
UID = "1.2.826.0.1.3680043.10.1999.42.1."


def unpack(tmp_path: Path) -> Path:
    data = tmp_path / "old"
    with tarfile.open(FOLDER) as tar:
        tar.extractall(data, filter="data")
    return data


def test_previous_release_data_folder_status_ls_verify(tmp_path: Path) -> None:
    data = unpack(tmp_path)
    status = cli("status", "--data", data, "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["merkle_root"] == OLD_ROOT
    assert st["instances"] == 4 and st["events"] == 6
    listed = cli("ls", "--data", data, "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted((i["sop_instance_uid"], i["blob"]) for i in json.loads(listed.stdout)) == \
        [(f"{UID}{i}", blob) for i, blob in zip(range(1, 5), OLD_BLOBS, strict=True)]
    checked = cli("verify", "--data", data)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # and it can be backed up and restored to the same root
    made = backup(data, tmp_path / "backup")
    assert made.merkle_root == OLD_ROOT
    restore(tmp_path / "backup", tmp_path / "restored")
    again = cli("status", "--data", tmp_path / "restored", "--json")
    assert json.loads(again.stdout)["merkle_root"] == OLD_ROOT


def test_version_matches_the_package_and_the_changelog() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    shown = cli("--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"syncnode {version}"
    assert f"\n## {version} " in (root / "CHANGELOG.md").read_text()
