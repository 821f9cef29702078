"""Who made a pooled cgroup or a spare action directory: their names carry the worker
process's `<pid>.<start time>`, so that a worker starting again removes what a dead one
left and never what a live one holds (a pid alone may have been reused since)."""

from __future__ import annotations

import os


def this_process() -> str:
    """This process as an owner tag: `<pid>.<start time>`."""
    pid = os.getpid()
    return f"{pid}.{start_time(pid)}"


def is_alive(pid: int, started: int) -> bool:
    """Is process `pid` the one that started at `started` (not a later reuse of its id)?"""
    return start_time(pid) == started


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot; -1 when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1
