"""Authentication and authorization for every call, as a grpc.aio server interceptor.

The caller is a bearer token (`authorization: Bearer <secret>`) or, on a listener that
asks for client certificates, the certificate's identity (a worker). The method's scope
comes from `expbuild.auth.scopes.METHOD_SCOPES`. The principal is set in a context
variable for the servicer (`expbuild.auth.principal.current_principal`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import grpc

from expbuild.auth.principal import Principal, reset_principal, set_principal
from expbuild.auth.scopes import ANY_TOKEN, OPEN, WORKER, required_scope
from expbuild.auth.verifier import TokenVerifier, Unauthenticated
from expbuild.db.outages import is_database_outage, outage_error

log = logging.getLogger(__name__)

_HOW = (
    "send the header 'authorization: Bearer <token>' (expbuild --token or EXPBUILD_TOKEN; "
    "bazel --remote_header=authorization='Bearer <token>'; a worker's [worker] token_file)"
)


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, secret = text.strip().partition(" ")
            return secret.strip() if scheme.lower() == "bearer" else ""
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`certificate_scopes`: what a verified client certificate grants on this listener
    (empty: certificates identify nobody here, a token is needed)."""

    def __init__(self, verifier: TokenVerifier, certificate_scopes: tuple[str, ...] = ()):
        self.verifier = verifier
        self.certificate_scopes = certificate_scopes
        # One guarded handler per method, made at its first call: the credential is read
        # from each call's context, so nothing per call is built here.
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is None:
            scope = required_scope(method)
            if scope == OPEN:
                return handler
            guarded = _guarded(handler, lambda context: self._authorize(method, scope, context))
            self._guarded[method] = guarded
        return guarded

    async def _authorize(
        self, method: str, scope: str, context: grpc.aio.ServicerContext
    ) -> Principal:
        short = method.rsplit("/", 1)[-1]
        try:
            secret = _bearer(context.invocation_metadata())
            principal = await self._authenticate(secret, context)
        except Unauthenticated as exc:
            log.info("%s refused: %s", short, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except Exception as exc:
            # Runs before the servicer's @rpc: without this a database outage while
            # looking the token up reached the client as UNKNOWN, which it does not retry.
            if not is_database_outage(exc):
                raise
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(outage_error(exc)))
        if scope != ANY_TOKEN and scope not in principal.scopes:
            have = ", ".join(sorted(principal.scopes)) or "none"
            message = (
                f"{principal.name!r} may not call {short}: it needs scope {scope!r} "
                f"(it has {have}); ask an operator for a token with --scope {scope}"
            )
            log.info("%s refused: %s", short, message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        return principal

    async def _authenticate(self, secret: str | None, context) -> Principal:
        if secret:
            return await self.verifier.verify(secret)
        if secret is None and self.certificate_scopes:
            identities = context.peer_identities()
            if identities:
                identity = identities[0].decode(errors="replace")
                return Principal.of(f"cert:{identity}", self.certificate_scopes)
        if secret == "":
            raise Unauthenticated(f"the authorization header is not 'Bearer <token>'; {_HOW}")
        raise Unauthenticated(f"this server needs a credential: {_HOW}")


def _guarded(handler: grpc.RpcMethodHandler, authorize) -> grpc.RpcMethodHandler:
    """The same handler, running `authorize(context)` first and as its principal."""
    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream

    if handler.response_streaming:

        async def streaming(request, context):
            token = set_principal(await authorize(context))
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write()
                    await result
            finally:
                reset_principal(token)

        wrapped = streaming
    else:

        async def unary(request, context):
            token = set_principal(await authorize(context))
            try:
                return await behavior(request, context)
            finally:
                reset_principal(token)

        wrapped = unary
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


WORKER_CERTIFICATE_SCOPES = (WORKER,)
