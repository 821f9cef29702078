"""End to end with real processes: `expbuild server`, `expbuild worker daemon`, `expbuild run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.postgres import free_port
from tests.processes import BIN, expbuild_up, server_env, start, wait_for_log, wait_healthy

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(database_url, tmp_path):
    """A server and one worker as separate processes, like two hosts would run them."""
    env = server_env(database_url, tmp_path)
    address = env["EXPBUILD_SERVER__ADDRESS"]
    # The shipped config is for a network (TLS, tokens, a worker listener); here it runs on
    # loopback without them, like the original guide (tests/test_tls.py and test_auth*.py
    # cover the secured setup).
    env.update(
        {
            "EXPBUILD_AUTH__MODE": "none",
            "EXPBUILD_SERVER__WORKER_ADDRESS": "",
            **{f"EXPBUILD_SERVER__{key}": "" for key in ("TLS_CERT", "TLS_KEY")},
            **{f"EXPBUILD_SERVER__WORKER_{key}": "" for key in ("TLS_CERT", "TLS_KEY")},
        }
    )
    server = start(
        "server",
        ["re-server", "--config", "configs/expbuild-server-remote-workers.toml", "--verbose"],
        tmp_path,
        env,
    )
    worker = None
    try:
        wait_healthy(address, server)
        worker = start(
            "worker",
            ["expbuild-worker", "daemon", "--config", "configs/expbuild-worker.toml", "--verbose"],
            tmp_path,
            {
                "EXPBUILD_WORKER__SERVER_URL": f"http://{address}",
                "EXPBUILD_WORKER__CAS_URL": f"http://{address}",
                "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / "work"),
                "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
                "EXPBUILD_WORKER__NAME": "e2e-worker",
                "EXPBUILD_WORKER__HEARTBEAT_INTERVAL": "0.5",
            },
        )
        wait_for_log(worker, "registered successfully")
        yield address, server, worker
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def run(address: str, *args: str, cwd, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "expbuild"), "run", "--server", address, *args],
        capture_output=True,
        cwd=cwd,
        timeout=timeout,
    )


def test_the_readme_examples_work_through_real_processes(cluster, tmp_path):
    address, server, worker = cluster
    started = time.monotonic()

    first = run(
        address, "--", "sh", "-c", "echo hello from remote; echo oops >&2; exit 3", cwd=tmp_path
    )
    assert first.stdout == b"hello from remote\n"
    assert first.stderr == b"oops\n"
    assert first.returncode == 3

    workdir = tmp_path / "client"
    (workdir / "some_dir").mkdir(parents=True)
    (workdir / "some_dir" / "a.txt").write_text("the contents of a\n")
    second = run(
        address,
        "--input",
        "./some_dir",
        "--output",
        "out.txt",
        "--",
        "sh",
        "-c",
        "cat some_dir/a.txt > out.txt",
        cwd=workdir,
    )
    assert second.returncode == 0, second.stderr
    assert (workdir / "out.txt").read_text() == "the contents of a\n"

    as_json = run(address, "--json", "--", "echo", "Hello from remote worker", cwd=tmp_path)
    report = json.loads(as_json.stdout)
    assert report["exit_code"] == 0 and report["stdout"] == "Hello from remote worker\n"
    print(f"\nend-to-end: three remote runs in {time.monotonic() - started:.2f}s")

    # The original guide's log lines, on both sides.
    for line in (
        "Initializing remote worker scheduler",
        "registered with platform",
        "submitted to queue",
        "Leased task task-",
        "completed on worker",
    ):
        assert line in server.log(), line
    for line in (
        "Starting execution of task task-",
        "Executing command:",
        "Command exited with code: 3",
        "completed successfully",
    ):
        assert line in worker.log(), line


def test_execute_an_uploaded_action_with_the_cli_alias(cluster, tmp_path):
    address, _server, _worker = cluster
    report = json.loads(run(address, "--json", "--", "echo", "again", cwd=tmp_path).stdout)
    executed = subprocess.run(
        [str(BIN / "expbuild-cli"), "execute", "--server", address, report["action_digest"]],
        capture_output=True,
        timeout=60,
    )
    assert executed.returncode == 0 and executed.stdout == b"again\n"
    bad = subprocess.run(
        [str(BIN / "expbuild-cli"), "execute", "--server", address, "abc/-1"],
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode == 2 and b"abc" in bad.stderr


def test_metrics_and_graceful_shutdown(cluster, tmp_path):
    address, server, worker = cluster
    run(address, "--", "true", cwd=tmp_path)
    metrics_address = server.env["EXPBUILD_SERVER__METRICS_ADDRESS"]
    deadline = time.monotonic() + 15
    while True:
        body = (
            urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
        )
        if "expbuild_workers_online 1.0" in body or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "expbuild_workers_online 1.0" in body
    assert 'expbuild_execute_requests_total{outcome="queued"}' in body

    assert worker.stop(signal.SIGTERM) == 0
    assert "deregistered" in server.log()
    assert server.stop(signal.SIGTERM) == 0


def test_a_bad_config_stops_startup_with_one_clear_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[execution]\nbackend = "magic"\n')
    result = subprocess.run(
        [str(BIN / "expbuild"), "server", "--config", str(config)],
        capture_output=True,
        timeout=60,
        text=True,
    )
    assert result.returncode != 0
    assert "execution.backend" in result.stderr and "magic" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _background_run(address: str, tmp_path, *command: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "expbuild"), "run", "--server", address, "--json", "--no-cache", "--", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )


def _completions(database_url: str) -> list[str]:
    import asyncio

    import asyncpg

    async def fetch():
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT event FROM task_events ORDER BY id")
        finally:
            await conn.close()
        return [r["event"] for r in rows]

    return asyncio.run(fetch())


def test_sigterm_mid_action_finishes_it_exactly_once(cluster, tmp_path, database_url):
    address, server, worker = cluster
    client = _background_run(address, tmp_path, "sh", "-c", "sleep 2; echo finished")
    wait_for_log(worker, "Executing command:")
    assert worker.stop(signal.SIGTERM, timeout=30) == 0
    out, err = client.communicate(timeout=30)
    report = json.loads(out)
    assert report["exit_code"] == 0 and report["stdout"] == "finished\n", err
    events = _completions(database_url)
    assert events.count("completed") == 1 and events.count("leased") == 1, events
    assert "deregistered" in server.log()


def test_workers_list_and_drain(cluster, tmp_path, database_url):
    address, server, worker = cluster
    listed = subprocess.run(
        [str(BIN / "expbuild"), "workers", "list", "--server", address, "--json"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    [info] = json.loads(listed.stdout)
    assert info["name"] == "e2e-worker" and info["state"] == "online"
    assert info["platform"]["OSFamily"] == ["linux"]

    client = _background_run(address, tmp_path, "sh", "-c", "sleep 1.5; echo drained")
    wait_for_log(worker, "Executing command:")
    drained = subprocess.run(
        [str(BIN / "expbuild"), "workers", "drain", "--server", address, "e2e-worker"],
        capture_output=True,
        timeout=30,
        text=True,
    )
    assert drained.returncode == 0 and "is draining" in drained.stdout, drained.stderr
    assert worker.popen.wait(timeout=30) == 0
    report = json.loads(client.communicate(timeout=30)[0])
    assert report["stdout"] == "drained\n"
    assert _completions(database_url).count("completed") == 1
    missing = subprocess.run(
        [str(BIN / "expbuild"), "workers", "drain", "--server", address, "nobody"],
        capture_output=True,
        timeout=30,
        text=True,
    )
    assert missing.returncode == 1 and "nobody" in missing.stderr


def test_server_with_the_local_backend_runs_actions_itself(database_url, tmp_path):
    env = server_env(database_url, tmp_path)
    env["EXPBUILD_WORKER__BACKEND__WORK_DIR"] = str(tmp_path / "work")
    env["EXPBUILD_WORKER__BACKEND__RUN_AS"] = "root"  # pytest's tmp tree is root's alone
    server = start(
        "server-local",
        ["expbuild", "server", "--config", "configs/expbuild-server.toml"],
        tmp_path,
        env,
    )
    try:
        wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], server)
        wait_for_log(server, "Started 2 local worker(s)")
        result = run(env["EXPBUILD_SERVER__ADDRESS"], "--", "echo", "local pool", cwd=tmp_path)
        assert result.returncode == 0 and result.stdout == b"local pool\n", result.stderr
    finally:
        assert server.stop() == 0, server.log()


def test_up_with_the_embedded_postgres(tmp_path_factory):
    """What `make run` does: no database configured, so `expbuild up` starts its own."""
    with expbuild_up() as (up, home, address):
        result = run(address, "--", "sh", "-c", "echo embedded; exit 4", cwd=home)
        assert result.returncode == 4 and result.stdout == b"embedded\n", result.stderr
        assert f"data in {home / 'postgres'}" in up.log()
        assert up.stop(signal.SIGINT, timeout=60) == 0, up.log()


def test_an_unreachable_database_is_one_clear_line_after_retrying(tmp_path):
    env = {
        "EXPBUILD_DATABASE__URL": f"postgresql://expbuild:s3cret@127.0.0.1:{free_port()}/expbuild",
        "EXPBUILD_DATABASE__CONNECT_WAIT": "1.5",
        "EXPBUILD_SERVER__METRICS_ADDRESS": "",
        "EXPBUILD_SERVER__ADDRESS": f"127.0.0.1:{free_port()}",
    }
    for command in (["server"], ["db", "migrate"]):
        result = subprocess.run(
            [str(BIN / "expbuild"), *command],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "s3cret" not in result.stderr
        assert "retrying" in result.stderr
        [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert "cannot connect to the database" in error and "***" in error
