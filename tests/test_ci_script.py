"""The CI entry point installs what the suite needs and leaves other services alone.

`.ci/run` may run on a hospital server whose Orthanc is the production PACS: it must never
stop, restart or kill a process or service it did not start. The tests start their own
Orthanc instances on free loopback ports (``tools/dicom_testkit.Orthanc``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "run"

# Anything that ends or reconfigures processes or services it did not start.
FORBIDDEN = re.compile(
    r"\b(pkill|killall|kill|systemctl\s+(stop|restart|kill|disable|mask|reload)|"
    r"service\s+\S+\s+(stop|restart)|invoke-rc\.d|fuser\s+-k)\b")


def _commands() -> list[str]:
    """The script's lines without comments (a '#' inside quotes is not used there)."""
    lines = []
    for raw in SCRIPT.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#!") else ""
        if line:
            lines.append(line)
    return lines


def test_ci_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_ci_script_stops_no_process_it_did_not_start() -> None:
    offending = [c for c in _commands() if FORBIDDEN.search(c)]
    assert offending == [], f".ci/run must not stop other processes: {offending}"


@pytest.mark.parametrize("package", ["dcmtk", "orthanc", "orthanc-dicomweb", "rsyslog",
                                     "rsyslog-gnutls", "systemd", "openssl", "curl",
                                     "chromium", "avahi-daemon", "iproute2"])
def test_ci_script_installs_what_the_tests_use(package: str) -> None:
    text = "\n".join(_commands())
    assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", text), \
        f"{package} is not in .ci/run's package list"


def test_ci_script_installs_the_viewer_the_browser_test_needs() -> None:
    text = "\n".join(_commands())
    assert "syncnode.cli viewer install --dir .cache/viewer" in text
    assert re.search(r"SYNCNODE_TEST_VIEWER=\S*\.cache/viewer", text)
    assert "SYNCNODE_CI=1" in text  # so the browser test fails instead of skipping


def test_forbidden_pattern_catches_the_old_commands() -> None:
    # The two lines the script used to have must be caught by the check above.
    for line in ("systemctl stop orthanc >/dev/null 2>&1 || true",
                 "pkill -x Orthanc >/dev/null 2>&1 || true"):
        assert FORBIDDEN.search(line)


def test_test_orthanc_uses_free_ports(tmp_path: Path) -> None:
    import sys
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import dicom_testkit as kit
    finally:
        sys.path.remove(str(ROOT / "tools"))
    o = kit.Orthanc(tmp_path)
    cfg = o.config()
    assert {cfg["DicomPort"], cfg["HttpPort"]}.isdisjoint({4242, 8042})
    assert cfg["RemoteAccessAllowed"] is False
