"""Configuration: the shipped files load, environment overrides win, bad values name their key."""

from __future__ import annotations

from datetime import timedelta

import pytest

from expbuild.config import ConfigError, grpc_target, load_settings, settings_from_mapping


@pytest.mark.parametrize("name", ["expbuild-server.toml", "expbuild-server-remote-workers.toml",
                                  "expbuild-worker.toml"])
def test_shipped_configs_load(name):
    settings = load_settings(f"configs/{name}")
    assert settings.server.address == "127.0.0.1:8980"


def test_the_guides_keys_are_read():
    settings = load_settings("configs/expbuild-worker.toml")
    assert settings.worker.server_target == "localhost:8980"
    assert settings.worker.cas_target == "localhost:8980"
    assert settings.worker.max_concurrent_tasks == 4
    assert settings.worker.platform == {"OSFamily": ("Linux",)}
    assert settings.worker.backend.type == "host"
    assert load_settings("configs/expbuild-server-remote-workers.toml").execution.backend == "scheduler"


def test_bare_file_names_are_found_in_configs():
    assert load_settings("expbuild-worker.toml").source.endswith("configs/expbuild-worker.toml")


def test_environment_overrides_files(monkeypatch):
    monkeypatch.setenv("EXPBUILD_SERVER__ADDRESS", "0.0.0.0:9999")
    monkeypatch.setenv("EXPBUILD_WORKER__MAX_CONCURRENT_TASKS", "8")
    monkeypatch.setenv("EXPBUILD_DATABASE__URL", "postgresql://u@db:5432/expbuild")
    monkeypatch.setenv("EXPBUILD_SERVER__METRICS_ADDRESS", "")
    settings = load_settings("configs/expbuild-worker.toml")
    assert settings.server.address == "0.0.0.0:9999"
    assert settings.worker.max_concurrent_tasks == 8
    assert settings.database.url == "postgresql://u@db:5432/expbuild"
    assert settings.server.metrics_address == ""


def test_durations_accept_numbers_and_units():
    settings = settings_from_mapping({"server": {"lease_duration": "2m", "heartbeat_interval": 10,
                                                 "poll_timeout": "500ms"}})
    assert settings.server.lease_duration == timedelta(minutes=2)
    assert settings.server.heartbeat_interval == timedelta(seconds=10)
    assert settings.server.poll_timeout == timedelta(milliseconds=500)


def test_several_values_per_platform_key():
    settings = settings_from_mapping({"worker": {"platform": {"ISA": ["x86-64", "x86-64-v3"]}}})
    assert settings.worker.platform == {"ISA": ("x86-64", "x86-64-v3")}


@pytest.mark.parametrize(("raw", "key"), [
    ({"execution": {"backend": "magic"}}, "execution.backend"),
    ({"worker": {"backend": {"type": "vm"}}}, "worker.backend.type"),
    ({"server": {"address": "localhost"}}, "server.address"),
    ({"server": {"address": "127.0.0.1:http"}}, "server.address"),
    ({"server": {"address": "127.0.0.1:70000"}}, "server.address"),
    ({"worker": {"max_concurrent_tasks": -1}}, "worker.max_concurrent_tasks"),
    ({"worker": {"max_concurrent_tasks": "four"}}, "worker.max_concurrent_tasks"),
    ({"worker": {"server_url": "https://x:1"}}, "worker.server_url"),
    ({"server": {"lease_duration": "soon"}}, "server.lease_duration"),
    ({"server": {"lease_duration": "10s", "heartbeat_interval": "30s"}}, "server.lease_duration"),
    ({"database": {"url": "mysql://x"}}, "database.url"),
    ({"worker": {"platform": {"": "x"}}}, "worker.platform"),
])
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings_from_mapping(raw)


def test_grpc_targets_from_the_guides_urls():
    assert grpc_target("http://192.168.1.100:8980", "k") == "192.168.1.100:8980"
    assert grpc_target("127.0.0.1:8980", "k") == "127.0.0.1:8980"
    assert grpc_target("grpc://[::1]:8980", "k") == "[::1]:8980"


def test_a_missing_config_file_is_one_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("no-such-file.toml")
