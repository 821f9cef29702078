"""Wire one server replica together: pool, CAS, LISTEN, servicers, reaper, CAS eviction,
health, metrics.

`ServerApp` holds no state of its own beyond connections: stop it at any moment and
another replica (or a restart) carries on from what is in Postgres and the CAS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass

import asyncpg
import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expbuild.cas.eviction import EvictionReport, evict_to_size
from expbuild.cas.store import FileStore
from expbuild.config import Settings, parse_address
from expbuild.db import queue, workers
from expbuild.db.locks import CAS_EVICTION_LOCK, try_advisory_lock
from expbuild.db.migrate import migrate
from expbuild.db.notifications import Notifications
from expbuild.db.pool import create_pool
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc, worker_pb2, worker_pb2_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.scheduling.operations import OperationTracker
from expbuild.scheduling.task_names import task_name
from expbuild.server import metrics
from expbuild.server.action_cache import ActionCacheServicer
from expbuild.server.bytestream import ByteStreamServicer
from expbuild.server.capabilities import CapabilitiesServicer
from expbuild.server.cas import ContentAddressableStorageServicer
from expbuild.server.decoding import DecodingInterceptor
from expbuild.server.execution import ExecutionServicer
from expbuild.server.instances import InstanceNames
from expbuild.server.operations import OperationsServicer
from expbuild.server.worker_admin import WorkerAdminServicer
from expbuild.server.worker_api import WorkerServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAMES = (
    re_pb2.DESCRIPTOR.services_by_name["Execution"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerAdminService"].full_name,
    "google.longrunning.Operations",
)


@dataclass
class ServerApp:
    settings: Settings
    database_url: str
    port: int = 0
    metrics_port: int | None = None

    async def start(self) -> None:
        settings = self.settings
        self.pool: asyncpg.Pool = await create_pool(
            self.database_url,
            settings.database.pool_min_size,
            settings.database.pool_max_size,
            wait=settings.database.connect_wait.total_seconds(),
        )
        async with self.pool.acquire() as conn:
            for migration in await migrate(conn):
                log.info("Applied migration %04d_%s", migration.version, migration.name)
        self.store = FileStore(settings.cas_root(), fsync=settings.cas.fsync)
        self.notifications = Notifications(
            self.database_url, settings.server.notify_fallback_interval
        )
        await self.notifications.start()

        instances = InstanceNames(settings.server.instance_names)
        tracker = OperationTracker(self.pool, self.notifications)
        server = grpc.aio.server(
            interceptors=[DecodingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        s = settings.server
        re_grpc.add_ExecutionServicer_to_server(
            ExecutionServicer(self.pool, self.store, tracker, instances, s), server
        )
        re_grpc.add_ActionCacheServicer_to_server(
            ActionCacheServicer(self.pool, self.store, instances, s), server
        )
        re_grpc.add_ContentAddressableStorageServicer_to_server(
            ContentAddressableStorageServicer(
                self.store, instances, s.max_batch_total_size_bytes, s.max_directory_size_bytes
            ),
            server,
        )
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesServicer(s, instances), server)
        bytestream_pb2_grpc.add_ByteStreamServicer_to_server(
            ByteStreamServicer(self.store, instances), server
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.pool, self.store, self.notifications, s), server
        )
        worker_pb2_grpc.add_WorkerAdminServiceServicer_to_server(
            WorkerAdminServicer(self.pool), server
        )
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(tracker), server)

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            SERVICE_NAMES
            + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        host, port = parse_address(s.address, "server.address")
        bind = (
            f"[{host}]:{port if not self.port else self.port}"
            if ":" in host
            else f"{host}:{port if not self.port else self.port}"
        )
        self.port = server.add_insecure_port(bind)
        await server.start()
        self.server = server
        for name in SERVICE_NAMES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

        if s.metrics_address:
            mhost, mport = parse_address(s.metrics_address, "server.metrics_address")
            self.metrics_port = metrics.start_http_server(
                mhost, mport if self.metrics_port is None else self.metrics_port
            )
        self._background = [
            asyncio.create_task(
                self._every(s.reap_interval.total_seconds(), self.reap_once, "reaper"),
                name="reaper",
            ),
            asyncio.create_task(
                self._every(
                    metrics.REFRESH_SECONDS,
                    functools.partial(metrics.refresh_gauges, self.pool),
                    "metrics refresh",
                ),
                name="metrics",
            ),
        ]
        metrics.CAS_MAX_BYTES.set(settings.cas.max_size)
        if settings.cas.max_size > 0:
            interval = settings.cas.eviction_interval.total_seconds()
            self._background.append(
                asyncio.create_task(
                    self._every(interval, self.evict_once, "CAS eviction"), name="cas-eviction"
                )
            )
        log.info("ExpBuild server listening on %s:%d (CAS at %s)", host, self.port, self.store.root)

    async def _every(self, seconds: float, one_pass, what: str) -> None:
        """Run `one_pass` forever, `seconds` apart; a failed pass is logged, not fatal
        (the database may be restarting)."""
        while True:
            try:
                await one_pass()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("%s pass failed", what)
            await asyncio.sleep(seconds)

    async def reap_once(self) -> None:
        s = self.settings.server
        for worker_id in await workers.mark_silent_workers_offline(
            self.pool, s.worker_offline_timeout
        ):
            log.warning("Worker %s missed its heartbeats; marked offline", worker_id)
        for task in await queue.reap_expired_leases(self.pool):
            metrics.REAPED_TASKS.labels(task.state).inc()
            outcome = (
                f"failed after {task.attempts} attempts" if task.state == "failed" else "requeued"
            )
            log.warning(
                "Task %s %s (%s on worker %s)",
                task_name(task.task_id),
                outcome,
                task.reason.replace("-", " "),
                task.worker_id,
            )
        purged = await queue.purge_finished_tasks(self.pool, s.task_retention)
        if purged:
            log.info("Purged %d finished task(s) older than %s", purged, s.task_retention)

    async def evict_once(self) -> EvictionReport | None:
        """One LRU eviction pass down to `[cas] max_size`; None if another replica is at it."""
        max_size = self.settings.cas.max_size
        # The lock is on a connection of its own, so a long scan holds none of the pool's.
        async with try_advisory_lock(self.database_url, CAS_EVICTION_LOCK) as held:
            if not held:
                return None
            report = await evict_to_size(self.store, max_size)
        metrics.CAS_STORE_BYTES.set(report.remaining_bytes)
        if report.removed:
            metrics.CAS_EVICTED_BLOBS.inc(report.removed)
            metrics.CAS_EVICTED_BYTES.inc(report.removed_bytes)
            mib = 1024 * 1024
            log.info(
                "CAS eviction: removed %d blobs (%.1f MiB), store now %.1f MiB of %.1f MiB",
                report.removed,
                report.removed_bytes / mib,
                report.remaining_bytes / mib,
                max_size / mib,
            )
        return report

    async def stop(self, grace: float = 5.0) -> None:
        for task in getattr(self, "_background", []):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if hasattr(self, "server"):
            await self.server.stop(grace)
        if hasattr(self, "notifications"):
            await self.notifications.stop()
        if hasattr(self, "pool"):
            await self.pool.close()
        if hasattr(self, "store"):
            await asyncio.to_thread(self.store.close)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
