"""Node configuration: one schema, four layers.

Precedence, highest first: command-line flags > ``SYNCNODE_*`` environment variables >
the config file ``<data>/config.toml`` > the defaults below. Every key has the same name
in all four (flag ``--dicom-port``, variable ``SYNCNODE_DICOM_PORT``, file key
``dicom_port``). An invalid value is refused when the node starts, with a message naming
the key and the reason.
"""

from __future__ import annotations

import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .durable import atomic_write

CONFIG_FILE = "config.toml"
_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")
_EXPORT_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")

# Keys that take effect only after `syncnode run` restarts.
RESTART_KEYS = frozenset({"dicom_port", "ae_title", "peer_host", "peer_port", "api_host",
                          "api_port", "api_tls", "api_tls_cert", "api_tls_key", "discovery",
                          "log_format", "max_pdu", "dicom_host", "allowed_aes",
                          "dicom_artim_timeout", "dicom_max_pending_per_address",
                          "dicom_max_pending", "audit_syslog", "audit_syslog_ca", "audit_site",
                          "dicom_tls", "dicom_tls_clients", "audit_patient_ids",
                          "dicom_destinations", "dicom_move_associations"})


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


def check_ae_title(value: str) -> str:
    if not _AE_RE.fullmatch(value):
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash, "
                         "not only spaces")
    return value


def parse_ae_address(value: str) -> tuple[str, str, int]:
    """``AE@HOST:PORT`` -> (ae, host, port)."""
    m = _EXPORT_RE.fullmatch(value.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"{value!r} is not AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
    return check_ae_title(m["ae"]), m["host"], int(m["port"])


_INTERVAL_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


class InvalidInterval(ValueError):
    """A duration that is not a number of seconds nor N followed by s, m, h, d or w."""


def parse_interval(value: object) -> float:
    """``7d`` -> 604800.0; ``90`` or ``90s`` -> 90.0; ``0`` -> 0.0 (off)."""
    if isinstance(value, bool):
        raise InvalidInterval(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _INTERVAL_RE.fullmatch(str(value).lower())
        if not m:
            raise InvalidInterval(f"{str(value)[:30]!r} is not a duration: write e.g. 7d, "
                                  "12h, 30m, 90s or 0 (off)")
        seconds = float(m[1]) * _UNITS[m[2]]
    if not 0 <= seconds <= 366 * 86_400:
        raise InvalidInterval(f"{value!r}: a duration from 0 (off) to 366d")
    return seconds


class Settings(BaseSettings):
    """Every setting of a node. Field names are the config-file keys."""

    model_config = SettingsConfigDict(env_prefix="SYNCNODE_", extra="forbid",
                                      validate_default=True)

    data: Path = Field(Path("syncnode-data"), description="data folder")
    dicom_port: int = Field(11112, ge=0, le=65535, description="DICOM SCP port (0 = any free)")
    dicom_host: str = Field("0.0.0.0", description="address the DICOM SCP listens on")
    ae_title: str = Field("SYNCNODE", description="AE title of the DICOM SCP")
    allowed_aes: list[str] = Field(default_factory=list,
                                   description="calling AE titles accepted, AE or AE@HOST "
                                               "(empty = any)")
    max_pdu: int = Field(262_144, ge=4096, le=16_777_216,
                         description="largest PDU the SCP reads, in bytes")
    dicom_artim_timeout: float = Field(
        10.0, gt=0, le=300, description="seconds a DICOM connection may take to send its "
                                        "A-ASSOCIATE-RQ before it is closed (ARTIM)")
    dicom_max_pending_per_address: int = Field(
        8, ge=1, le=1024, description="DICOM connections one address may hold open before "
                                      "associating; more evict the oldest")
    dicom_max_pending: int = Field(
        128, ge=1, le=65536, description="DICOM connections all addresses together may hold "
                                         "open before associating; more evict the oldest")
    dicom_tls: bool = Field(False, description="DICOM TLS (PS3.15 B.1) on the SCP port, "
                                               "with the node's certificate")
    dicom_tls_clients: str = Field("", description="PEM file of the CA or client "
                                                   "certificates a DICOM TLS client must "
                                                   "present one of (empty = none asked)")
    peer_host: str = Field("0.0.0.0", description="address the peer server listens on")
    peer_port: int = Field(8443, ge=0, le=65535, description="peer (mutual TLS) port")
    api_host: str = Field("127.0.0.1", description="admin API address")
    api_port: int = Field(8080, ge=0, le=65535, description="admin API port")
    api_key: str = Field("", description="an extra admin key given in clear (environment); "
                                         "prefer the hashed keys of `syncnode apikey`")
    api_tls: Literal["auto", "on", "off"] = Field(
        "auto", description="HTTPS for the admin API: auto = on unless bound to loopback; "
                            "off is refused off loopback")
    api_tls_cert: str = Field("", description="certificate (PEM) for the admin API "
                                              "(default: the node's own node.crt)")
    api_tls_key: str = Field("", description="its private key (PEM; default: node.key)")
    api_names: list[str] = Field(default_factory=list,
                                 description="host names the admin API is reached by, beyond "
                                             "localhost and the addresses it listens on")
    viewer_dir: str = Field("", description="folder of the web viewer served at /viewer/ "
                                            "(`syncnode viewer install`; empty = DATA/viewer; "
                                            "relative = inside DATA)")
    dicomweb_cors_origins: list[str] = Field(
        default_factory=list, description="origins (scheme://host[:port]) whose web pages may "
                                          "call /dicom-web/ (e.g. a viewer served elsewhere); "
                                          "empty = none")
    dicomweb_max_request_bytes: int = Field(2 << 30, ge=1 << 20,
                                            description="bytes: a larger STOW-RS request is "
                                                        "refused (413), nothing stored")
    dicomweb_read_timeout: float = Field(30.0, gt=0, le=3600,
                                         description="seconds a STOW-RS upload may go without "
                                                     "sending data before it is dropped (408)")
    export: list[str] = Field(default_factory=list,
                              description="local PACS to deliver to, AE@HOST:PORT")
    export_commitment: list[str] = Field(
        default_factory=list, description="export destinations (AE title or AE@HOST:PORT "
                                          "of `export`) that are asked for storage "
                                          "commitment of what they took")
    export_reject_reason: str = Field(
        "quality", description="reason of the rejection notes that tell the export PACS "
                               "about deletes given no reason (peers' tombstones; `rm` "
                               "without --reason): quality, safety, worklist or retention "
                               "(or the code 113001/113037/113038/113039)")
    export_reject_reasons: dict[str, str] = Field(
        default_factory=dict, description="per export destination (AE title or "
                                          "AE@HOST:PORT of `export`): its own "
                                          "export_reject_reason")
    import_from: list[str] = Field(default_factory=list,
                                   description="PACS to poll and retrieve from, AE@HOST:PORT")
    dicom_destinations: dict[str, str] = Field(
        default_factory=dict, description="C-MOVE destinations this node sends to, "
                                          "AE title -> HOST:PORT")
    dicom_move_associations: int = Field(
        4, ge=1, le=16, description="associations a large C-MOVE opens to its destination "
                                    "at most (one per 20 instances), sending in parallel")
    # Off unless asked for: announcing a node that holds patient data is an operator's choice.
    discovery: bool = Field(False, description="advertise and browse on the LAN (mDNS)")
    sync_interval: float = Field(5.0, gt=0, le=3600,
                                 description="seconds between sync rounds per peer")
    max_pulls: int = Field(8, ge=1, le=64,
                           description="blobs pulled (or pushed) at once per peer at the "
                                       "start: the adaptive window grows or shrinks from "
                                       "there with the measured throughput")
    max_window: int = Field(32, ge=1, le=256,
                            description="the most blobs pulled (or pushed) at once per "
                                        "peer: the adaptive window's ceiling")
    bandwidth_caps: dict[str, str] = Field(
        default_factory=dict,
        description="bandwidth caps of blob bytes: scope (in, out, NODEID:in, NODEID:out) "
                    "-> schedule, e.g. '2MB/s 07:00-19:00 Mon-Fri, unlimited otherwise' "
                    "(see README, Bandwidth caps)")
    max_blob_size: int = Field(64 << 30, ge=1 << 20,
                               description="bytes: a peer announcing a larger blob (event or "
                                           "push offer) is refused before anything is "
                                           "written")
    min_pull_rate: int = Field(64 * 1024, ge=1,
                               description="bytes/s a pull must average: past 60 s plus the "
                                           "blob's size at this rate it is dropped and the "
                                           "blob can come from another peer")
    compression: Literal["auto", "on", "off"] = Field(
        "auto", description="zstd on the wire for blob pulls: auto = for peers not on this "
                            "machine and instances not already compressed")
    audit_syslog: str = Field("", description="IHE ATNA collector, HOST:PORT: every audit "
                                              "entry is also sent there as a DICOM audit "
                                              "message over syslog/TLS (empty = off)")
    audit_syslog_ca: str = Field("", description="PEM file of the CA the collector's "
                                                 "certificate must chain to (empty = the "
                                                 "system's CAs)")
    audit_site: str = Field("", description="AuditEnterpriseSiteID in audit messages")
    # Certificates (syncnode.renewal, syncnode.tls.truststore).
    cert_grace_days: float = Field(30.0, ge=0, le=3650,
                                   description="days a renewed certificate's old one stays "
                                               "accepted (cert renew)")
    crl_file: str = Field("", description="the cluster CA's revocation list (crl.pem from "
                                          "`syncnode ca revoke`); empty = crl.pem in the "
                                          "data folder; re-read when it changes")
    # Rules for received events (syncnode.authority): safe unless the operator widens them.
    may_delete: list[str] = Field(default_factory=list,
                                  description="node ids whose deletes remove instances "
                                              "that other nodes made (beside each put's "
                                              "own origin and this node)")
    delete_authority: Literal["origin", "any"] = Field(
        "origin", description="origin = a delete removes a put only if made by the put's "
                              "origin, this node or a may_delete node; any = by any node")
    accept_unsigned_events: bool = Field(
        False, description="take unsigned events from peers (made before event signing); "
                           "only while a cluster upgrades")
    max_clock_skew: float = Field(86_400.0, gt=0, le=365 * 86_400.0,
                                  description="seconds an event's clock may be ahead of "
                                              "this node's clock")
    max_unknown_tombstones: int = Field(10_000, ge=0, le=10_000_000,
                                        description="names of not-yet-received events that "
                                                    "one origin's deletes may keep waiting")
    unknown_tombstone_ttl: float = Field(7 * 86_400.0, gt=0,
                                         description="seconds such a name waits at most")
    audit_patient_ids: bool = Field(False, description="name the patient (Patient ID) in "
                                                       "the audit messages sent to the "
                                                       "collector (the trail file never "
                                                       "holds it)")
    verify_interval: float = Field(0.0, description="background verify of every blob: "
                                   "7d, 12h, 30m, seconds; 0 = off")
    verify_rate: float = Field(20.0, ge=0, le=100_000,
                               description="MB/s the background verify reads at most "
                                           "(0 = unlimited)")
    log_format: Literal["kv", "json"] = Field("kv", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")

    @field_validator("verify_interval", mode="before")
    @classmethod
    def _interval(cls, v: object) -> float:
        return parse_interval(v)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)

    @field_validator("bandwidth_caps")
    @classmethod
    def _caps(cls, v: dict[str, str]) -> dict[str, str]:
        from .ratelimit import check_caps

        return check_caps(v)  # a ScheduleError is a ValueError: reported with the key

    @field_validator("allowed_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        # "AE" or "AE@HOST" (the calling AE must also connect from HOST).
        out = []
        for a in v:
            ae, _, host = a.rpartition("@") if "@" in a else (a, "", "")
            if "@" in a and not host.strip():
                raise ValueError(f"{a!r}: AE@HOST needs a host after '@'")
            out.append(check_ae_title(ae) + (f"@{host.strip()}" if "@" in a else ""))
        return out

    @field_validator("may_delete")
    @classmethod
    def _node_ids(cls, v: list[str]) -> list[str]:
        from .nodeid import NodeId

        return [NodeId.parse(n).compact for n in v]

    @field_validator("export", "import_from")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            parse_ae_address(a)
        return v

    @field_validator("export_reject_reason")
    @classmethod
    def _reject_reason(cls, v: str) -> str:
        from .rejection import reason_code

        reason_code(v)
        return v.strip().lower()

    @field_validator("export_reject_reasons")
    @classmethod
    def _reject_reasons(cls, v: dict[str, str]) -> dict[str, str]:
        from .rejection import reason_code

        for reason in v.values():
            reason_code(reason)
        return {dest.strip(): reason.strip().lower() for dest, reason in v.items()}

    @field_validator("dicom_destinations")
    @classmethod
    def _destinations(cls, v: dict[str, str]) -> dict[str, str]:
        for ae, address in v.items():
            parse_ae_address(f"{ae}@{address}")
        return {check_ae_title(ae): address.strip() for ae, address in v.items()}

    def move_destinations(self) -> dict[str, tuple[str, int]]:
        """``dicom_destinations`` as AE title -> (host, port)."""
        out = {}
        for ae, address in self.dicom_destinations.items():
            _ae, host, port = parse_ae_address(f"{ae}@{address}")
            out[ae] = (host, port)
        return out

    @field_validator("audit_syslog")
    @classmethod
    def _syslog(cls, v: str) -> str:
        if v:
            from .atna import parse_target

            parse_target(v)
        return v.strip()

    @field_validator("audit_syslog_ca")
    @classmethod
    def _syslog_ca(cls, v: str) -> str:
        if v and not Path(v).is_file():
            raise ValueError(f"{v}: no such CA file (PEM)")
        return v

    @field_validator("audit_site")
    @classmethod
    def _site(cls, v: str) -> str:
        if not re.fullmatch(r"[\x21-\x7e]{0,64}", v):
            raise ValueError("up to 64 printable ASCII characters, no spaces")
        return v

    @field_validator("api_names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or len(name) > 253 or not all(c.isalnum() or c in "-.:[]" for c in name):
                raise ValueError(f"{name!r} is not a host name or address")
        return [n.lower() for n in v]

    @field_validator("dicomweb_cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]{1,260}", origin):
                raise ValueError(f"{origin[:80]!r} is not an origin: scheme://host[:port], "
                                 "no path, no trailing slash")
        return [o.lower() for o in v]

    @field_validator("api_tls_cert", "api_tls_key")
    @classmethod
    def _pem_path(cls, v: str) -> str:
        if v and not Path(v).is_file():
            raise ValueError(f"{v}: no such file")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v and len(v) < 16:
            raise ValueError("an API key has at least 16 characters")
        return v

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))


class _FileSource(PydanticBaseSettingsSource):
    """The config file of the data folder chosen by the higher layers (or the default)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = _FILE_DATA_DIR.get() or Path(os.environ.get("SYNCNODE_DATA", "syncnode-data"))
        return read_file(Path(data))


# The data folder whose config file the file layer reads, chosen by the layers above it.
_FILE_DATA_DIR: ContextVar[Path | None] = ContextVar("syncnode_config_data", default=None)


def read_file(data: Path) -> dict[str, Any]:
    path = data / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    values.pop("data", None)  # the folder holding the file is the data folder
    return values


def write_file(data: Path, values: dict[str, Any]) -> None:
    """Write the config file atomically (temp file, fsync, rename)."""
    clean = {k: v for k, v in values.items() if k != "data" and v is not None}
    atomic_write(data / CONFIG_FILE, tomli_w.dumps(clean).encode(), 0o600)  # holds the API key


def load(data: Path | str | None = None, **overrides: Any) -> Settings:
    """Settings for a data folder. ``overrides`` are command-line flags (None = not given)."""
    flags = {k: v for k, v in overrides.items() if v is not None}
    if data is not None:
        flags["data"] = Path(data)
    chosen = flags.get("data") or os.environ.get("SYNCNODE_DATA")
    token = _FILE_DATA_DIR.set(Path(chosen) if chosen else None)
    try:
        return Settings(**flags)
    except ValidationError as exc:
        folder = Path(chosen) if chosen else Path("syncnode-data")
        raise ConfigError(_describe(exc, flags, folder / CONFIG_FILE)) from None
    finally:
        _FILE_DATA_DIR.reset(token)


def _describe(exc: ValidationError, flags: dict[str, Any] | None = None,
              file: Path | None = None, given: str = "") -> str:
    """One line per bad value, naming where it came from (flag, environment variable or
    the config file, by path) and how to fix it."""
    in_file: dict[str, Any] = {}
    if file is not None:
        try:
            in_file = read_file(file.parent)
        except ConfigError:
            in_file = {}
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"
        top = str(err["loc"][0]) if err["loc"] else key
        msg = err["msg"].removeprefix("Value error, ")
        env = f"SYNCNODE_{top.upper()}"
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        if flags and top in flags:
            where = given or f"flag --{top.replace('_', '-')}, env {env}"
        elif env in os.environ:
            where = f"environment variable {env}"
        elif file is not None and top in in_file:
            where = (f"{file}: {top} = {str(in_file[top])[:60]!r}; fix or remove that line "
                     f"(or `syncnode config set --data {file.parent} {top} VALUE`)")
        else:
            where = f"flag --{top.replace('_', '-')}, env {env}"
        lines.append(f"invalid setting {key!r} ({where}): {msg}")
    return "\n".join(lines)


def initial_values() -> dict[str, Any]:
    """What ``syncnode init`` writes to a new config file (the API keys are not in it:
    they are stored hashed, see syncnode.apikeys)."""
    return {}


def update_file(data: Path, changes: dict[str, Any]) -> tuple[Settings, list[str]]:
    """Validate and persist changes to the config file; return the new settings and the
    changed keys that need a restart to take effect."""
    values = read_file(data)
    values.update(changes)
    try:
        settings = Settings(**{**values, "data": data})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, changes, given="the value given")) from None
    write_file(data, {k: v for k, v in settings.model_dump(mode="json").items()
                      if k in values})
    return settings, sorted(k for k in changes if k in RESTART_KEYS)
