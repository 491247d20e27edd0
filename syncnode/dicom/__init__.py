"""The DICOM bridge: the node's SCP, its C-FIND queries, the exporter and the retriever.

- :mod:`.scp`: C-ECHO, C-STORE (streamed byte for byte into the blob store, success only
  once durable), C-FIND over the catalog (:mod:`.query`).
- :mod:`.exporter`: instances that arrived from peers go to the local PACS by C-STORE,
  from a durable outbox, with retries; done only on a success status.
- :mod:`.retrieve`: poll a PACS with C-FIND and retrieve new studies with C-MOVE to us.
- :mod:`.transport`: pynetdicom adapted (capped PDU reads, TCP_NODELAY, no 1 ms polling).

Importing this package quietens pynetdicom's per-message logging, which would otherwise
print C-FIND identifiers (patient IDs) and costs time per message. Nothing here logs
patient names, IDs or birth dates.
"""

from __future__ import annotations

import logging

from pynetdicom import _config as _pynetdicom_config

_pynetdicom_config.LOG_HANDLER_LEVEL = "none"
_pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
_pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
# Connection failures are reported by the exporter/retriever with their retry plan.
logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
