"""Typed settings, read once from TOML (dynaconf) and `EXPBUILD_...` environment variables.

Keys follow the original ExpBuild guide (`[server] address`, `[execution] backend`,
`[worker] server_url`, ...). Nested keys are overridden from the environment with a
double underscore: `EXPBUILD_SERVER__ADDRESS=0.0.0.0:8980`,
`EXPBUILD_DATABASE__URL=postgresql://...`, `EXPBUILD_WORKER__MAX_CONCURRENT_TASKS=8`.

`load_settings` is the only place that touches dynaconf; everything else receives the
frozen dataclasses below. A bad value raises `ConfigError` whose message names the key.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from expbuild.reapi.platforms import OS_FAMILY, normalize_platform, respelled

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8980"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    address: str = DEFAULT_ADDRESS
    # Replica processes sharing `address` (and `worker_address`) on this host, each on its
    # own core; 0: one per usable core. `expbuild up` and `[execution] backend = "local"`
    # run one (their workers live in the server process).
    processes: int = 0
    # Prometheus /metrics; empty string switches the endpoint off.
    metrics_address: str = "127.0.0.1:9464"
    instance_names: tuple[str, ...] = ("",)
    # How long a lease lasts without a heartbeat extending it (the original's 5 minutes).
    lease_duration: timedelta = timedelta(minutes=5)
    # The interval the server asks workers to heartbeat at.
    heartbeat_interval: timedelta = timedelta(seconds=30)
    # A worker silent this long is marked offline and its leases are requeued.
    worker_offline_timeout: timedelta = timedelta(seconds=90)
    # A worker whose session stream broke without DeregisterWorker, and that has not
    # reconnected within this grace, is taken for dead and its leases are requeued.
    worker_disconnect_grace: timedelta = timedelta(seconds=5)
    # Execute answers RESOURCE_EXHAUSTED while an instance has this many tasks queued;
    # 0: no limit.
    max_queued_tasks: int = 0
    # Longest time a PollTasks call waits for work before answering empty.
    poll_timeout: timedelta = timedelta(seconds=30)
    # How often each replica runs the reaper.
    reap_interval: timedelta = timedelta(seconds=5)
    # Attempts before a task whose leases keep expiring is failed.
    max_attempts: int = 3
    # Pollers and operation waiters re-check the database this often even without NOTIFY.
    notify_fallback_interval: timedelta = timedelta(seconds=2)
    max_batch_total_size_bytes: int = 4 * 1024 * 1024
    # GetTree refuses a Directory message larger than this (RESOURCE_EXHAUSTED).
    max_directory_size_bytes: int = 4 * 1024 * 1024
    allow_action_cache_updates: bool = True
    # Longest an action may run; also the limit of actions that set no timeout.
    max_action_timeout: timedelta = timedelta(hours=1)
    # Refuse at once (FAILED_PRECONDITION) an action whose platform no online worker
    # offers, instead of queueing it for a worker that may never come.
    reject_unmatched_platforms: bool = True
    # Concurrent builds (RequestMetadata's tool_invocation_id, else the caller) take turns
    # in each platform's queue; false: one line, oldest first, within a priority.
    fair_scheduling: bool = True
    # Finished tasks (and their operations) are deleted after this; task_events keep history.
    task_retention: timedelta = timedelta(days=7)
    # The history (task_events, asset_fetches) is deleted after this; None: kept forever.
    history_retention: timedelta | None = timedelta(days=90)
    # The Worker API's own listener; empty: it shares `address` with the clients' services.
    worker_address: str = ""
    # Serve with [auth] mode = "none" on a non-loopback address anyway (warns at each start).
    allow_insecure_public: bool = False
    # TLS for `address` (PEM files); tls_client_ca: callers must show a certificate it signed.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # TLS for `worker_address` (used only when it is set).
    worker_tls_cert: str = ""
    worker_tls_key: str = ""
    worker_tls_client_ca: str = ""


AUTH_MODES = ("none", "tokens")


@dataclass(frozen=True)
class AuthSettings:
    """`[auth]`: who may call the server (expbuild.auth)."""

    # "none": every caller may do everything (loopback only, unless allow_insecure_public);
    # "tokens": every call needs a bearer token (or a worker's client certificate).
    mode: str = "none"
    # How long a replica trusts what it read about a token; a revocation takes this long.
    cache_ttl: timedelta = timedelta(seconds=5)


@dataclass(frozen=True)
class ExecutionSettings:
    backend: str = "scheduler"  # "scheduler": remote workers; "local": the server runs its own
    local_workers: int = 1


@dataclass(frozen=True)
class DatabaseSettings:
    # Empty: start the embedded PostgreSQL (expbuild up / expbuild server on a laptop).
    url: str = ""
    pool_min_size: int = 2
    pool_max_size: int = 10
    # How long a starting server keeps trying to reach the database before giving up.
    connect_wait: timedelta = timedelta(seconds=30)
    embedded_data_dir: str = ""


CAS_FSYNC_MODES = ("always", "batch", "never")  # expbuild.cas.durability.FSYNC_MODES


@dataclass(frozen=True)
class CasSettings:
    root: str = ""
    # Bytes of blobs kept before least recently used ones are evicted; 0: unbounded.
    max_size: int = 0
    # How often a replica checks the store's size (one replica at a time evicts).
    eviction_interval: timedelta = timedelta(seconds=60)
    # "always" | "batch" | "never": when blobs reach the disk (expbuild/cas/durability.py).
    fsync: str = "batch"


@dataclass(frozen=True)
class AssetSettings:
    """The Remote Asset API's downloads (FetchBlob)."""

    # Largest body a download may have; a larger one is refused (RESOURCE_EXHAUSTED).
    max_download_size: int = 2 * 1024**3
    # A download's time limit when the request sets none, and the most a request may ask.
    download_timeout: timedelta = timedelta(minutes=10)


# Host directories a "workdir"-mode sandbox sees read-only when none are configured.
DEFAULT_RO_BINDS = ("/usr", "/bin", "/lib", "/lib64", "/etc/alternatives")


@dataclass(frozen=True)
class BackendSettings:
    type: str = "host"
    work_dir: str = "/tmp/expbuild-worker"
    # sandbox: the input root is the action's working area ("workdir") or its "/" ("root").
    sandbox_root: str = "workdir"
    # sandbox: host paths bind-mounted read-only; None: DEFAULT_RO_BINDS in "workdir"
    # mode, nothing in "root" mode (the input root brings its own system).
    ro_binds: tuple[str, ...] | None = None
    # A worker running as root runs actions as this user: a name, "uid" or "uid:gid";
    # "root" or "" keeps them root (with a warning). Ignored by a worker that is not root.
    run_as: str = "nobody"
    # Directory messages of an input root larger than this are refused, not parsed.
    max_directory_size: int = 16 * 1024**2

    @property
    def sandbox_ro_binds(self) -> tuple[str, ...]:
        if self.ro_binds is not None:
            return self.ro_binds
        return DEFAULT_RO_BINDS if self.sandbox_root == "workdir" else ()


@dataclass(frozen=True)
class LimitsSettings:
    """`[worker.limits]`: caps on every action the worker runs; None means no limit."""

    timeout: timedelta | None = None  # caps the action's own timeout; applies when it sets none
    memory: int | None = None  # bytes
    cpu_time: int | None = None  # CPU seconds, per process (RLIMIT_CPU)
    max_output_size: int | None = None  # bytes: output files + stdout + stderr
    max_processes: int | None = None  # processes and threads at once (cgroup pids)
    cpus: float | None = None  # CPU bandwidth in CPUs (cgroup cpu quota, docker --cpus)
    # Use a cgroup per action where the worker may create one (memory, processes, cpus,
    # and finding every process an action started); off: rlimits only.
    cgroups: bool = True


@dataclass(frozen=True)
class CacheSettings:
    """`[worker.cache]`: the blob cache inputs are hardlinked from (expbuild.worker.blob_cache)."""

    dir: str = ""  # empty: "<work_dir>-cache", beside work_dir so that hardlinks work
    max_size: int = 10 * 1024**3  # bytes; 0 turns the cache off
    # Share of cache hits whose content is re-hashed before use (0 to 1).
    verify_fraction: float = 0.0


@dataclass(frozen=True)
class WorkerSettings:
    server_url: str = f"http://{DEFAULT_ADDRESS}"
    cas_url: str = ""  # empty: same as server_url
    max_concurrent_tasks: int = 4
    name: str = ""
    platform: dict[str, tuple[str, ...]] = field(default_factory=dict)
    heartbeat_interval: timedelta | None = None  # None: what the server asks for
    poll_timeout: timedelta = timedelta(seconds=30)
    backend: BackendSettings = field(default_factory=BackendSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    # Prometheus /metrics of `expbuild worker daemon`, e.g. "0.0.0.0:9465"; empty (the
    # default, as several workers may share a host): no endpoint.
    metrics_address: str = ""
    # TLS (grpcs:// server_url): CA file to trust; tls_cert/tls_key: this worker's client
    # certificate for mutual TLS.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # File holding the bearer token (scope "worker") sent with every call.
    token_file: str = ""

    @property
    def cache_dir(self) -> Path:
        if self.cache.dir:
            return Path(self.cache.dir)
        work_dir = Path(self.backend.work_dir)
        return work_dir.with_name(f"{work_dir.name}-cache")

    @property
    def server_addresses(self) -> tuple[str, ...]:
        """Every replica `server_url` names (`host:port` each), in the order given."""
        return grpc_targets(self.server_url, "worker.server_url")

    @property
    def server_target(self) -> str:
        """The first replica; `expbuild.client.replicas` makes a target of all of them."""
        return self.server_addresses[0]

    @property
    def cas_target(self) -> str:
        return grpc_target(self.cas_url, "worker.cas_url") if self.cas_url else self.server_target


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    cas: CasSettings = field(default_factory=CasSettings)
    asset: AssetSettings = field(default_factory=AssetSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    source: str = "defaults"

    def cas_root(self) -> Path:
        return Path(self.cas.root) if self.cas.root else data_dir() / "cas"


EXECUTION_BACKENDS = ("scheduler", "local")
WORKER_BACKENDS = ("host", "sandbox", "docker")
SANDBOX_ROOTS = ("workdir", "root")


def data_dir() -> Path:
    """Where ExpBuild keeps local state when not told otherwise.

    As root, `/var/lib/expbuild`: its ancestors are world-traversable already, so the
    embedded Postgres (which runs as an unprivileged user) can reach its data without
    anyone loosening the permissions of /root.
    """
    if os.environ.get("EXPBUILD_HOME"):
        return Path(os.environ["EXPBUILD_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/expbuild")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "expbuild"


def parse_address(value: str, key: str) -> tuple[str, int]:
    """Parse `host:port` (IPv6 as `[::1]:8980`) and return (host, port)."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key} = {value!r}: expected host:port, e.g. 127.0.0.1:8980")
    try:
        port_number = int(port)
    except ValueError:
        raise ConfigError(f"{key} = {value!r}: port {port!r} is not a number") from None
    if not 0 <= port_number <= 65535:
        raise ConfigError(f"{key} = {value!r}: port {port_number} is out of range 0-65535")
    return host.strip("[]"), port_number


TLS_SCHEMES = ("grpcs", "https")


def grpc_target(url: str, key: str) -> str:
    """Turn the guide's `http://host:port` (or plain `host:port`) into a gRPC target.

    `grpcs://host:port` and `https://host:port` (TLS) become `grpcs://host:port`, which
    `expbuild.client.channel.open_channel` opens with TLS.
    """
    text = str(url).strip()
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme not in ("http", "grpc") + TLS_SCHEMES:
            raise ConfigError(
                f"{key} = {url!r}: scheme {parsed.scheme!r} is not supported "
                "(use http://, grpc://, or grpcs:// for TLS)"
            )
        if not parsed.hostname or not parsed.port:
            raise ConfigError(f"{key} = {url!r}: expected http://host:port")
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        prefix = "grpcs://" if parsed.scheme in TLS_SCHEMES else ""
        return f"{prefix}{host}:{parsed.port}"
    parse_address(text, key)
    return text


def grpc_targets(urls: str, key: str) -> tuple[str, ...]:
    """Several replicas' URLs, separated by commas, each as `grpc_target` takes it."""
    parts = [part for part in str(urls).split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"{key} = {urls!r}: no server address")
    return tuple(grpc_target(part, key) for part in parts)


def _url_list(value: Any, key: str) -> str:
    """A TOML list of URLs (or one string, commas allowed) as one comma-separated string."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v).strip() for v in value)
    text = str(value)
    grpc_targets(text, key)
    return text


def _retention(value: Any, key: str) -> timedelta | None:
    """A duration, or None for "forever"."""
    if value is None or value == "forever":
        return None
    return parse_duration(value, key)


def parse_duration(value: Any, key: str) -> timedelta:
    """A positive duration: seconds as a number, or a string with a unit ("500ms", "30s",
    "5m", "1h", "7d"); the error names `key`."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ConfigError(f'{key} = {value!r}: expected a duration such as 30 or "30s"')
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0))
        for suffix, scale in units:
            if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
                seconds = float(text[: -len(suffix)]) * scale
                break
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ConfigError(
                    f'{key} = {value!r}: expected a duration such as 30, "30s", "5m"'
                ) from None
    if seconds <= 0:
        raise ConfigError(f"{key} = {value!r}: must be positive")
    return timedelta(seconds=seconds)


def _non_negative_int(value: Any, key: str) -> int:
    """An integer >= 0 (0 usually meaning "no limit")."""
    if value in (0, "0"):
        return 0
    return _positive_int(value, key)


def _positive_int(value: Any, key: str) -> int:
    """An integer >= 1, given as a TOML integer or a decimal string (from the environment)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    else:
        raise ConfigError(f"{key} = {value!r}: expected a positive integer")
    if number < 1:
        raise ConfigError(f"{key} = {value!r}: expected a positive integer")
    return number


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


def _size(value: Any, key: str) -> int:
    """Bytes as an integer, or with a unit: "512MiB", "2GiB", "1.5G" (binary), "100MB" (decimal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        try:
            number = float(digits) * _SIZE_UNITS[unit]
        except (ValueError, KeyError):
            raise ConfigError(
                f'{key} = {value!r}: expected a size such as 268435456, "256MiB" or "2GiB"'
            ) from None
    if number < 1:
        raise ConfigError(f"{key} = {value!r}: must be at least 1 byte")
    return int(number)


def _size_or_off(value: Any, key: str) -> int:
    """A size where 0 (or an empty value) switches the bounded thing off."""
    return 0 if str(value).strip() in ("0", "") else _size(value, key)


def _positive_float(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r}: expected a positive number") from None
    if isinstance(value, bool) or not number > 0:
        raise ConfigError(f"{key} = {value!r}: expected a positive number")
    return number


def _absolute_paths(value: Any, key: str) -> tuple[str, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    paths = tuple(str(v) for v in values)
    for path in paths:
        if not path.startswith("/"):
            raise ConfigError(f"{key}: {path!r} is not an absolute path")
    return paths


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key} = {value!r}: expected true or false")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ConfigError(f"{key} = {value!r}: unknown value; expected one of {', '.join(choices)}")
    return text


def parse_platform(raw: Any, key: str) -> dict[str, tuple[str, ...]]:
    """`{OSFamily = "linux", ISA = ["x86-64", "x86_64"]}` -> {"OSFamily": ("linux",), ...}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table of property = value")
    if any(not str(name).strip() for name in raw):
        raise ConfigError(f"{key}: a property has an empty name")
    return {name: tuple(values) for name, values in normalize_platform(raw).items()}


def worker_platform(raw: Any) -> dict[str, tuple[str, ...]]:
    """`[worker.platform]`, its OSFamily in the REAPI lexicon's spelling: an older
    configuration's `OSFamily = "Linux"` still works, with a warning."""
    platform = parse_platform(raw, "worker.platform")
    if OS_FAMILY in platform:
        values = tuple(respelled(platform[OS_FAMILY]))
        if values != platform[OS_FAMILY]:
            log.warning(
                "[worker.platform] OSFamily = %s: REAPI's platform lexicon spells it %s; "
                "advertising %s (actions asking for either spelling match)",
                ", ".join(platform[OS_FAMILY]),
                ", ".join(values),
                ", ".join(values),
            )
            platform[OS_FAMILY] = values
    return platform


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return {str(k).lower(): v for k, v in value.items()}


def _get(section: dict, name: str, default: Any) -> Any:
    """The value if the key is present (an empty string counts: it switches things off)."""
    value = section.get(name)
    return default if value is None else value


def _reader(section: dict, prefix: str):
    """`read(name, parse, defaults)`: the section's value for `name` (or the default
    dataclass's), parsed, with errors naming `prefix.name`."""

    def read(name: str, parse, defaults) -> Any:
        return parse(_get(section, name, getattr(defaults, name)), f"{prefix}.{name}")

    return read


# Each table of the configuration and the settings class whose fields are its keys;
# None: a free-form table (platform properties).
SECTIONS: dict[str, type | None] = {
    "server": ServerSettings,
    "execution": ExecutionSettings,
    "database": DatabaseSettings,
    "cas": CasSettings,
    "asset": AssetSettings,
    "auth": AuthSettings,
    "worker": WorkerSettings,
    "worker.backend": BackendSettings,
    "worker.limits": LimitsSettings,
    "worker.cache": CacheSettings,
    "worker.platform": None,
}


def _known_keys(section: str) -> list[str]:
    if not section:
        return [name for name in SECTIONS if "." not in name]
    cls = SECTIONS[section]
    return [f.name for f in fields(cls)] if cls is not None else []


def check_known_keys(raw: dict, origin: str, section: str = "") -> None:
    """Raise ConfigError for the first key that no setting reads (a misspelling would
    otherwise be silently ignored), naming the nearest known key."""
    for key, value in raw.items():
        name = str(key).lower()
        path = f"{section}.{name}" if section else name
        if path in SECTIONS:
            if SECTIONS[path] is not None and isinstance(value, dict):
                check_known_keys(value, origin, path)
            continue
        known = _known_keys(section)
        if name in known:
            continue
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        where = f"[{section}] {name}" if section else f"[{name}]"
        hint = f"; did you mean {nearest[0]}?" if nearest else f"; known: {', '.join(known)}"
        raise ConfigError(f"unknown key {where} in {origin}{hint}")


def settings_from_mapping(raw: dict, source: str = "mapping", origin: str = "") -> Settings:
    """Build and validate typed settings from a plain nested mapping (`origin`, for
    messages, says where it came from; `source` by default)."""
    raw = {str(k).lower(): v for k, v in raw.items()}
    check_known_keys(raw, origin or source)
    s, e, d, c, w = (_section(raw, n) for n in ("server", "execution", "database", "cas", "worker"))
    defaults_server = ServerSettings()

    srv = _reader(s, "server")
    address = str(_get(s, "address", defaults_server.address))
    parse_address(address, "server.address")
    metrics_address = str(_get(s, "metrics_address", defaults_server.metrics_address))
    if metrics_address:
        parse_address(metrics_address, "server.metrics_address")
    instance_names = _get(s, "instance_names", list(defaults_server.instance_names))
    if isinstance(instance_names, str):
        instance_names = [instance_names]
    server = ServerSettings(
        address=address,
        processes=srv("processes", _non_negative_int, defaults_server),
        metrics_address=metrics_address,
        instance_names=tuple(str(n) for n in instance_names),
        lease_duration=srv("lease_duration", parse_duration, defaults_server),
        heartbeat_interval=srv("heartbeat_interval", parse_duration, defaults_server),
        worker_offline_timeout=srv("worker_offline_timeout", parse_duration, defaults_server),
        worker_disconnect_grace=srv("worker_disconnect_grace", parse_duration, defaults_server),
        max_queued_tasks=srv("max_queued_tasks", _non_negative_int, defaults_server),
        poll_timeout=srv("poll_timeout", parse_duration, defaults_server),
        reap_interval=srv("reap_interval", parse_duration, defaults_server),
        max_attempts=srv("max_attempts", _positive_int, defaults_server),
        notify_fallback_interval=srv("notify_fallback_interval", parse_duration, defaults_server),
        max_batch_total_size_bytes=srv(
            "max_batch_total_size_bytes", _positive_int, defaults_server
        ),
        max_directory_size_bytes=srv("max_directory_size_bytes", _positive_int, defaults_server),
        allow_action_cache_updates=srv("allow_action_cache_updates", _bool, defaults_server),
        max_action_timeout=srv("max_action_timeout", parse_duration, defaults_server),
        reject_unmatched_platforms=srv("reject_unmatched_platforms", _bool, defaults_server),
        task_retention=srv("task_retention", parse_duration, defaults_server),
        history_retention=srv("history_retention", _retention, defaults_server),
        worker_address=str(_get(s, "worker_address", "")),
        allow_insecure_public=srv("allow_insecure_public", _bool, defaults_server),
        fair_scheduling=srv("fair_scheduling", _bool, defaults_server),
        **{key: str(_get(s, key, "")) for key in TLS_FILE_KEYS},
    )
    if server.worker_address:
        parse_address(server.worker_address, "server.worker_address")
    _check_tls_pair(server.tls_cert, server.tls_key, "server.tls_cert", "server.tls_key")
    _check_tls_pair(
        server.worker_tls_cert,
        server.worker_tls_key,
        "server.worker_tls_cert",
        "server.worker_tls_key",
    )
    if server.lease_duration <= server.heartbeat_interval:
        raise ConfigError(
            f"server.lease_duration ({server.lease_duration.total_seconds():g}s) must be longer than "
            f"server.heartbeat_interval ({server.heartbeat_interval.total_seconds():g}s)"
        )

    a = _section(raw, "auth")
    auth = AuthSettings(
        mode=_choice(_get(a, "mode", AuthSettings.mode), "auth.mode", AUTH_MODES),
        cache_ttl=_reader(a, "auth")("cache_ttl", parse_duration, AuthSettings()),
    )

    execution = ExecutionSettings(
        backend=_choice(
            _get(e, "backend", ExecutionSettings.backend), "execution.backend", EXECUTION_BACKENDS
        ),
        local_workers=_reader(e, "execution")("local_workers", _positive_int, ExecutionSettings()),
    )
    db = _reader(d, "database")
    database = DatabaseSettings(
        url=str(_get(d, "url", "")),
        pool_min_size=db("pool_min_size", _positive_int, DatabaseSettings()),
        pool_max_size=db("pool_max_size", _positive_int, DatabaseSettings()),
        connect_wait=db("connect_wait", parse_duration, DatabaseSettings()),
        embedded_data_dir=str(_get(d, "embedded_data_dir", "")),
    )
    if database.url and urlparse(database.url).scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"database.url = {database.url!r}: expected postgresql://user@host:port/dbname"
        )
    cas_field = _reader(c, "cas")
    cas = CasSettings(
        root=str(_get(c, "root", "")),
        fsync=_choice(_get(c, "fsync", CasSettings.fsync), "cas.fsync", CAS_FSYNC_MODES),
        max_size=cas_field("max_size", _size_or_off, CasSettings()),
        eviction_interval=cas_field("eviction_interval", parse_duration, CasSettings()),
    )
    asset_field = _reader(_section(raw, "asset"), "asset")
    asset = AssetSettings(
        max_download_size=asset_field("max_download_size", _size, AssetSettings()),
        download_timeout=asset_field("download_timeout", parse_duration, AssetSettings()),
    )

    b = {str(k).lower(): v for k, v in (w.get("backend") or {}).items()}
    ro_binds = b.get("ro_binds")
    backend = BackendSettings(
        type=_choice(_get(b, "type", BackendSettings.type), "worker.backend.type", WORKER_BACKENDS),
        work_dir=str(_get(b, "work_dir", BackendSettings.work_dir)),
        sandbox_root=_choice(
            _get(b, "sandbox_root", BackendSettings.sandbox_root),
            "worker.backend.sandbox_root",
            SANDBOX_ROOTS,
        ),
        ro_binds=None if ro_binds is None else _absolute_paths(ro_binds, "worker.backend.ro_binds"),
        run_as=str(_get(b, "run_as", BackendSettings.run_as)),
        max_directory_size=_size(
            _get(b, "max_directory_size", BackendSettings.max_directory_size),
            "worker.backend.max_directory_size",
        ),
    )
    limits = _limits({str(k).lower(): v for k, v in (w.get("limits") or {}).items()})
    # Several replicas: a TOML list, or commas; the worker moves to another when one fails.
    server_url = _url_list(_get(w, "server_url", WorkerSettings.server_url), "worker.server_url")
    cas_url = str(_get(w, "cas_url", ""))
    if cas_url:
        grpc_target(cas_url, "worker.cas_url")
    heartbeat = w.get("heartbeat_interval")
    worker_metrics = str(_get(w, "metrics_address", WorkerSettings.metrics_address))
    if worker_metrics:
        parse_address(worker_metrics, "worker.metrics_address")
    worker = WorkerSettings(
        server_url=server_url,
        cas_url=cas_url,
        max_concurrent_tasks=_positive_int(
            _get(w, "max_concurrent_tasks", WorkerSettings.max_concurrent_tasks),
            "worker.max_concurrent_tasks",
        ),
        name=str(_get(w, "name", "")) or socket.gethostname(),
        platform=worker_platform(w.get("platform")),
        heartbeat_interval=parse_duration(heartbeat, "worker.heartbeat_interval")
        if heartbeat
        else None,
        poll_timeout=parse_duration(
            _get(w, "poll_timeout", WorkerSettings.poll_timeout), "worker.poll_timeout"
        ),
        backend=backend,
        limits=limits,
        cache=_cache({str(k).lower(): v for k, v in (w.get("cache") or {}).items()}),
        metrics_address=worker_metrics,
        tls_ca=str(_get(w, "tls_ca", "")),
        tls_cert=str(_get(w, "tls_cert", "")),
        tls_key=str(_get(w, "tls_key", "")),
        token_file=str(_get(w, "token_file", "")),
    )
    _check_tls_pair(worker.tls_cert, worker.tls_key, "worker.tls_cert", "worker.tls_key")
    return Settings(
        server=server,
        execution=execution,
        database=database,
        cas=cas,
        asset=asset,
        worker=worker,
        auth=auth,
        source=source,
    )


TLS_FILE_KEYS = (
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "worker_tls_cert",
    "worker_tls_key",
    "worker_tls_client_ca",
)


def _check_tls_pair(cert: str, key: str, cert_name: str, key_name: str) -> None:
    if bool(cert) != bool(key):
        missing = key_name if cert else cert_name
        raise ConfigError(f"{missing} is empty: a TLS certificate needs its key and vice versa")


def _cache(raw: dict) -> CacheSettings:
    """`[worker.cache]`; max_size 0 turns the cache off."""
    max_size = _get(raw, "max_size", CacheSettings.max_size)
    fraction = _get(raw, "verify_fraction", CacheSettings.verify_fraction)
    try:
        verify_fraction = float(fraction)
    except (TypeError, ValueError):
        verify_fraction = -1.0
    if isinstance(fraction, bool) or not 0.0 <= verify_fraction <= 1.0:
        raise ConfigError(
            f"worker.cache.verify_fraction = {fraction!r}: expected a number from 0 to 1"
        )
    return CacheSettings(
        dir=str(_get(raw, "dir", "")),
        max_size=_size_or_off(max_size, "worker.cache.max_size"),
        verify_fraction=verify_fraction,
    )


def _limits(raw: dict) -> LimitsSettings:
    """`[worker.limits]`; a key that is absent or empty sets no limit."""

    def given(name: str) -> Any:
        value = raw.get(name)
        return None if value is None or value == "" else value

    timeout, memory, cpu_time = given("timeout"), given("memory"), given("cpu_time")
    output, processes, cpus = given("max_output_size"), given("max_processes"), given("cpus")
    return LimitsSettings(
        timeout=None if timeout is None else parse_duration(timeout, "worker.limits.timeout"),
        memory=None if memory is None else _size(memory, "worker.limits.memory"),
        # RLIMIT_CPU counts whole seconds.
        cpu_time=None
        if cpu_time is None
        else math.ceil(parse_duration(cpu_time, "worker.limits.cpu_time").total_seconds()),
        max_output_size=None if output is None else _size(output, "worker.limits.max_output_size"),
        max_processes=None
        if processes is None
        else _positive_int(processes, "worker.limits.max_processes"),
        cpus=None if cpus is None else _positive_float(cpus, "worker.limits.cpus"),
        cgroups=_bool(_get(raw, "cgroups", True), "worker.limits.cgroups"),
    )


def _find_config(path: str) -> Path:
    """Accept the guide's bare names (`expbuild-worker.toml`) as well as paths."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    for folder in (Path("configs"), Path(__file__).resolve().parent.parent / "configs"):
        if (folder / candidate.name).exists():
            return folder / candidate.name
    raise ConfigError(f"config file {path!r} not found (looked in ., ./configs)")


def load_settings(config_path: str | None = None) -> Settings:
    """Read the TOML file (if any) and `EXPBUILD_*` overrides into validated settings."""
    from dynaconf import Dynaconf

    files: list[str] = []
    source = "defaults"
    if config_path:
        found = _find_config(config_path)
        files.append(str(found))
        source = str(found)
    try:
        raw = Dynaconf(
            envvar_prefix="EXPBUILD",
            settings_files=files,
            environments=False,
            load_dotenv=False,
            merge_enabled=True,
        ).as_dict()
    except Exception as exc:  # dynaconf surfaces TOML syntax errors as various types
        raise ConfigError(f"cannot read {source}: {exc}") from None
    if files and files[0].endswith(".toml"):
        with open(files[0], "rb") as handle:
            check_known_keys(tomllib.load(handle), source)
    # Top-level EXPBUILD_ variables that name no table are the commands' own (EXPBUILD_TOKEN,
    # EXPBUILD_CONFIG, ...); inside a table every key must be known, from a file or not.
    raw = {k: v for k, v in raw.items() if str(k).lower() in SECTIONS}
    origin = f"{source} or EXPBUILD_ environment variables" if files else "EXPBUILD_ variables"
    return settings_from_mapping(raw, source=source, origin=origin)
