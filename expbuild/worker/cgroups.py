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
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000


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
        group = ActionCgroup(name=f"expbuild-{name}")
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


@dataclass
class ActionCgroup:
    name: str
    directories: list[Path] = field(default_factory=list)
    unified: Path | None = None
    memory: Path | None = None  # the cgroup whose memory limit applies
    pids: Path | None = None
    cpu: Path | None = None

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
        """How many processes the kernel killed for exceeding the memory limit."""
        if self.memory is None:
            return 0
        events = "memory.events" if self.memory == self.unified else "memory.oom_control"
        return _counter(self.memory / events, "oom_kill")

    def process_limit_hits(self) -> int:
        """How many forks failed because of the process limit."""
        return 0 if self.pids is None else _counter(self.pids / "pids.events", "max")

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

    async def destroy(self, wait: float = 5.0) -> None:
        """Kill whatever is left, wait for it to be gone, remove the cgroups."""
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
        self.remove_now()

    def remove_now(self) -> None:
        for directory in reversed(self.directories):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("Could not remove cgroup %s: %s", directory, exc)
        self.directories.clear()


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


def _read(path: Path) -> str:
    with open(path) as handle:
        return handle.read()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _write_if_present(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("Could not set %s: %s", path, exc)
