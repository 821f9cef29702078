"""Configuration: the shipped files load, environment overrides win, bad values name their key."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from expbuild.config import ConfigError, grpc_target, load_settings, settings_from_mapping


@pytest.mark.parametrize(
    "name", ["expbuild-server.toml", "expbuild-server-remote-workers.toml", "expbuild-worker.toml"]
)
def test_shipped_configs_load(name):
    settings = load_settings(f"configs/{name}")
    if settings.server.address != "127.0.0.1:8980":
        # A config that listens beyond loopback ships with tokens and TLS on.
        assert settings.auth.mode == "tokens" and settings.server.tls_cert
        assert not settings.server.allow_insecure_public


def test_the_guides_keys_are_read():
    settings = load_settings("configs/expbuild-worker.toml")
    assert settings.worker.server_target == "localhost:8980"
    assert settings.worker.cas_target == "localhost:8980"
    assert settings.worker.max_concurrent_tasks == 4
    assert settings.worker.platform == {"OSFamily": ("linux",)}
    assert settings.worker.backend.type == "host"
    assert (
        load_settings("configs/expbuild-server-remote-workers.toml").execution.backend
        == "scheduler"
    )


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
    settings = settings_from_mapping(
        {"server": {"lease_duration": "2m", "heartbeat_interval": 10, "poll_timeout": "500ms"}}
    )
    assert settings.server.lease_duration == timedelta(minutes=2)
    assert settings.server.heartbeat_interval == timedelta(seconds=10)
    assert settings.server.poll_timeout == timedelta(milliseconds=500)


def test_history_is_kept_90_days_or_forever():
    assert settings_from_mapping({}).server.history_retention == timedelta(days=90)
    forever = settings_from_mapping({"server": {"history_retention": "forever"}})
    assert forever.server.history_retention is None
    with pytest.raises(ConfigError, match="server.history_retention"):
        settings_from_mapping({"server": {"history_retention": "sometimes"}})


def test_several_values_per_platform_key():
    settings = settings_from_mapping({"worker": {"platform": {"ISA": ["x86-64", "x86-64-v3"]}}})
    assert settings.worker.platform == {"ISA": ("x86-64", "x86-64-v3")}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"execution": {"backend": "magic"}}, "execution.backend"),
        ({"worker": {"backend": {"type": "vm"}}}, "worker.backend.type"),
        ({"server": {"address": "localhost"}}, "server.address"),
        ({"server": {"address": "127.0.0.1:http"}}, "server.address"),
        ({"server": {"address": "127.0.0.1:70000"}}, "server.address"),
        ({"worker": {"max_concurrent_tasks": -1}}, "worker.max_concurrent_tasks"),
        ({"worker": {"max_concurrent_tasks": "four"}}, "worker.max_concurrent_tasks"),
        ({"worker": {"server_url": "ftp://x:1"}}, "worker.server_url"),
        ({"server": {"tls_cert": "/c.pem"}}, "server.tls_key"),
        ({"worker": {"tls_key": "/k.pem"}}, "worker.tls_cert"),
        ({"auth": {"mode": "maybe"}}, "auth.mode"),
        ({"server": {"worker_address": "nowhere"}}, "server.worker_address"),
        ({"server": {"lease_duration": "soon"}}, "server.lease_duration"),
        (
            {"server": {"lease_duration": "10s", "heartbeat_interval": "30s"}},
            "server.lease_duration",
        ),
        ({"database": {"url": "mysql://x"}}, "database.url"),
        ({"worker": {"platform": {"": "x"}}}, "worker.platform"),
    ],
)
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings_from_mapping(raw)


def test_grpc_targets_from_the_guides_urls():
    assert grpc_target("http://192.168.1.100:8980", "k") == "192.168.1.100:8980"
    assert grpc_target("grpcs://build.example:443", "k") == "grpcs://build.example:443"
    assert grpc_target("https://build.example:443", "k") == "grpcs://build.example:443"
    assert grpc_target("127.0.0.1:8980", "k") == "127.0.0.1:8980"
    assert grpc_target("grpc://[::1]:8980", "k") == "[::1]:8980"


def test_a_missing_config_file_is_one_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("no-such-file.toml")


# -- [worker.backend] sandbox keys, [worker.limits], detected platform ---------------------


def test_backends_and_sandbox_keys():
    from expbuild.config import DEFAULT_RO_BINDS

    settings = settings_from_mapping({"worker": {"backend": {"type": "sandbox"}}})
    backend = settings.worker.backend
    assert (backend.type, backend.sandbox_root) == ("sandbox", "workdir")
    assert backend.sandbox_ro_binds == DEFAULT_RO_BINDS
    root = settings_from_mapping(
        {"worker": {"backend": {"type": "Sandbox", "sandbox_root": "root"}}}
    )
    assert root.worker.backend.sandbox_ro_binds == ()  # the input root brings its own system
    binds = settings_from_mapping(
        {"worker": {"backend": {"sandbox_root": "root", "ro_binds": ["/opt/sdk"]}}}
    )
    assert binds.worker.backend.sandbox_ro_binds == ("/opt/sdk",)
    assert (
        settings_from_mapping({"worker": {"backend": {"type": "docker"}}}).worker.backend.type
        == "docker"
    )


def test_limits_accept_units():
    limits = settings_from_mapping(
        {
            "worker": {
                "limits": {
                    "timeout": "10m",
                    "memory": "2GiB",
                    "cpu_time": "1.5s",
                    "max_output_size": "100MB",
                    "max_processes": 256,
                    "cpus": "1.5",
                    "cgroups": "false",
                }
            }
        }
    ).worker.limits
    assert limits.timeout == timedelta(minutes=10)
    assert limits.memory == 2 * 1024**3
    assert limits.cpu_time == 2  # whole seconds, rounded up
    assert limits.max_output_size == 100_000_000
    assert limits.max_processes == 256
    assert limits.cpus == 1.5
    assert limits.cgroups is False
    assert (
        settings_from_mapping({"worker": {"limits": {"memory": 1048576}}}).worker.limits.memory
        == 1048576
    )
    assert (
        settings_from_mapping({"worker": {"limits": {"memory": "512M"}}}).worker.limits.memory
        == 512 * 1024**2
    )
    unlimited = settings_from_mapping({}).worker.limits
    assert (unlimited.timeout, unlimited.memory, unlimited.cpu_time, unlimited.max_output_size) == (
        None,
    ) * 4
    assert unlimited.cgroups is True


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"backend": {"sandbox_root": "chroot"}}, "worker.backend.sandbox_root"),
        ({"backend": {"ro_binds": ["usr"]}}, "worker.backend.ro_binds"),
        ({"limits": {"memory": "lots"}}, "worker.limits.memory"),
        ({"limits": {"memory": "2 parsecs"}}, "worker.limits.memory"),
        ({"limits": {"memory": 0}}, "worker.limits.memory"),
        ({"limits": {"cpu_time": "forever"}}, "worker.limits.cpu_time"),
        ({"limits": {"timeout": -1}}, "worker.limits.timeout"),
        ({"limits": {"max_output_size": "big"}}, "worker.limits.max_output_size"),
        ({"limits": {"max_processes": 0}}, "worker.limits.max_processes"),
        ({"limits": {"cpus": "-2"}}, "worker.limits.cpus"),
        ({"limits": {"cgroups": "maybe"}}, "worker.limits.cgroups"),
    ],
)
def test_bad_worker_values_name_their_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings_from_mapping({"worker": raw})


def _documented_keys() -> dict[str, set[str]]:
    """Keys per section in configs/*.toml, commented-out examples included."""
    import re
    from pathlib import Path

    keys: dict[str, set[str]] = {}
    for path in Path("configs").glob("*.toml"):
        section = ""
        for line in path.read_text().splitlines():
            if m := re.match(r"^\s*#?\s*\[([\w.]+)\]", line):
                section = m.group(1)
            elif m := re.match(r"^\s*#?\s*(\w+)\s*=", line):
                keys.setdefault(section, set()).add(m.group(1))
    return keys


def test_every_setting_is_documented_in_configs():
    import dataclasses

    from expbuild import config

    sections = {
        "server": config.ServerSettings,
        "execution": config.ExecutionSettings,
        "database": config.DatabaseSettings,
        "cas": config.CasSettings,
        "worker": config.WorkerSettings,
        "worker.backend": config.BackendSettings,
        "worker.limits": config.LimitsSettings,
        "worker.cache": config.CacheSettings,
        "auth": config.AuthSettings,
    }
    documented = _documented_keys()
    nested = {"backend", "limits", "cache", "platform"}
    missing = [
        f"[{section}] {field.name}"
        for section, cls in sections.items()
        for field in dataclasses.fields(cls)
        if field.name not in nested and field.name not in documented.get(section, set())
    ]
    assert not missing, f"not shown in configs/*.toml: {missing}"


# -- unknown keys (issue #7 point 12) ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"adress": "127.0.0.1:1"}}, r"\[server\] adress .*did you mean address\?"),
        ({"sever": {"address": "127.0.0.1:1"}}, r"\[sever\] .*did you mean server\?"),
        ({"worker": {"backend": {"typ": "host"}}}, r"\[worker.backend\] typ .*did you mean type\?"),
        ({"auth": {"cache_tll": "5s"}}, r"\[auth\] cache_tll .*did you mean cache_ttl\?"),
        ({"cas": {"zzz": 1}}, r"\[cas\] zzz .*known: root, max_size"),
    ],
)
def test_unknown_keys_stop_with_the_nearest_known_one(raw, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(raw)


def test_platform_properties_are_free_form():
    settings = settings_from_mapping({"worker": {"platform": {"anything_at_all": "x"}}})
    assert settings.worker.platform == {"anything_at_all": ("x",)}


def test_a_misspelled_key_in_a_file_stops_loading(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[server]\nadress = "0.0.0.0:8980"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path))
    text = str(caught.value)
    assert "\n" not in text
    assert "[server] adress" in text and "did you mean address?" in text and str(path) in text


def test_a_misspelled_environment_key_stops_loading(monkeypatch):
    monkeypatch.setenv("EXPBUILD_SERVER__ADRESS", "0.0.0.0:8980")
    with pytest.raises(ConfigError, match=r"\[server\] adress .*EXPBUILD_.*did you mean address"):
        load_settings(None)


def test_command_environment_variables_are_not_settings(monkeypatch):
    # EXPBUILD_TOKEN and EXPBUILD_CONFIG belong to the commands, not to a table.
    monkeypatch.setenv("EXPBUILD_TOKEN", "ebt_x")
    monkeypatch.setenv("EXPBUILD_CONFIG", "configs/expbuild-server.toml")
    assert load_settings(None).auth.mode == "none"


def test_worker_server_url_may_name_several_replicas():
    listed = settings_from_mapping(
        {"worker": {"server_url": ["http://10.0.0.1:8980", "10.0.0.2:8981"]}}, source="t"
    )
    assert listed.worker.server_addresses == ("10.0.0.1:8980", "10.0.0.2:8981")
    assert listed.worker.server_target == "10.0.0.1:8980"
    commas = settings_from_mapping({"worker": {"server_url": "a:1, b:2"}}, source="t")
    assert commas.worker.server_addresses == ("a:1", "b:2")
    from expbuild.client.replicas import replicas_target

    assert replicas_target(("127.0.0.1:1", "127.0.0.2:2")) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert replicas_target(("localhost:5",)) == "localhost:5"


def test_the_old_osfamily_spelling_is_read_as_the_lexicons_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="expbuild.config"):
        settings = settings_from_mapping(
            {"worker": {"platform": {"OSFamily": ["Linux", "linux", "Plan9"]}}}
        )
    # REAPI's lexicon spells it `linux`; values outside the lexicon are kept as written.
    assert settings.worker.platform == {"OSFamily": ("linux", "Plan9")}
    [warning] = caplog.records
    assert "lexicon spells it linux, Plan9" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="expbuild.config"):
        settings_from_mapping({"worker": {"platform": {"OSFamily": "linux"}}})
    assert not caplog.records
