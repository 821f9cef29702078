"""What `expbuild workers` and `expbuild tasks` share: one WorkerAdminService call, and
platforms as the operator reads them."""

from __future__ import annotations

import asyncio

import click
import grpc

from expbuild.cli.common import channel_security
from expbuild.client.channel import open_channel
from expbuild.client.errors import from_rpc_error
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import worker_pb2_grpc


def admin_call(target: str, method: str, request):
    """One WorkerAdminService call; a failure is a one-line ClickException."""
    security = channel_security()

    async def run():
        async with open_channel(target, security) as channel:
            stub = worker_pb2_grpc.WorkerAdminServiceStub(channel)
            try:
                return await getattr(stub, method)(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                raise click.ClickException(str(from_rpc_error(exc, target))) from None

    return asyncio.run(run())


def platform_dict(platform: re_pb2.Platform) -> dict[str, list[str]]:
    """{name: [values]} as the server sent them (the JSON output's form)."""
    found: dict[str, list[str]] = {}
    for prop in platform.properties:
        found.setdefault(prop.name, []).append(prop.value)
    return found


def platform_text(platform: dict[str, list[str]]) -> str:
    """`OSFamily=linux, pool=a|b`: one line for a table."""
    return ", ".join(f"{name}={'|'.join(values)}" for name, values in sorted(platform.items()))
