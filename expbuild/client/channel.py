"""Opening gRPC channels to an ExpBuild (or any REAPI) server.

A target is `host:port` (plain gRPC) or `grpcs://host:port` (TLS; see
`config.grpc_target`). `ChannelSecurity` adds what a secured server asks for: the CA to
trust, a client certificate for mutual TLS, and a bearer token sent with every call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import grpc

from expbuild.errors import InvalidArgument

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
TLS_PREFIX = "grpcs://"

# Pings every minute keep NATs and load balancers from dropping an Execute stream that is
# silent while an action waits in the queue, and detect a dead server within ~80 s. The
# server must accept pings this often (grpc.http2.min_ping_interval_without_data_ms <= 60 s)
# or it answers with GOAWAY "too_many_pings"; ExecutionClient survives that via WaitExecution.
_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]

_targets: weakref.WeakKeyDictionary[grpc.aio.Channel, str] = weakref.WeakKeyDictionary()


class ChannelSecurityError(InvalidArgument):
    """A TLS file or token file cannot be used; the message names it."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ChannelSecurityError(f"{what} {path!r}: cannot read it: {exc.strerror}") from None


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS files (PEM) and a bearer token; empty values are not used."""

    ca_file: str = ""  # empty: the system's trusted CAs
    cert_file: str = ""  # mutual TLS: this client's certificate chain...
    key_file: str = ""  # ...and its private key
    token: str = ""

    @classmethod
    def from_files(
        cls, *, ca_file: str = "", cert_file: str = "", key_file: str = "", token_file: str = ""
    ) -> ChannelSecurity:
        """As configured for a worker: the token is read from `token_file`."""
        token = _read(token_file, "token file").decode().strip() if token_file else ""
        if token_file and not token:
            raise ChannelSecurityError(f"token file {token_file!r} is empty")
        return cls(ca_file=ca_file, cert_file=cert_file, key_file=key_file, token=token)

    @property
    def uses_tls_files(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise ChannelSecurityError("a client certificate needs its key and vice versa")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file") if self.ca_file else None,
            private_key=_read(self.key_file, "key file") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "certificate file") if self.cert_file else None,
        )


class _Bearer:
    """Adds `authorization: Bearer <token>` to every call on a plain channel, where gRPC
    does not allow call credentials (a loopback server without TLS)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.header)
        return details._replace(metadata=metadata)


# grpc.aio files each interceptor under one call kind only, so one class per kind.
class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self.details(client_call_details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self.details(client_call_details), request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self.details(client_call_details), request_iterator)


def _token_interceptors(token: str) -> list | None:
    if not token:
        return None
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def open_channel(target: str, security: ChannelSecurity | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: `host:port`, or `grpcs://host:port` for TLS.

    Messages up to 64 MiB may be sent and received. The channel connects lazily: an
    unreachable server shows up as UNAVAILABLE on the first call. Close it with
    `await channel.close()` or use it as `async with open_channel(...) as channel`.
    Must be called with the event loop that will use it running (grpc.aio binds to it).
    """
    security = security or ChannelSecurity()
    if target.startswith(TLS_PREFIX):
        credentials = security.credentials()
        if security.token:
            # gRPC core adds the header itself: cheaper than a Python interceptor.
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(security.token)
            )
        channel = grpc.aio.secure_channel(
            target.removeprefix(TLS_PREFIX), credentials, options=_OPTIONS
        )
    else:
        if security.uses_tls_files:
            raise ChannelSecurityError(
                f"TLS files are given but {target!r} is not a TLS address; use grpcs://{target}"
            )
        # Call credentials need a secure channel; on plain gRPC an interceptor adds the header.
        channel = grpc.aio.insecure_channel(
            target, options=_OPTIONS, interceptors=_token_interceptors(security.token)
        )
    _targets[channel] = target
    return channel


def channel_target(channel: grpc.aio.Channel) -> str | None:
    """The target a channel from `open_channel` was opened to; None for other channels."""
    return _targets.get(channel)
