"""The DICOM bridge as one service of ``syncnode run``: SCP, exporter, retriever together.

``RunningNode`` creates a :class:`DicomBridge` from the settings, calls :meth:`start`
(blocking, so from a worker thread) and :meth:`stop` at shutdown. ``start`` returns the
bound SCP port (``dicom_port`` 0 picks a free one). ``on_stored`` is called (from SCP
threads) after instances were committed, so the node can wake its sync loops at once
instead of at the next poll. Everything started here is stopped by :meth:`stop`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..catalog.attrs import Backfill
from ..config import Settings
from ..local import LocalNode
from ..rejection import reason_code
from .exporter import Exporter
from .retrieve import Retriever
from .scp import DicomServer
from .transport import Perimeter, dicom_tls_context

log = logging.getLogger("syncnode.dicom")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class DicomBridge:
    def __init__(self, node: LocalNode, settings: Settings,
                 on_stored: Callable[[], None] | None = None, *,
                 export_poll: float = 5.0, import_poll: float = 60.0,
                 backoff_base: float = 1.0, backoff_cap: float = 60.0,
                 audit: AuditLog | None = None) -> None:
        self.node = node
        self.settings = settings
        tls = None
        if settings.dicom_tls:
            identity = node.identity
            tls = dicom_tls_context(identity.cert_path, identity.key_path,
                                    Path(settings.dicom_tls_clients)
                                    if settings.dicom_tls_clients else None)
        self.server = DicomServer(node, ae_title=settings.ae_title, host=settings.dicom_host,
                                  port=settings.dicom_port, allowed_aes=settings.allowed_aes,
                                  max_pdu=settings.max_pdu, on_stored=on_stored,
                                  perimeter=Perimeter(
                                      artim_timeout=settings.dicom_artim_timeout,
                                      per_address=settings.dicom_max_pending_per_address,
                                      total=settings.dicom_max_pending),
                                  ssl_context=tls, audit=audit,
                                  destinations=settings.move_destinations(),
                                  move_associations=settings.dicom_move_associations)
        self.exporter = (Exporter(node, settings.export, ae_title=settings.ae_title,
                                  poll_interval=export_poll, backoff_base=backoff_base,
                                  backoff_cap=backoff_cap, max_pdu=settings.max_pdu,
                                  audit=audit, commitment=settings.export_commitment,
                                  reject_code=reason_code(settings.export_reject_reason),
                                  reject_codes={d: reason_code(r) for d, r in
                                                settings.export_reject_reasons.items()})
                         if settings.export else None)
        if self.exporter is not None:  # reports of commitments it asked for reach the SCP
            self.server.on_commitment_report = self.exporter.commitment_report
        self.retriever = (Retriever(node, settings.import_from, ae_title=settings.ae_title,
                                    poll_interval=import_poll)
                          if settings.import_from else None)
        # C-FIND's attribute index, filled as instances arrive (any way in)
        self.backfill = Backfill(self.server.catalog_path, node.store.path)
        node.catalog.add_listener(lambda _result: self.backfill.wake())
        self.port = 0

    def start(self) -> int:
        self.port = self.server.start()
        if not self.settings.allowed_aes and self.settings.dicom_host not in LOOPBACK_HOSTS:
            log.warning("DICOM SCP on %s:%d accepts any calling AE title: set allowed_aes "
                        "(e.g. [\"MODALITY1\", \"PACS@10.0.0.5\"]) in %s/config.toml",
                        self.settings.dicom_host, self.port, self.settings.data)
        try:
            self.backfill.start()
            if self.exporter is not None:
                self.exporter.start()
            if self.retriever is not None:
                self.retriever.start()
        except BaseException:
            self.stop()
            raise
        return self.port

    def stop(self) -> None:
        if self.retriever is not None:
            self.retriever.stop()
        if self.exporter is not None:
            self.exporter.stop()
        self.server.stop()
        self.backfill.stop()

    def wake_exporter(self) -> None:
        if self.exporter is not None:
            self.exporter.wake()

    def status(self) -> dict[str, Any]:
        st = self.server.stats
        return {
            "ae_title": self.settings.ae_title, "port": self.port,
            "tls": self.server.ssl_context is not None,
            "associations": st.associations,
            "stored": st.stored, "duplicates": st.duplicates, "failed": st.failed,
            "rejected_associations": st.rejected_associations, "finds": st.finds,
            "find_index_backfilled": self.backfill.indexed,
            "refused_connections": self.server.refused_connections(),
            "export": self.node.catalog.outbox.status() if self.exporter else {},
            "import_from": {s.address: s.status()
                            for s in (self.retriever.sources if self.retriever else [])},
        }
