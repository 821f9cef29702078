"""`[worker.limits]`: how each limit is enforced, and which one an action ran into.

Enforcement (host and sandbox backends; docker maps the same keys to `docker create`):

| limit             | with a per-action cgroup       | without                                 |
|-------------------|--------------------------------|-----------------------------------------|
| `memory`          | memory.max / limit_in_bytes    | RLIMIT_AS (address space, per process)  |
| `cpu_time`        | RLIMIT_CPU, per process        | same                                    |
| `max_output_size` | RLIMIT_FSIZE per file, plus the total checked after the run      |
| `max_processes`   | pids.max                       | not enforced (RLIMIT_NPROC is per user) |
| `cpus`            | cpu.max / cfs_quota_us         | not enforced                            |
| `timeout`         | caps the action's own timeout (the runner)                       |

The messages name the limit and its value, so a user can tell a timeout from an OOM
kill from a runaway output without reading worker logs.
"""

from __future__ import annotations

import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from expbuild.config import LimitsSettings
from expbuild.errors import ExpBuildError
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.worker.outputs import declared_outputs, working_directory
from expbuild.worker.paths import join_inside

SIGXCPU = int(signal.SIGXCPU)
SIGXFSZ = int(signal.SIGXFSZ)
SIGKILL = int(signal.SIGKILL)
# What programs print when malloc fails under RLIMIT_AS (Python, glibc/C, C++, Go, Rust).
_OUT_OF_MEMORY_MARKERS = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"std::bad_alloc",
    b"out of memory",
    b"memory allocation of",
    b"memory exhausted",
)
_STDERR_TAIL = 64 * 1024


@dataclass(frozen=True)
class Enforcement:
    """Which limits a cgroup took over for one action (the rest use rlimits)."""

    memory_by_cgroup: bool = False


def rlimits(limits: LimitsSettings, enforcement: Enforcement) -> dict[str, tuple[int, int]]:
    """Resource limits for the launcher to set in the command's process."""
    result: dict[str, tuple[int, int]] = {}
    if limits.cpu_time is not None:
        # SIGXCPU at the limit; SIGKILL a second later for a process that ignores it.
        result["CPU"] = (limits.cpu_time, limits.cpu_time + 1)
    if limits.memory is not None and not enforcement.memory_by_cgroup:
        result["AS"] = (limits.memory, limits.memory)
    if limits.max_output_size is not None:
        # A backstop: no single file (stdout and stderr included) beyond the total limit.
        result["FSIZE"] = (limits.max_output_size, limits.max_output_size)
    return result


def capped_timeout(timeout: float | None, limits: LimitsSettings) -> float | None:
    """The action's timeout, never longer than `[worker.limits] timeout`."""
    if limits.timeout is None:
        return timeout
    cap = limits.timeout.total_seconds()
    return cap if timeout is None else min(timeout, cap)


def death_signal(exit_code: int) -> int | None:
    """The signal an exit code 128 + N reports (as shells and bwrap report one)."""
    return exit_code - 128 if 128 < exit_code < 128 + 65 else None


def cpu_time_exceeded(
    limits: LimitsSettings, signum: int | None, cpu_seconds: float, *, by_signal: bool = False
) -> str | None:
    """Why the action ended, if RLIMIT_CPU ended it. `by_signal`: the action's process
    itself died of `signum` (the kernel sends SIGXCPU only at the soft limit), rather
    than an exit code of 128 + `signum` saying so (a shell's, bwrap's, or any program's)."""
    if limits.cpu_time is None or signum not in (SIGXCPU, SIGKILL):
        return None
    name = "SIGXCPU" if signum == SIGXCPU else "SIGKILL"
    # A SIGKILL may be anyone's, and an exit code may merely look like a death by signal:
    # then the CPU used must back it. Not to the full limit: the CPU time the kernel
    # reports for a process its limit killed trails the time the limit counted, by up to
    # a quarter on a loaded virtual machine (0.73 s at a 1 s limit, measured here).
    if (by_signal and signum == SIGXCPU) or cpu_seconds >= limits.cpu_time * 0.5:
        return f"action exceeded its CPU time limit of {limits.cpu_time}s ({name})"
    return None


def memory_exceeded(limits: LimitsSettings) -> str:
    assert limits.memory is not None
    return f"action exceeded its memory limit of {format_size(limits.memory)}"


def file_size_exceeded(limits: LimitsSettings) -> str:
    assert limits.max_output_size is not None
    return (
        f"action wrote a file larger than the {format_size(limits.max_output_size)} output "
        "limit ([worker.limits] max_output_size) (SIGXFSZ)"
    )


def process_limit_exceeded(limits: LimitsSettings) -> str:
    return (
        f"action exceeded its limit of {limits.max_processes} processes "
        "([worker.limits] max_processes)"
    )


def output_too_large(total: int, limits: LimitsSettings) -> str:
    assert limits.max_output_size is not None
    return (
        f"outputs total {format_size(total)}, over the {format_size(limits.max_output_size)} "
        "limit ([worker.limits] max_output_size)"
    )


def says_out_of_memory(stderr_path: os.PathLike[str] | str) -> bool:
    """Does the end of stderr report a failed allocation (how RLIMIT_AS shows itself)?"""
    try:
        with open(stderr_path, "rb") as stderr:
            size = stderr.seek(0, os.SEEK_END)
            stderr.seek(max(size - _STDERR_TAIL, 0))
            tail = stderr.read()
    except OSError:
        return False
    return any(marker in tail for marker in _OUT_OF_MEMORY_MARKERS)


def format_size(size: int) -> str:
    """1.5GiB, 256MiB, 4KiB, 100 bytes: binary units, at most one decimal."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            value = round(size / scale, 1)
            return f"{value:g}{unit}"
    return f"{size} bytes"


def output_size(command: re_pb2.Command, input_root: Path, logs: tuple[Path, ...]) -> int:
    """Bytes the action would upload: its declared output files plus stdout and stderr.

    Counted from file sizes before anything is hashed, so an oversized result costs
    a directory walk, not a read of every byte (blocking; run it in a thread).
    """
    total = sum(_file_size(path) for path in logs)
    try:
        workdir = working_directory(command, input_root)
    except ExpBuildError:
        return total  # collecting the outputs reports the bad path
    for output in declared_outputs(command):
        try:
            path = join_inside(input_root, workdir, output.path, output.kind.value)
        except ExpBuildError:
            continue
        if path.is_dir() and not path.is_symlink():
            for directory, _, files in os.walk(path):
                total += sum(_file_size(Path(directory, name)) for name in files)
        else:
            total += _file_size(path)
    return total


def _file_size(path: Path) -> int:
    """The size of a regular file; 0 for anything else or nothing."""
    try:
        status = os.lstat(path)
    except OSError:
        return 0
    return status.st_size if stat.S_ISREG(status.st_mode) else 0
