"""Structured logs: one line per event, key=value or JSON; UIDs and hashes, never PHI.

Callers log identifiers only (node ids, event ids, blob hashes, UIDs). Nothing in the
code path logs patient names, IDs or birth dates; reasons from DICOM inspection name
attributes, not their values.

Invariants once :func:`setup_logging` ran:

- every line written to stderr by the logging system is one record in the chosen format
  (with ``json``: a JSON object per line and nothing else). Python warnings
  (``logging.captureWarnings``) and uncaught exceptions in any thread (``sys.excepthook``,
  ``threading.excepthook``) go through the same handler instead of printing their own
  text;
- a record with an exception carries its traceback as the ``exception`` field (newlines
  inside the field: JSON-escaped, or in the quoted value of key=value), never as extra
  lines;
- every string field is passed through :func:`syncnode.safetext.clean` before rendering:
  a peer's text quoted in a message cannot move the cursor, retitle a terminal or forge a
  log line.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType
from typing import Any

import structlog

from .safetext import clean


def _clean_fields(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and not key.startswith("_"):
            event[key] = clean(value, multiline=key in ("exception", "stack"))
    return event


def configured() -> bool:
    """Whether :func:`setup_logging` ran in this process (errors should then be logged)."""
    return any(isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)
               for h in logging.getLogger().handlers)


def setup_logging(fmt: str = "kv", level: str = "info") -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.processors.KeyValueRenderer(key_order=["ts", "level", "logger", "event"]))
    pre_chain: list[structlog.types.Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", key="ts"),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info,
                    _clean_fields, renderer],
        foreign_pre_chain=pre_chain))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("syncnode").critical("uncaught exception: %s", kind.__name__,
                                           exc_info=(kind, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc_info = ((args.exc_type, args.exc_value, args.exc_traceback)
                if args.exc_value is not None else None)
    logging.getLogger("syncnode").error("uncaught exception in thread %s: %s", name,
                                        args.exc_type.__name__, exc_info=exc_info)
