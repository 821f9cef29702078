"""Request decoding where a bad body can be answered: INVALID_ARGUMENT, not UNKNOWN.

gRPC deserializes a request before any servicer code runs, so a body that is not a valid
protobuf (random bytes, a bad varint, a wrong wire type, groups nested past the parser's
limit) surfaces as UNKNOWN "Unexpected DecodeError". `DecodingInterceptor` takes the
deserializer out of every method handler and parses inside the handler instead, where the
error becomes INVALID_ARGUMENT naming the message type. Streamed requests are parsed one
by one as the servicer reads them.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Deserializer = Callable[[bytes], Any]


def _type_name(deserialize: Deserializer) -> str:
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"


async def _decode(raw: bytes, deserialize: Deserializer, context: grpc.aio.ServicerContext):
    try:
        return deserialize(raw)
    except (DecodeError, RecursionError, UnicodeDecodeError) as exc:
        # `exc` says what the parser found (its text is the library's, not the client's).
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body ({len(raw)} bytes) is not a valid {_type_name(deserialize)} "
            f"message: {str(exc)[:200]}",
        )


async def _decoded_stream(
    raw_requests: AsyncIterator[bytes],
    deserialize: Deserializer,
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[Any]:
    async for raw in raw_requests:
        yield await _decode(raw, deserialize, context)


def _decoding(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method handler, with parsing moved into the call."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    serialize = handler.response_serializer

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(raw, context):
            return await inner(await _decode(raw, deserialize, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)

    if handler.stream_unary is not None:
        inner = handler.stream_unary

        async def stream_unary(raw_requests, context):
            return await inner(_decoded_stream(raw_requests, deserialize, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

    if handler.unary_stream is not None:
        inner = handler.unary_stream
        unary_stream: Callable[..., Any]
        if inspect.isasyncgenfunction(inner):

            async def yielding(raw, context):
                request = await _decode(raw, deserialize, context)
                async for response in inner(request, context):
                    yield response

            unary_stream = yielding
        else:  # writes with context.write (e.g. health's Watch)

            async def writing(raw, context):
                return await inner(await _decode(raw, deserialize, context), context)

            unary_stream = writing

        return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

    inner = handler.stream_stream
    stream_stream: Callable[..., Any]
    if inspect.isasyncgenfunction(inner):

        async def yielding_stream(raw_requests, context):
            async for response in inner(
                _decoded_stream(raw_requests, deserialize, context), context
            ):
                yield response

        stream_stream = yielding_stream
    else:

        async def writing_stream(raw_requests, context):
            return await inner(_decoded_stream(raw_requests, deserialize, context), context)

        stream_stream = writing_stream

    return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Parses every request inside its handler, so a malformed body is INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return None if handler is None else _decoding(handler)
