"""One exit-code table for every command (README "Commands"), table-driven:

0 done; 1 the command ran but found problems or nothing matched; 2 it could not run as given
(usage, a malformed id / UID / URL, a bad setting, no node in the folder). The CLI runs
in-process (typer's runner): the codes are the ones a shell sees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from syncnode.cli import app
from syncnode.local import LocalNode

runner = CliRunner()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("codes")
    a, b = LocalNode.init(root / "a"), LocalNode.init(root / "b")
    (root / "not-dicom.txt").write_text("hello")
    bad = LocalNode.init(root / "badconf")
    (root / "badconf" / "config.toml").write_text('sync_interval = "fast"\n')
    yield {"a": str(a.data), "other_id": str(b.node_id), "own_id": str(a.node_id),
           "empty": str(root / "nothing-here"), "txt": str(root / "not-dicom.txt"),
           "badconf": str(bad.data)}
    for n in (a, b, bad):
        n.close()


CASES = [
    # (command line, exit code, a fragment of the message)
    (["id", "--data", "{empty}"], 2, "syncnode init"),
    (["status", "--data", "{a}"], 0, ""),
    (["peer", "add", "NOT-AN-ID", "https://127.0.0.1:1", "--data", "{a}"], 2, ""),
    (["peer", "add", "{other_id}", "http://127.0.0.1:8443", "--data", "{a}"], 2,
     "mutual TLS"),
    (["peer", "add", "{other_id}", "https://127.0.0.1", "--data", "{a}"], 2, "no port"),
    (["peer", "add", "{other_id}", "https://127.0.0.1:8443/x", "--data", "{a}"], 2,
     "scheme, host and port"),
    (["peer", "add", "{own_id}", "https://127.0.0.1:8443", "--data", "{a}"], 2, "own id"),
    (["peer", "remove", "{other_id}", "--data", "{a}"], 1, "not a trusted peer"),
    (["peer", "remove", "garbage!", "--data", "{a}"], 2, ""),
    (["peer", "accept", "{other_id}", "--data", "{a}"], 1, "not been seen"),
    (["rm", "1.2.826.0.1.3680043.10.1999.9", "--data", "{a}"], 1, "nothing matched"),
    (["rm", "not-a-uid", "--data", "{a}"], 2, ""),
    (["rm", "--data", "{a}"], 2, "give SOP Instance UIDs"),
    (["ls", "--study", "1.2.x", "--data", "{a}"], 2, ""),
    (["import", "{empty}", "--data", "{a}"], 2, "no such file"),
    (["import", "{txt}", "--data", "{a}"], 1, ""),
    (["verify", "--data", "{a}"], 0, ""),
    (["config", "set", "sync_interval", "fast", "--data", "{a}"], 2, "sync_interval"),
    (["config", "set", "verify_interval", "weekly", "--data", "{a}"], 2, "7d"),
    (["config", "show", "--data", "{badconf}"], 2, "config.toml: sync_interval"),
    (["run", "--data", "{badconf}"], 2, "config.toml: sync_interval"),
    (["apikey", "rotate", "owner", "--data", "{a}"], 2, ""),
    (["no-such-command"], 2, ""),
]


@pytest.mark.parametrize(("args", "code", "fragment"), CASES,
                         ids=[" ".join(c[0][:3]) for c in CASES])
def test_exit_code_table(nodes: dict[str, str], args: list[str], code: int,
                         fragment: str) -> None:
    argv = [a.format(**nodes) for a in args]
    result = runner.invoke(app, argv)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, (argv, result.exit_code, text)
    assert fragment in " ".join(text.split()), text


def test_damage_found_by_verify_is_1(tmp_path: Path) -> None:
    import pydicom

    node = LocalNode.init(tmp_path / "n")
    src = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    assert runner.invoke(app, ["import", str(src), "--data", str(node.data)]).exit_code == 0
    blob = node.catalog.instances()[0].blob
    path = node.store.path(blob)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", "--data", str(node.data)])
    assert result.exit_code == 1 and f"DAMAGED {blob}" in result.output
    # and the result is what `status` shows as the last verify
    shown = runner.invoke(app, ["status", "--data", str(node.data)])
    assert shown.exit_code == 0 and "1 PROBLEMS" in shown.output, shown.output
    node.close()
