"""Prometheus metrics of a worker daemon, served at `/metrics` of `[worker] metrics_address`.

Every definition lives here (the worker imports nothing from the server). In a process
that also runs a server replica (`expbuild up`, local workers) they appear on the
replica's /metrics instead.
"""

from __future__ import annotations

import errno

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from expbuild.config import ConfigError

RUNNING_ACTIONS = Gauge("expbuild_worker_running_actions", "Actions this worker is running")
INPUT_CACHE_HITS = Counter(
    "expbuild_worker_input_cache_hits", "Input blobs found in the worker's blob cache"
)
INPUT_CACHE_MISSES = Counter(
    "expbuild_worker_input_cache_misses", "Input blobs the blob cache had to fetch from the CAS"
)
INPUT_CACHE_HIT_RATIO = Gauge(
    "expbuild_worker_input_cache_hit_ratio",
    "Hits over lookups of the blob cache since the worker started (0 before any lookup)",
)
BYTES_FETCHED = Counter(
    "expbuild_worker_fetched_bytes", "Input bytes the blob cache downloaded from the CAS"
)
INPUT_FETCH = Histogram(
    "expbuild_worker_input_fetch_seconds",
    "Time to materialise an action's input root",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
BACKEND_LAUNCH = Histogram(
    "expbuild_worker_backend_launch_seconds",
    "From asking the backend to run a command to the command starting, by backend",
    ["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def _hit_ratio() -> float:
    hits = INPUT_CACHE_HITS._value.get()  # noqa: SLF001 - prometheus-client has no reader
    lookups = hits + INPUT_CACHE_MISSES._value.get()  # noqa: SLF001
    return hits / lookups if lookups else 0.0


INPUT_CACHE_HIT_RATIO.set_function(_hit_ratio)


def record_input_cache(hits: int, fetched_blobs: int, fetched_bytes: int) -> None:
    INPUT_CACHE_HITS.inc(hits)
    INPUT_CACHE_MISSES.inc(fetched_blobs)
    BYTES_FETCHED.inc(fetched_bytes)


def start_http_server(address: str) -> int:
    """Serve /metrics on `[worker] metrics_address` in a background thread; the bound port.

    A port in use is a ConfigError naming the key."""
    from expbuild.config import parse_address

    host, port = parse_address(address, "worker.metrics_address")
    try:
        server, _thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"failed: {exc.strerror}"
        raise ConfigError(f"[worker] metrics_address {address} {reason}") from None
    return server.server_port
