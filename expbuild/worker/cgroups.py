"""Per-action cgroups: find every process an action started, and cap its memory, process
count and CPU share.

Where the worker may create cgroups (root, or a delegated subtree), each action gets
`<the worker's own cgroup>/expbuild-<action>` in the hierarchies it needs:

- a tracking cgroup, preferably in the unified (v2) hierarchy even on a hybrid host
  where it has no controllers: its `cgroup.procs` lists every process of the action,
  setsid daemons included, and `cgroup.kill` ends them all at once;
- `memory`, `pids`, `cpu` from v2 when the v2 hierarchy offers them, else from v1.

The launcher writes the command's pid into every `cgroup.procs` before exec, so
everything the command starts is accounted from its first instruction. Limits a host
cannot enforce with cgroups fall back to rlimits (see `expbuild.worker.limits`).

Creating and removing these cgroups for every action costs milliseconds (more on a busy
host), so a `CgroupPool` keeps them between actions: an action's cgroup is emptied
(leftover processes killed) and goes back to the pool; the next action re-applies the
limits and resets the counters, or reads them as differences from what it found. A
cgroup that cannot be emptied, has children, or still holds much of a previous action's
memory is removed instead of reused. Pool cgroups are named
`expbuild-pool-<key>-<pid>.<start time>-<n>`: `key` names the worker (its work_dir), so
a worker starting again removes those its crashed predecessor left, and never those of
another worker on the host or of a live process.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import signal
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from expbuild.worker import owners

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000
POOL_PREFIX = "expbuild-pool-"
# A pooled cgroup still charged with more than this (page cache of a previous action's
# files, tmpfs) is replaced: the next action must not start with its memory in use.
POOL_MEMORY_LEFTOVER = 4 * 1024 * 1024
_POOL_SERIAL = itertools.count()


@dataclass(frozen=True)
class CgroupSupport:
    """The cgroups this worker may create children of (detected once at start-up)."""

    unified: Path | None  # the worker's own cgroup in the v2 hierarchy, if writable
    v1: dict[str, Path] = field(default_factory=dict)  # controller -> own v1 cgroup, if writable

    @classmethod
    def detect(cls) -> CgroupSupport | None:
        """What this process may use; None when it may create no cgroup at all."""
        try:
            own = _own_cgroups()
            mounts = _cgroup_mounts()
        except OSError:
            return None
        unified = None
        v1: dict[str, Path] = {}
        for version, controllers, mount_root, mount_point in mounts:
            key = "" if version == 2 else ",".join(sorted(controllers))
            path = own.get(key) if version == 2 else _own_path_v1(own, controllers)
            if path is None:
                continue
            relative = os.path.relpath(path, mount_root) if path.startswith(mount_root) else None
            if relative is None or relative.startswith(".."):
                continue
            directory = Path(mount_point) / relative
            if not _can_create_children(directory):
                continue
            if version == 2:
                unified = unified or directory
            else:
                for controller in controllers & set(CONTROLLERS):
                    v1.setdefault(controller, directory)
        if unified is None and not v1:
            return None
        return cls(unified=unified, v1=v1)

    def describe(self) -> str:
        parts = []
        if self.unified is not None:
            parts.append(f"v2 at {self.unified}")
        parts += [f"v1 {name} at {path}" for name, path in sorted(self.v1.items())]
        return ", ".join(parts)

    def create(
        self,
        name: str,
        *,
        memory: int | None = None,
        max_processes: int | None = None,
        cpus: float | None = None,
    ) -> ActionCgroup:
        """Create the action's cgroups with the given limits; OSError if that fails."""
        return self.create_named(
            f"expbuild-{name}", memory=memory, max_processes=max_processes, cpus=cpus
        )

    def create_named(
        self,
        name: str,
        *,
        memory: int | None = None,
        max_processes: int | None = None,
        cpus: float | None = None,
    ) -> ActionCgroup:
        group = ActionCgroup(name=name)
        try:
            v2_controllers: set[str] = set()
            if self.unified is not None:
                wanted = {
                    c
                    for c, limit in zip(CONTROLLERS, (memory, max_processes, cpus), strict=True)
                    if limit is not None
                }
                _enable_controllers(self.unified, wanted)
                group.unified = group.make(self.unified)
                v2_controllers = set(_read(group.unified / "cgroup.controllers").split())
            if memory is not None:
                group.set_memory(memory, v2_controllers, self.v1)
            if max_processes is not None:
                group.set_max_processes(max_processes, v2_controllers, self.v1)
            if cpus is not None:
                group.set_cpus(cpus, v2_controllers, self.v1)
            if not group.directories and self.v1:
                # No v2 tracking cgroup and no limit: any v1 cgroup lists the processes.
                controller = next(iter(sorted(self.v1)))
                group.make(self.v1[controller])
        except OSError:
            group.remove_now()
            raise
        return group

    def parents(self) -> list[Path]:
        """Every directory this worker creates cgroups in."""
        found = [self.unified] if self.unified is not None else []
        return found + sorted({p for p in self.v1.values() if p not in found})


@dataclass
class ActionCgroup:
    name: str
    directories: list[Path] = field(default_factory=list)
    unified: Path | None = None
    memory: Path | None = None  # the cgroup whose memory limit applies
    pids: Path | None = None
    cpu: Path | None = None
    # Counters that cannot be reset, as they were when this action started (pool reuse).
    oom_kills_before: int = 0
    limit_hits_before: int = 0
    # v2 pooled: memory.peak opened and reset for this action (kernel >= 6.12); -1: none.
    peak_fd: int = -1
    reused: bool = False

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.directories]

    def make(self, parent: Path) -> Path:
        directory = parent / self.name
        directory.mkdir()
        self.directories.append(directory)
        return directory

    def _cgroup_for(self, controller: str, v2: set[str], v1: dict[str, Path]) -> tuple[Path, int]:
        if controller in v2 and self.unified is not None:
            return self.unified, 2
        if controller in v1:
            existing = next((d for d in self.directories if d.parent == v1[controller]), None)
            return existing or self.make(v1[controller]), 1
        raise OSError(f"no {controller} controller available")

    def set_memory(self, limit: int, v2: set[str], v1: dict[str, Path]) -> None:
        try:
            directory, version = self._cgroup_for("memory", v2, v1)
        except OSError:
            return
        if version == 2:
            _write(directory / "memory.max", str(limit))
            _write_if_present(directory / "memory.swap.max", "0")
        else:
            _write(directory / "memory.limit_in_bytes", str(limit))
            # With swap accounting, the same cap on memory+swap: no escape into swap.
            _write_if_present(directory / "memory.memsw.limit_in_bytes", str(limit))
        self.memory = directory

    def set_max_processes(self, limit: int, v2: set[str], v1: dict[str, Path]) -> None:
        try:
            directory, _ = self._cgroup_for("pids", v2, v1)
        except OSError:
            return
        _write(directory / "pids.max", str(limit))
        self.pids = directory

    def set_cpus(self, cpus: float, v2: set[str], v1: dict[str, Path]) -> None:
        try:
            directory, version = self._cgroup_for("cpu", v2, v1)
        except OSError:
            return
        quota = max(int(cpus * _CPU_PERIOD_US), 1000)
        if version == 2:
            _write(directory / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
        else:
            _write(directory / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(quota))
        self.cpu = directory

    # -- after the run ----------------------------------------------------------------

    def oom_kills(self) -> int:
        """How many of this action's processes the kernel killed for exceeding the memory
        limit."""
        return self._oom_kill_counter() - self.oom_kills_before

    def process_limit_hits(self) -> int:
        """How many of this action's forks failed because of the process limit."""
        return self._limit_hit_counter() - self.limit_hits_before

    def _oom_kill_counter(self) -> int:
        if self.memory is None:
            return 0
        events = "memory.events" if self.memory == self.unified else "memory.oom_control"
        return _counter(self.memory / events, "oom_kill")

    def _limit_hit_counter(self) -> int:
        return 0 if self.pids is None else _counter(self.pids / "pids.events", "max")

    def memory_peak(self) -> int | None:
        """The most memory this action's cgroup held at once (bytes); None if unknown."""
        if self.memory is None:
            return None
        try:
            if self.memory != self.unified:
                return int(_read(self.memory / "memory.max_usage_in_bytes"))
            if self.peak_fd >= 0:
                return int(os.pread(self.peak_fd, 64, 0))
            # A reused v2 cgroup whose peak could not be reset holds an earlier action's.
            return None if self.reused else int(_read(self.memory / "memory.peak"))
        except (OSError, ValueError):
            return None

    def memory_in_use(self) -> int:
        """Bytes still charged to the memory cgroup (0 without one)."""
        if self.memory is None:
            return 0
        name = "memory.current" if self.memory == self.unified else "memory.usage_in_bytes"
        try:
            return int(_read(self.memory / name))
        except (OSError, ValueError):
            return 0

    def reset_for_reuse(
        self, memory: int | None, max_processes: int | None, cpus: float | None
    ) -> None:
        """Make an emptied cgroup of an earlier action ready for the next one: its limits
        written again (a CPU quota rewrite also refills the period's runtime), resettable
        counters reset, the others remembered to be read as differences."""
        self.reused = True
        self._close_peak()
        if self.memory is not None and memory is not None:
            if self.memory == self.unified:
                _write(self.memory / "memory.max", str(memory))
                self._reset_v2_peak()
            else:
                _write(self.memory / "memory.limit_in_bytes", str(memory))
                _write_if_present(self.memory / "memory.memsw.limit_in_bytes", str(memory))
                _write(self.memory / "memory.max_usage_in_bytes", "0")
                _write_if_present(self.memory / "memory.memsw.max_usage_in_bytes", "0")
                _write(self.memory / "memory.failcnt", "0")
        if self.pids is not None and max_processes is not None:
            _write(self.pids / "pids.max", str(max_processes))
        if self.cpu is not None and cpus is not None:
            quota = max(int(cpus * _CPU_PERIOD_US), 1000)
            if self.cpu == self.unified:
                _write(self.cpu / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            else:
                _write(self.cpu / "cpu.cfs_quota_us", str(quota))
                _write_if_present(self.cpu / "cpuacct.usage", "0")
        self.oom_kills_before = self._oom_kill_counter()
        self.limit_hits_before = self._limit_hit_counter()

    def _reset_v2_peak(self) -> None:
        """A private memory.peak for this action: since Linux 6.12 a write to an open
        memory.peak resets the peak that descriptor reads."""
        assert self.memory is not None
        try:
            fd = os.open(self.memory / "memory.peak", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, b"reset\n")
        except OSError:
            os.close(fd)
            return
        self.peak_fd = fd

    def _close_peak(self) -> None:
        if self.peak_fd >= 0:
            os.close(self.peak_fd)
            self.peak_fd = -1

    def pids_alive(self) -> set[int]:
        alive: set[int] = set()
        for directory in self.directories:
            try:
                alive.update(int(p) for p in _read(directory / "cgroup.procs").split())
            except OSError:
                pass
        return alive

    def kill(self) -> None:
        """SIGKILL every process in the action's cgroups."""
        if self.unified is not None and (self.unified / "cgroup.kill").exists():
            try:
                _write(self.unified / "cgroup.kill", "1")
            except OSError as exc:
                log.debug("cgroup.kill of %s failed: %s", self.unified, exc)
        for pid in self.pids_alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def has_children(self) -> bool:
        """Did the action create cgroups below its own (a kernfs directory's link count
        is 2 plus its subdirectories)?"""
        return any(_link_count(d) > 2 for d in self.directories)

    async def empty(self, wait: float = 5.0) -> bool:
        """Kill whatever is left and wait for it to be gone; False if something stays."""
        if not self.pids_alive():
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            self.kill()
            if not self.pids_alive() or loop.time() > deadline:
                break
            await asyncio.sleep(0.02)
        survivors = self.pids_alive()
        if survivors:
            log.error("Processes %s of %s survived SIGKILL", sorted(survivors), self.name)
        return not survivors

    async def destroy(self, wait: float = 5.0) -> None:
        """Kill whatever is left, wait for it to be gone, remove the cgroups."""
        await self.empty(wait)
        self.remove_now()

    def remove_now(self) -> None:
        self._close_peak()
        for directory in reversed(self.directories):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("Could not remove cgroup %s: %s", directory, exc)
        self.directories.clear()


class CgroupPool:
    """Cgroups kept between the actions of one Supervisor (see the module's doc).

    Holds at most as many idle cgroups as actions ever ran at once, so a worker's pool
    is as large as its slots. Idle cgroups are empty of processes; `close` (and, for a
    Supervisor never closed, the garbage collector or interpreter exit) removes them.
    """

    def __init__(
        self,
        support: CgroupSupport,
        key: str,
        *,
        memory: int | None = None,
        max_processes: int | None = None,
        cpus: float | None = None,
    ) -> None:
        self.support = support
        self.key = pool_key(key)
        self.limits = (memory, max_processes, cpus)
        self.owner = owners.this_process()
        self.prefix = f"{POOL_PREFIX}{self.key}-"
        self.idle: list[ActionCgroup] = []
        self.stuck: list[ActionCgroup] = []  # could not be emptied: removed at close
        self.busy = 0
        self.created = 0
        self.reused = 0
        # A Supervisor nobody closes still leaves no empty cgroup behind.
        self._finalizer = weakref.finalize(self, _remove_all, self.idle)
        swept = sweep_stale(support, self.key)
        if swept:
            log.info("Removed %d cgroup(s) a previous run of this worker left", swept)

    def acquire(self) -> ActionCgroup:
        """A cgroup for one action, limits applied and counters reset; OSError if none
        can be created."""
        memory, max_processes, cpus = self.limits
        while self.idle:
            group = self.idle.pop()
            try:
                group.reset_for_reuse(memory, max_processes, cpus)
            except OSError as exc:
                log.warning("Cannot reuse cgroup %s (%s); removing it", group.name, exc)
                group.remove_now()
                continue
            self.busy += 1
            self.reused += 1
            return group
        name = f"{self.prefix}{self.owner}-{next(_POOL_SERIAL)}"
        group = self.support.create_named(
            name, memory=memory, max_processes=max_processes, cpus=cpus
        )
        self.busy += 1
        self.created += 1
        return group

    async def release(self, group: ActionCgroup) -> None:
        """Empty the action's cgroup and keep it for the next action, or remove it."""
        self.busy -= 1
        if not await group.empty():
            self.stuck.append(group)  # rmdir would fail while it has processes
            return
        group._close_peak()
        if group.has_children():
            # The action made cgroups of its own (it ran as root): remove the whole tree.
            log.info("Not reusing cgroup %s: the action created cgroups in it", group.name)
            directories, group.directories = list(group.directories), []
            await asyncio.to_thread(_remove_trees, directories)
            return
        leftover = group.memory_in_use()
        if leftover > POOL_MEMORY_LEFTOVER:
            log.debug("Not reusing cgroup %s: %d bytes still charged", group.name, leftover)
            group.remove_now()
            return
        self.idle.append(group)

    async def close(self) -> None:
        """Remove every cgroup of the pool; call once no action runs any more."""
        for group in self.stuck:
            await group.empty()
        _remove_all(self.stuck)
        _remove_all(self.idle)
        self._finalizer.detach()


def pool_key(text: str) -> str:
    """A short name for a worker in its pool cgroups' names (no dash, which separates)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def sweep_stale(support: CgroupSupport, key: str) -> int:
    """Remove the pool cgroups of worker `key` whose owning process is gone; how many."""
    pattern = re.compile(re.escape(f"{POOL_PREFIX}{key}-") + r"(\d+)\.(\d+)-\d+$")
    stale: list[Path] = []
    for parent in support.parents():
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            match = pattern.match(entry.name)
            if match and entry.is_dir() and not owners.is_alive(int(match[1]), int(match[2])):
                stale.append(Path(entry.path))
    return _remove_trees(stale)


def _remove_trees(directories: list[Path]) -> int:
    """Kill every process in these cgroups and their descendants, then remove them all
    (deepest first); how many of `directories` are gone. Blocking."""
    removed = 0
    for top in directories:
        tree = [Path(d) for d, _, _ in os.walk(top)]
        for directory in reversed(tree):
            deadline = time.monotonic() + 5.0
            while True:
                pids = _procs(directory)
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                if not pids or time.monotonic() > deadline:
                    break
                time.sleep(0.02)  # until the killed processes have left the cgroup
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("Could not remove cgroup %s: %s", directory, exc)
        removed += not top.exists()
    return removed


def _remove_all(groups: list[ActionCgroup]) -> None:
    while groups:
        groups.pop().remove_now()


def _procs(directory: Path) -> list[int]:
    try:
        return [int(p) for p in _read(directory / "cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def _link_count(directory: Path) -> int:
    try:
        return os.stat(directory).st_nlink
    except OSError:
        return 0


def _own_cgroups() -> dict[str, str]:
    """/proc/self/cgroup: "" -> v2 path, "cpu,cpuacct" -> v1 path, ..."""
    found: dict[str, str] = {}
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers.startswith("name="):
                continue
            key = ",".join(sorted(c for c in controllers.split(",") if c))
            found[key] = path
    return found


def _own_path_v1(own: dict[str, str], controllers: frozenset[str]) -> str | None:
    for key, path in own.items():
        if key and set(key.split(",")) == controllers:
            return path
    return None


def _cgroup_mounts() -> list[tuple[int, frozenset[str], str, str]]:
    """(version, controllers, root within the hierarchy, mount point) per cgroup mount."""
    mounts: list[tuple[int, frozenset[str], str, str]] = []
    with open("/proc/self/mountinfo") as lines:
        for line in lines:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            fstype, options = tail[0], tail[2].split(",")
            root, mount_point = _unescape(fields[3]), _unescape(fields[4])
            if fstype == "cgroup2":
                mounts.append((2, frozenset(), root, mount_point))
            elif fstype == "cgroup":
                controllers = frozenset(o for o in options if o in CONTROLLERS or o == "cpuacct")
                if controllers:
                    mounts.append((1, controllers, root, mount_point))
    return mounts


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")


def _can_create_children(directory: Path) -> bool:
    probe = directory / f"expbuild-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except FileExistsError:
        try:
            probe.rmdir()
            return True
        except OSError:
            return False
    except OSError:
        return False


def _enable_controllers(directory: Path, wanted: set[str]) -> None:
    """Ask for v2 controllers in our children; refused (EBUSY, EACCES) leaves v1 or rlimits."""
    try:
        available = set(_read(directory / "cgroup.controllers").split())
        enabled = set(_read(directory / "cgroup.subtree_control").split())
    except OSError:
        return
    for controller in sorted((wanted & available) - enabled):
        try:
            _write(directory / "cgroup.subtree_control", f"+{controller}")
        except OSError as exc:
            log.debug("Cannot enable the v2 %s controller in %s: %s", controller, directory, exc)


def _counter(path: Path, name: str) -> int:
    try:
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


# Raw descriptors, not open(): a few cgroup files are read and written per action, and
# a buffered text file object costs several times the system calls.
def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_if_present(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("Could not set %s: %s", path, exc)
