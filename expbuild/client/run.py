"""Running one command remotely end to end: what `expbuild run` and `expbuild execute` do.

`run_command` uploads the inputs, the Command and the Action, executes the action and
downloads its outputs; `execute_action` executes an Action already in the CAS.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from google.protobuf.message import DecodeError

from expbuild.aio import gather_or_cancel
from expbuild.client.actions import build_action, build_command, check_output_path
from expbuild.client.cas import CasClient
from expbuild.client.channel import ChannelSecurity, open_channel
from expbuild.client.execution import ExecutionClient, response_error
from expbuild.client.files import publish, temp_path_for, write_new_file
from expbuild.client.integrity import verify
from expbuild.client.tree import materialize, materialize_tree, merkle_tree_from_paths
from expbuild.digest import Digest, digest_of
from expbuild.errors import InvalidArgument, RemoteError
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.platforms import PlatformInput

Progress = Callable[[str], None]

_STAGE_LINES: dict[int, str] = {
    re_pb2.ExecutionStage.CACHE_CHECK: "Checking the action cache",
    re_pb2.ExecutionStage.QUEUED: "Queued",
    re_pb2.ExecutionStage.COMPLETED: "Completed",
}


@dataclass
class RunResult:
    """The outcome of an executed action.

    `stdout` / `stderr` are the action's bytes (fetched from the CAS when not inlined);
    `outputs` are the local paths written (empty for `execute_action`); `worker` is
    `execution_metadata.worker` ("" if the server did not say); `action_result` is the raw
    ActionResult as the server sent it.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    action_digest: Digest
    cached: bool
    worker: str
    action_result: re_pb2.ActionResult
    outputs: list[Path] = field(default_factory=list)
    message: str = ""  # ExecuteResponse.message: the server's note for the user, if any


def human_size(size: int) -> str:
    """`12 KiB`, `3.4 MiB`: sizes for progress lines."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def input_entries(inputs: Sequence[Path]) -> dict[str, Path]:
    """Each input under its name at the input root: its last component once `.` and `..`
    are resolved (`src/..` is the current directory's name), a symlink under its own
    name. InvalidArgument for `/` or for two inputs with one name."""
    entries: dict[str, Path] = {}
    for path in inputs:
        name = Path(os.path.abspath(path)).name  # lexical: a symlink keeps its name
        if not name:
            raise InvalidArgument(f"input {path} has no name to place it under (is it '/'?)")
        if name in entries:
            raise InvalidArgument(
                f"inputs {entries[name]} and {path} would both be placed at {name!r} in the "
                "input root; rename one or pass their common parent directory"
            )
        entries[name] = path
    return entries


class _StageReporter:
    """on_stage / on_metadata callbacks printing "Queued", "Executing on <worker>", ...

    The worker is named as soon as the server reports it in the partial execution
    metadata, or else from the final result (`finish`).
    """

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self._worker = ""
        self._named_worker = False

    def _name_worker(self, verb: str) -> None:
        if self._worker and not self._named_worker:
            self._named_worker = True
            _say(self._progress, f"{verb} on {self._worker}")

    def on_metadata(self, metadata: re_pb2.ExecuteOperationMetadata) -> None:
        self._worker = metadata.partial_execution_metadata.worker or self._worker
        if metadata.stage == re_pb2.ExecutionStage.EXECUTING:
            self._name_worker("Executing")

    def on_stage(self, stage: int) -> None:
        if stage == re_pb2.ExecutionStage.EXECUTING:
            if not self._worker:
                _say(self._progress, "Executing")
        elif stage in _STAGE_LINES:
            _say(self._progress, _STAGE_LINES[stage])

    def finish(self, response: re_pb2.ExecuteResponse) -> None:
        if not response.cached_result:
            self._worker = response.result.execution_metadata.worker
            self._name_worker("Executed")


async def _std_streams(cas: CasClient, result: re_pb2.ActionResult) -> tuple[bytes, bytes]:
    async def stream(raw: bytes, digest_field: str) -> bytes:
        if raw or not result.HasField(digest_field):
            return raw
        return await cas.read(Digest.from_proto(getattr(result, digest_field)))

    stdout, stderr = await gather_or_cancel(
        [stream(result.stdout_raw, "stdout_digest"), stream(result.stderr_raw, "stderr_digest")]
    )
    return stdout, stderr


def _write_inline(destination: Path, contents: bytes, executable: bool) -> None:
    """Publish inlined output bytes as `CasClient.read_to_file` publishes a download."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(destination, uuid.uuid4().hex)
    try:
        write_new_file(temp, contents)
        publish(temp, destination, 0o755 if executable else 0o644)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _clear(path: Path) -> None:
    """Remove whatever is at `path` (a stale output from an earlier run)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


async def _download_outputs(
    cas: CasClient, result: re_pb2.ActionResult, download_to: Path, progress: Progress | None
) -> list[Path]:
    """Write the result's output files, directories and symlinks under `download_to`.

    Paths come from the server, so each is checked to stay inside `download_to`.
    """
    written: list[Path] = []

    async def output_file(entry: re_pb2.OutputFile) -> None:
        destination = download_to / check_output_path(entry.path)
        digest = Digest.from_proto(entry.digest)
        if destination.is_dir() and not destination.is_symlink():
            await asyncio.to_thread(shutil.rmtree, destination)
        if entry.contents or digest.is_empty:
            # Inlined by the server; still verified like any other blob.
            try:
                verify(digest, entry.contents)
            except RemoteError as exc:
                raise RemoteError(exc.code, f"output {entry.path}: {exc}") from None
            await asyncio.to_thread(_write_inline, destination, entry.contents, entry.is_executable)
        else:
            await cas.read_to_file(digest, destination, entry.is_executable)
        written.append(destination)
        _say(progress, f"Downloaded {entry.path}")

    async def output_directory(entry: re_pb2.OutputDirectory) -> None:
        destination = download_to / check_output_path(entry.path)
        await asyncio.to_thread(_clear, destination)
        if entry.HasField("tree_digest"):
            tree_digest = Digest.from_proto(entry.tree_digest)
            tree = re_pb2.Tree()
            try:
                tree.ParseFromString(await cas.read(tree_digest))
            except DecodeError:
                # As for a Directory (client/tree.py), not a traceback from the CLI.
                raise InvalidArgument(
                    f"output directory {entry.path}: blob {tree_digest} is not a Tree message"
                ) from None
            await materialize_tree(cas, tree, destination, location=entry.path)
        elif entry.HasField("root_directory_digest"):
            root = Digest.from_proto(entry.root_directory_digest)
            await materialize(cas, root, destination, location=entry.path)
        else:
            raise InvalidArgument(
                f"output directory {entry.path} has neither a tree nor a root digest"
            )
        written.append(destination)
        _say(progress, f"Downloaded {entry.path}/")

    await gather_or_cancel(
        [
            *(output_file(f) for f in result.output_files),
            *(output_directory(d) for d in result.output_directories),
        ]
    )
    for link in result.output_symlinks:
        destination = download_to / check_output_path(link.path)
        await asyncio.to_thread(_clear, destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link.target, destination)
        written.append(destination)
        _say(progress, f"Downloaded {link.path} -> {link.target}")
    return written


async def _finish(
    cas: CasClient,
    response: re_pb2.ExecuteResponse,
    action_digest: Digest,
    download_to: Path | None,
    progress: Progress | None,
) -> RunResult:
    """Fetch stdout/stderr (and outputs, if `download_to`) of a final ExecuteResponse.

    A non-OK status raises its error with `.result` set to the RunResult (outputs not
    downloaded) when the response carries a result, else `.result` = None.
    """
    result = response.result
    error = response_error(response)
    stdout, stderr = await _std_streams(cas, result) if response.HasField("result") else (b"", b"")
    run_result = RunResult(
        exit_code=result.exit_code,
        stdout=stdout,
        stderr=stderr,
        action_digest=action_digest,
        cached=response.cached_result,
        worker=result.execution_metadata.worker,
        action_result=result,
        message=response.message,
    )
    if error is not None:
        error.result = run_result if response.HasField("result") else None  # type: ignore[attr-defined]
        raise error
    if response.cached_result:
        _say(progress, "Cached result")
    if download_to is not None:
        run_result.outputs = await _download_outputs(cas, result, download_to, progress)
    return run_result


async def _connect_and_execute(
    target: str,
    action_digest: Digest,
    before: Callable[[CasClient], Awaitable[None]] | None,
    *,
    instance_name: str,
    security: ChannelSecurity | None,
    **options,
) -> RunResult:
    """Connect, run `before` (the uploads) if given, then execute and finish."""
    async with open_channel(target, security) as channel:
        cas = await CasClient.connect(channel, instance_name)
        if before is not None:
            await before(cas)
        return await _execute_and_finish(
            channel, cas, action_digest, instance_name=instance_name, **options
        )


async def _execute_and_finish(
    channel,
    cas: CasClient,
    action_digest: Digest,
    *,
    instance_name: str,
    skip_cache_lookup: bool,
    priority: int,
    download_to: Path | None,
    progress: Progress | None,
) -> RunResult:
    reporter = _StageReporter(progress)
    response = await ExecutionClient(channel, instance_name).execute(
        action_digest,
        skip_cache_lookup=skip_cache_lookup,
        priority=priority,
        on_stage=reporter.on_stage,
        on_metadata=reporter.on_metadata,
    )
    reporter.finish(response)
    return await _finish(cas, response, action_digest, download_to, progress)


async def run_command(
    target: str,
    argv: list[str],
    *,
    security: ChannelSecurity | None = None,
    instance_name: str = "",
    inputs: Sequence[Path] = (),
    outputs: Sequence[str] = (),
    platform: PlatformInput | None = None,
    env: Mapping[str, str] | None = None,
    timeout: timedelta | None = None,
    skip_cache_lookup: bool = False,
    do_not_cache: bool = False,
    priority: int = 0,
    download_to: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run `argv` remotely on the server at `target` (`host:port`) and return its result.

    Each path in `inputs` (file or directory) is placed at the input root under its
    basename, which is also the working directory. `outputs` are paths relative to it
    that the action may create; those it did create are downloaded under `download_to`
    (default: the current directory), replacing what is there. Only blobs the CAS lacks
    are uploaded. `progress` receives human-readable lines ("Uploading 3 blobs (12 KiB)",
    "Queued", "Executing on worker-1", "Downloaded out.txt"). Transfers follow the
    server's capabilities (`CasClient.connect`): its batch size limit, zstd if offered.

    Raises `ExpBuildError` subclasses: `NotFound` for a missing input, `InvalidArgument`
    naming the instance if the server does not serve `instance_name`, `RemoteError`
    (UNAVAILABLE) when the server cannot be reached, the mapped error when the action's
    status is not OK (e.g. `RemoteError` DEADLINE_EXCEEDED on timeout) with `.result`
    holding the RunResult (exit code, stdout, stderr) if the server returned one.
    """
    download_to = Path.cwd() if download_to is None else download_to
    tree = await asyncio.to_thread(merkle_tree_from_paths, input_entries(inputs))
    command = build_command(argv, env=env, output_paths=outputs, platform=platform)
    command_bytes = command.SerializeToString(deterministic=True)
    command_digest = digest_of(command_bytes)
    action = build_action(
        command_digest,
        tree.root_digest,
        timeout=timeout,
        do_not_cache=do_not_cache,
        platform=platform,
    )
    action_bytes = action.SerializeToString(deterministic=True)
    action_digest = digest_of(action_bytes)
    blobs: dict[Digest, bytes | Path] = {
        **tree.blobs,
        command_digest: command_bytes,
        action_digest: action_bytes,
    }

    async def upload_inputs(cas: CasClient) -> None:
        missing = await cas.find_missing(blobs)
        if missing:
            size = sum(d.size_bytes for d in missing)
            _say(progress, f"Uploading {len(missing)} blobs ({human_size(size)})")
            await cas.upload_missing(blobs, missing)
        else:
            _say(progress, "All inputs already in the CAS")

    return await _connect_and_execute(
        target,
        action_digest,
        upload_inputs,
        instance_name=instance_name,
        security=security,
        skip_cache_lookup=skip_cache_lookup,
        priority=priority,
        download_to=download_to,
        progress=progress,
    )


async def execute_action(
    target: str,
    action_digest: Digest,
    *,
    security: ChannelSecurity | None = None,
    instance_name: str = "",
    skip_cache_lookup: bool = False,
    priority: int = 0,
    download_to: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Execute an Action that is already in the CAS (with its Command and inputs).

    Outputs are downloaded only if `download_to` is given. Transfers and errors as for
    `run_command`; a missing Action or input surfaces as the server reports it (usually
    `FailedPrecondition` naming the missing blobs).
    """
    return await _connect_and_execute(
        target,
        action_digest,
        None,
        instance_name=instance_name,
        security=security,
        skip_cache_lookup=skip_cache_lookup,
        priority=priority,
        download_to=download_to,
        progress=progress,
    )
