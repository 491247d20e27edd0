"""systemd's readiness and watchdog protocol (``sd_notify``), without a dependency.

When systemd starts ``syncnode run`` from a ``Type=notify`` unit it sets ``NOTIFY_SOCKET``
(a unix datagram socket; a leading ``@`` names one in the abstract namespace). ``run``
sends ``READY=1`` once every listener is bound, ``WATCHDOG=1`` every half of
``WATCHDOG_USEC`` while its event loop turns (a hung loop stops the pings and systemd
restarts the node), and ``STOPPING=1`` on the way out. Without ``NOTIFY_SOCKET`` every
call does nothing. A failed send is logged, never raised: the node keeps serving.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("syncnode.sdnotify")


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; True if a datagram was sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("telling systemd %s failed (NOTIFY_SOCKET=%s): %s", state.split("=")[0],
                    env.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of systemd's ``WATCHDOG_USEC``), or
    None when no watchdog is asked for this process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
