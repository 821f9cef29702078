"""The worker's launch chain alone, on idle and on busy cores: `[worker] control_slice`.

Runs `true` (or `--command`) one action at a time through a real HostExecutor (zygote,
launcher, pooled cgroup) and prints the p50 and p90 of each action's wall time, with the
kernel's default time slice for the worker's processes and with `control_slice`, first
on idle cores and then next to `--busy` CPU-bound processes (what a worker host running
other actions looks like). The configurations run in interleaved rounds; compare the
columns of one run.

    .venv/bin/python bench/launch_latency.py [--actions 150] [--busy 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from expbuild.worker.execution import ExecutionRequest  # noqa: E402
from expbuild.worker.host import HostExecutor  # noqa: E402

SLICE = timedelta(microseconds=100)


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """`count` processes spinning on the CPU at the default priority and slice."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def run_series(command: list[str], actions: int, control_slice: timedelta | None) -> list[float]:
    """Wall times (ms) of `actions` serial actions, in a fresh process whose own time slice
    is what the worker daemon would set (the executor passes it to the zygote)."""
    script = (
        "import asyncio, json, sys;"
        f"sys.path.insert(0, {str(ROOT)!r});"
        "from bench.launch_latency import series;"
        f"print(json.dumps(asyncio.run(series({command!r}, {actions}, {control_slice is not None}))))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


async def series(command: list[str], actions: int, short_slice: bool) -> list[float]:
    if short_slice:
        from expbuild.worker.launcher import set_time_slice

        set_time_slice(round(SLICE.total_seconds() * 1e9))  # as `expbuild worker daemon` does
    executor = HostExecutor(
        pool_key=f"/bench-launch-{os.getpid()}", control_slice=SLICE if short_slice else None
    )
    times = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        try:
            for _ in range(actions + 10):
                request = ExecutionRequest(
                    arguments=command,
                    environment={},
                    working_directory=directory,
                    stdout_path=directory / "stdout",
                    stderr_path=directory / "stderr",
                    timeout=60,
                )
                started = time.perf_counter()
                outcome = await executor.execute(request)
                times.append((time.perf_counter() - started) * 1000)
                assert outcome.exit_code == 0, (directory / "stderr").read_text()
        finally:
            await executor.close()
    return times[10:]  # the first actions start the zygote and fill the cgroup pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=150)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--command", default="true", help="the action's command line")
    args = parser.parse_args()
    command = args.command.split()
    results: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for busy in (0, args.busy):
            for label, control_slice in (("default slice", None), ("control_slice", SLICE)):
                with busy_loops(busy):
                    times = run_series(command, args.actions, control_slice)
                results.setdefault((busy, label), []).extend(times)
    print(
        f"`{args.command}` through HostExecutor, one at a time, {args.actions} actions x "
        f"{args.rounds} round(s) per configuration, {os.cpu_count()} cores "
        f"(control_slice = {SLICE.total_seconds() * 1e3:g} ms):"
    )
    print(f"  {'cores':<22} {'worker slice':<15} {'p50 ms':>8} {'p90 ms':>8}")
    for (busy, label), times in results.items():
        cores = "idle" if busy == 0 else f"{busy} busy loop(s)"
        p50, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
        print(f"  {cores:<22} {label:<15} {p50:8.2f} {p90:8.2f}")


if __name__ == "__main__":
    main()
