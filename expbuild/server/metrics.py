"""Prometheus metrics: an HTTP /metrics endpoint on its own port (prometheus-client).

Counters count what this replica did; gauges describe the shared queue and are the same
on every replica (scrape any one of them, or aggregate with max()).
"""

from __future__ import annotations

import asyncpg
import prometheus_client
from prometheus_client import Counter, Gauge

from expbuild.db.metrics import queue_gauges

REFRESH_SECONDS = 5.0

EXECUTE_REQUESTS = Counter("expbuild_execute_requests", "Execute calls", ["outcome"])
TASK_COMPLETIONS = Counter("expbuild_task_completions", "Results reported by workers", ["outcome"])
LEASE_ATTEMPTS = Counter(
    "expbuild_lease_attempts", "Lease statements run for polling workers", ["outcome"]
)
REAPED_TASKS = Counter("expbuild_reaped_tasks", "Leases ended by the reaper", ["outcome"])
# Blobs sent to clients and workers, by method (BatchReadBlobs, ByteStream.Read): how much
# the CAS is read, e.g. to see workers' blob caches at work. Bytes as sent (compressed
# when the client asked for compression).
CAS_BLOBS_READ = Counter("expbuild_cas_blobs_read", "Blobs served by the CAS", ["method"])
CAS_BYTES_READ = Counter("expbuild_cas_bytes_read", "Blob bytes served by the CAS", ["method"])
# LRU eviction of the CAS ([cas] max_size): counted by the replica that ran the pass; the
# store's size is as last measured by this replica's eviction passes.
CAS_STORE_BYTES = Gauge(
    "expbuild_cas_store_bytes", "Bytes of blobs in the CAS at the last eviction pass"
)
CAS_MAX_BYTES = Gauge("expbuild_cas_max_bytes", "The CAS size bound ([cas] max_size); 0: unbounded")
CAS_EVICTED_BLOBS = Counter("expbuild_cas_evicted_blobs", "Blobs deleted by CAS eviction")
CAS_EVICTED_BYTES = Counter("expbuild_cas_evicted_bytes", "Blob bytes deleted by CAS eviction")

QUEUE_GAUGES = {
    "queued": Gauge("expbuild_tasks_queued", "Tasks waiting for a worker"),
    "leased": Gauge("expbuild_tasks_leased", "Tasks leased to a worker"),
    "workers_online": Gauge("expbuild_workers_online", "Workers heartbeating"),
    "workers_draining": Gauge("expbuild_workers_draining", "Workers finishing up before leaving"),
    "oldest_queued_seconds": Gauge(
        "expbuild_oldest_queued_task_age_seconds", "Age of the oldest queued task"
    ),
}


def start_http_server(host: str, port: int) -> int:
    """Serve /metrics in a background thread; returns the bound port (port 0 picks one)."""
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    return server.server_port


async def refresh_gauges(pool: asyncpg.Pool) -> None:
    """Read the shared queue gauges from Postgres (the app runs this every few seconds)."""
    for name, value in (await queue_gauges(pool)).items():
        QUEUE_GAUGES[name].set(value)
