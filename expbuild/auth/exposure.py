"""Secure by default: without auth, the server listens on loopback only."""

from __future__ import annotations

import ipaddress
import logging

from expbuild.config import ConfigError, Settings, parse_address

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def listeners(settings: Settings) -> list[tuple[str, str]]:
    """(key, address) of every gRPC listener the server opens."""
    found = [("server.address", settings.server.address)]
    if settings.server.worker_address:
        found.append(("server.worker_address", settings.server.worker_address))
    return found


def check_exposure(settings: Settings, *, warn: bool = True) -> None:
    """Refuse (ConfigError, one line) to serve a non-loopback address with [auth] mode
    "none", unless [server] allow_insecure_public, which warns (if `warn`) instead."""
    if settings.auth.mode != "none":
        return
    for key, address in listeners(settings):
        host, _ = parse_address(address, key)
        if is_loopback(host):
            continue
        if settings.server.allow_insecure_public:
            if not warn:
                continue
            log.warning(
                "INSECURE: %s = %s accepts calls from other machines without any credential "
                '([auth] mode = "none", allow_insecure_public = true): anyone who reaches it '
                "can run commands on the workers",
                key,
                address,
            )
            continue
        raise ConfigError(
            f'{key} = {address!r} is reachable from other machines, but [auth] mode = "none" '
            'would let anyone there run commands on the workers; set [auth] mode = "tokens" '
            "(see docs/security.md), listen on 127.0.0.1, or set [server] "
            "allow_insecure_public = true"
        )
