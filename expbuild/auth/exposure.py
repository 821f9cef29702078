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


def listeners(settings: Settings) -> list[tuple[str, str, str]]:
    """(key, address, TLS certificate) of every gRPC listener the server opens."""
    s = settings.server
    found = [("server.address", s.address, s.tls_cert)]
    if s.worker_address:
        found.append(("server.worker_address", s.worker_address, s.worker_tls_cert))
    return found


def _warn_plain_tokens(settings: Settings) -> None:
    for key, address, cert in listeners(settings):
        host, _ = parse_address(address, key)
        if not cert and not is_loopback(host):
            log.warning(
                "%s = %s serves without TLS: tokens cross the network in plain text (set its "
                "tls_cert and tls_key, or terminate TLS in front of it)",
                key,
                address,
            )


def check_exposure(settings: Settings, *, warn: bool = True) -> None:
    """Refuse (ConfigError, one line) to serve a non-loopback address with [auth] mode
    "none", unless [server] allow_insecure_public, which warns (if `warn`) instead."""
    if settings.auth.mode != "none":
        if warn:
            _warn_plain_tokens(settings)
        return
    for key, address, _cert in listeners(settings):
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
