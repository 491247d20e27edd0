"""The systemd unit that runs one node as a hardened service.

One template, rendered with three paths: the ``syncnode`` executable, the service user and
the data folder. ``packaging/syncnode.service`` is this template rendered with the
defaults below (a test keeps the two equal); ``syncnode service install`` writes it with
the paths of this machine. The unit:

- runs ``syncnode run`` as its own unprivileged user, ``Type=notify``: systemd sees the
  node ready once every listener is bound (``READY=1``) and restarts it when it fails or
  its event loop stops pinging the watchdog (``WatchdogSec``);
- can write only the data folder (``ProtectSystem=strict`` + ``ReadWritePaths=``), has
  no home, a private /tmp, no capabilities and no way to gain privileges;
- logs to the journal (stderr, identifier ``syncnode``): ``journalctl -u syncnode``.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_BIN = "/usr/local/bin/syncnode"
DEFAULT_USER = "syncnode"
DEFAULT_DATA = "/var/lib/syncnode"
WATCHDOG_SECONDS = 60

TEMPLATE = """\
# syncnode: one peer-to-peer DICOM sync node as a hardened systemd service.
# Install: syncnode service install --user {user} --data {data}
#   (or copy this file to /etc/systemd/system/ and adjust ExecStart, User and the paths)
[Unit]
Description=syncnode peer-to-peer DICOM sync node ({data})
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
ExecStart={bin} run --data {data}
User={user}
Group={user}
Restart=on-failure
RestartSec=5s
WatchdogSec={watchdog}s
TimeoutStartSec=120s
TimeoutStopSec=60s
KillSignal=SIGTERM
Environment=PYTHONUNBUFFERED=1
StandardOutput=journal
StandardError=journal
SyslogIdentifier=syncnode
UMask=0077
LimitNOFILE=65536

# Hardening: the node writes its data folder and nothing else.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
"""


class UnitError(Exception):
    """A path the unit would name is not usable (relative, or with spaces or newlines)."""


def render(bin_path: str = DEFAULT_BIN, user: str = DEFAULT_USER,
           data: str = DEFAULT_DATA) -> str:
    """The unit text for these paths. Paths must be absolute and free of whitespace (the
    unit would otherwise need quoting systemd and admins both get wrong)."""
    for what, value in (("executable", bin_path), ("data folder", data)):
        if not Path(value).is_absolute() or any(c.isspace() for c in value):
            raise UnitError(f"the {what} {value!r} must be an absolute path without spaces")
    if not user or not user.replace("-", "").replace("_", "").isalnum():
        raise UnitError(f"{user!r} is not a user name (letters, digits, - and _)")
    return TEMPLATE.format(bin=bin_path, user=user, data=data, watchdog=WATCHDOG_SECONDS)
