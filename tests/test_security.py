"""Secure by default (no public listener without auth) and the `expbuild tokens` commands."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import grpc
import pytest
from click.testing import CliRunner

from expbuild.cli.main import main
from expbuild.config import ConfigError, settings_from_mapping
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.app import ServerApp
from tests.secured import channel, secured_settings
from tests.serving import running_server, server_settings


@pytest.mark.parametrize("key", ["address", "worker_address"])
async def test_a_public_bind_without_auth_refuses_to_start(tmp_path, key):
    settings = server_settings(tmp_path / "cas", **{key: "0.0.0.0:0"})
    app = ServerApp(settings, "postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ConfigError) as caught:
        await app.start()
    message = str(caught.value)
    assert "\n" not in message
    assert f"server.{key} = '0.0.0.0:0'" in message
    assert 'mode = "tokens"' in message and "allow_insecure_public" in message
    assert not hasattr(app, "pool")  # refused before anything started


def test_the_server_command_refuses_a_public_bind_in_one_line(tmp_path):
    result = CliRunner().invoke(
        main,
        ["server", "--address", "0.0.0.0:8980"],
        env={"EXPBUILD_CAS__ROOT": str(tmp_path / "cas"), "EXPBUILD_HOME": str(tmp_path)},
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "allow_insecure_public" in lines[0]
    assert not (tmp_path / "postgres").exists()  # nothing was started


def test_loopback_binds_and_token_mode_need_nothing_else():
    from expbuild.auth.exposure import check_exposure

    for address in ("127.0.0.1:8980", "[::1]:8980", "localhost:8980"):
        check_exposure(settings_from_mapping({"server": {"address": address}}))
    check_exposure(
        settings_from_mapping({"server": {"address": "0.0.0.0:8980"}, "auth": {"mode": "tokens"}})
    )


async def test_allow_insecure_public_starts_with_a_warning(database_url, tmp_path, caplog):
    settings = server_settings(tmp_path / "cas", address="0.0.0.0:0", allow_insecure_public=True)
    with caplog.at_level(logging.WARNING, logger="expbuild.auth.exposure"):
        async with running_server(settings, database_url) as app:
            async with channel(app) as ch:
                await re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(
                    re_pb2.FindMissingBlobsRequest()
                )
    assert any("INSECURE" in r.getMessage() for r in caplog.records)


def _cli(database_url: str, *args: str):
    return CliRunner().invoke(main, list(args), env={"EXPBUILD_DATABASE__URL": database_url})


async def test_tokens_create_list_revoke(database_url, tmp_path):
    created = await asyncio.to_thread(
        _cli, database_url, "tokens", "create", "--name", "ci", "--scope", "cas:read,execute",
        "--expires", "30d", "--json",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    token = json.loads(created.output)
    secret = token["secret"]
    assert secret.startswith("ebt_") and len(secret) >= 4 + 43  # 256 bits, base64url
    assert token["scopes"] == ["cas:read", "execute"] and token["expires_at"]

    settings = secured_settings(tmp_path / "cas", cache_ttl=0.5)
    async with running_server(settings, database_url) as app:
        stored = await app.pool.fetchval("SELECT secret_sha256 FROM tokens WHERE name = 'ci'")
        assert secret.encode() not in bytes(stored)  # only the hash is kept
        async with channel(app, secret) as ch:
            cas = re_grpc.ContentAddressableStorageStub(ch)
            await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest())

            listed = await asyncio.to_thread(_cli, database_url, "tokens", "list", "--json")
            [row] = json.loads(listed.output)
            assert row["name"] == "ci" and row["last_used_at"] and "secret" not in row

            revoked = await asyncio.to_thread(_cli, database_url, "tokens", "revoke", "ci")
            assert revoked.exit_code == 0 and "revoked" in revoked.output
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                try:
                    await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest())
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)

    duplicate = await asyncio.to_thread(
        _cli, database_url, "tokens", "create", "--name", "ci", "--scope", "execute"
    )
    assert duplicate.exit_code == 1 and "exists already" in duplicate.output
    bad = await asyncio.to_thread(
        _cli, database_url, "tokens", "create", "--name", "x", "--scope", "root"
    )
    assert bad.exit_code == 2 and "unknown scope 'root'" in bad.output
    missing = await asyncio.to_thread(_cli, database_url, "tokens", "revoke", "nobody")
    assert missing.exit_code == 1 and "no token named 'nobody'" in missing.output


def test_the_local_backend_serves_tokens_with_its_own_workers(database_url, tmp_path):
    """`[execution] backend = "local"` with tokens: the in-process workers log in with a
    credential only the replica knows; clients need their token."""
    import subprocess

    from tests.processes import BIN, server_env, start, wait_for_log, wait_healthy

    env = server_env(database_url, tmp_path)
    env["EXPBUILD_WORKER__BACKEND__WORK_DIR"] = str(tmp_path / "work")
    env["EXPBUILD_WORKER__BACKEND__RUN_AS"] = "root"  # pytest's tmp tree is root's alone
    env["EXPBUILD_AUTH__MODE"] = "tokens"
    server = start(
        "server-local-tokens",
        ["expbuild", "server", "--config", "configs/expbuild-server.toml"],
        tmp_path,
        env,
    )
    address = env["EXPBUILD_SERVER__ADDRESS"]

    def expbuild(*args: str, token: str = "") -> subprocess.CompletedProcess:
        extra = {"EXPBUILD_TOKEN": token} if token else {}
        return subprocess.run(
            [str(BIN / "expbuild"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**{k: v for k, v in os.environ.items() if k != "EXPBUILD_TOKEN"}, **env, **extra},
        )

    try:
        wait_healthy(address, server)
        wait_for_log(server, "Started 2 local worker(s)")
        created = expbuild(
            "tokens", "create", "--name", "dev", "--scope", "cas:read,cas:write,execute"
        )
        assert created.returncode == 0, created.stderr
        secret = created.stdout.strip()
        ran = expbuild("run", "--server", address, "--", "echo", "local pool", token=secret)
        assert ran.returncode == 0 and ran.stdout == "local pool\n", ran.stderr
        refused = expbuild("run", "--server", address, "--", "echo", "anyone")
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
        assert "anyone" not in refused.stdout
        # The fleet is an admin's business: the local workers are listed for an admin only.
        denied = expbuild("workers", "list", "--server", address, token=secret)
        assert denied.returncode == 1 and "needs scope 'admin'" in denied.stderr
        admin = expbuild("tokens", "create", "--name", "ops", "--scope", "admin").stdout.strip()
        listed = expbuild("workers", "list", "--server", address, "--json", token=admin)
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)) == 2
    finally:
        assert server.stop() == 0, server.log()
