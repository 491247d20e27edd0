"""The one sanitiser for text from the network (syncnode.safetext) and the log format.

- ``clean`` escapes every control/format/separator character (and only those), is
  idempotent, and keeps letters of any script.
- With ``setup_logging("json")``, a process that logs a peer's escape sequences, an
  exception, a Python warning and an uncaught exception in a thread writes only JSON
  lines to stderr; exceptions carry their traceback in the ``exception`` field; no line,
  raw or decoded, holds a control character.
"""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from syncnode.safetext import clean, clean_tree

EVIL = "\x1b[2J\x1b]0;title\x07"
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def test_terminal_escapes_are_escaped() -> None:
    assert clean(EVIL) == "\\x1b[2J\\x1b]0;title\\x07"
    assert clean("line\nforged=1\r") == "line\\nforged=1\\r"
    assert clean("a\u202eb\u200bc\u2028d") == "a\\u202eb\\u200bc\\u2028d"
    assert clean("\x9b31m") == "\\x9b31m"  # C1 CSI
    assert clean("\U000e0041") == "\\U000e0041"  # a tag character (Cf)


def test_ordinary_text_is_unchanged() -> None:
    for text in ("HTTP 500: internal error", "Zürich – 東京 – Ελλάδα", "C:\\dicom\\x1b", ""):
        assert clean(text) == text


def test_multiline_keeps_newlines_and_tabs_only() -> None:
    assert clean("a\n\tb\x1b", multiline=True) == "a\n\tb\\x1b"


def test_limit_cuts_and_marks() -> None:
    assert clean("x" * 50, limit=10) == "xxxxxxx..."
    assert clean("\x1b" * 5, limit=10) == "\\x1b\\x1..."


def test_clean_tree_cleans_keys_and_values() -> None:
    tree = {"peers": [{"last_error": EVIL, "n": 3, EVIL: (EVIL, None)}]}
    assert clean_tree(tree) == {"peers": [{"last_error": clean(EVIL), "n": 3,
                                           clean(EVIL): [clean(EVIL), None]}]}


@given(st.text())
def test_no_unsafe_character_survives_and_cleaning_is_idempotent(text: str) -> None:
    out = clean(text)
    assert not any(unicodedata.category(ch) in UNSAFE for ch in out)
    assert clean(out) == out
    multi = clean(text, multiline=True)
    assert not any(unicodedata.category(ch) in UNSAFE and ch not in "\n\t" for ch in multi)


LOGGING_SCRIPT = r'''
import logging, sys, threading, warnings
from syncnode.logs import setup_logging
setup_logging(sys.argv[1], "info")
log = logging.getLogger("syncnode.sync")
evil = "\x1b[2J\x1b]0;title\x07"
log.warning("sync with peer: HTTP 500: %s", evil)
try:
    raise ValueError("peer said " + evil)
except ValueError:
    log.exception("round failed")
warnings.warn("a library is unhappy " + evil)
t = threading.Thread(target=lambda: 1 / 0, name="worker")
t.start(); t.join()
raise RuntimeError("the end " + evil)
'''


def _run_logging(fmt: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, fmt], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0  # the last, uncaught exception
    assert proc.stdout == ""
    return proc.stderr.splitlines()


def test_json_logs_are_json_lines_only_with_tracebacks_as_fields() -> None:
    lines = _run_logging("json")
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) == 5, lines
    for line in lines:
        assert not any(unicodedata.category(ch) in UNSAFE for ch in line)
    for rec in records:
        assert {"ts", "level", "logger", "event"} <= set(rec)
        for value in rec.values():  # decoded too (what `jq -r` would print)
            if isinstance(value, str):
                assert "\x1b" not in value and "\x07" not in value
    by_event = {r["event"].split(":")[0]: r for r in records}
    assert "\\x1b[2J" in by_event["sync with peer"]["event"]
    failed = by_event["round failed"]
    assert failed["level"] == "error"
    assert failed["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: peer said \\x1b[2J" in failed["exception"]
    warned = next(r for r in records if r["logger"] == "py.warnings")
    assert "a library is unhappy \\x1b" in warned["event"]
    thread = next(r for r in records if "in thread worker" in r["event"])
    assert "ZeroDivisionError" in thread["exception"]
    last = records[-1]
    assert last["level"] == "critical" and "RuntimeError: the end" in last["exception"]


def test_kv_logs_are_one_line_per_record() -> None:
    lines = _run_logging("kv")
    assert len(lines) == 5, lines
    for line in lines:
        assert line.startswith("ts=") and " level=" in line
        assert not any(unicodedata.category(ch) in UNSAFE for ch in line)
    assert any("exception=" in line and "Traceback" in line for line in lines)
