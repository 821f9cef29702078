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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expbuild.assets.catalog import AssetCatalog
from expbuild.auth.exposure import check_exposure
from expbuild.auth.interceptor import WORKER_CERTIFICATE_SCOPES, AuthInterceptor
from expbuild.auth.principal import Principal
from expbuild.auth.scopes import WORKER as WORKER_SCOPE
from expbuild.auth.token_secrets import new_secret
from expbuild.auth.verifier import TokenVerifier
from expbuild.cas.eviction import EvictionReport, evict_to_size, measure_usage
from expbuild.cas.store import FileStore
from expbuild.config import ConfigError, Settings, parse_address
from expbuild.db import assets, queue, workers
from expbuild.db.locks import CAS_EVICTION_LOCK, try_advisory_lock
from expbuild.db.migrate import migrate
from expbuild.db.notifications import Notifications
from expbuild.db.outages import is_database_outage
from expbuild.db.pool import create_pool
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc, worker_pb2, worker_pb2_grpc
from expbuild.proto import remote_asset_pb2 as ra_pb2
from expbuild.proto import remote_asset_pb2_grpc as ra_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.scheduling.operations import OperationTracker
from expbuild.scheduling.sessions import WorkerSessions
from expbuild.scheduling.task_names import task_name
from expbuild.server import http, metrics
from expbuild.server.action_cache import ActionCacheServicer
from expbuild.server.bytestream import ByteStreamServicer
from expbuild.server.capabilities import CapabilitiesServicer
from expbuild.server.cas import ContentAddressableStorageServicer
from expbuild.server.decoding import DecodingInterceptor
from expbuild.server.execution import ExecutionServicer
from expbuild.server.instances import InstanceNames
from expbuild.server.operations import OperationsServicer
from expbuild.server.remote_asset import FetchServicer, PushServicer
from expbuild.server.worker_admin import WorkerAdminServicer
from expbuild.server.worker_api import WorkerServicer

log = logging.getLogger(__name__)

LOCAL_WORKERS = "local-workers"  # the principal of a replica's in-process workers

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE_NAMES = (
    re_pb2.DESCRIPTOR.services_by_name["Execution"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    ra_pb2.DESCRIPTOR.services_by_name["Fetch"].full_name,
    ra_pb2.DESCRIPTOR.services_by_name["Push"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["WorkerAdminService"].full_name,
    "google.longrunning.Operations",
)
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
WORKER_LISTENER_SERVICES = (
    WORKER_SERVICE,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
)


def _read_pem(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"{key} = {path!r}: cannot read it: {exc.strerror}") from None


@dataclass
class ServerApp:
    settings: Settings
    database_url: str
    port: int = 0
    metrics_port: int | None = None
    # Non-zero: the Worker API listener's port instead of [server] worker_address's (tests).
    worker_port_override: int = 0
    # Who may read the status pages; None: an `admin` token when `[auth] mode = "tokens"`,
    # everyone otherwise.
    status_access: http.ReadAccess | None = None
    cas_usage_interval: float = metrics.CAS_USAGE_SECONDS
    # Set for the processes of one `expbuild server --processes N` (expbuild.server.
    # process_group): its number, counted in `expbuild_server_process_rpcs`; the listeners
    # then join the port the parent holds (SO_REUSEPORT). A replica on its own binds
    # without that option, so a port in use is refused rather than silently shared.
    process_index: int | None = None
    # The periodic reaper, queue gauges, CAS measurement and eviction: shared work that one
    # process of a group does for all (the reaper is idempotent, so replicas on other hosts
    # running it too is fine; the point is not doing it N times per host).
    housekeeping: bool = True

    async def start(self) -> None:
        """Connect, migrate and serve; on any failure (a port in use: ConfigError naming
        the key) whatever was started is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        settings = self.settings
        check_exposure(settings)  # before anything starts: a refusal leaves nothing behind
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
        s = settings.server
        self.verifier = TokenVerifier(self.pool, settings.auth.cache_ttl.total_seconds())
        # The credential of this replica's in-process workers (`expbuild up`, backend local).
        self.local_worker_secret = new_secret()
        self.verifier.add_static(
            self.local_worker_secret, Principal.of(LOCAL_WORKERS, (WORKER_SCOPE,))
        )
        self.health = health.aio.HealthServicer()
        separate_workers = bool(s.worker_address)

        execution = ExecutionServicer(self.pool, self.store, tracker, instances, s)
        action_cache = ActionCacheServicer(self.pool, self.store, instances, s)
        cas = ContentAddressableStorageServicer(
            self.store, instances, s.max_batch_total_size_bytes, s.max_directory_size_bytes
        )
        capabilities = CapabilitiesServicer(s, instances)
        bytestream = ByteStreamServicer(self.store, instances)
        self.sessions = WorkerSessions(self.pool, s.worker_disconnect_grace, self.reap_once)
        worker_api = WorkerServicer(self.pool, self.store, self.notifications, s, self.sessions)
        self.worker_api = worker_api

        def storage(server: grpc.aio.Server) -> None:
            re_grpc.add_ContentAddressableStorageServicer_to_server(cas, server)
            re_grpc.add_CapabilitiesServicer_to_server(capabilities, server)
            bytestream_pb2_grpc.add_ByteStreamServicer_to_server(bytestream, server)

        # Clients: REAPI, Operations, admin, health, reflection (and the Worker API when
        # it has no listener of its own).
        server = self._new_server(s.tls_client_ca)
        re_grpc.add_ExecutionServicer_to_server(execution, server)
        re_grpc.add_ActionCacheServicer_to_server(action_cache, server)
        storage(server)
        catalog = AssetCatalog(self.pool, self.store, settings.asset)
        ra_grpc.add_FetchServicer_to_server(FetchServicer(catalog, instances), server)
        ra_grpc.add_PushServicer_to_server(PushServicer(catalog, instances), server)
        if not separate_workers:
            worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker_api, server)
        worker_pb2_grpc.add_WorkerAdminServiceServicer_to_server(
            WorkerAdminServicer(self.pool), server
        )
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(tracker), server)
        client_services = tuple(
            n for n in SERVICE_NAMES if not (separate_workers and n == WORKER_SERVICE)
        )
        self._add_health_and_reflection(server, client_services)
        self.port = self._listen(
            server, s.address, self.port, s.tls_cert, s.tls_key, s.tls_client_ca, "server."
        )
        self.servers = [server]
        self.worker_port = self.port
        if separate_workers:
            # Workers: the Worker API and the CAS they fetch inputs from and upload to.
            worker_server = self._new_server(s.worker_tls_client_ca)
            worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker_api, worker_server)
            storage(worker_server)
            self._add_health_and_reflection(worker_server, WORKER_LISTENER_SERVICES)
            self.worker_port = self._listen(
                worker_server,
                s.worker_address,
                self.worker_port_override,
                s.worker_tls_cert,
                s.worker_tls_key,
                s.worker_tls_client_ca,
                "server.worker_",
            )
            self.servers.append(worker_server)
        for each in self.servers:
            await each.start()
        self.server = server
        for name in SERVICE_NAMES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

        if s.metrics_address:
            mhost, mport = parse_address(s.metrics_address, "server.metrics_address")
            self.http_runner, self.metrics_port = await http.start(
                self.pool,
                mhost,
                mport if self.metrics_port is None else self.metrics_port,
                self.status_access or http.status_access(settings.auth.mode, self.verifier),
            )
        metrics.CAS_MAX_BYTES.set(settings.cas.max_size)
        self._background: list[asyncio.Task] = []
        if self.housekeeping:
            self._start_housekeeping()
        host, _ = parse_address(s.address, "server.address")
        log.info(
            "ExpBuild server listening on %s:%d%s (CAS at %s; auth: %s)",
            host,
            self.port,
            " with TLS" if s.tls_cert else "",
            self.store.root,
            settings.auth.mode,
        )
        if separate_workers:
            whost, _ = parse_address(s.worker_address, "server.worker_address")
            log.info(
                "Worker API listening on %s:%d%s",
                whost,
                self.worker_port,
                " with TLS" if s.worker_tls_cert else "",
            )

    def _start_housekeeping(self) -> None:
        s, cas = self.settings.server, self.settings.cas
        # The CAS passes scan every blob file: on a store of millions they take seconds of a
        # thread (and of the GIL), so they are spaced by what they cost, not only by the clock.
        loops: list[tuple[float, Callable[[], Awaitable[object]], str, float]] = [
            (s.reap_interval.total_seconds(), self.reap_once, "reaper", 0.0),
            (
                metrics.REFRESH_SECONDS,
                functools.partial(metrics.refresh_gauges, self.pool),
                "metrics refresh",
                0.0,
            ),
            (self.cas_usage_interval, self.measure_cas_once, "CAS usage", SCAN_PACE),
        ]
        if cas.max_size > 0:
            seconds = cas.eviction_interval.total_seconds()
            loops.append((seconds, self.evict_once, "CAS eviction", SCAN_PACE))
        for seconds, one_pass, what, pace in loops:
            self._background.append(
                asyncio.create_task(self._every(seconds, one_pass, what, pace=pace), name=what)
            )

    def _new_server(self, client_ca: str) -> grpc.aio.Server:
        # The first interceptor wraps the others: the caller is authenticated before its
        # request body is even parsed, so a stranger's garbage is UNAUTHENTICATED, and only
        # a known caller learns how its body is malformed (INVALID_ARGUMENT).
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.process_index is not None:
            interceptors.append(metrics.ProcessRpcCounter(self.process_index))
        if self.settings.auth.mode == "tokens":
            # A verified client certificate identifies a worker where a client CA is set.
            cert_scopes = WORKER_CERTIFICATE_SCOPES if client_ca else ()
            interceptors.append(AuthInterceptor(self.verifier, cert_scopes))
        interceptors.append(DecodingInterceptor())
        return grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.so_reuseport", int(self.process_index is not None)),
            ],
        )

    def _add_health_and_reflection(self, server: grpc.aio.Server, services) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            tuple(services)
            + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )

    @staticmethod
    def _listen(
        server: grpc.aio.Server,
        address: str,
        port_override: int,
        cert: str,
        key: str,
        client_ca: str,
        prefix: str,
    ) -> int:
        """Bind `address` (port `port_override` when non-zero), with TLS when `cert` is set;
        `prefix` ("server." or "server.worker_") names the keys in errors."""
        host, port = parse_address(address, f"{prefix}address")
        port = port_override or port
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if not cert:
                return server.add_insecure_port(bind)
            credentials = grpc.ssl_server_credentials(
                [(_read_pem(key, f"{prefix}tls_key"), _read_pem(cert, f"{prefix}tls_cert"))],
                root_certificates=(
                    _read_pem(client_ca, f"{prefix}tls_client_ca") if client_ca else None
                ),
                require_client_auth=bool(client_ca),
            )
            return server.add_secure_port(bind, credentials)
        except RuntimeError:  # grpc's "Failed to bind": the port is taken
            section, _, key = prefix.partition(".")
            raise ConfigError(f"[{section}] {key}address {bind} is already in use") from None

    async def _every(self, seconds: float, one_pass, what: str, *, pace: float = 0.0) -> None:
        """Run `one_pass` forever, `seconds` apart; a failed pass is logged, not fatal
        (the database may be restarting). With `pace`, the pause after a pass is also at
        least `pace` times as long as the pass took (see `pause_after`)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await one_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again next time
                if is_database_outage(exc):
                    log.warning("%s pass skipped: the database is unavailable (%s)", what, exc)
                else:
                    log.exception("%s pass failed", what)
            await asyncio.sleep(pause_after(seconds, loop.time() - started, pace))

    async def reap_once(self) -> None:
        s = self.settings.server
        for worker_id in await workers.mark_disconnected_workers_offline(
            self.pool, s.worker_disconnect_grace
        ):
            log.warning("Worker %s did not reconnect; marked offline", worker_id)
        for worker_id in await workers.mark_silent_workers_offline(
            self.pool, s.worker_offline_timeout
        ):
            log.warning("Worker %s missed its heartbeats; marked offline", worker_id)
        for task in await queue.reap_expired_leases(self.pool):
            metrics.REAPED_TASKS.labels(task.state).inc()
            metrics.LEASE_EXPIRIES.labels(task.reason).inc()
            if task.state == "queued":
                metrics.TASK_REQUEUES.labels(task.reason).inc()
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
        await queue.forget_idle_invocations(self.pool)
        purged = await queue.purge_finished_tasks(self.pool, s.task_retention)
        if purged:
            log.info("Purged %d finished task(s) older than %s", purged, s.task_retention)
        if s.history_retention is not None:
            events = await queue.purge_task_events(self.pool, s.history_retention)
            fetches = await assets.purge_asset_fetches(self.pool, s.history_retention)
            if events or fetches:
                log.info(
                    "Purged %d task event(s) and %d asset fetch record(s) older than %s",
                    events,
                    fetches,
                    s.history_retention,
                )

    async def measure_cas_once(self) -> None:
        usage = await measure_usage(self.store)
        metrics.set_cas_usage(usage.blobs, usage.total_bytes)

    async def evict_once(self) -> EvictionReport | None:
        """One LRU eviction pass down to `[cas] max_size`; None if another replica is at it."""
        max_size = self.settings.cas.max_size
        # The lock is on a connection of its own, so a long scan holds none of the pool's.
        async with try_advisory_lock(self.database_url, CAS_EVICTION_LOCK) as held:
            if not held:
                return None
            report = await evict_to_size(self.store, max_size)
        metrics.set_cas_usage(report.scanned - report.removed, report.remaining_bytes)
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
        if hasattr(self, "sessions"):
            # Before the listener closes: this replica going away is no worker's death.
            await self.sessions.close()
        for task in getattr(self, "_background", []):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if hasattr(self, "http_runner"):
            await self.http_runner.cleanup()
        await asyncio.gather(*(server.stop(grace) for server in getattr(self, "servers", [])))
        if hasattr(self, "notifications"):
            await self.notifications.stop()
        if hasattr(self, "pool"):
            try:
                # A connection still held by a call being torn down must not hold up a
                # replica's exit; the database rolls back whatever it had open.
                await asyncio.wait_for(self.pool.close(), timeout=grace + 5)
            except TimeoutError:
                log.warning("Database connections still busy at shutdown; closing them")
                self.pool.terminate()
        if hasattr(self, "store"):
            await asyncio.to_thread(self.store.close)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


# A CAS scan that took d seconds is followed by at least SCAN_PACE * d seconds without one:
# scanning a large store then takes at most ~1/SCAN_PACE of a core, however large it grows.
SCAN_PACE = 20.0


def pause_after(interval: float, elapsed: float, pace: float) -> float:
    """How long to wait before the next pass of a loop that runs every `interval` seconds,
    after a pass that took `elapsed`: at least `pace` times the pass's own duration."""
    return max(interval, pace * elapsed)
