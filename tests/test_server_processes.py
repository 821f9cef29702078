"""`expbuild server --processes N`: real parent and child processes on one port, a real
worker, real PostgreSQL; connections, metrics, restarts and signals observed from outside."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from expbuild.cli.server import process_count
from expbuild.config import ConfigError, settings_from_mapping
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.server.process_group import usable_cores
from expbuild.server.shared_port import hold_port
from tests.postgres import free_port
from tests.processes import BIN, Process, server_env, start, wait_for_log, wait_healthy

pytestmark = pytest.mark.e2e

# Fresh TCP connections: each a new 4-tuple the kernel hashes to one of the listeners.
CONNECTIONS = 40


def group(name: str, database_url: str, tmp_path: Path, processes: int = 2, **extra: str):
    """`expbuild server --processes N`, once every child serves; (env, process)."""
    env = {
        **server_env(database_url, tmp_path),
        "TMPDIR": str(_scratch(tmp_path)),  # where the parent keeps its metrics files
        **extra,
    }
    process = start(name, ["expbuild", "server", "--processes", str(processes)], tmp_path, env)
    wait_for_log(process, f"{processes} server processes serving", timeout=90)
    return env, process


def _scratch(tmp_path: Path) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir(exist_ok=True)
    return folder


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[1]) == pid and fields[0] != "Z":
                    found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def scrape(env: dict[str, str]) -> dict[tuple[str, frozenset], float]:
    port = env["EXPBUILD_SERVER__METRICS_ADDRESS"].rsplit(":", 1)[1]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def per_process_rpcs(samples) -> dict[str, float]:
    return {
        dict(labels)["process"]: value
        for (name, labels), value in samples.items()
        if name == "expbuild_server_process_rpcs_total"
    }


def lookups(samples) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "expbuild_action_cache_lookups_total"
        and dict(labels) == {"method": "GetActionResult", "result": "miss"}
    )


def get_action_result_on_new_connections(address: str, count: int) -> None:
    """`count` GetActionResult calls (all misses), each on a connection of its own."""
    digest = re_pb2.Digest(hash="0" * 64, size_bytes=1)
    for _ in range(count):
        options = [("grpc.use_local_subchannel_pool", 1)]  # no connection reused
        with grpc.insecure_channel(address, options=options) as channel:
            with pytest.raises(grpc.RpcError) as miss:
                re_grpc.ActionCacheStub(channel).GetActionResult(
                    re_pb2.GetActionResultRequest(action_digest=digest), timeout=30
                )
            assert miss.value.code() == grpc.StatusCode.NOT_FOUND


def run_action(address: str, tmp_path: Path, text: str) -> dict:
    done = subprocess.run(
        [str(BIN / "expbuild"), "run", "--server", address, "--json", "--no-cache", "--"]
        + ["sh", "-c", f"echo {text}"],
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def worker(address: str, tmp_path: Path) -> Process:
    env = {
        "EXPBUILD_WORKER__SERVER_URL": f"http://{address}",
        "EXPBUILD_WORKER__NAME": "worker-of-the-group",
        "EXPBUILD_WORKER__BACKEND__WORK_DIR": str(tmp_path / "work"),
        "EXPBUILD_WORKER__BACKEND__RUN_AS": "root",  # pytest's tmp tree is root's alone
    }
    process = start("worker", ["expbuild", "worker", "daemon"], tmp_path, env)
    wait_for_log(process, "registered successfully")
    return process


def test_two_processes_share_the_port_and_the_metrics_add_up(database_url, tmp_path):
    env, server = group("server", database_url, tmp_path)
    address = env["EXPBUILD_SERVER__ADDRESS"]
    runner = None
    try:
        assert len(children(server.popen.pid)) == 2
        runner = worker(address, tmp_path)
        report = run_action(address, tmp_path, "served")
        assert report["exit_code"] == 0 and report["stdout"] == "served\n"

        before = scrape(env)
        get_action_result_on_new_connections(address, CONNECTIONS)
        after = scrape(env)
        rpcs_before, rpcs_after = per_process_rpcs(before), per_process_rpcs(after)
        served = {p: rpcs_after[p] - rpcs_before.get(p, 0) for p in rpcs_after}
        assert set(served) == {"0", "1"}
        # Both children took connections (all 40 on one: odds 2**-39)...
        assert served["0"] > 0 and served["1"] > 0, served
        # ...and the parent's endpoint adds up what each child counted.
        assert lookups(after) - lookups(before) == CONNECTIONS
        # The shared gauges come from one process (refreshed every 5 s), not one per child.
        online = ("expbuild_workers_online", frozenset())
        latest = wait_until(
            lambda: (samples := scrape(env)).get(online) == 1 and samples, "the gauge counts 1"
        )
        assert [n for (n, _labels) in latest if n == online[0]] == [online[0]]
        # The parent serves the status pages too, from its own pool.
        port = env["EXPBUILD_SERVER__METRICS_ADDRESS"].rsplit(":", 1)[1]
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "worker-of-the-group" in page  # read from the database
    finally:
        if runner is not None:
            runner.stop()
        assert server.stop() == 0, server.log()


def test_a_killed_process_is_started_again_and_service_goes_on(database_url, tmp_path):
    env, server = group("server", database_url, tmp_path)
    address = env["EXPBUILD_SERVER__ADDRESS"]
    try:
        first = children(server.popen.pid)
        victim = max(first)
        os.kill(victim, signal.SIGKILL)
        wait_for_log(server, f"(pid {victim}) was killed by SIGKILL; restarting it in")
        wait_for_log(server, "serves again")
        now = children(server.popen.pid)
        assert victim not in now and len(now) == 2 and first - {victim} <= now
        before = per_process_rpcs(scrape(env))
        get_action_result_on_new_connections(address, CONNECTIONS)
        after = per_process_rpcs(scrape(env))
        assert all(after[p] > before.get(p, 0) for p in ("0", "1")), (before, after)
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_stops_every_process_and_exits_0(database_url, tmp_path):
    env, server = group("server", database_url, tmp_path)
    pids = children(server.popen.pid)
    assert len(list(_scratch(tmp_path).glob("expbuild-metrics-*"))) == 1
    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert not [pid for pid in pids if alive(pid)]
    assert server.log().count("Shutting down") == 2  # each child drained
    assert not list(_scratch(tmp_path).glob("expbuild-metrics-*"))  # the parent cleaned up


def test_kill_9_of_the_parent_takes_the_children_with_it(database_url, tmp_path):
    _, server = group("server", database_url, tmp_path)
    pids = children(server.popen.pid)
    server.stop(signal.SIGKILL)
    wait_until(lambda: not [pid for pid in pids if alive(pid)], "the children are gone")


def _refused(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "expbuild"), "server", *args],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    stderr = done.stderr.decode()
    assert done.returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_a_second_plain_server_on_a_port_in_use_is_refused(database_url, tmp_path):
    env = server_env(database_url, tmp_path)
    first = start("first", ["expbuild", "server", "--processes", "1"], tmp_path, env)
    try:
        wait_healthy(env["EXPBUILD_SERVER__ADDRESS"], first)
        second = {**env, "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
        error = _refused(second, "--processes", "1")
        address = env["EXPBUILD_SERVER__ADDRESS"]
        assert error == f"Error: configuration error: [server] address {address} is already in use"
        assert _refused(second, "--processes", "2") == error
    finally:
        first.stop()


def test_only_the_groups_own_children_share_its_port(database_url, tmp_path):
    env, server = group("server", database_url, tmp_path)
    try:
        second = {**env, "EXPBUILD_SERVER__METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}
        address = env["EXPBUILD_SERVER__ADDRESS"]
        expected = f"Error: configuration error: [server] address {address} is already in use"
        assert _refused(second, "--processes", "1") == expected
        assert _refused(second, "--processes", "2") == expected
    finally:
        assert server.stop() == 0, server.log()


def test_a_child_that_cannot_start_ends_the_start_with_its_one_line(database_url, tmp_path):
    env = {
        **server_env(database_url, tmp_path),
        "EXPBUILD_SERVER__TLS_CERT": "/nonexistent/server.pem",
        "EXPBUILD_SERVER__TLS_KEY": "/nonexistent/server.key",
    }
    # Found by the first child (each child would find it): said once, not three times.
    error = _refused(env, "--processes", "3")
    assert "server.tls_key = '/nonexistent/server.key': cannot read it" in error


def test_an_unreachable_database_ends_the_start_with_one_line(tmp_path):
    url = f"postgresql://expbuild@127.0.0.1:{free_port()}/none"
    env = {**server_env(url, tmp_path), "EXPBUILD_DATABASE__CONNECT_WAIT": "1s"}
    assert "Error: cannot connect to the database" in _refused(env, "--processes", "3")
    env["EXPBUILD_SERVER__METRICS_ADDRESS"] = ""  # no pool in the parent: a child finds it
    assert "Error: cannot connect to the database" in _refused(env, "--processes", "3")


@pytest.mark.parametrize("address", ["127.0.0.1:0", "0.0.0.0:0", "[::]:0"])
def test_a_held_port_admits_only_listeners_that_share_it(address):
    from concurrent import futures

    held = hold_port(address, "server.address")
    servers = []
    try:

        def bind(share: int) -> int | str:
            server = grpc.server(
                futures.ThreadPoolExecutor(1), options=[("grpc.so_reuseport", share)]
            )
            servers.append(server)
            try:
                return server.add_insecure_port(held.address)
            except RuntimeError:
                return "refused"

        assert [bind(1), bind(1), bind(0)] == [held.port, held.port, "refused"]
        with pytest.raises(ConfigError, match=r"\[server\] address .* is already in use"):
            hold_port(held.address, "server.address")
    finally:
        for server in servers:
            server.stop(None)
        held.close()


def test_how_many_processes():
    assert process_count(settings_from_mapping({"server": {"processes": 3}})) == 3
    assert process_count(settings_from_mapping({})) == usable_cores() >= 1
    local = {"execution": {"backend": "local"}}
    assert process_count(settings_from_mapping(local)) == 1
    with pytest.raises(ConfigError, match=r"\[server\] processes = 2 needs"):
        process_count(settings_from_mapping({**local, "server": {"processes": 2}}))
