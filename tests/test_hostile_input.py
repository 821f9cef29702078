"""Hostile input gets a precise answer: the exact status, never UNKNOWN or INTERNAL.

One real server (real gRPC over loopback, real PostgreSQL, a real CAS directory) takes
every malformed request below; each case asserts the status code it must get. At the end
the server still answers, nothing was queued, no internal error was logged and no log
line grew past a bounded length.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2

from expbuild.cas.store import FileStore
from expbuild.digest import EMPTY, Digest, digest_of
from expbuild.proto import bytestream_pb2, bytestream_pb2_grpc, worker_pb2, worker_pb2_grpc
from expbuild.proto import remote_asset_pb2 as ra_pb2
from expbuild.proto import remote_asset_pb2_grpc as ra_grpc
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.app import ServerApp
from tests.conftest import create_from_template, drop_database
from tests.secured import channel as secured_channel
from tests.secured import make_token, secured_settings
from tests.serving import running_server, server_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_DIRECTORY = 4096
MAX_LOG_LINE = 4000
HASH = "a" * 64


@dataclass
class Env:
    app: ServerApp
    channel: grpc.aio.Channel
    store: FileStore
    records: list[logging.LogRecord]


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(postgres_admin_url, tmp_path_factory):
    name = f"expbuild_hostile_{os.getpid()}"
    await drop_database(postgres_admin_url, name)
    database_url = await create_from_template(postgres_admin_url, name)
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    logging.getLogger("expbuild").addHandler(handler)
    previous_level = logging.getLogger("expbuild").level
    logging.getLogger("expbuild").setLevel(logging.DEBUG)
    settings = server_settings(
        tmp_path_factory.mktemp("hostile") / "cas",
        # "*": any instance name is served, so a hostile one reaches the database.
        instance_names=("*",),
        max_directory_size_bytes=MAX_DIRECTORY,
        reject_unmatched_platforms=False,
    )
    try:
        async with running_server(settings, database_url) as app:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                yield Env(app, channel, app.store, records)
    finally:
        logging.getLogger("expbuild").removeHandler(handler)
        logging.getLogger("expbuild").setLevel(previous_level)
        await drop_database(postgres_admin_url, name)


async def code_of(call) -> grpc.StatusCode:
    """The status a unary call, a response stream or a call object ends with."""
    try:
        if hasattr(call, "read") and not asyncio.iscoroutine(call):
            async with asyncio.timeout(20):
                async for _ in call:
                    pass
        else:
            async with asyncio.timeout(20):
                await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def put(store: FileStore, message_or_bytes) -> Digest:
    data = (
        message_or_bytes
        if isinstance(message_or_bytes, bytes)
        else message_or_bytes.SerializeToString()
    )
    digest = digest_of(data)
    await store.put(digest, data)
    return digest


# -- bodies that are not protobuf, on every method -----------------------------------------

GARBAGE = {
    "truncated-varint": b"\x08\xff",
    "overlong-varint": b"\x08" + b"\xff" * 11 + b"\x01",
    "truncated-length": b"\x0a\x05ab",
    "field-number-zero": b"\x00",
    "wire-type-7": b"\x0f",
    "stray-end-group": b"\x0c",
    "100k-nested-groups": b"\x0b" * 100_000,
}


def _methods():
    services = [
        re_pb2.DESCRIPTOR.services_by_name[name]
        for name in ("Execution", "ActionCache", "ContentAddressableStorage", "Capabilities")
    ]
    services += [
        bytestream_pb2.DESCRIPTOR.services_by_name["ByteStream"],
        worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
        worker_pb2.DESCRIPTOR.services_by_name["WorkerAdminService"],
        operations_pb2.DESCRIPTOR.services_by_name["Operations"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        ra_pb2.DESCRIPTOR.services_by_name["Fetch"],
        ra_pb2.DESCRIPTOR.services_by_name["Push"],
    ]
    for service in services:
        for method in service.methods:
            yield (
                f"/{service.full_name}/{method.name}",
                method.client_streaming,
                method.server_streaming,
            )


@pytest.mark.parametrize("body", list(GARBAGE.values()), ids=list(GARBAGE))
@pytest.mark.parametrize(
    "path,client_streaming,server_streaming", list(_methods()), ids=lambda v: str(v)
)
async def test_a_body_that_is_not_protobuf_is_invalid_argument(
    env, path, client_streaming, server_streaming, body
):
    kinds = {
        (False, False): env.channel.unary_unary,
        (False, True): env.channel.unary_stream,
        (True, False): env.channel.stream_unary,
        (True, True): env.channel.stream_stream,
    }
    method = kinds[(client_streaming, server_streaming)](path)
    call = method(iter([body]) if client_streaming else body)
    assert await code_of(call) == INVALID


# -- digest functions --------------------------------------------------------------------

DIGEST_FUNCTIONS = {
    "md5": re_pb2.DigestFunction.MD5,
    "sha1": re_pb2.DigestFunction.SHA1,
    "sha512": re_pb2.DigestFunction.SHA512,
    "undefined-999": 999,
}


def _digest_function_calls(env: Env, function: int):
    d = re_pb2.Digest(hash=HASH, size_bytes=1)
    execution = re_grpc.ExecutionStub(env.channel)
    cache = re_grpc.ActionCacheStub(env.channel)
    cas = re_grpc.ContentAddressableStorageStub(env.channel)
    return {
        "Execute": lambda: execution.Execute(
            re_pb2.ExecuteRequest(action_digest=d, digest_function=function)
        ),
        "GetActionResult": lambda: cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=d, digest_function=function)
        ),
        "UpdateActionResult": lambda: cache.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=d, digest_function=function)
        ),
        "FindMissingBlobs": lambda: cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=[d], digest_function=function)
        ),
        "BatchUpdateBlobs": lambda: cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(digest_function=function)
        ),
        "BatchReadBlobs": lambda: cas.BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[d], digest_function=function)
        ),
        "GetTree": lambda: cas.GetTree(
            re_pb2.GetTreeRequest(root_digest=d, digest_function=function)
        ),
    }


@pytest.mark.parametrize("function", list(DIGEST_FUNCTIONS.values()), ids=list(DIGEST_FUNCTIONS))
@pytest.mark.parametrize(
    "method",
    [
        "Execute",
        "GetActionResult",
        "UpdateActionResult",
        "FindMissingBlobs",
        "BatchUpdateBlobs",
        "BatchReadBlobs",
        "GetTree",
    ],
)
async def test_an_unsupported_digest_function_is_invalid_argument(env, method, function):
    assert await code_of(_digest_function_calls(env, function)[method]()) == INVALID


# -- NUL bytes (and overlong worker names) in strings bound for PostgreSQL ------------

NUL = "bad\x00name"


def _nul_calls(env: Env):
    workers = worker_pb2_grpc.WorkerServiceStub(env.channel)
    admin = worker_pb2_grpc.WorkerAdminServiceStub(env.channel)
    operations = operations_pb2_grpc.OperationsStub(env.channel)
    execution = re_grpc.ExecutionStub(env.channel)
    cache = re_grpc.ActionCacheStub(env.channel)
    d = re_pb2.Digest(hash=HASH, size_bytes=1)
    token = "00000000-0000-0000-0000-000000000000"

    def register(**fields):
        request = worker_pb2.RegisterWorkerRequest(name="w", max_concurrent_tasks=1)
        platform = fields.pop("platform", None)
        if platform:
            request.platform.properties.add(name=platform[0], value=platform[1])
        for key, value in fields.items():
            setattr(request, key, value)
        return workers.RegisterWorker(request)

    return {
        "instance-name": lambda: cache.GetActionResult(
            re_pb2.GetActionResultRequest(instance_name=NUL, action_digest=d)
        ),
        "GetOperation": lambda: operations.GetOperation(
            operations_pb2.GetOperationRequest(name=NUL)
        ),
        "CancelOperation": lambda: operations.CancelOperation(
            operations_pb2.CancelOperationRequest(name=NUL)
        ),
        "DeleteOperation": lambda: operations.DeleteOperation(
            operations_pb2.DeleteOperationRequest(name=NUL)
        ),
        "WaitExecution": lambda: execution.WaitExecution(re_pb2.WaitExecutionRequest(name=NUL)),
        "register-worker-id": lambda: register(worker_id=NUL),
        "register-name": lambda: register(name=NUL),
        "register-hostname": lambda: register(hostname=NUL),
        "register-version": lambda: register(version=NUL),
        "register-long-worker-id": lambda: register(worker_id="w" * 100_000),
        "register-long-name": lambda: register(name="n" * 100_000),
        "register-platform-name": lambda: register(platform=(NUL, "x")),
        "register-platform-value": lambda: register(platform=("OSFamily", NUL)),
        "heartbeat-worker-id": lambda: workers.Heartbeat(
            worker_pb2.HeartbeatRequest(worker_id=NUL)
        ),
        "poll-worker-id": lambda: workers.PollTasks(worker_pb2.PollTasksRequest(worker_id=NUL)),
        "deregister-worker-id": lambda: workers.DeregisterWorker(
            worker_pb2.DeregisterWorkerRequest(worker_id=NUL)
        ),
        "drain-worker-id": lambda: admin.DrainWorker(worker_pb2.DrainWorkerRequest(worker_id=NUL)),
        "release-reason": lambda: workers.ReleaseTask(
            worker_pb2.ReleaseTaskRequest(
                worker_id="w", task_id="task-1", lease_token=token, reason=NUL
            )
        ),
        "lease-token": lambda: workers.ReleaseTask(
            worker_pb2.ReleaseTaskRequest(worker_id="w", task_id="task-1", lease_token=NUL)
        ),
        "task-id": lambda: workers.CompleteTask(
            worker_pb2.CompleteTaskRequest(worker_id="w", task_id=NUL, lease_token=token)
        ),
    }


NUL_CASES = [
    "instance-name",
    "GetOperation",
    "CancelOperation",
    "DeleteOperation",
    "WaitExecution",
    "register-worker-id",
    "register-name",
    "register-hostname",
    "register-version",
    "register-long-worker-id",
    "register-long-name",
    "register-platform-name",
    "register-platform-value",
    "heartbeat-worker-id",
    "poll-worker-id",
    "deregister-worker-id",
    "drain-worker-id",
    "release-reason",
    "lease-token",
    "task-id",
]


@pytest.mark.parametrize("case", NUL_CASES)
async def test_a_nul_byte_or_an_overlong_name_is_invalid_argument(env, case):
    assert await code_of(_nul_calls(env)[case]()) == INVALID


async def test_a_list_page_token_hiding_a_nul_is_invalid_argument(env):
    import base64

    token = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|a\x00b").decode()
    operations = operations_pb2_grpc.OperationsStub(env.channel)
    call = operations.ListOperations(operations_pb2.ListOperationsRequest(page_token=token))
    assert await code_of(call) == INVALID


# -- Execute: Actions and Commands refused before they are queued --------------------------


async def execute(env: Env, *, action=None, command=None, root=None, action_bytes=None):
    """Upload the blobs and Execute; the status the stream ends with."""
    root_digest = await put(env.store, root if root is not None else re_pb2.Directory())
    if action_bytes is None:
        command_digest = await put(
            env.store, command if command is not None else re_pb2.Command(arguments=["true"])
        )
        action = action if action is not None else re_pb2.Action()
        action.command_digest.CopyFrom(command_digest.to_proto())
        action.input_root_digest.CopyFrom(root_digest.to_proto())
        action_bytes = action.SerializeToString()
    digest = await put(env.store, action_bytes)
    stub = re_grpc.ExecutionStub(env.channel)
    return await code_of(
        stub.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto(), skip_cache_lookup=True))
    )


def _timeout(seconds: int, nanos: int = 0) -> re_pb2.Action:
    return re_pb2.Action(timeout=duration_pb2.Duration(seconds=seconds, nanos=nanos))


def _command(**fields) -> re_pb2.Command:
    env = fields.pop("env", ())
    command = re_pb2.Command(**{"arguments": ["true"], **fields})
    for name, value in env:
        command.environment_variables.add(name=name, value=value)
    return command


def _platform_command(name: str, value: str) -> re_pb2.Command:
    command = _command()
    command.platform.properties.add(name=name, value=value)
    return command


EXECUTE_CASES = {
    "timeout-int64-max": ({"action": _timeout(2**63 - 1)}, INVALID),
    "timeout-nanos-too-large": ({"action": _timeout(1, 2_000_000_000)}, INVALID),
    "timeout-mixed-signs": ({"action": _timeout(1, -1)}, INVALID),
    "timeout-negative": ({"action": _timeout(-5)}, INVALID),
    "timeout-above-maximum": ({"action": _timeout(10**9)}, INVALID),
    "action-not-protobuf": ({"action_bytes": b"\x08\xff"}, PRECONDITION),
    "no-arguments": ({"command": re_pb2.Command()}, INVALID),
    "empty-argv0": ({"command": _command(arguments=["", "x"])}, INVALID),
    "nul-in-argument": ({"command": _command(arguments=["sh", "a\x00b"])}, INVALID),
    "empty-env-name": ({"command": _command(env=[("", "x")])}, INVALID),
    "env-name-with-equals": ({"command": _command(env=[("A=B", "x")])}, INVALID),
    "nul-in-env-name": ({"command": _command(env=[("A\x00", "x")])}, INVALID),
    "nul-in-env-value": ({"command": _command(env=[("A", "x\x00")])}, INVALID),
    "output-file-absolute": ({"command": _command(output_files=["/etc/passwd"])}, INVALID),
    "output-file-trailing-slash": ({"command": _command(output_files=["out/"])}, INVALID),
    "output-file-empty": ({"command": _command(output_files=[""])}, INVALID),
    "output-file-escapes": ({"command": _command(output_files=["../x"])}, INVALID),
    "output-directory-escapes": (
        {"command": _command(output_directories=["a/../../x"])},
        INVALID,
    ),
    "output-path-trailing-slash": ({"command": _command(output_paths=["d/"])}, INVALID),
    "output-path-absolute": ({"command": _command(output_paths=["/tmp/x"])}, INVALID),
    "output-escapes-through-working-directory": (
        {"command": _command(working_directory="", output_paths=["sub/../../x"])},
        INVALID,
    ),
    "working-directory-absolute": ({"command": _command(working_directory="/tmp")}, INVALID),
    "working-directory-escapes": ({"command": _command(working_directory="../up")}, INVALID),
    "working-directory-absent": (
        {"command": _command(working_directory="no/such/dir")},
        PRECONDITION,
    ),
    "platform-name-nul": ({"command": _platform_command("OS\x00", "Linux")}, INVALID),
    "platform-value-nul": ({"command": _platform_command("OSFamily", "Lin\x00ux")}, INVALID),
    "platform-name-empty": ({"command": _platform_command("", "Linux")}, INVALID),
}


@pytest.mark.parametrize("case", list(EXECUTE_CASES))
async def test_execute_refuses_a_bad_action_or_command(env, case):
    fields, expected = EXECUTE_CASES[case]
    assert await execute(env, **fields) == expected


async def test_a_command_blob_that_is_not_protobuf_is_failed_precondition_naming_it(env):
    command_digest = await put(env.store, b"\x0a\x05ab")
    root_digest = await put(env.store, re_pb2.Directory())
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(), input_root_digest=root_digest.to_proto()
    )
    digest = await put(env.store, action)
    stub = re_grpc.ExecutionStub(env.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Execute(re_pb2.ExecuteRequest(action_digest=digest.to_proto())):
            pass
    assert info.value.code() == PRECONDITION
    assert str(command_digest) in info.value.details()
    assert "not a valid Command" in info.value.details()


async def test_a_working_directory_that_is_a_file_is_failed_precondition(env):
    file_digest = await put(env.store, b"contents")
    root = re_pb2.Directory()
    root.files.add(name="src", digest=file_digest.to_proto())
    code = await execute(env, command=_command(working_directory="src"), root=root)
    assert code == PRECONDITION


async def test_nothing_refused_was_queued(env):
    # Runs after the Execute cases above (file order): none of them left a task behind.
    assert await env.app.pool.fetchval("SELECT count(*) FROM tasks") == 0


# -- the action cache ----------------------------------------------------------------------


def _result(**fields) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(**fields)


BAD = re_pb2.Digest(hash="not-hex", size_bytes=1)
NEGATIVE = re_pb2.Digest(hash=HASH, size_bytes=-1)
ACTION_RESULT_CASES = {
    "output-file-bad-hash": _result(output_files=[re_pb2.OutputFile(path="a", digest=BAD)]),
    "output-file-negative-size": _result(
        output_files=[re_pb2.OutputFile(path="a", digest=NEGATIVE)]
    ),
    "output-file-no-digest": _result(output_files=[re_pb2.OutputFile(path="a")]),
    "tree-digest-bad": _result(
        output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=BAD)]
    ),
    "root-directory-digest-bad": _result(
        output_directories=[
            re_pb2.OutputDirectory(
                path="d",
                tree_digest=re_pb2.Digest(hash=HASH, size_bytes=1),
                root_directory_digest=BAD,
            )
        ]
    ),
    "stdout-digest-bad": _result(stdout_digest=BAD),
    "stderr-digest-negative": _result(stderr_digest=NEGATIVE),
}


@pytest.mark.parametrize("case", list(ACTION_RESULT_CASES))
async def test_update_action_result_validates_every_digest(env, case):
    stub = re_grpc.ActionCacheStub(env.channel)
    call = stub.UpdateActionResult(
        re_pb2.UpdateActionResultRequest(
            action_digest=re_pb2.Digest(hash=HASH, size_bytes=1),
            action_result=ACTION_RESULT_CASES[case],
        )
    )
    assert await code_of(call) == INVALID


# -- ByteStream QueryWriteStatus -------------------------------------------------------------

WRITE_NAMES = {
    "empty": "",
    "read-form": f"blobs/{HASH}/1",
    "empty-uuid": f"uploads//blobs/{HASH}/1",
    "bad-hash": f"uploads/u/blobs/{'z' * 64}/1",
    "short-hash": "uploads/u/blobs/abc/1",
    "negative-size": f"uploads/u/blobs/{HASH}/-1",
    "size-not-a-number": f"uploads/u/blobs/{HASH}/1e3",
    "unknown-compressor": f"uploads/u/compressed-blobs/lz4/{HASH}/1",
    "identity-compressor": f"uploads/u/compressed-blobs/identity/{HASH}/1",
    "md5-digest-function": f"uploads/u/blobs/md5/{HASH}/1",
    "no-keyword": "garbage",
    "nul": f"uploads/u\x00/blobs/{HASH}/1\x00",
}


@pytest.mark.parametrize("name", list(WRITE_NAMES.values()), ids=list(WRITE_NAMES))
async def test_query_write_status_validates_its_resource_name(env, name):
    stub = bytestream_pb2_grpc.ByteStreamStub(env.channel)
    call = stub.QueryWriteStatus(bytestream_pb2.QueryWriteStatusRequest(resource_name=name))
    assert await code_of(call) == INVALID


# -- GetTree ---------------------------------------------------------------------------------


def _big_directory(files: int) -> re_pb2.Directory:
    directory = re_pb2.Directory()
    for n in range(files):
        directory.files.add(name=f"file-{n:06d}", digest=re_pb2.Digest(hash=HASH, size_bytes=n))
    return directory


async def get_tree(env: Env, root: re_pb2.Directory):
    """GetTree of `root`, stored first: the response stream."""
    digest = await put(env.store, root)
    stub = re_grpc.ContentAddressableStorageStub(env.channel)
    return stub.GetTree(re_pb2.GetTreeRequest(root_digest=digest.to_proto()))


async def _parent_of(env: Env, name: str, child: re_pb2.Directory) -> re_pb2.Directory:
    child_digest = await put(env.store, child)
    root = re_pb2.Directory()
    root.directories.add(name=name, digest=child_digest.to_proto())
    return root


async def test_get_tree_refuses_a_root_directory_above_the_bound(env):
    root = _big_directory(200)
    assert root.ByteSize() > MAX_DIRECTORY
    assert await code_of(await get_tree(env, root)) == EXHAUSTED


async def test_get_tree_refuses_a_child_directory_above_the_bound(env):
    root = await _parent_of(env, "big", _big_directory(200))
    assert await code_of(await get_tree(env, root)) == EXHAUSTED


async def test_get_tree_serves_directories_within_the_bound(env):
    root = await _parent_of(env, "small", _big_directory(10))
    pages = [p async for p in await get_tree(env, root)]
    assert sum(len(p.directories) for p in pages) == 2


# -- operations and the Worker API -----------------------------------------------------------


async def test_list_operations_refuses_a_negative_page_size(env):
    operations = operations_pb2_grpc.OperationsStub(env.channel)
    call = operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=-1))
    assert await code_of(call) == INVALID


@pytest.mark.parametrize(
    "timeout",
    [
        duration_pb2.Duration(seconds=2**63 - 1),
        duration_pb2.Duration(seconds=0, nanos=-2_000_000_000),
        duration_pb2.Duration(seconds=-1, nanos=5),
    ],
    ids=["int64-max", "nanos-out-of-range", "mixed-signs"],
)
async def test_poll_tasks_refuses_an_invalid_timeout(env, timeout):
    workers = worker_pb2_grpc.WorkerServiceStub(env.channel)
    call = workers.PollTasks(worker_pb2.PollTasksRequest(worker_id="w", timeout=timeout))
    assert await code_of(call) == INVALID


@pytest.mark.parametrize("task_id", ["task-x", "task-", "task-٣", "-1", ""])
async def test_a_malformed_task_id_is_invalid_argument(env, task_id):
    workers = worker_pb2_grpc.WorkerServiceStub(env.channel)
    call = workers.CompleteTask(
        worker_pb2.CompleteTaskRequest(worker_id="w", task_id=task_id, lease_token="x")
    )
    assert await code_of(call) == INVALID


async def test_a_huge_operation_name_gets_a_short_answer(env):
    name = "x" * 1_000_000
    operations = operations_pb2_grpc.OperationsStub(env.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations.GetOperation(operations_pb2.GetOperationRequest(name=name))
    assert info.value.code() == NOT_FOUND
    assert len(info.value.details()) < 1000


# -- the newer RPCs ------------------------------------------------------------------------
# Each refusal names the problem in its message, leaves nothing behind, and the same
# service answers a good request right after it.


async def refusal(call) -> grpc.aio.AioRpcError:
    """The error a unary call or a response stream ends with; fails if it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(20):
            if hasattr(call, "read") and not asyncio.iscoroutine(call):
                async for _ in call:
                    pass
            else:
                await call
    return info.value


def stub_for(env: Env, service: str):
    return {
        "Fetch": ra_grpc.FetchStub,
        "Push": ra_grpc.PushStub,
        "CAS": re_grpc.ContentAddressableStorageStub,
        "Workers": worker_pb2_grpc.WorkerServiceStub,
        "Admin": worker_pb2_grpc.WorkerAdminServiceStub,
    }[service](env.channel)


def _qualifiers(*pairs: tuple[str, str]) -> list[ra_pb2.Qualifier]:
    return [ra_pb2.Qualifier(name=name, value=value) for name, value in pairs]


UNREACHABLE = "http://127.0.0.1:9/asset"  # the discard port: nothing answers
HUGE = 2**62
LYING_SRI = "sha256-" + "A" * 43 + "="  # well formed, but not the empty blob's


def _fetch(uris=(UNREACHABLE,), qualifiers=(), **fields) -> ra_pb2.FetchBlobRequest:
    return ra_pb2.FetchBlobRequest(uris=list(uris), qualifiers=_qualifiers(*qualifiers), **fields)


def _push(
    uris=("https://example.invalid/pushed",), qualifiers=(), digest=None, **fields
) -> ra_pb2.PushBlobRequest:
    return ra_pb2.PushBlobRequest(
        uris=list(uris),
        qualifiers=_qualifiers(*qualifiers),
        blob_digest=digest if digest is not None else EMPTY.to_proto(),
        **fields,
    )


ASSET_CASES = {
    "fetch-no-uri": ("FetchBlob", _fetch(uris=()), INVALID, "uris is empty"),
    "fetch-directory-no-uri": (
        "FetchDirectory",
        ra_pb2.FetchDirectoryRequest(),
        INVALID,
        "uris is empty",
    ),
    "fetch-nul-in-uri": ("FetchBlob", _fetch(uris=["http://x.invalid/\x00"]), INVALID, "uris[0]"),
    "fetch-nul-in-qualifier": (
        "FetchBlob",
        _fetch(qualifiers=[("bazel.canonical_id", "a\x00")]),
        INVALID,
        "NUL",
    ),
    "fetch-huge-qualifier": (
        "FetchBlob",
        _fetch(qualifiers=[("bazel.canonical_id", os.urandom(4000).hex())]),
        INVALID,
        "longer than",
    ),
    "fetch-huge-uri": (
        "FetchBlob",
        _fetch(uris=["https://x.invalid/" + os.urandom(4000).hex()]),
        INVALID,
        "longer than",
    ),
    "fetch-unknown-qualifier": (
        "FetchBlob",
        _fetch(qualifiers=[("vcs.commit", "abc")]),
        INVALID,
        "'vcs.commit' is not supported",
    ),
    "fetch-sri-not-base64": (
        "FetchBlob",
        _fetch(qualifiers=[("checksum.sri", "sha256-!!!")]),
        INVALID,
        "is not base64",
    ),
    "fetch-sri-md5": (
        "FetchBlob",
        _fetch(qualifiers=[("checksum.sri", "md5-AAAA")]),
        INVALID,
        "algorithm one of",
    ),
    "fetch-sri-short": (
        "FetchBlob",
        _fetch(qualifiers=[("checksum.sri", "sha256-AAAA")]),
        INVALID,
        "a sha256 digest is 32 bytes",
    ),
    "fetch-negative-timeout": (
        "FetchBlob",
        _fetch(timeout=duration_pb2.Duration(seconds=-1)),
        INVALID,
        "timeout",
    ),
    "fetch-nul-in-instance-name": (
        "FetchBlob",
        _fetch(instance_name="a\x00b"),
        INVALID,
        "instance name",
    ),
    "push-no-uri": ("PushBlob", _push(uris=()), INVALID, "uris is empty"),
    "push-uri-without-scheme": ("PushBlob", _push(uris=["not a uri"]), INVALID, "'not a uri'"),
    "push-nul-in-uri": ("PushBlob", _push(uris=["https://x.invalid/\x00"]), INVALID, "NUL"),
    "push-huge-uri": (
        "PushBlob",
        _push(uris=["https://x.invalid/" + os.urandom(4000).hex()]),
        INVALID,
        "longer than",
    ),
    "push-huge-qualifier": (
        "PushBlob",
        _push(qualifiers=[("bazel.canonical_id", os.urandom(4000).hex())]),
        INVALID,
        "longer than",
    ),
    "push-bad-hash": (
        "PushBlob",
        _push(digest=re_pb2.Digest(hash="zz", size_bytes=1)),
        INVALID,
        "blob_digest",
    ),
    "push-negative-size": (
        "PushBlob",
        _push(digest=re_pb2.Digest(hash=HASH, size_bytes=-1)),
        INVALID,
        "blob_digest",
    ),
    "push-huge-size": (
        "PushBlob",
        _push(digest=re_pb2.Digest(hash=EMPTY.hash, size_bytes=HUGE)),
        PRECONDITION,
        "not in the CAS",
    ),
    "push-sri-that-lies": (
        "PushBlob",
        _push(qualifiers=[("checksum.sri", LYING_SRI)]),
        INVALID,
        "does not match",
    ),
    "push-bad-reference": (
        "PushBlob",
        _push(references_blobs=[re_pb2.Digest(hash=HASH, size_bytes=-5)]),
        INVALID,
        "references_blobs[0]",
    ),
    "push-bad-expiry": (
        "PushBlob",
        _push(expire_at=timestamp_pb2.Timestamp(seconds=HUGE)),
        INVALID,
        "expire_at",
    ),
    "push-directory-bad-digest": (
        "PushDirectory",
        ra_pb2.PushDirectoryRequest(
            uris=["https://example.invalid/d"],
            root_directory_digest=re_pb2.Digest(hash=HASH.upper(), size_bytes=1),
        ),
        INVALID,
        "root_directory_digest",
    ),
    "push-nul-in-instance-name": (
        "PushBlob",
        _push(instance_name="a\x00b"),
        INVALID,
        "instance name",
    ),
    "push-dot-dot-instance-name": (
        "PushBlob",
        _push(instance_name="main/../other"),
        INVALID,
        "'..'",
    ),
}

GOOD_URI = "https://example.invalid/good.tar.gz"


async def assets_stored(env: Env) -> list[str]:
    return [r["uri"] for r in await env.app.pool.fetch("SELECT uri FROM assets ORDER BY uri")]


async def good_push_and_fetch(env: Env) -> None:
    push = ra_grpc.PushStub(env.channel)
    await push.PushBlob(_push(uris=[GOOD_URI]))
    reply = await ra_grpc.FetchStub(env.channel).FetchBlob(_fetch(uris=[GOOD_URI]))
    assert reply.status.code == code_pb2.OK, reply.status.message
    assert Digest.from_proto(reply.blob_digest) == EMPTY


@pytest.mark.parametrize("case", list(ASSET_CASES))
async def test_remote_asset_refuses_a_malformed_request_naming_the_problem(env, case):
    method, request, code, needle = ASSET_CASES[case]
    service = "Fetch" if method.startswith("Fetch") else "Push"
    error = await refusal(getattr(stub_for(env, service), method)(request))
    assert error.code() == code, error.details()
    assert needle in error.details()
    assert len(error.details()) < MAX_LOG_LINE
    assert set(await assets_stored(env)) <= {GOOD_URI}
    await good_push_and_fetch(env)


THIS_FILE = Path(__file__)
FETCH_FAILURES = {
    "file-uri": (THIS_FILE.as_uri(), code_pb2.INVALID_ARGUMENT, "'file'"),
    "no-scheme": ("just some words", code_pb2.INVALID_ARGUMENT, "(none)"),
    "ftp": ("ftp://127.0.0.1/x", code_pb2.INVALID_ARGUMENT, "'ftp'"),
    "unreachable": (UNREACHABLE, code_pb2.UNAVAILABLE, "127.0.0.1:9"),
}


@pytest.mark.parametrize("case", list(FETCH_FAILURES))
async def test_a_fetch_that_cannot_download_says_why_and_stores_nothing(env, case):
    uri, code, needle = FETCH_FAILURES[case]
    reply = await ra_grpc.FetchStub(env.channel).FetchBlob(_fetch(uris=[uri]))
    assert reply.status.code == code, reply.status.message
    assert needle in reply.status.message
    assert not reply.HasField("blob_digest")
    assert uri not in await assets_stored(env)
    if uri.startswith("file:"):
        assert not await env.store.has(digest_of(THIS_FILE.read_bytes()))
    await good_push_and_fetch(env)


async def test_push_directory_refuses_a_blob_that_is_not_a_directory(env):
    lie = await put(env.store, b"\x0a\x05ab")
    error = await refusal(
        ra_grpc.PushStub(env.channel).PushDirectory(
            ra_pb2.PushDirectoryRequest(
                uris=["https://example.invalid/not-a-tree"], root_directory_digest=lie.to_proto()
            )
        )
    )
    assert error.code() == INVALID
    assert str(lie) in error.details() and "not a Directory" in error.details()
    assert "https://example.invalid/not-a-tree" not in await assets_stored(env)


# -- WorkerService.OpenSession -------------------------------------------------------------

SESSION_CASES = {
    "empty": ("", INVALID, "worker_id"),
    "nul": ("w\x00", INVALID, "NUL"),
    "unknown": ("never-registered", NOT_FOUND, "register again"),
    "huge": ("w" * 100_000, INVALID, "worker_id"),
}


@pytest.mark.parametrize("case", list(SESSION_CASES))
async def test_open_session_refuses_a_worker_id_it_cannot_use(env, case):
    worker_id, code, needle = SESSION_CASES[case]
    workers = worker_pb2_grpc.WorkerServiceStub(env.channel)
    error = await refusal(workers.OpenSession(worker_pb2.OpenSessionRequest(worker_id=worker_id)))
    assert error.code() == code, error.details()
    assert needle in error.details()
    assert env.app.sessions.held == 0
    assert await env.app.pool.fetchval("SELECT count(*) FROM workers") == 0


async def test_open_session_for_a_worker_of_another_credential_is_permission_denied(
    database_url, tmp_path
):
    async with running_server(secured_settings(tmp_path / "cas"), database_url) as app:
        alice = await make_token(app.pool, "alice", "worker")
        mallory = await make_token(app.pool, "mallory", "worker")
        async with secured_channel(app, alice) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            registered = await workers.RegisterWorker(
                worker_pb2.RegisterWorkerRequest(name="alice-w", max_concurrent_tasks=1)
            )
            worker_id = registered.worker_id
        async with secured_channel(app, mallory) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            error = await refusal(
                workers.OpenSession(worker_pb2.OpenSessionRequest(worker_id=worker_id))
            )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert worker_id in error.details() and "another credential" in error.details()
        assert app.sessions.held == 0
        session_column = "SELECT session_id FROM workers WHERE id = $1"
        assert await app.pool.fetchval(session_column, worker_id) is None
        # Its own credential still opens it.
        async with secured_channel(app, alice) as channel:
            workers = worker_pb2_grpc.WorkerServiceStub(channel)
            session = workers.OpenSession(worker_pb2.OpenSessionRequest(worker_id=worker_id))
            assert (await session.read()).opened
            session.cancel()


# -- WorkerAdminService ListTasks / GetTaskHistory -----------------------------------------


def _list(**fields) -> worker_pb2.ListTasksRequest:
    platform = fields.pop("platform", None)
    request = worker_pb2.ListTasksRequest(**fields)
    if platform:
        request.platform.properties.add(name=platform[0], value=platform[1])
    return request


ADMIN_CASES = {
    "list-huge-limit": ("ListTasks", _list(limit=2**32 - 1), INVALID, "limit 4294967295"),
    "list-unknown-state": ("ListTasks", _list(state="running"), INVALID, "'running'"),
    "list-nul-state": ("ListTasks", _list(state="queued\x00"), INVALID, "NUL"),
    "list-nul-platform": ("ListTasks", _list(platform=("OS\x00", "x")), INVALID, "NUL"),
    "list-since-out-of-range": (
        "ListTasks",
        _list(since=timestamp_pb2.Timestamp(seconds=HUGE)),
        INVALID,
        "since",
    ),
    "history-empty": ("GetTaskHistory", worker_pb2.GetTaskHistoryRequest(), INVALID, "empty"),
    "history-nul": (
        "GetTaskHistory",
        worker_pb2.GetTaskHistoryRequest(task="task-1\x00"),
        INVALID,
        "NUL",
    ),
    "history-garbage": (
        "GetTaskHistory",
        worker_pb2.GetTaskHistoryRequest(task="no such thing"),
        NOT_FOUND,
        "'no such thing'",
    ),
    "history-id-past-bigint": (
        "GetTaskHistory",
        worker_pb2.GetTaskHistoryRequest(task="task-" + "9" * 30),
        NOT_FOUND,
        "9" * 30,
    ),
    "history-non-ascii-digits": (
        "GetTaskHistory",
        worker_pb2.GetTaskHistoryRequest(task="task-²"),
        NOT_FOUND,
        "task-²",
    ),
    "history-unknown-id": (
        "GetTaskHistory",
        worker_pb2.GetTaskHistoryRequest(task="task-424242"),
        NOT_FOUND,
        "task-424242",
    ),
}


@pytest.mark.parametrize("case", list(ADMIN_CASES))
async def test_task_admin_refuses_a_bad_request_naming_the_problem(env, case):
    method, request, code, needle = ADMIN_CASES[case]
    admin = worker_pb2_grpc.WorkerAdminServiceStub(env.channel)
    error = await refusal(getattr(admin, method)(request))
    assert error.code() == code, error.details()
    assert needle in error.details()
    assert len(error.details()) < MAX_LOG_LINE
    listed = await admin.ListTasks(worker_pb2.ListTasksRequest(limit=1000))
    assert len(listed.tasks) == await env.app.pool.fetchval("SELECT count(*) FROM tasks")


# -- ContentAddressableStorage SplitBlob / SpliceBlob --------------------------------------

SPLICED = b"spliced from two chunks"
HEAD, TAIL = SPLICED[:7], SPLICED[7:]


def _splice(blob: Digest | re_pb2.Digest, chunks, **fields) -> re_pb2.SpliceBlobRequest:
    as_proto = [c.to_proto() if isinstance(c, Digest) else c for c in chunks]
    return re_pb2.SpliceBlobRequest(
        blob_digest=blob.to_proto() if isinstance(blob, Digest) else blob,
        chunk_digests=as_proto,
        **fields,
    )


def _split(blob: Digest | re_pb2.Digest, **fields) -> re_pb2.SplitBlobRequest:
    return re_pb2.SplitBlobRequest(
        blob_digest=blob.to_proto() if isinstance(blob, Digest) else blob, **fields
    )


WHOLE, FIRST, SECOND = digest_of(SPLICED), digest_of(HEAD), digest_of(TAIL)
OTHER = digest_of(b"something else entirely")
SPLIT_SPLICE_CASES = {
    "splice-sizes-do-not-add-up": (
        "SpliceBlob",
        _splice(Digest(WHOLE.hash, WHOLE.size_bytes + 1), [FIRST, SECOND]),
        INVALID,
        "add up to",
    ),
    "splice-chunks-in-the-wrong-order": (
        "SpliceBlob",
        _splice(WHOLE, [SECOND, FIRST]),
        INVALID,
        "concatenate to",
    ),
    "splice-blob-digest-that-lies": (
        "SpliceBlob",
        _splice(Digest(OTHER.hash, WHOLE.size_bytes), [FIRST, SECOND]),
        INVALID,
        "concatenate to",
    ),
    "splice-chunk-digest-that-lies": (
        "SpliceBlob",
        _splice(WHOLE, [Digest(FIRST.hash, FIRST.size_bytes + 1), SECOND]),
        NOT_FOUND,
        "not in the CAS",
    ),
    "splice-huge-chunk-list": (
        "SpliceBlob",
        _splice(Digest(WHOLE.hash, HUGE), [FIRST] * 50_000),
        INVALID,
        "add up to",
    ),
    "splice-huge-size": (
        "SpliceBlob",
        _splice(Digest(WHOLE.hash, HUGE), [FIRST, SECOND]),
        INVALID,
        "add up to",
    ),
    "splice-negative-chunk": (
        "SpliceBlob",
        _splice(WHOLE, [re_pb2.Digest(hash=HASH, size_bytes=-1)]),
        INVALID,
        "chunk_digests[0]",
    ),
    "splice-no-blob-digest": (
        "SpliceBlob",
        re_pb2.SpliceBlobRequest(chunk_digests=[FIRST.to_proto()]),
        INVALID,
        "blob_digest is not set",
    ),
    "splice-nul-in-instance-name": (
        "SpliceBlob",
        _splice(WHOLE, [FIRST, SECOND], instance_name="a\x00"),
        INVALID,
        "NUL",
    ),
    "splice-dot-dot-instance-name": (
        "SpliceBlob",
        _splice(WHOLE, [FIRST, SECOND], instance_name="../up"),
        INVALID,
        "'..'",
    ),
    "split-missing": ("SplitBlob", _split(OTHER), NOT_FOUND, str(OTHER)),
    "split-size-that-lies": (
        "SplitBlob",
        _split(Digest(FIRST.hash, HUGE)),
        NOT_FOUND,
        "not in the CAS",
    ),
    "split-bad-hash": (
        "SplitBlob",
        _split(re_pb2.Digest(hash="g" * 64, size_bytes=1)),
        INVALID,
        "blob_digest",
    ),
    "split-nul-in-instance-name": (
        "SplitBlob",
        _split(FIRST, instance_name="\x00"),
        INVALID,
        "NUL",
    ),
    "split-dot-dot-instance-name": (
        "SplitBlob",
        _split(FIRST, instance_name="a/./b"),
        INVALID,
        "'.'",
    ),
}


@pytest.mark.parametrize("case", list(SPLIT_SPLICE_CASES))
async def test_split_and_splice_refuse_a_bad_request_and_store_nothing(env, case):
    await put(env.store, HEAD)
    await put(env.store, TAIL)
    method, request, code, needle = SPLIT_SPLICE_CASES[case]
    cas = re_grpc.ContentAddressableStorageStub(env.channel)
    error = await refusal(getattr(cas, method)(request))
    assert error.code() == code, error.details()
    assert needle in error.details()
    assert len(error.details()) < MAX_LOG_LINE
    assert not await env.store.has(WHOLE)
    assert [p for p in env.store.layout.tmp_dir.iterdir() if not p.name.startswith("upload-")] == []
    # The same RPCs still serve: a good splice, then a split of what it stored.
    spliced = await cas.SpliceBlob(_splice(WHOLE, [FIRST, SECOND]))
    assert Digest.from_proto(spliced.blob_digest) == WHOLE
    split = await cas.SplitBlob(_split(WHOLE))
    assert [Digest.from_proto(d) for d in split.chunk_digests] == [WHOLE]
    env.store.path_of(WHOLE).unlink()


# -- afterwards ------------------------------------------------------------------------------


async def test_the_server_still_answers_and_logged_no_internal_error(env):
    stub = re_grpc.CapabilitiesStub(env.channel)
    caps = await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest())
    assert caps.execution_capabilities.exec_enabled
    messages = [record.getMessage() for record in env.records]
    assert messages, "the server logged nothing: the handler is not attached"
    assert not [m for m in messages if "internal error" in m]
    assert not [record for record in env.records if record.exc_info]
    assert max(len(m) for m in messages) < MAX_LOG_LINE


async def test_an_internal_error_hides_its_text_behind_an_id(env, caplog):
    # A real fault: the database connection pool is closed under the servicer. This
    # breaks the module's server, so it is the file's last test.
    caplog.set_level(logging.ERROR, logger="expbuild.server.status")
    pool = env.app.pool
    await pool.close()
    stub = re_grpc.ActionCacheStub(env.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=re_pb2.Digest(hash=HASH, size_bytes=1))
        )
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert details.startswith("internal error (id ")
    incident = details.removeprefix("internal error (id ").split(")")[0]
    assert "pool" not in details.lower()
    assert any(incident in record.getMessage() for record in caplog.records)
