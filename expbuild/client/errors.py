"""A failed RPC as the client reports it: the same `expbuild.errors` class the server raised
(through the one table, `expbuild.reapi.status`), with the server's message and, for a
FAILED_PRECONDITION, its `PreconditionFailure` violations read from the status trailer.
Codes without a domain class become `RemoteError`, worded for the user where the
connection itself failed (UNAVAILABLE, UNIMPLEMENTED).
"""

from __future__ import annotations

import grpc
from google.rpc import code_pb2

from expbuild.errors import ExpBuildError, RemoteError
from expbuild.reapi.status import domain_error, trailer_details


def from_rpc_error(
    e: grpc.aio.AioRpcError, target: str | None = None, context: str = ""
) -> ExpBuildError:
    """The error a failed RPC stands for, keeping the server's message.

    `target` (host:port) makes UNAVAILABLE and other transport messages name the server;
    `context`, when given, is prefixed to the message ("reading blob X: ..."), except for
    UNAVAILABLE. PreconditionFailure details are read from the `grpc-status-details-bin` trailer.
    """
    code, message = e.code(), e.details() or ""
    prefix = f"{context}: " if context else ""
    error = domain_error(code.value[0], prefix + message, trailer_details(e.trailing_metadata()))
    if error is not None:
        return error
    where = f"the server at {target}" if target else "the server"
    if code == grpc.StatusCode.UNAVAILABLE:
        # Not prefixed: which call found the server gone does not help the user.
        return RemoteError(
            code_pb2.UNAVAILABLE,
            f"{where} is unreachable ({message}); check that it is running and that "
            "--server (or EXPBUILD_SERVER) names its host:port",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RemoteError(
            code_pb2.UNIMPLEMENTED,
            f"{prefix}{where} does not implement this call ({message}); check that "
            "--server points at an ExpBuild or other REAPI v2 server",
        )
    suffix = f": {message}" if message else ""
    return RemoteError(code.value[0], f"{prefix}{where} answered {code.name}{suffix}")
