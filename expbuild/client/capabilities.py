"""Asking a REAPI server what one of its instances supports (GetCapabilities)."""

from __future__ import annotations

import grpc

from expbuild.client.channel import channel_target
from expbuild.client.errors import from_rpc_error
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc


async def fetch_capabilities(
    channel: grpc.aio.Channel, instance_name: str = ""
) -> re_pb2.ServerCapabilities:
    """The server's capabilities for `instance_name`.

    Raises `InvalidArgument` (with the server's message, which names the instance) for
    an instance the server does not serve, and the usual mapped errors otherwise, e.g.
    `RemoteError` UNAVAILABLE when the server cannot be reached.
    """
    stub = re_grpc.CapabilitiesStub(channel)
    request = re_pb2.GetCapabilitiesRequest(instance_name=instance_name)
    try:
        return await stub.GetCapabilities(request)
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(
            e, channel_target(channel), f"reading the capabilities of instance {instance_name!r}"
        ) from None
