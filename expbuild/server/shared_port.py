"""Holding a gRPC port for the processes of one `expbuild server --processes N`.

The children's listeners share the port with SO_REUSEPORT, which Linux grants to every
socket of the same user that sets it too, so another server must not be able to slip in
beside them. The parent therefore binds the port first *without* SO_REUSEPORT (which fails
if anything holds it, whatever its options) and only then turns the option on for its
still-bound, never-listening socket. From then on the children (SO_REUSEPORT, same user)
may bind beside it; a plain server (`grpc.so_reuseport` = 0) or another parent's first
bind may not. There is no moment at which the port is free, so no race, and the parent's
socket takes no connections: only listening sockets do.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from expbuild.config import ConfigError, parse_address


@dataclass
class HeldPort:
    """The bound sockets of one `host:port` (a name may resolve to several addresses)."""

    host: str
    port: int
    sockets: list[socket.socket]

    @property
    def address(self) -> str:
        """`host:port` with the bound port (the configured one, or the one picked for 0)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        for each in self.sockets:
            each.close()


def hold_port(address: str, key: str) -> HeldPort:
    """Bind every address `address` names, so that only SO_REUSEPORT sockets of this user
    can join; `key` ("server.address") names the setting in errors, as `[server] address`."""
    host, port = parse_address(address, key)
    section, _, name = key.partition(".")
    key = f"[{section}] {name}"
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{key} {shown}: cannot resolve {host!r} ({exc.strerror})") from None
    held: list[socket.socket] = []
    unusable: OSError | None = None
    try:
        for family, kind, proto, _, sockaddr in infos:
            each = socket.socket(family, kind, proto)
            try:
                if family == socket.AF_INET6:
                    # As gRPC binds `[::]`: both stacks, so an IPv4 server is kept out too.
                    each.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                # One port for every address of the name: the first one bound picks it.
                each.bind((sockaddr[0], port, *sockaddr[2:]))
            except OSError as exc:
                each.close()
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"{key} {shown} is already in use") from None
                unusable = exc  # e.g. no IPv6 on this host: gRPC skips it as well
                continue
            each.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            port = each.getsockname()[1]
            held.append(each)
    except BaseException:
        for each in held:
            each.close()
        raise
    if not held:
        reason = unusable.strerror if unusable else "the name resolves to no address"
        raise ConfigError(f"{key} {shown}: cannot bind it ({reason})")
    return HeldPort(host, port, held)
