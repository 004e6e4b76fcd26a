from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_settings, read_secret
from edge_agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    s = load_settings(None, env={})
    assert s.mqtt.host == "127.0.0.1"
    assert s.mqtt.port == 1883
    assert s.mqtt.topic_prefix == "edge"
    assert s.source.kind == "jsonl"
    assert s.source.path == "-"
    assert s.device.state_dir == "/var/lib/edge-agent"
    assert s.input.max_line_bytes == 1024 * 1024
    assert s.model.intra_op_threads == 1
    assert s.device_id  # falls back to the host name


def test_file_values_are_read_and_immutable(tmp_path: Path) -> None:
    path = write(tmp_path, '[device]\nid = "dev-1"\n[mqtt]\nport = 1999\n')
    s = load_settings(path, env={})
    assert s.device_id == "dev-1"
    assert s.mqtt.port == 1999
    with pytest.raises(AttributeError):
        s.mqtt.port = 1  # type: ignore[misc]


def test_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nprot = 1883\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert "mqtt.prot" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqqt]\nport = 1883\n")
    with pytest.raises(ConfigError, match="unknown key 'mqqt'"):
        load_settings(path, env={})


def test_wrong_type_and_range_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        load_settings(write(tmp_path, '[mqtt]\nport = "x"\n'), env={})
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        load_settings(write(tmp_path, "[mqtt]\nport = 70000\n"), env={})


def test_password_in_the_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password_file"):
        load_settings(write(tmp_path, '[mqtt]\npassword = "hunter2"\n'), env={})


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[mqtt\n"), env={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", env={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nport = 1999\n")
    env = {"EDGE_AGENT_MQTT_PORT": "2001", "EDGE_AGENT_DEVICE_STATE_DIR": "/tmp/x"}
    s = load_settings(path, env=env)
    assert s.mqtt.port == 2001
    assert s.device.state_dir == "/tmp/x"


def test_unknown_or_bad_environment_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="EDGE_AGENT_MQTT_PROT"):
        load_settings(None, env={"EDGE_AGENT_MQTT_PROT": "1"})
    with pytest.raises(ConfigError, match="EDGE_AGENT_MQTT_PORT"):
        load_settings(None, env={"EDGE_AGENT_MQTT_PORT": "many"})
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        load_settings(None, env={"EDGE_AGENT_MQTT_PORT": "0"})


def test_other_environment_variables_are_ignored() -> None:
    s = load_settings(None, env={"EDGE_AGENT_CONFIG": "/x.toml", "PATH": "/bin"})
    assert s.mqtt.port == 1883


def test_secret_from_file_and_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    assert read_secret(str(tmp_path / "mqtt-password")) == "s3cret"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("mqtt-password") == "s3cret"
    with pytest.raises(ConfigError) as err:
        read_secret("absent")
    assert "s3cret" not in str(err.value)
