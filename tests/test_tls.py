"""TLS and mutual TLS on the server's listeners, with a CA made at test time.

Clients reach the client listener over grpcs:// with a token; workers reach their own
listener ([server] worker_address) and log in with a client certificate alone.
"""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from expbuild.client.channel import ChannelSecurity
from expbuild.client.run import run_command
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import worker_pb2, worker_pb2_grpc
from tests.secured import CLIENT_SCOPES, channel, make_token, secured_settings
from tests.serving import running_server, running_worker
from tests.tls_certs import TestCA

pytestmark = pytest.mark.e2e


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def workers_ca(tmp_path) -> TestCA:
    return TestCA(tmp_path / "workers-pki", name="ExpBuild workers CA")


@pytest.fixture
async def server(database_url, tmp_path, ca, workers_ca):
    """Clients on TLS + tokens; workers on their own listener with mutual TLS."""
    cert = ca.issue("server", "localhost", server=True)
    settings = secured_settings(
        tmp_path / "cas",
        tls_cert=str(cert.cert),
        tls_key=str(cert.key),
        worker_address="127.0.0.1:0",
        worker_tls_cert=str(cert.cert),
        worker_tls_key=str(cert.key),
        worker_tls_client_ca=str(workers_ca.pem),
    )
    async with running_server(settings, database_url) as app:
        yield app


async def test_a_client_runs_an_action_over_tls_on_a_worker_known_by_its_certificate(
    server, tmp_path, ca, workers_ca
):
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    worker_cert = workers_ca.issue("worker-1", "worker-1", server=False)
    async with running_worker(
        server,
        tmp_path / "work",
        server_url=f"grpcs://127.0.0.1:{server.worker_port}",
        tls_ca=str(ca.pem),
        tls_cert=str(worker_cert.cert),
        tls_key=str(worker_cert.key),
    ) as worker:
        assert worker.worker_id
        result = await run_command(
            f"grpcs://127.0.0.1:{server.port}",
            ["sh", "-c", "echo over tls"],
            security=ChannelSecurity(ca_file=str(ca.pem), token=client),
        )
    assert result.exit_code == 0 and result.stdout == b"over tls\n"
    principal = await server.pool.fetchval(
        "SELECT principal FROM workers WHERE id = $1", worker.worker_id
    )
    assert principal == "cert:worker-1"


async def test_without_the_ca_or_over_plain_grpc_nothing_gets_through(server, ca):
    client = await make_token(server.pool, "ci", *CLIENT_SCOPES)
    request = re_pb2.FindMissingBlobsRequest()
    # The system's CAs do not know the test CA: the handshake fails.
    async with channel(server, client, target=f"grpcs://127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Plain gRPC to a TLS port: no answer either.
    async with channel(server, client) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # With the CA it works.
    async with channel(
        server, client, target=f"grpcs://127.0.0.1:{server.port}", ca_file=str(ca.pem)
    ) as ch:
        await re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(request, timeout=10)


async def test_the_worker_listener_wants_a_certificate_from_the_workers_ca(server, ca, tmp_path):
    worker_token = await make_token(server.pool, "worker-a", "worker")
    target = f"grpcs://127.0.0.1:{server.worker_port}"
    request = worker_pb2.RegisterWorkerRequest(name="w", max_concurrent_tasks=1)
    # A token is not enough without a client certificate: the handshake is refused.
    async with channel(server, worker_token, target=target, ca_file=str(ca.pem)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.WorkerServiceStub(ch).RegisterWorker(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA (the clients' one) is refused too.
    stranger = ca.issue("stranger", "stranger", server=False)
    async with channel(
        server,
        target=target,
        ca_file=str(ca.pem),
        cert_file=str(stranger.cert),
        key_file=str(stranger.key),
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.WorkerServiceStub(ch).RegisterWorker(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await server.pool.fetchval("SELECT count(*) FROM workers") == 0


async def test_with_a_worker_address_the_worker_api_is_not_on_the_client_listener(server, ca):
    worker_token = await make_token(server.pool, "worker-a", "worker")
    async with channel(
        server, worker_token, target=f"grpcs://127.0.0.1:{server.port}", ca_file=str(ca.pem)
    ) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await worker_pb2_grpc.WorkerServiceStub(ch).RegisterWorker(
                worker_pb2.RegisterWorkerRequest(name="w", max_concurrent_tasks=1)
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_missing_certificate_file_is_one_clear_error(database_url, tmp_path):
    from expbuild.config import ConfigError
    from expbuild.server.app import ServerApp

    settings = secured_settings(
        tmp_path / "cas", tls_cert=str(tmp_path / "nope.pem"), tls_key=str(tmp_path / "nope.key")
    )
    app = ServerApp(settings, database_url)
    with pytest.raises(ConfigError, match=r"server\.tls_key = .*nope\.key.*cannot read"):
        await app.start()
    await app.stop()


def test_tls_files_with_a_plain_target_are_refused():
    from expbuild.client.channel import ChannelSecurityError, open_channel

    with pytest.raises(ChannelSecurityError, match="grpcs://"):
        open_channel("127.0.0.1:1", ChannelSecurity(ca_file="/ca.pem"))


def test_settings_keep_tls_targets():
    settings = secured_settings(__import__("pathlib").Path("/tmp/unused"))
    worker = replace(settings.worker, server_url="grpcs://build.example:8981")
    assert worker.server_target == "grpcs://build.example:8981"
