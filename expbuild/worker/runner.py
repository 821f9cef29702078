"""One task end to end: inputs, execution, outputs, and the ExecuteResponse to report.

`TaskRunner.run` never raises for a problem with the task itself: a missing input, a
bad path, an unsupported output or a CAS failure becomes an ExecuteResponse with the
matching status, so the worker keeps serving. Only cancellation propagates (the
backend has stopped the process by then), and the action directory is removed in
every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.rpc import code_pb2, status_pb2

from expbuild import errors
from expbuild.client.cas import CasClient
from expbuild.client.files import read_local
from expbuild.config import BackendSettings, LimitsSettings
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2
from expbuild.reapi.platforms import platform_spec, requested_platform
from expbuild.reapi.status import to_status
from expbuild.worker import action_log, metrics
from expbuild.worker.action_log import LOG_NAME, ActionLog
from expbuild.worker.blob_cache import BlobCache
from expbuild.worker.execution import ExecutionOutcome, ExecutionRequest, Executor
from expbuild.worker.inputs import ActionDirectories, ActionDirectory, prepare_inputs
from expbuild.worker.limits import capped_timeout, output_size, output_too_large
from expbuild.worker.outputs import (
    Blob,
    CollectedOutputs,
    collect_outputs,
    declared_outputs,
    file_digest,
)
from expbuild.worker.paths import join_inside

log = logging.getLogger(__name__)


@dataclass
class TaskRunner:
    executor: Executor
    work_dir: Path
    worker_name: str
    # The CAS client for a task's instance name.
    cas_for: Callable[[str], Awaitable[CasClient]]
    # Where input files come from when set; None: downloaded for every action.
    blob_cache: BlobCache | None = None
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    max_directory_size: int = BackendSettings.max_directory_size
    # Whether a task's lease may still be valid: while it is, an upload that fails because
    # the server is away is retried rather than turned into a failed action.
    still_leased: Callable[[str], bool] = lambda _task_id: False
    # How many bytes of blobs the server takes inline in CompleteTask (0: none, all go to
    # the CAS first); the agent learns it when it registers.
    inline_budget: Callable[[], int] = lambda: 0

    def __post_init__(self) -> None:
        self.directories = ActionDirectories(self.work_dir)

    async def close(self) -> None:
        """Remove the spare action directories; once no task runs any more."""
        await self.directories.close()

    async def run(self, task: worker_pb2.Task) -> TaskReport:
        """Run the task; the response carries this action's log as server_logs["worker.log"]."""
        report = TaskReport(re_pb2.ExecuteResponse())
        with action_log.capture(task.task_id) as this_log:
            report.response = await self._run(task, report)
            if LOG_NAME not in report.response.server_logs:
                # Failed before its outputs went up: the log goes on its own.
                await self._send_log(task, report, this_log)
        return report

    async def _send_log(
        self, task: worker_pb2.Task, report: TaskReport, this_log: ActionLog
    ) -> None:
        _note_status(report.response)
        digest, data = _log_blob(this_log)
        report.inline_blobs.clear()  # an earlier stage's outputs are not in the response
        if digest.size_bytes <= self.inline_budget():
            report.add_inline(digest, data)
        else:
            try:
                cas = await self.cas_for(task.instance_name)
                await cas.upload({digest: data})
            except (errors.ExpBuildError, grpc.aio.AioRpcError, OSError) as exc:
                log.warning("Task %s: its log could not be uploaded: %s", task.task_id, exc)
                return
        _attach_log(report.response, digest)

    async def _run(self, task: worker_pb2.Task, report: TaskReport) -> re_pb2.ExecuteResponse:
        log.info("Starting execution of task %s", task.task_id)
        action_log.note(
            f"task {task.task_id} (attempt {task.attempt}) on worker {self.worker_name}: "
            f"action {Digest.from_proto(task.action_digest)}"
        )
        metadata = re_pb2.ExecutedActionMetadata(worker=self.worker_name)
        _stamp(metadata.worker_start_timestamp)
        if task.HasField("queued_at"):
            metadata.queued_timestamp.CopyFrom(task.queued_at)
        cas = await self.cas_for(task.instance_name)
        # Synchronous on purpose (a rename, or two mkdirs): no await between creating the
        # directory and the try whose finally removes it, so a cancellation cannot leak it.
        try:
            action_path = self.directories.create(task.task_id, task.attempt)
        except OSError as exc:
            log.error("Task %s: cannot create its action directory: %s", task.task_id, exc)
            return failure_response(
                RuntimeError(f"worker cannot create an action directory in {self.work_dir}: {exc}")
            )
        try:
            return await self._run_in(action_path, task, cas, metadata, report)
        except (errors.ExpBuildError, grpc.aio.AioRpcError) as exc:
            return failure_response(exc)
        except Exception as exc:  # a bug must fail this task, not the worker
            log.exception("Task %s: internal error", task.task_id)
            return failure_response(exc)
        finally:
            await self.directories.remove(action_path)

    async def _run_in(
        self,
        action_path: Path,
        task: worker_pb2.Task,
        cas: CasClient,
        metadata: re_pb2.ExecutedActionMetadata,
        report: TaskReport,
    ) -> re_pb2.ExecuteResponse:
        """The stages, each timed into `metadata`: inputs, execution, outputs (the small
        ones into `report`'s inline blobs, the rest uploaded)."""
        cache_before = replace(self.blob_cache.stats) if self.blob_cache else None
        with _timed(metadata.input_fetch_start_timestamp, metadata.input_fetch_completed_timestamp):
            try:
                with metrics.INPUT_FETCH.time():
                    directory = await prepare_inputs(
                        cas,
                        task,
                        action_path,
                        self.blob_cache,
                        self.executor.user,
                        self.max_directory_size,
                    )
            except (errors.ExpBuildError, grpc.aio.AioRpcError) as exc:
                log.warning("Task %s: cannot prepare inputs: %s", task.task_id, _describe(exc))
                return failure_response(exc)
            finally:
                if self.blob_cache is not None and cache_before is not None:
                    after = self.blob_cache.stats
                    metrics.record_input_cache(
                        after.hits - cache_before.hits,
                        after.fetched_blobs - cache_before.fetched_blobs,
                        after.fetched_bytes - cache_before.fetched_bytes,
                    )
        _note_inputs(metadata)
        timeout = capped_timeout(task_timeout(task), self.limits)
        outcome = await self._execute(task, directory, action_path.name, timeout)
        metadata.execution_start_timestamp.FromDatetime(outcome.started_at)
        metadata.execution_completed_timestamp.FromDatetime(outcome.completed_at)
        with _timed(
            metadata.output_upload_start_timestamp, metadata.output_upload_completed_timestamp
        ):
            if _outputs_are_small(task.command, directory):
                result, blobs, output_error = gather_outputs(task.command, directory, self.limits)
            else:
                result, blobs, output_error = await asyncio.to_thread(
                    gather_outputs, task.command, directory, self.limits
                )
            result.exit_code = outcome.exit_code
            response = execute_response(result, outcome, timeout, output_error)
            # The log goes with the outputs: one round trip for both.
            _note_status(response, len(blobs))
            digest, data = _log_blob(action_log.current())
            blobs[digest] = data
            inline, upload = await _split_inline(blobs, self.inline_budget())
            sent = await self._upload_while_leased(cas, upload, task.task_id) if upload else 0
            for blob_digest, blob_data in inline.items():
                report.add_inline(blob_digest, blob_data)
            log.info(
                "Outputs: %d blob(s) inline (%d bytes), %d uploaded (%d bytes sent)",
                len(inline),
                sum(d.size_bytes for d in inline),
                len(upload),
                sent,
            )
            _attach_log(response, digest)
        _stamp(metadata.worker_completed_timestamp)
        response.result.execution_metadata.CopyFrom(metadata)
        return response

    async def _execute(
        self, task: worker_pb2.Task, directory: ActionDirectory, name: str, timeout: float | None
    ) -> ExecutionOutcome:
        command = task.command
        log.info("Executing command: %s", json.dumps(list(command.arguments)))
        action_log.note(_launch_line(self.executor, task, timeout, self.limits))
        asked_at = datetime.now(UTC)
        outcome = await self.executor.execute(
            ExecutionRequest(
                arguments=list(command.arguments),
                environment={v.name: v.value for v in command.environment_variables},
                working_directory=directory.working_directory,
                stdout_path=directory.stdout_path,
                stderr_path=directory.stderr_path,
                timeout=timeout,
                input_root=directory.input_root,
                platform=platform_spec(
                    requested_platform(task.action, task.command), "action platform"
                ),
                name=name,
            )
        )
        metrics.BACKEND_LAUNCH.labels(type(self.executor).__name__).observe(
            max((outcome.started_at - asked_at).total_seconds(), 0.0)
        )
        if outcome.timed_out:
            log.warning("Command timed out after %gs (exit code %d)", timeout, outcome.exit_code)
        else:
            log.info("Command exited with code: %d", outcome.exit_code)
        return outcome

    async def _upload_while_leased(
        self, cas: CasClient, blobs: dict[Digest, Blob], task_id: str
    ) -> int:
        delay = 0.25
        while True:
            try:
                return await cas.upload(blobs)
            except (errors.ExpBuildError, grpc.aio.AioRpcError) as exc:
                if not _server_away(exc) or not self.still_leased(task_id):
                    raise
                log.warning(
                    "Task %s: uploading outputs failed (%s); retrying in %gs",
                    task_id,
                    _describe(exc),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@dataclass
class TaskReport:
    """What CompleteTask carries: the response, and blobs it names sent inline."""

    response: re_pb2.ExecuteResponse
    inline_blobs: list[worker_pb2.InlineBlob] = field(default_factory=list)

    def add_inline(self, digest: Digest, data: bytes) -> None:
        self.inline_blobs.append(worker_pb2.InlineBlob(digest=digest.to_proto(), data=data))


async def _split_inline(
    blobs: dict[Digest, Blob], budget: int
) -> tuple[dict[Digest, bytes], dict[Digest, Blob]]:
    """(inline, to upload): the smallest blobs first, while they fit in `budget` bytes."""
    inline: dict[Digest, Blob] = {}
    for digest in sorted(blobs, key=lambda d: d.size_bytes):
        if digest.size_bytes > budget:
            break
        budget -= digest.size_bytes
        inline[digest] = blobs[digest]
    upload = {d: b for d, b in blobs.items() if d not in inline}
    if all(isinstance(b, bytes) for b in inline.values()):
        return {d: b for d, b in inline.items() if isinstance(b, bytes)}, upload
    if sum(d.size_bytes for d in inline) <= _INLINE_GATHER_BYTES:
        return _read_inline(inline), upload  # a few small files: no thread hop
    return await asyncio.to_thread(_read_inline, inline), upload


def _read_inline(blobs: dict[Digest, Blob]) -> dict[Digest, bytes]:
    """The blobs' bytes, refusing a file that changed since it was hashed (as an upload
    would be refused). Blocking."""
    read = {}
    for digest, source in blobs.items():
        data = read_local(digest, source)
        if isinstance(source, Path) and digest_of(data) != digest:
            raise errors.InvalidArgument(f"{source} changed after it was hashed (blob {digest})")
        read[digest] = data
    return read


def _server_away(error: BaseException) -> bool:
    """An error that says the server is unreachable or restarting, not that we erred."""
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else getattr(error, "code", None)
    away = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return code in away or code in (c.value[0] for c in away)


# Outputs this small in all (the logs included, no output directory) are gathered on the
# event loop: a few stats and hashing 64 KiB take less than a thread hop.
_INLINE_GATHER_BYTES = 64 * 1024
_INLINE_GATHER_PATHS = 16


def _outputs_are_small(command: re_pb2.Command, directory: ActionDirectory) -> bool:
    declared = declared_outputs(command)
    if len(declared) > _INLINE_GATHER_PATHS:
        return False
    paths = [directory.stdout_path, directory.stderr_path]
    try:
        workdir = directory.working_directory
        paths += [join_inside(directory.input_root, workdir, o.path, "output") for o in declared]
    except errors.ExpBuildError:
        return False  # gather_outputs reports it
    total = 0
    for path in paths:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode):
            return False
        total += st.st_size
        if total > _INLINE_GATHER_BYTES:
            return False
    return True


def gather_outputs(
    command: re_pb2.Command, directory: ActionDirectory, limits: LimitsSettings
) -> tuple[re_pb2.ActionResult, dict[Digest, Blob], errors.ExpBuildError | None]:
    """The result's outputs and logs, the blobs to upload, and why outputs are missing.

    Over `max_output_size` nothing is uploaded. An unusable output (bad type, path
    escaping the root) does not lose the logs: the result then carries stdout/stderr
    only, plus the error. Blocking: run it in a thread.
    """
    logs = (directory.stdout_path, directory.stderr_path)
    if limits.max_output_size is not None:
        total = output_size(command, directory.input_root, logs)
        if total > limits.max_output_size:
            message = output_too_large(total, limits)
            log.warning("Outputs not uploaded: %s", message)
            return re_pb2.ActionResult(), {}, errors.ResourceExhausted(message)
    output_error: errors.ExpBuildError | None = None
    try:
        collected = collect_outputs(command, directory.input_root)
    except errors.ExpBuildError as exc:
        log.warning("Outputs cannot be collected: %s", exc)
        output_error = exc
        collected = CollectedOutputs()
    result = collected.result
    for path, digest_field in zip(logs, (result.stdout_digest, result.stderr_digest), strict=True):
        digest = file_digest(path)
        collected.add_blob(digest, path)
        digest_field.CopyFrom(digest.to_proto())
    return result, collected.blobs, output_error


def execute_response(
    result: re_pb2.ActionResult,
    outcome: ExecutionOutcome,
    timeout: float | None,
    output_error: errors.ExpBuildError | None,
) -> re_pb2.ExecuteResponse:
    """The status says why the action did not simply finish: time, a limit, its outputs."""
    response = re_pb2.ExecuteResponse(result=result)
    if outcome.timed_out:
        response.status.code = code_pb2.DEADLINE_EXCEEDED
        response.status.message = f"action timed out after {timeout:g}s"
        if output_error is not None:
            response.status.message += f"; its outputs could not be collected: {output_error}"
    elif outcome.limit_exceeded:
        response.status.code = code_pb2.RESOURCE_EXHAUSTED
        response.status.message = outcome.limit_exceeded
    elif output_error is not None:
        response.status.CopyFrom(error_status(output_error))
    else:
        response.status.code = code_pb2.OK
    response.message = response.status.message
    return response


def _launch_line(
    executor: Executor, task: worker_pb2.Task, timeout: float | None, limits: LimitsSettings
) -> str:
    """How the action is started: backend, user, directory, time and resource limits."""
    command = task.command
    user = executor.user
    caps = {
        "timeout": f"{timeout:g}s" if timeout else "none",
        "memory": limits.memory,
        "cpu_time": limits.cpu_time and f"{limits.cpu_time}s",
        "processes": limits.max_processes,
        "cpus": limits.cpus,
        "output": limits.max_output_size,
    }
    shown = ", ".join(f"{k}={v}" for k, v in caps.items() if v is not None)
    return (
        f"launch: {json.dumps(list(command.arguments))[:500]} with {type(executor).__name__} "
        f"as {user if user is not None else 'the worker user'} in "
        f"{command.working_directory or '.'!r}; limits: {shown}"
    )


def _note_inputs(metadata: re_pb2.ExecutedActionMetadata) -> None:
    this_log = action_log.current()
    if this_log is None:
        return
    took = _seconds(metadata.input_fetch_start_timestamp, metadata.input_fetch_completed_timestamp)
    this_log.note(
        f"inputs ready in {took:.3f}s: {this_log.cache_hits} blob(s) from the worker cache, "
        f"{this_log.cache_fetched_blobs} fetched ({this_log.cache_fetched_bytes} bytes)"
    )


def _note_status(response: re_pb2.ExecuteResponse, output_blobs: int | None = None) -> None:
    if output_blobs is not None:
        action_log.note(
            f"exit code {response.result.exit_code}; {output_blobs} output blob(s) to upload"
        )
    status = response.status
    if status.code == code_pb2.OK:
        action_log.note("status: OK")
    else:
        action_log.note(f"status: {code_pb2.Code.Name(status.code)}: {status.message}", "WARNING")


def _log_blob(this_log: ActionLog | None) -> tuple[Digest, bytes]:
    data = this_log.text() if this_log is not None else b""
    return digest_of(data), data


def _attach_log(response: re_pb2.ExecuteResponse, digest: Digest) -> None:
    response.server_logs[LOG_NAME].digest.CopyFrom(digest.to_proto())
    response.server_logs[LOG_NAME].human_readable = True


def _seconds(start, end) -> float:
    return (end.ToDatetime() - start.ToDatetime()).total_seconds()


def task_timeout(task: worker_pb2.Task) -> float | None:
    """The server's effective timeout, else the Action's; neither set means no limit."""
    for duration in (task.timeout, task.action.timeout):
        seconds = duration.ToTimedelta().total_seconds()
        if seconds > 0:
            return seconds
    return None


def failure_response(exc: BaseException) -> re_pb2.ExecuteResponse:
    status = error_status(exc)
    return re_pb2.ExecuteResponse(status=status, message=status.message)


def error_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status to report for `exc`, with its PreconditionFailure violations.

    Blobs missing while fetching inputs arrive as `FailedPrecondition` from `materialize`
    with a MISSING violation per blob: that is what makes Bazel upload them and retry.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # The worker's own disk: this action fails clearly, the worker goes on.
        return to_status(errors.ResourceExhausted(f"the worker's disk is full: {exc}"))
    if isinstance(exc, errors.ExpBuildError | grpc.aio.AioRpcError):
        return to_status(exc)
    return to_status(exc, f"internal worker error: {type(exc).__name__}: {exc}")


def _describe(exc: BaseException) -> str:
    status = error_status(exc)
    return f"{code_pb2.Code.Name(status.code)}: {status.message}"


@contextlib.contextmanager
def _timed(start, completed) -> Iterator[None]:
    """Stamp `start` and `completed` (Timestamp fields) around a stage that returns normally."""
    _stamp(start)
    yield
    _stamp(completed)


def _stamp(timestamp) -> None:
    timestamp.FromDatetime(datetime.now(UTC))
