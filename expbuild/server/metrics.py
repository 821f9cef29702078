"""Prometheus metrics of a server replica: every definition lives in this module.

Counters and histograms count what this replica did (sum them over replicas); gauges
describe the shared queue and the CAS and are read from Postgres and the store, so every
replica reports the same values (scrape any one of them, or aggregate with max()).
The HTTP endpoint that serves them (with the status page) is `expbuild.server.http`.

The processes of one `expbuild server --processes N` write these to files in a private
directory (prometheus-client's multiprocess mode) and their parent serves the sum: counters
and histograms add up; the shared gauges are set by one process (the housekeeper) and read
as its most recent value ("livemostrecent": a dead process's values go with it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Final

import asyncpg
import grpc
from prometheus_client import Counter, Gauge, Histogram

from expbuild.db.metrics import queue_depth, queue_gauges
from expbuild.reapi.platforms import platform_text

# Gauges of shared state, set by one process: N children must not read N times the queue.
SHARED: Final = "livemostrecent"

REFRESH_SECONDS = 5.0
"""How often each replica reads the queue gauges from Postgres."""
CAS_USAGE_SECONDS = 30.0
"""How often each replica measures the CAS (blob count and bytes) by scanning it."""

# Seconds, from sub-second no-ops to hour-long builds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800, 3600)  # fmt: skip

EXECUTE_REQUESTS = Counter(
    "expbuild_execute_requests",
    "Execute calls by outcome: cache_hit, queued (a new task), joined (merged into an "
    "identical in-flight task)",
    ["outcome"],
)
TASK_COMPLETIONS = Counter("expbuild_task_completions", "Results reported by workers", ["outcome"])
LEASE_ATTEMPTS = Counter(
    "expbuild_lease_attempts", "Lease statements run for polling workers", ["outcome"]
)
REAPED_TASKS = Counter("expbuild_reaped_tasks", "Leases ended by the reaper", ["outcome"])
LEASE_EXPIRIES = Counter(
    "expbuild_lease_expiries",
    "Leases the reaper ended, by reason (lease-expired, heartbeat-missed, worker-gone)",
    ["reason"],
)
TASK_REQUEUES = Counter(
    "expbuild_task_requeues",
    "Tasks put back in the queue, by reason (a reaper reason, or released by a worker)",
    ["reason"],
)
ACTION_CACHE_LOOKUPS = Counter(
    "expbuild_action_cache_lookups",
    "Action cache lookups by method (GetActionResult, Execute) and result (hit, miss)",
    ["method", "result"],
)

_TASK_LABELS = ["platform", "instance"]
TASK_QUEUE_WAIT = Histogram(
    "expbuild_task_queue_wait_seconds",
    "From enqueue to the lease that produced the result, per finished task",
    _TASK_LABELS,
    buckets=DURATION_BUCKETS,
)
TASK_EXECUTION = Histogram(
    "expbuild_task_execution_seconds",
    "From lease to result (fetching inputs, running, uploading outputs), per finished task",
    _TASK_LABELS,
    buckets=DURATION_BUCKETS,
)
TASK_TOTAL = Histogram(
    "expbuild_task_total_seconds",
    "From enqueue to result, per finished task",
    _TASK_LABELS,
    buckets=DURATION_BUCKETS,
)

# Blobs sent to clients and workers, by method (BatchReadBlobs, ByteStream.Read): how much
# the CAS is read, e.g. to see workers' blob caches at work. Bytes as sent (compressed
# when the client asked for compression).
CAS_BLOBS_READ = Counter("expbuild_cas_blobs_read", "Blobs served by the CAS", ["method"])
CAS_BYTES_READ = Counter("expbuild_cas_bytes_read", "Blob bytes served by the CAS", ["method"])
CAS_STORE_BYTES = Gauge(
    "expbuild_cas_store_bytes",
    "Bytes of blobs in the CAS (measured every 30 s or more and by eviction)",
    multiprocess_mode=SHARED,
)
CAS_STORE_BLOBS = Gauge(
    "expbuild_cas_store_blobs",
    "Blobs in the CAS (measured every 30 s or more and by eviction)",
    multiprocess_mode=SHARED,
)
CAS_MAX_BYTES = Gauge(
    "expbuild_cas_max_bytes",
    "The CAS size bound ([cas] max_size); 0: unbounded",
    multiprocess_mode=SHARED,
)
CAS_EVICTED_BLOBS = Counter("expbuild_cas_evicted_blobs", "Blobs deleted by CAS eviction")
CAS_EVICTED_BYTES = Counter("expbuild_cas_evicted_bytes", "Blob bytes deleted by CAS eviction")

QUEUE_GAUGES = {
    "queued": Gauge(
        "expbuild_tasks_queued", "Tasks waiting for a worker", multiprocess_mode=SHARED
    ),
    "leased": Gauge("expbuild_tasks_leased", "Tasks leased to a worker", multiprocess_mode=SHARED),
    "workers_online": Gauge(
        "expbuild_workers_online", "Workers heartbeating", multiprocess_mode=SHARED
    ),
    "workers_draining": Gauge(
        "expbuild_workers_draining",
        "Workers finishing up before leaving",
        multiprocess_mode=SHARED,
    ),
    "oldest_queued_seconds": Gauge(
        "expbuild_oldest_queued_task_age_seconds",
        "Age of the oldest queued task",
        multiprocess_mode=SHARED,
    ),
}
QUEUE_DEPTH = Gauge(
    "expbuild_queue_depth",
    "Unfinished tasks by state (queued, leased), platform and instance",
    ["state", "platform", "instance"],
    multiprocess_mode=SHARED,
)

PROCESS_RPCS = Counter(
    "expbuild_server_process_rpcs",
    "RPCs received by each process of `expbuild server --processes N` (how the shared port "
    "spreads the load)",
    ["process"],
)


class ProcessRpcCounter(grpc.aio.ServerInterceptor):
    """Counts every RPC under this process's number (`process` label)."""

    def __init__(self, process: int) -> None:
        self._count = PROCESS_RPCS.labels(str(process)).inc

    async def intercept_service(self, continuation, handler_call_details):
        self._count()
        return await continuation(handler_call_details)


def platform_label(platform: Mapping[str, Sequence[str]] | str) -> str:
    """A platform requirement as one label value: `Arch=x86_64,OSFamily=linux`."""
    if isinstance(platform, str):
        return _platform_label_of_json(platform)
    return platform_text(platform, separator=",")


@functools.lru_cache(maxsize=1024)
def _platform_label_of_json(platform: str) -> str:
    # A handful of platforms, each finished task naming one: decode each JSON text once.
    return platform_text(json.loads(platform), separator=",")


def observe_finished_task(platform: str, instance: str, waited: float, ran: float) -> None:
    """Record a finished task: its platform (JSON), instance and the seconds it waited for
    its lease and ran."""
    labels = (platform_label(platform), instance)
    waited, ran = max(waited, 0.0), max(ran, 0.0)
    TASK_QUEUE_WAIT.labels(*labels).observe(waited)
    TASK_EXECUTION.labels(*labels).observe(ran)
    TASK_TOTAL.labels(*labels).observe(waited + ran)


def set_cas_usage(blobs: int, size_bytes: int) -> None:
    CAS_STORE_BLOBS.set(blobs)
    CAS_STORE_BYTES.set(size_bytes)


async def refresh_gauges(pool: asyncpg.Pool) -> None:
    """Read the shared queue gauges from Postgres (the app runs this every few seconds)."""
    for name, value in (await queue_gauges(pool)).items():
        QUEUE_GAUGES[name].set(value)
    depth = {
        (row.state, platform_label(row.platform), row.instance_name): row.tasks
        for row in await queue_depth(pool)
    }
    for labels in _known_depth_labels - depth.keys():
        # A platform whose queue emptied reads 0 rather than vanishing (alerts see it drop).
        QUEUE_DEPTH.labels(*labels).set(0)
    for labels, tasks in depth.items():
        QUEUE_DEPTH.labels(*labels).set(tasks)
    _known_depth_labels.update(depth)


_known_depth_labels: set[tuple[str, str, str]] = set()
