"""Kill any process and nothing is lost: two server replicas on one database and one CAS,
workers on either, real processes, SIGKILL in the middle of an action."""

from __future__ import annotations

import json
import signal
import subprocess

import grpc
import pytest

from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from tests.processes import BIN, server_env, start, wait_for_log, wait_healthy

pytestmark = pytest.mark.e2e


def replica(name, database_url, tmp_path, **extra):
    env = server_env(database_url, tmp_path)  # same CAS directory: tmp_path / "cas"
    env.update(extra)
    process = start(name, ["expbuild", "server"], tmp_path, env)
    wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], process)
    return env["EXPBUILD_SERVER__ADDRESS"], process


def worker(name, address, tmp_path, **extra):
    env = {
        "EXPBUILD_WORKER__SERVER_URL": f"http://{address}",
        "EXPBUILD_WORKER__NAME": name,
        "EXPBUILD_WORKER__HEARTBEAT_INTERVAL": "0.5",
        "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / f"work-{name}"),
        "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
        **extra,
    }
    process = start(name, ["expbuild", "worker", "daemon"], tmp_path, env)
    wait_for_log(process, "registered successfully")
    return process


def submit(address, tmp_path, *command) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "expbuild"), "run", "--server", address, "--json", "--no-cache", "--", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )


def wait_execution(address: str, name: str) -> re_pb2.ExecuteResponse:
    with grpc.insecure_channel(address) as channel:
        last = None
        for operation in re_grpc.ExecutionStub(channel).WaitExecution(
            re_pb2.WaitExecutionRequest(name=name), timeout=60
        ):
            last = operation
    response = re_pb2.ExecuteResponse()
    last.response.Unpack(response)
    return response


def operation_names(address: str) -> list[str]:
    from google.longrunning import operations_pb2, operations_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = operations_pb2_grpc.OperationsStub(channel).ListOperations(
            operations_pb2.ListOperationsRequest(), timeout=10
        )
    return [op.name for op in reply.operations]


def test_killing_the_clients_replica_loses_nothing(database_url, tmp_path):
    a, server_a = replica("server-a", database_url, tmp_path)
    b, server_b = replica("server-b", database_url, tmp_path)
    runner = worker("worker-on-b", b, tmp_path)
    try:
        client = submit(a, tmp_path, "sh", "-c", "sleep 1.5; echo survived")
        wait_for_log(runner, "Executing command:")
        server_a.stop(signal.SIGKILL)  # the replica the client streams from dies
        client.kill()  # (it would keep retrying A); a new client asks B instead
        client.wait(timeout=10)
        [name] = operation_names(b)
        response = wait_execution(b, name)  # any replica answers for any operation
        assert response.result.exit_code == 0
        assert response.result.stdout_raw == b"" and response.result.stdout_digest.size_bytes == 9
    finally:
        runner.stop()
        server_b.stop()


def test_killing_the_worker_mid_action_runs_it_again_elsewhere(database_url, tmp_path):
    # Short liveness settings so the test does not wait minutes for the reaper.
    fast = {
        "EXPBUILD_SERVER__WORKER_OFFLINE_TIMEOUT": "2s",
        "EXPBUILD_SERVER__REAP_INTERVAL": "0.5s",
        "EXPBUILD_SERVER__HEARTBEAT_INTERVAL": "0.5s",
        "EXPBUILD_SERVER__LEASE_DURATION": "5s",
    }
    a, server_a = replica("server-a", database_url, tmp_path, **fast)
    doomed = worker("doomed", a, tmp_path)
    spare = None
    try:
        client = submit(a, tmp_path, "sh", "-c", "sleep 1; echo ran to the end")
        wait_for_log(doomed, "Executing command:")
        doomed.stop(signal.SIGKILL)  # no deregistration, no hand-back: only the reaper knows
        spare = worker("spare", a, tmp_path)
        out, err = client.communicate(timeout=60)
        report = json.loads(out)
        assert report["exit_code"] == 0 and report["stdout"] == "ran to the end\n", err
        assert report["worker"] == "spare"
        wait_for_log(server_a, "requeued (session lost on worker")  # noticed by its session
    finally:
        if spare is not None:
            spare.stop()
        server_a.stop()
