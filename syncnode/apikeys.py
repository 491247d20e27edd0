"""API keys of the admin API: two roles, stored hashed.

Roles: ``read`` may read everything the API serves, patient data and files included
(viewers, scripts that watch); ``admin`` may also change things: trust, deletes,
configuration. Each role has one key.

A key is 32 random bytes, written ``snk-read-<base64url>`` or ``snk-admin-<base64url>``
so an operator can tell which one is in hand. The data folder keeps only the BLAKE3 hash
of each key, in ``<data>/api-keys.json`` (mode 0600); the key itself is shown once, when
``init`` or ``syncnode apikey rotate`` creates it. A hash of a 256-bit random key cannot
be reversed or guessed, so no slow hash is needed; comparison is constant time.

Invariants: no clear key is ever written to disk by syncnode; rotating a role replaces its
key at once, for a running node too (the file is re-read when it changes); a presented
key maps to at most one role.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from .durable import atomic_write

KEYS_FILE = "api-keys.json"
ROLES = ("read", "admin")
PREFIX = "snk-"


class ApiKeyError(Exception):
    """The key file cannot be used; the message says which file and what to do."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    role: str
    created: float
    fingerprint: str  # the first 12 hex digits of the hash: names a key in logs and audit

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "created": self.created, "fingerprint": self.fingerprint}


def _hash(key: str) -> str:
    return blake3.blake3(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(role: str) -> str:
    return f"{PREFIX}{role}-{secrets.token_urlsafe(32)}"


class KeyStore:
    """The key file of one data folder. Safe to share between threads."""

    def __init__(self, data: Path | str) -> None:
        self.path = Path(data) / KEYS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, dict[str, Any]] = {}

    # -- reading -------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        """The entries, re-read when the file changed (a rotation by the CLI)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, {}
            return {}
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            try:
                raw = json.loads(self.path.read_text())
                entries = {r: raw["keys"][r] for r in ROLES if r in raw.get("keys", {})}
                for e in entries.values():
                    if not (isinstance(e.get("hash"), str) and len(e["hash"]) == 64):
                        raise ValueError("bad hash")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ApiKeyError(f"{self.path} is damaged ({exc}); create new keys with "
                                  "`syncnode apikey rotate read` and `... rotate admin`") from exc
            self._stamp, self._entries = stamp, entries
        return self._entries

    def role_of(self, presented: str) -> str | None:
        """The role of a presented key, or None. Constant time in the key's content."""
        if not presented or len(presented) > 200:
            return None
        digest = _hash(presented)
        with self._lock:
            entries = self._load()
        found = None
        for role in ROLES:  # every role compared, whatever matches first
            entry = entries.get(role)
            if entry is not None and hmac.compare_digest(digest, entry["hash"]):
                found = role
        return found

    def fingerprint(self, presented: str) -> str:
        return _hash(presented)[:12]

    def info(self) -> list[KeyInfo]:
        with self._lock:
            entries = self._load()
        return [KeyInfo(r, float(entries[r].get("created", 0)), entries[r]["hash"][:12])
                for r in ROLES if r in entries]

    def has_keys(self) -> bool:
        return bool(self.info())

    # -- writing -------------------------------------------------------------------------
    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        body = json.dumps({"version": 1, "keys": entries}, indent=2, sort_keys=True)
        atomic_write(self.path, body.encode(), 0o600)

    def set(self, role: str, key: str) -> None:
        """Store the hash of ``key`` as the key of ``role`` (replacing the previous one)."""
        if role not in ROLES:
            raise ApiKeyError(f"a key's role is {' or '.join(ROLES)}, not {role!r}")
        with self._lock:
            entries = dict(self._load())
            entries[role] = {"hash": _hash(key), "created": time.time()}
            self._save(entries)
            self._stamp = None

    def rotate(self, role: str) -> str:
        """A new key for ``role``; the previous one stops working at once. Returns the
        key: the only time it is shown."""
        key = new_key(role)
        self.set(role, key)
        return key

    def create_missing(self) -> dict[str, str]:
        """Keys for the roles that have none yet (``init``); returns them in clear."""
        with self._lock:
            missing = [r for r in ROLES if r not in self._load()]
        return {r: self.rotate(r) for r in missing}


def adopt_config_key(data: Path) -> bool:
    """Move an ``api_key`` an older syncnode wrote in clear to ``config.toml`` into the key
    file, as the admin key (unless one exists), and remove it from the config file.
    Returns True if the config file changed."""
    from . import config as cfg

    values = cfg.read_file(data)
    key = values.pop("api_key", None)
    if not key:
        return False
    store = KeyStore(data)
    if not any(k.role == "admin" for k in store.info()):
        store.set("admin", str(key))
    cfg.write_file(data, values)  # atomic: temp file, fsync, rename
    return True
