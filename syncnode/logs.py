"""Structured logs: one line per event, key=value or JSON; UIDs and hashes, never PHI.

Callers log identifiers only (node ids, event ids, blob hashes, UIDs). Nothing in the
code path logs patient names, IDs or birth dates; reasons from DICOM inspection name
attributes, not their values.
"""

from __future__ import annotations

import logging
import sys

import structlog


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
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=pre_chain))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
