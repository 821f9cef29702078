"""Every gRPC method the server serves, called without a credential, with broken ones and
with a token that lacks just the scope it needs: each answers the exact status, before
the servicer sees the request, and the server keeps serving.
"""

from __future__ import annotations

import grpc
import pytest

from expbuild.auth.scopes import ADMIN, ANY_TOKEN, METHOD_SCOPES, OPEN, SCOPES
from expbuild.proto import bytestream_pb2, remote_asset_pb2, worker_pb2
from expbuild.proto import remote_execution_pb2 as re_pb2
from tests.secured import make_token, secured_settings
from tests.serving import running_server

pytestmark = pytest.mark.e2e


def _methods() -> list[tuple[str, bool, bool]]:
    """(full method name, client streaming, server streaming) of our own services."""
    from google.longrunning import operations_pb2

    found = []
    for module in (re_pb2, worker_pb2, bytestream_pb2, remote_asset_pb2, operations_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append(
                    (
                        f"/{service.full_name}/{method.name}",
                        method.client_streaming,
                        method.server_streaming,
                    )
                )
    return [m for m in found if m[0] in METHOD_SCOPES and METHOD_SCOPES[m[0]] != OPEN]


METHODS = _methods()
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
BROKEN_HEADERS = [
    ("no header", None, UNAUTHENTICATED),
    ("empty", "", UNAUTHENTICATED),
    ("scheme only", "Bearer", UNAUTHENTICATED),
    ("basic", "Basic dXNlcjpwYXNz", UNAUTHENTICATED),
    ("unknown token", "Bearer ebt_" + "A" * 43, UNAUTHENTICATED),
    ("not ebt", "Bearer hello", UNAUTHENTICATED),
    ("two spaces", "Bearer  ebt_x", UNAUTHENTICATED),
    ("long", "Bearer " + "x" * 4_000, UNAUTHENTICATED),
    # Beyond gRPC's metadata limit: the transport refuses it before any handler runs.
    ("huge", "Bearer " + "x" * 16_000, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


async def _call(channel: grpc.aio.Channel, method: str, client_streaming: bool,
                server_streaming: bool, metadata, body: bytes = b"") -> grpc.StatusCode:  # fmt: skip
    """Call `method` with `body` (by default the empty request, valid for every message
    type) and return the status it ended with."""
    identity = bytes
    try:
        if client_streaming and server_streaming:
            call = channel.stream_stream(method, identity, identity)(
                iter([body]), metadata=metadata, timeout=30
            )
            async for _ in call:
                pass
        elif client_streaming:
            await channel.stream_unary(method, identity, identity)(
                iter([body]), metadata=metadata, timeout=30
            )
        elif server_streaming:
            call = channel.unary_stream(method, identity, identity)(
                body, metadata=metadata, timeout=30
            )
            async for _ in call:
                pass
        else:
            await channel.unary_unary(method, identity, identity)(
                body, metadata=metadata, timeout=30
            )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def server(database_url, tmp_path):
    async with running_server(secured_settings(tmp_path / "cas"), database_url) as app:
        yield app


async def test_every_method_refuses_broken_credentials(server):
    codes: dict[tuple[str, str], grpc.StatusCode] = {}
    expected = {label: code for label, _, code in BROKEN_HEADERS}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for label, header, _ in BROKEN_HEADERS:
            metadata = None if header is None else (("authorization", header),)
            for method, client_streaming, server_streaming in METHODS:
                codes[(label, method)] = await _call(
                    channel, method, client_streaming, server_streaming, metadata
                )
        wrong = {k: v for k, v in codes.items() if v != expected[k[0]]}
        assert not wrong, wrong
        assert len(METHODS) >= 27 and len(codes) == len(BROKEN_HEADERS) * len(METHODS)
        # Still serving: the health check answers.
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert await server.pool.fetchval("SELECT count(*) FROM tasks") == 0


async def test_every_method_needs_exactly_its_scope(server):
    """A token with every scope but the one a method needs (and not admin) is denied; the
    same method with its scope gets past authorization (whatever the empty request then
    earns, it is not UNAUTHENTICATED or PERMISSION_DENIED)."""
    tokens: dict[str, str] = {}
    for scope in SCOPES:
        others = [s for s in SCOPES if s not in (scope, ADMIN)]
        if scope in ("cas:read", "cas:write"):
            others.remove("worker")  # worker implies both
        tokens[f"all-but-{scope}"] = await make_token(server.pool, f"all-but-{scope}", *others)
        tokens[scope] = await make_token(server.pool, f"only-{scope}", scope)
    denied, passed = {}, {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, client_streaming, server_streaming in METHODS:
            scope = METHOD_SCOPES[method]
            if scope == ANY_TOKEN:
                continue
            call = (channel, method, client_streaming, server_streaming)
            without = (("authorization", f"Bearer {tokens[f'all-but-{scope}']}"),)
            denied[method] = await _call(*call, without)
            if method.endswith(("/PollTasks", "/Execute", "/WaitExecution", "/Read")):
                continue  # would wait for work or stream; their denial is what matters here
            with_scope = (("authorization", f"Bearer {tokens[scope]}"),)
            passed[method] = await _call(*call, with_scope)
    assert set(denied.values()) == {grpc.StatusCode.PERMISSION_DENIED}, denied
    refused = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
    assert not {m: c for m, c in passed.items() if c in refused}, passed
    assert len(denied) > 25


# A truncated varint: no message type parses it.
GARBAGE = b"\x08\xff"


async def test_a_body_that_is_not_protobuf_is_judged_only_for_a_known_caller(server):
    """The auth interceptor runs before the body is parsed: a stranger's garbage is
    UNAUTHENTICATED on every method, a known caller's is INVALID_ARGUMENT (from the
    decoding interceptor), and an open method parses without a credential."""
    admin = await make_token(server.pool, "garbage-admin", ADMIN)
    stranger, known = {}, {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        for method, client_streaming, server_streaming in METHODS:
            call = (channel, method, client_streaming, server_streaming)
            stranger[method] = await _call(*call, None, GARBAGE)
            known[method] = await _call(*call, (("authorization", f"Bearer {admin}"),), GARBAGE)
        health = await _call(channel, "/grpc.health.v1.Health/Check", False, False, None, GARBAGE)
    assert set(stranger.values()) == {UNAUTHENTICATED}, stranger
    assert set(known.values()) == {grpc.StatusCode.INVALID_ARGUMENT}, known
    assert health == grpc.StatusCode.INVALID_ARGUMENT
    assert await server.pool.fetchval("SELECT count(*) FROM tasks") == 0
