"""Helpers for tests of a server with [auth] mode = "tokens"."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import grpc

from expbuild.auth.token_secrets import new_secret, secret_hash
from expbuild.client.channel import ChannelSecurity, open_channel
from expbuild.config import AuthSettings, Settings
from expbuild.db import tokens as db_tokens
from expbuild.digest import Digest, digest_of
from expbuild.proto import remote_execution_pb2 as re_pb2
from tests.serving import server_settings

CLIENT_SCOPES = ("cas:read", "cas:write", "execute")


def secured_settings(cas_root: Path, cache_ttl: float = 1.0, **server_overrides) -> Settings:
    settings = server_settings(cas_root, **server_overrides)
    return replace(
        settings, auth=AuthSettings(mode="tokens", cache_ttl=timedelta(seconds=cache_ttl))
    )


async def make_token(
    pool,
    name: str,
    *scopes: str,
    instances: tuple[str, ...] = (),
    expires_at: datetime | None = None,
) -> str:
    """A token in the database, as `expbuild tokens create` makes it; returns the secret."""
    secret = new_secret()
    await db_tokens.create_token(
        pool,
        name=name,
        secret_sha256=secret_hash(secret),
        scopes=list(scopes),
        instances=list(instances),
        expires_at=expires_at,
    )
    return secret


def channel(app, token: str = "", *, target: str = "", **tls) -> grpc.aio.Channel:
    """A channel to `app` (its client listener unless `target`), sending `token`."""
    return open_channel(target or f"127.0.0.1:{app.port}", ChannelSecurity(token=token, **tls))


def action_blobs(argv=("sh", "-c", "id")) -> tuple[Digest, dict[Digest, bytes]]:
    """An Action running `argv` with an empty input root, and every blob it needs."""
    command = re_pb2.Command(arguments=list(argv))
    command.platform.properties.add(name="OSFamily", value="Linux")
    blobs = {}
    for message in (command, re_pb2.Directory()):
        data = message.SerializeToString(deterministic=True)
        blobs[digest_of(data)] = data
    command_digest, root_digest = list(blobs)
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(), input_root_digest=root_digest.to_proto()
    )
    action.platform.properties.add(name="OSFamily", value="Linux")
    data = action.SerializeToString(deterministic=True)
    blobs[digest_of(data)] = data
    return digest_of(data), blobs


def token_file(folder: Path, secret: str, name: str = "worker.token") -> str:
    path = folder / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)
