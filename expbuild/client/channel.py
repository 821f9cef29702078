"""Opening gRPC channels to an ExpBuild (or any REAPI) server."""

from __future__ import annotations

import weakref

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

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


def open_channel(target: str) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to `target` (`host:port`, see `config.grpc_target`).

    Messages up to 64 MiB may be sent and received. The channel connects lazily: an
    unreachable server shows up as UNAVAILABLE on the first call. Close it with
    `await channel.close()` or use it as `async with open_channel(...) as channel`.
    Must be called with the event loop that will use it running (grpc.aio binds to it).
    """
    channel = grpc.aio.insecure_channel(target, options=_OPTIONS)
    _targets[channel] = target
    return channel


def channel_target(channel: grpc.aio.Channel) -> str | None:
    """The target a channel from `open_channel` was opened to; None for other channels."""
    return _targets.get(channel)
