"""Text from the network made safe to show: the one sanitiser for terminals, logs and the dashboard.

Peers, PACS and LAN neighbours send text we display: HTTP error bodies, DICOM Error
Comments, discovered names and URLs, exception messages quoting any of those. Shown raw,
``\\x1b[2J`` clears an operator's terminal, ``\\x1b]0;...\\x07`` retitles it, a newline
forges a log line, and U+202E reorders what is read. :func:`clean` escapes every such
character as Python would write it (``\\x1b``, ``\\n``, ``\\u202e``) and leaves
everything else, including non-ASCII letters, as it is.

Invariants: the result of :func:`clean` contains no character of Unicode category Cc
(controls, C0/C1, DEL), Cf (format: bidi overrides, zero-width), Cs (lone surrogates),
Zl or Zp (line/paragraph separators), except ``\\n`` and ``\\t`` when ``multiline`` is
asked for; it is idempotent on its own output; it is pure (no I/O).
"""

from __future__ import annotations

import unicodedata
from typing import Any, TypeVar, cast

T = TypeVar("T")

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_KEPT_MULTILINE = frozenset("\n\t")


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(text: object, *, multiline: bool = False, limit: int | None = None) -> str:
    """``text`` (made a string) with every control or invisible formatting character
    escaped. ``multiline`` keeps newlines and tabs (a traceback); ``limit`` cuts the
    result to that many characters, marking the cut with ``...``."""
    s = text if isinstance(text, str) else str(text)
    if not (s.isascii() and s.isprintable()):
        s = "".join(
            ch if (multiline and ch in _KEPT_MULTILINE)
            or unicodedata.category(ch) not in _UNSAFE_CATEGORIES else _escape(ch)
            for ch in s)
    if limit is not None and len(s) > limit:
        s = s[:max(limit - 3, 0)] + "..."
    return s


def clean_tree(value: T) -> T:
    """A copy of a JSON-like structure (dicts, lists, tuples, scalars) with every string,
    keys included, passed through :func:`clean` (tuples become lists, as in JSON)."""
    return cast(T, _clean_any(value))


def _clean_any(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {_clean_any(k): _clean_any(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_any(v) for v in value]
    return value
