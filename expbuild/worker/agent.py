"""The worker daemon's protocol loop: register, heartbeat, poll, run, report, shut down.

Concurrency model: one asyncio task polls, one heartbeats, and every leased task runs as
its own asyncio task (at most `max_concurrent_tasks` at once). Stopping a running action
means cancelling its asyncio task; the execution backend kills the process group and the
runner removes the action directory on the way out.

Shutdown (`request_stop`, wired to SIGINT/SIGTERM by `expbuild worker daemon`): polling stops
at once (the in-flight long poll is cancelled), running actions get `shutdown_grace`
seconds to finish and report, the rest are killed and handed back with ReleaseTask, then
the worker deregisters. A second `request_stop` skips what is left of the grace period.

Riding out server outages: the worker keeps a session stream (`OpenSession`) open and
reopens it whenever it breaks, so the server can tell a dead worker from a restarting
replica. A finished action's result is kept and its report retried with backoff for as long
as its lease could still be valid (the last time the server extended it, plus the lease
duration); heartbeats that get through meanwhile extend it. It is never turned into an
UNAVAILABLE failure that would make the client run the action again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from expbuild import __version__
from expbuild.aio import current_task
from expbuild.client.cas import CasClient
from expbuild.client.channel import ChannelSecurity, open_channel
from expbuild.client.errors import from_rpc_error
from expbuild.client.replicas import replicas_target
from expbuild.config import WorkerSettings
from expbuild.errors import ExpBuildError
from expbuild.proto import worker_pb2, worker_pb2_grpc
from expbuild.reapi.platforms import platform_message, platform_summary
from expbuild.worker import metrics
from expbuild.worker.blob_cache import open_blob_cache
from expbuild.worker.execution import Executor
from expbuild.worker.executor import make_executor
from expbuild.worker.host_platform import detected_platform
from expbuild.worker.runner import TaskReport, TaskRunner

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_HEARTBEAT_INTERVAL = timedelta(seconds=30)
# Deadlines of the short Worker API calls; a long poll gets its own wait plus this margin.
RPC_TIMEOUT = 15.0
MAX_RETRY_DELAY = 30.0
# Reports of finished tasks and session reconnects are retried at most this far apart, so
# that a replica back after a restart hears from its workers within seconds.
MAX_REPORT_DELAY = 2.0
DEFAULT_LEASE_DURATION = timedelta(minutes=5)
# Errors worth retrying: the server is down, restarting or overloaded.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
SHUTDOWN_REASON = "worker shutting down"


@dataclass
class _RunningTask:
    task_id: str
    lease_token: str
    job: asyncio.Task[None] | None = None
    # Set when the worker stops the task on purpose: "cancelled by the server",
    # "lease lost" or SHUTDOWN_REASON.
    stop_reason: str | None = None
    # Once the result is being reported, only a forced stop interrupts it.
    reporting: bool = False
    # Until when (event loop time) the lease may still be valid: the last extension the
    # server confirmed plus the lease duration. A result is retried until then.
    lease_valid_until: float = 0.0
    # The server said the lease is gone (lost, cancelled): stop reporting.
    lease_gone: bool = False


@dataclass
class _Registration:
    worker_id: str = ""
    generation: int = 0  # bumped by every successful RegisterWorker
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class WorkerAgent:
    """A worker daemon. `await run()` serves until `request_stop()`, then returns normally."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        executor: Executor | None = None,
    ):
        self.settings = settings
        self.shutdown_grace = shutdown_grace
        self.name = settings.name or socket.gethostname()
        # Closed by run() when made here; a caller passing its own executor closes it.
        self._owns_executor = executor is None
        self._executor = executor or make_executor(settings.backend, settings.limits)
        self._registration = _Registration()
        self._heartbeat_interval = settings.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL
        self._lease_duration = DEFAULT_LEASE_DURATION
        self._inline_budget = 0  # RegisterWorkerResponse.max_inline_blob_bytes
        self._running: dict[str, _RunningTask] = {}
        self._cas_clients: dict[str, CasClient] = {}
        self._stopping = False
        self._forced = False
        self._draining = False
        # Set whenever the poll loop or the shutdown wait should look again:
        # a slot freed up, drain changed, stop requested.
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._poll_call: asyncio.Task | None = None
        # Both set by run() before anything calls the server.
        self._stub: worker_pb2_grpc.WorkerServiceStub
        self._cas_channel: grpc.aio.Channel

    @property
    def worker_id(self) -> str:
        """The id the server assigned; empty until registered."""
        return self._registration.worker_id

    @property
    def running_task_ids(self) -> list[str]:
        return list(self._running)

    def request_stop(self) -> None:
        """Begin a graceful shutdown; a second call kills running actions at once.

        Call it from the event loop's thread (signal handlers installed with
        `loop.add_signal_handler` are).
        """
        if self._stopping:
            if not self._forced:
                log.warning("Second stop request: stopping running tasks now")
                self._forced = True
                self._wakeup.set()
            return
        self._stopping = True
        log.info("Shutdown requested; no new tasks will be taken")
        self._stopped.set()
        self._wakeup.set()
        if self._poll_call is not None:
            self._poll_call.cancel()

    async def run(self) -> None:
        cache = self.settings.cache
        # Opened first: a cache directory held by another process stops the worker here.
        blob_cache = (
            await open_blob_cache(
                self.settings.cache_dir, cache.max_size, verify_fraction=cache.verify_fraction
            )
            if cache.max_size
            else None
        )
        # Several replicas: one channel that moves to another when its replica fails.
        server_target = replicas_target(self.settings.server_addresses)
        cas_target = self.settings.cas_target if self.settings.cas_url else server_target
        security = ChannelSecurity.from_files(
            ca_file=self.settings.tls_ca,
            cert_file=self.settings.tls_cert,
            key_file=self.settings.tls_key,
            token_file=self.settings.token_file,
        )
        server_channel = open_channel(server_target, security)
        cas_channel = (
            server_channel if cas_target == server_target else open_channel(cas_target, security)
        )
        self._stub = worker_pb2_grpc.WorkerServiceStub(server_channel)
        self._cas_channel = cas_channel
        runner = TaskRunner(
            executor=self._executor,
            work_dir=Path(self.settings.backend.work_dir),
            worker_name=self.name,
            cas_for=self._cas_client,
            blob_cache=blob_cache,
            limits=self.settings.limits,
            max_directory_size=self.settings.backend.max_directory_size,
            still_leased=self._still_leased,
            # Inline blobs reach the CAS of the server they are reported to: only when that
            # is the worker's CAS too.
            inline_budget=lambda: self._inline_budget if cas_channel is server_channel else 0,
        )
        background: list[asyncio.Task] = []
        try:
            if not await self._register():
                log.info("Worker %s stopped before it could register", self.name)
                return
            background = [
                asyncio.create_task(self._heartbeat_loop(), name="worker heartbeat"),
                asyncio.create_task(self._session_loop(), name="worker session"),
            ]
            await self._poll_loop(runner)
            await self._finish_running_tasks()
            background[0].cancel()
            # Deregister before the session ends, so the server sees a goodbye, not a death.
            await self._deregister()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await runner.close()
            await server_channel.close()
            if cas_channel is not server_channel:
                await cas_channel.close()
            if blob_cache is not None:
                blob_cache.close()
            if self._owns_executor:
                await self._executor.close()
        log.info("Worker %s stopped", self.worker_id or self.name)

    # ---- registration ----------------------------------------------------------------

    def _register_request(self) -> worker_pb2.RegisterWorkerRequest:
        return worker_pb2.RegisterWorkerRequest(
            worker_id=self._registration.worker_id,
            name=self.name,
            hostname=socket.gethostname(),
            platform=platform_message(self.platform()),
            max_concurrent_tasks=self.settings.max_concurrent_tasks,
            version=__version__,
        )

    def platform(self) -> dict[str, tuple[str, ...]]:
        """What this worker advertises: detected values and what its backend offers
        (sandbox/docker: `network`; docker: `container-image`), overridden by configured ones."""
        return {**detected_platform(), **self._executor.platform(), **self.settings.platform}

    async def _register(self, seen_generation: int | None = None) -> bool:
        """RegisterWorker, retrying with backoff while the server is unreachable.

        Returns False if a stop was requested before it succeeded. With
        `seen_generation`, does nothing if someone registered again since then.
        """
        registration = self._registration
        async with registration.lock:
            if seen_generation is not None and registration.generation != seen_generation:
                return True
            delay = 1.0
            while not self._stopping:
                try:
                    response = await self._stub.RegisterWorker(
                        self._register_request(), timeout=RPC_TIMEOUT
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in TRANSIENT_CODES:
                        raise from_rpc_error(exc) from None
                    log.warning(
                        "Server %s unreachable (%s); retrying in %gs",
                        ", ".join(self.settings.server_addresses),
                        _rpc_reason(exc),
                        delay,
                    )
                    if await self._sleep_unless_stopped(delay):
                        return False
                    delay = min(delay * 2, MAX_RETRY_DELAY)
                    continue
                registration.worker_id = response.worker_id
                registration.generation += 1
                if _seconds(response.lease_duration) > 0:
                    self._lease_duration = response.lease_duration.ToTimedelta()
                self._inline_budget = response.max_inline_blob_bytes
                if (
                    self.settings.heartbeat_interval is None
                    and _seconds(response.heartbeat_interval) > 0
                ):
                    self._heartbeat_interval = response.heartbeat_interval.ToTimedelta()
                log.info("Worker %s registered successfully", response.worker_id)
                log.info(
                    "Worker %s platform: %s; up to %d concurrent task(s); heartbeat every %gs",
                    response.worker_id,
                    json.dumps(platform_summary(self.platform())),
                    self.settings.max_concurrent_tasks,
                    self._heartbeat_interval.total_seconds(),
                )
                return True
            return False

    async def _deregister(self) -> None:
        try:
            await self._stub.DeregisterWorker(
                worker_pb2.DeregisterWorkerRequest(worker_id=self.worker_id), timeout=RPC_TIMEOUT
            )
            log.info("Worker %s deregistered", self.worker_id)
        except grpc.aio.AioRpcError as exc:
            log.warning("Could not deregister worker %s: %s", self.worker_id, _rpc_reason(exc))

    # ---- session -----------------------------------------------------------------------

    async def _session_loop(self) -> None:
        """Keep one OpenSession stream open; reopen it (quickly) whenever it ends."""
        delay = 0.25
        while True:
            generation = self._registration.generation
            call = self._stub.OpenSession(worker_pb2.OpenSessionRequest(worker_id=self.worker_id))
            try:
                async for _event in call:
                    delay = 0.25
                log.info("Server ended the session of worker %s; reopening", self.worker_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("Server has no worker sessions; relying on heartbeats alone")
                    return
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    await self._register_again(exc, generation)
                    continue
                log.warning("Session broke (%s); reopening in %gs", _rpc_reason(exc), delay)
            finally:
                call.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_REPORT_DELAY)

    # ---- heartbeat ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval.total_seconds())
            try:
                await self._heartbeat()
            except Exception:  # a bug here must not silently end the heartbeats
                log.exception("Heartbeat failed")

    async def _heartbeat(self) -> None:
        generation = self._registration.generation
        sent_at = asyncio.get_running_loop().time()
        reported = list(self._running.values())
        request = worker_pb2.HeartbeatRequest(
            worker_id=self.worker_id,
            running=[
                worker_pb2.TaskLease(task_id=t.task_id, lease_token=t.lease_token)
                for t in self._running.values()
            ],
        )
        try:
            response = await self._stub.Heartbeat(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            log.warning("Heartbeat failed: %s", _rpc_reason(exc))
            return
        if response.reregister:
            log.warning("Server does not know worker %s; registering again", self.worker_id)
            try:
                await self._register(generation)
            except ExpBuildError as error:
                log.error("Registering again failed: %s", error)
            return
        gone = set(response.cancelled_task_ids) | set(response.lost_task_ids)
        for running in reported:
            if running.task_id in gone:
                running.lease_gone = True
            else:
                running.lease_valid_until = sent_at + self._lease_duration.total_seconds()
        for task_id in response.cancelled_task_ids:
            self._stop_task(task_id, "cancelled by the server")
        for task_id in response.lost_task_ids:
            self._stop_task(task_id, "lease lost")
        if response.drain and not self._stopping:
            # `expbuild workers drain`: the same graceful exit as SIGTERM, asked remotely.
            log.info(
                "Server asks worker %s to drain: finishing running tasks, then leaving",
                self.worker_id,
            )
            self._draining = True
            self.request_stop()

    # ---- polling and running -----------------------------------------------------------

    def _free_slots(self) -> int:
        return self.settings.max_concurrent_tasks - len(self._running)

    async def _poll_loop(self, runner: TaskRunner) -> None:
        delay = 1.0
        while True:
            self._wakeup.clear()
            if self._stopping:
                return
            if self._draining or self._free_slots() <= 0:
                await self._wakeup.wait()
                continue
            generation = self._registration.generation
            try:
                tasks = await self._poll()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and await self._register_again(
                    exc, generation
                ):
                    continue
                log.warning(
                    "Polling for tasks failed (%s); retrying in %gs", _rpc_reason(exc), delay
                )
                if await self._sleep_unless_stopped(delay):
                    return
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            if tasks is None:
                return
            delay = 1.0
            for task in tasks:
                if self._stopping:
                    # The lease arrived just as we stopped: hand it straight back.
                    await self._release(task.task_id, task.lease_token, SHUTDOWN_REASON)
                elif self._free_slots() <= 0 or task.task_id in self._running:
                    # The server sent more than asked for; never exceed the slots.
                    await self._release(task.task_id, task.lease_token, "worker has no free slot")
                else:
                    self._start_task(runner, task)

    async def _poll(self) -> list[worker_pb2.Task] | None:
        """One long poll for as many tasks as there are free slots; None if stopped."""
        poll_timeout = self.settings.poll_timeout
        wait = duration_pb2.Duration()
        wait.FromTimedelta(poll_timeout)
        request = worker_pb2.PollTasksRequest(
            worker_id=self.worker_id, max_tasks=self._free_slots(), timeout=wait
        )
        # A task of its own so that request_stop can cancel the call.
        self._poll_call = asyncio.ensure_future(
            self._stub.PollTasks(request, timeout=poll_timeout.total_seconds() + RPC_TIMEOUT)
        )
        try:
            response = await self._poll_call
        except asyncio.CancelledError:
            if self._stopping and not current_task().cancelling():
                return None  # request_stop cancelled the poll, not our caller
            raise
        finally:
            self._poll_call = None
        return list(response.tasks)

    async def _register_again(self, exc: grpc.aio.AioRpcError, seen_generation: int) -> bool:
        log.warning(
            "Server forgot worker %s (%s); registering again", self.worker_id, _rpc_reason(exc)
        )
        try:
            return await self._register(seen_generation)
        except ExpBuildError as error:
            log.error("Registering again failed: %s", error)
            return False

    def _start_task(self, runner: TaskRunner, task: worker_pb2.Task) -> None:
        running = _RunningTask(task.task_id, task.lease_token)
        # The lease began at most now; it lasts the lease duration unless extended.
        running.lease_valid_until = (
            asyncio.get_running_loop().time() + self._lease_duration.total_seconds()
        )
        self._running[task.task_id] = running
        running.job = asyncio.create_task(self._serve(runner, task, running), name=task.task_id)

    async def _serve(
        self, runner: TaskRunner, task: worker_pb2.Task, running: _RunningTask
    ) -> None:
        metrics.RUNNING_ACTIONS.inc()
        try:
            try:
                report = await runner.run(task)
            except asyncio.CancelledError:
                if running.stop_reason is None:
                    raise  # not ours: the whole worker is being torn down
                current_task().uncancel()
                if running.stop_reason == SHUTDOWN_REASON:
                    await self._release(task.task_id, task.lease_token, SHUTDOWN_REASON)
                else:
                    log.info(
                        "Task %s stopped (%s); not reporting it", task.task_id, running.stop_reason
                    )
                return
            running.reporting = True
            await self._complete(task, report)
        except Exception:
            log.exception("Task %s: unexpected error while serving it", task.task_id)
        finally:
            metrics.RUNNING_ACTIONS.dec()
            self._running.pop(task.task_id, None)
            self._wakeup.set()

    def _stop_task(self, task_id: str, reason: str, *, force: bool = False) -> None:
        running = self._running.get(task_id)
        if running is None or running.stop_reason is not None or running.job is None:
            return
        if running.reporting and not force:
            return  # its result is on the way; the server decides whether it still counts
        running.stop_reason = reason
        log.warning("Stopping task %s: %s", task_id, reason)
        running.job.cancel()

    def _still_leased(self, task_id: str) -> bool:
        """Whether the task's lease may still be valid (the runner retries uploads while so)."""
        running = self._running.get(task_id)
        return (
            running is not None
            and not running.lease_gone
            and asyncio.get_running_loop().time() < running.lease_valid_until
        )

    async def _complete(self, task: worker_pb2.Task, report: TaskReport) -> None:
        response = report.response
        request = worker_pb2.CompleteTaskRequest(
            worker_id=self.worker_id,
            task_id=task.task_id,
            lease_token=task.lease_token,
            response=response,
            inline_blobs=report.inline_blobs,
        )
        delay = 0.25
        while True:
            request.worker_id = self.worker_id  # may have changed through re-registration
            try:
                await self._stub.CompleteTask(request, timeout=RPC_TIMEOUT)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND):
                    log.warning(
                        "Server refused the result of task %s (lease no longer held): %s",
                        task.task_id,
                        _rpc_reason(exc),
                    )
                    return
                if exc.code() in TRANSIENT_CODES and self._still_leased(task.task_id):
                    log.warning(
                        "Reporting task %s failed (%s); retrying in %gs",
                        task.task_id,
                        _rpc_reason(exc),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_REPORT_DELAY)
                    continue
                log.error(
                    "Could not report task %s (%s); its lease is over, so the server runs it again",
                    task.task_id,
                    _rpc_reason(exc),
                )
                return
        status = response.status
        if status.code != 0:
            log.warning("Task %s failed: %s", task.task_id, status.message)
        elif response.result.exit_code == 0:
            log.info("Task %s completed successfully", task.task_id)
        else:
            log.info("Task %s completed with exit code %d", task.task_id, response.result.exit_code)

    async def _release(self, task_id: str, lease_token: str, reason: str) -> None:
        try:
            await self._stub.ReleaseTask(
                worker_pb2.ReleaseTaskRequest(
                    worker_id=self.worker_id,
                    task_id=task_id,
                    lease_token=lease_token,
                    reason=reason,
                ),
                timeout=RPC_TIMEOUT,
            )
            log.info("Task %s handed back to the server (%s)", task_id, reason)
        except grpc.aio.AioRpcError as exc:
            log.warning("Could not hand back task %s: %s", task_id, _rpc_reason(exc))

    # ---- shutdown ----------------------------------------------------------------------

    async def _finish_running_tasks(self) -> None:
        """Give running tasks the grace period, then stop and hand back the rest."""
        loop = asyncio.get_running_loop()
        if self._running:
            log.info(
                "Waiting up to %gs for %d running task(s) to finish",
                self.shutdown_grace,
                len(self._running),
            )
        deadline = loop.time() + self.shutdown_grace
        while self._running and not self._forced:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        leftovers = list(self._running.values())
        for running in leftovers:
            self._stop_task(running.task_id, SHUTDOWN_REASON, force=self._forced)
        await asyncio.gather(*(r.job for r in leftovers if r.job), return_exceptions=True)

    # ---- helpers -----------------------------------------------------------------------

    async def _cas_client(self, instance_name: str) -> CasClient:
        """One client per instance, configured from the server's capabilities (batch limit,
        zstd) the first time the instance is used."""
        client = self._cas_clients.get(instance_name)
        if client is None:
            try:
                client = await CasClient.connect(self._cas_channel, instance_name=instance_name)
            except ExpBuildError as error:
                # Not fatal: defaults work against most servers; ask again next task.
                log.warning("Could not read the CAS capabilities (%s); using defaults", error)
                return CasClient(self._cas_channel, instance_name=instance_name)
            self._cas_clients[instance_name] = client
        return client

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; True if a stop was requested meanwhile (the sleep then ends early)."""
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except TimeoutError:
            pass
        return self._stopping


def _rpc_reason(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}" if exc.details() else exc.code().name


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToTimedelta().total_seconds()
