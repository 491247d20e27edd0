"""Configuration layers: defaults < config file < SYNCNODE_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncnode import config as cfg


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("SYNCNODE_"):
            monkeypatch.delenv(key)


def test_defaults(tmp_path: Path) -> None:
    s = cfg.load(tmp_path)
    assert (s.dicom_port, s.ae_title, s.peer_port, s.api_host, s.api_port) == (
        11112, "SYNCNODE", 8443, "127.0.0.1", 8080)
    assert s.export == [] and s.discovery is False


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg.write_file(tmp_path, {"dicom_port": 2000, "ae_title": "FILEAE", "peer_port": 2001})
    s = cfg.load(tmp_path)
    assert (s.dicom_port, s.ae_title, s.peer_port, s.api_port) == (2000, "FILEAE", 2001, 8080)
    monkeypatch.setenv("SYNCNODE_DICOM_PORT", "3000")
    monkeypatch.setenv("SYNCNODE_AE_TITLE", "ENVAE")
    s = cfg.load(tmp_path)
    assert (s.dicom_port, s.ae_title, s.peer_port) == (3000, "ENVAE", 2001)
    s = cfg.load(tmp_path, dicom_port=4000, ae_title=None)
    assert (s.dicom_port, s.ae_title, s.peer_port) == (4000, "ENVAE", 2001)


def test_data_folder_from_environment_selects_its_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg.write_file(tmp_path, {"api_port": 9999})
    monkeypatch.setenv("SYNCNODE_DATA", str(tmp_path))
    assert cfg.load().api_port == 9999


def test_list_setting_from_environment_and_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cfg.write_file(tmp_path, {"export": ["PACS@127.0.0.1:4242"]})
    assert cfg.load(tmp_path).export == ["PACS@127.0.0.1:4242"]
    monkeypatch.setenv("SYNCNODE_EXPORT", '["B@10.0.0.1:104", "C@host:11112"]')
    assert cfg.load(tmp_path).export == ["B@10.0.0.1:104", "C@host:11112"]


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("dicom_port", 70000, "less than or equal to 65535"),
    ("peer_port", -1, "greater than or equal to 0"),
    ("ae_title", "THIS TITLE IS TOO LONG", "AE title is 1-16"),
    ("ae_title", "BACK\\SLASH", "AE title is 1-16"),
    ("export", ["nohost"], "is not AE@HOST:PORT"),
    ("export", ["AE@host:99999"], "is not AE@HOST:PORT"),
    ("allowed_aes", [""], "AE title is 1-16"),
    ("api_key", "short", "at least 16 characters"),
    ("sync_interval", 0, "greater than 0"),
    ("max_pulls", 0, "greater than or equal to 1"),
    ("log_format", "xml", "'kv' or 'json'"),
    ("max_pdu", 10, "greater than or equal to 4096"),
])
def test_invalid_values_name_the_key_and_reason(tmp_path: Path, key: str, value: object,
                                                reason: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(tmp_path, **{key: value})
    msg = str(info.value)
    assert f"'{key}'" in msg and reason in msg
    assert f"--{key.replace('_', '-')}" in msg and f"SYNCNODE_{key.upper()}" in msg


def test_invalid_environment_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCNODE_API_PORT", "eighty")
    with pytest.raises(cfg.ConfigError, match=r"'api_port'.*valid integer"):
        cfg.load(tmp_path)


def test_unknown_and_invalid_file_keys(tmp_path: Path) -> None:
    cfg.write_file(tmp_path, {"dicom_prot": 1})
    with pytest.raises(cfg.ConfigError, match=r"'dicom_prot'.*unknown setting"):
        cfg.load(tmp_path)
    (tmp_path / cfg.CONFIG_FILE).write_text("dicom_port = [")
    with pytest.raises(cfg.ConfigError, match="not valid TOML"):
        cfg.load(tmp_path)


def test_update_file_persists_validates_and_flags_restart(tmp_path: Path) -> None:
    cfg.write_file(tmp_path, {"api_key": "k" * 20})
    settings, restart = cfg.update_file(tmp_path, {"sync_interval": 2.5, "dicom_port": 5000})
    assert settings.sync_interval == 2.5 and restart == ["dicom_port"]
    again = cfg.load(tmp_path)
    assert (again.sync_interval, again.dicom_port, again.api_key) == (2.5, 5000, "k" * 20)
    with pytest.raises(cfg.ConfigError, match="'ae_title'"):
        cfg.update_file(tmp_path, {"ae_title": ""})
    assert cfg.load(tmp_path).ae_title == "SYNCNODE"  # the bad change was not written
    assert (tmp_path / cfg.CONFIG_FILE).stat().st_mode & 0o777 == 0o600
