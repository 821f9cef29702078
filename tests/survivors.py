"""Finding processes an action left behind, by a marker in their command line.

Sandboxed and containerized actions run in their own PID namespaces, so a pid they
print means nothing outside; a unique argument (`sleep 3171.5`) finds them from the
host whatever namespace they are in.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tests.waiting import wait_until


def marker_seconds() -> str:
    """A unique, valid `sleep` duration to tag a test's processes with."""
    return f"{3000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"


def running_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def is_gone(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


async def wait_for_processes(marker: str, seconds: float = 10.0) -> list[int]:
    """Wait until some process carries `marker` (the action got going)."""
    return await wait_until(
        lambda: running_with(marker), seconds, f"a process with {marker!r} to start"
    )


async def none_left(marker: str, seconds: float = 5.0) -> bool:
    """Wait until no process carries `marker`; fails naming the survivors' marker."""
    await wait_until(lambda: not running_with(marker), seconds, f"no process with {marker!r} left")
    return True
