"""`expbuild tokens create|list|revoke`: the operator's bearer tokens, straight in the
database of `[database] url` (like `expbuild db migrate`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime

import click

from expbuild.auth.scopes import SCOPES, check_scopes
from expbuild.auth.token_secrets import new_secret, secret_hash
from expbuild.cli.common import config_option, json_option, settings_or_exit
from expbuild.config import ConfigError, parse_duration
from expbuild.db import tokens as db_tokens
from expbuild.db.pool import DatabaseUnavailable
from expbuild.errors import ExpBuildError


def _split(values: tuple[str, ...]) -> list[str]:
    """`--scope a --scope b`, `--scope a,b` and `--scope "a b"` all give [a, b]."""
    return [part for value in values for part in value.replace(",", " ").split() if part]


def _with_database(config: str | None, work):
    """Run `work(pool)` against the configured (or embedded) database, migrated first."""
    from expbuild.cli.server import resolve_database_url
    from expbuild.db.migrate import migrate
    from expbuild.db.pool import create_pool

    settings = settings_or_exit(config)

    async def run(url: str):
        pool = await create_pool(url, 1, 2, wait=settings.database.connect_wait.total_seconds())
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            return await work(pool)
        finally:
            await pool.close()

    with contextlib.ExitStack() as stack:
        try:
            return asyncio.run(run(resolve_database_url(settings, stack)))
        except (DatabaseUnavailable, ExpBuildError) as exc:
            raise click.ClickException(str(exc)) from None


def _as_dict(record: db_tokens.TokenRecord) -> dict:
    def when(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "name": record.name,
        "scopes": list(record.scopes),
        "instances": list(record.instances),
        "created_at": when(record.created_at),
        "expires_at": when(record.expires_at),
        "revoked_at": when(record.revoked_at),
        "last_used_at": when(record.last_used_at),
    }


@click.group("tokens")
def tokens_group() -> None:
    """Bearer tokens for a server with [auth] mode = "tokens".

    \b
    Scopes: cas:read, cas:write, execute, ac:write, worker, admin (admin implies all;
    worker implies cas:read and cas:write). See docs/security.md.
    \b
    Examples:
      expbuild tokens create --name bazel-ci --scope cas:read,cas:write,execute
      expbuild tokens create --name worker-a --scope worker --expires 90d
      expbuild tokens revoke bazel-ci
    """


@tokens_group.command("create")
@config_option
@click.option("--name", required=True, help="Unique name, shown in logs and as the owner.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    metavar="SCOPE",
    help=f"What the token may do (repeat, or comma-separate): {', '.join(SCOPES)}.",
)
@click.option(
    "--instance",
    "instances",
    multiple=True,
    metavar="NAME",
    help="Limit the token to these instance names (repeatable; default: all).",
)
@click.option("--expires", metavar="DURATION", help="Lifetime, e.g. 30d or 12h (default: none).")
@json_option
def create_command(
    config: str | None,
    name: str,
    scopes: tuple[str, ...],
    instances: tuple[str, ...],
    expires: str | None,
    as_json: bool,
) -> None:
    """Create a token and print its secret (shown this once; only its hash is kept)."""
    scope_list = _split(scopes)
    try:
        check_scopes(scope_list)
        lifetime = parse_duration(expires, "--expires") if expires else None
    except (ValueError, ConfigError) as exc:
        raise click.BadParameter(str(exc)) from None
    if not name.strip():
        raise click.BadParameter("--name is empty")
    secret = new_secret()
    expires_at = datetime.now(UTC) + lifetime if lifetime else None

    async def work(pool):
        return await db_tokens.create_token(
            pool,
            name=name,
            secret_sha256=secret_hash(secret),
            scopes=scope_list,
            instances=_split(instances),
            expires_at=expires_at,
        )

    record = _with_database(config, work)
    if as_json:
        click.echo(json.dumps({**_as_dict(record), "secret": secret}, indent=2))
        return
    click.echo(secret)
    click.echo(
        f"token {record.name!r} created with scopes {', '.join(record.scopes)}"
        + (f" for instances {', '.join(record.instances)}" if record.instances else "")
        + (f", expires {record.expires_at:%Y-%m-%d %H:%M} UTC" if record.expires_at else "")
        + "; the secret above is shown only now",
        err=True,
    )


@tokens_group.command("list")
@config_option
@json_option
def list_command(config: str | None, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    records = _with_database(config, db_tokens.list_tokens)
    rows = [_as_dict(r) for r in records]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tokens; create one with `expbuild tokens create`")
        return
    click.echo(f"{'NAME':<20} {'STATE':<8} {'EXPIRES':<17} {'LAST USED':<17} SCOPES")
    now = datetime.now(UTC)
    for record, row in zip(records, rows, strict=True):
        expired = record.expires_at is not None and record.expires_at <= now
        state = "revoked" if record.revoked_at else "expired" if expired else "active"
        click.echo(
            f"{row['name'][:20]:<20} {state:<8} {(row['expires_at'] or 'never')[:16]:<17} "
            f"{(row['last_used_at'] or 'never')[:16]:<17} {','.join(row['scopes'])}"
            + (f" (instances {','.join(row['instances'])})" if row["instances"] else "")
        )


@tokens_group.command("revoke")
@config_option
@click.argument("name")
def revoke_command(config: str | None, name: str) -> None:
    """Revoke token NAME; servers refuse it within [auth] cache_ttl."""

    async def work(pool):
        return await db_tokens.revoke_token(pool, name)

    revoked_at = _with_database(config, work)
    click.echo(f"token {name!r} revoked at {revoked_at:%Y-%m-%d %H:%M:%S} UTC")
