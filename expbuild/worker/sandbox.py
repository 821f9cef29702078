"""The `sandbox` backend: each action in a bubblewrap (`bwrap`) sandbox.

What the action sees:

- `[worker.backend] sandbox_root = "workdir"` (default): a tmpfs `/` holding the input
  root at `/work` (the command starts in `/work/<working_directory>`) and the host
  directories of `ro_binds`, read-only (default: /usr, /bin, /lib, /lib64,
  /etc/alternatives; host symlinks such as a merged-usr `/bin` stay symlinks).
- `sandbox_root = "root"`: the input root is `/` itself, as BuildStream's actions
  expect; `ro_binds` (default: none) are mounted over it.
- Either way a fresh /proc, a minimal /dev, a private tmpfs /tmp, new PID, IPC and UTS
  namespaces, no capabilities, and no network (only a loopback of its own) unless the
  action's platform says `network = on`.
- The Command's environment, with `PATH` defaulted as on the host backend and `PWD`
  set to the working directory (bwrap always sets it when it changes directory).

No process survives the action: bwrap is the init of the PID namespace, so when it dies
the kernel kills everything in the sandbox, and `--die-with-parent` ties bwrap to the
launcher, which the worker stops on timeout or cancellation. Limits and cgroups are the
launcher's, as for the host backend (`expbuild.worker.supervisor`).

As root, bwrap needs no user namespace; an unprivileged worker needs unprivileged user
namespaces (or a setuid bwrap). The executor runs a trivial sandbox at start-up and
refuses to start with bwrap's own message when that fails.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

from expbuild.config import BackendSettings, ConfigError, LimitsSettings
from expbuild.worker.action_user import ActionUser
from expbuild.worker.execution import ExecutionOutcome, ExecutionRequest
from expbuild.worker.host import (
    DEFAULT_PATH,
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    finished_outcome,
    not_started,
)
from expbuild.worker.supervisor import Command, Supervisor

log = logging.getLogger(__name__)

# Where the input root appears in "workdir" mode.
SANDBOX_WORKDIR = "/work"
# Mount points bwrap creates; in "root" mode they are created in the input root.
_SYSTEM_MOUNTS = ("/proc", "/dev", "/tmp")
# How bwrap reports its own failures: "bwrap: <what>" on stderr, exit status 1.
_BWRAP_PREFIX = b"bwrap: "
_BWRAP_EXEC_FAILED = b"bwrap: execvp "


class SandboxExecutor:
    """Runs each action in its own bubblewrap sandbox."""

    def __init__(
        self,
        settings: BackendSettings | None = None,
        *,
        limits: LimitsSettings | None = None,
        terminate_grace: float = 1.0,
        user: ActionUser | None = None,
    ):
        settings = settings or BackendSettings(type="sandbox")
        self.user = user
        self.bwrap = find_bwrap()
        self.root_mode = settings.sandbox_root == "root"
        self.ro_binds = settings.sandbox_ro_binds
        self.supervisor = Supervisor(
            limits or LimitsSettings(),
            terminate_grace=terminate_grace,
            user=user,
            pool_key=os.path.abspath(settings.work_dir),
        )
        self._self_test()

    async def close(self) -> None:
        await self.supervisor.close()

    def platform(self) -> dict[str, tuple[str, ...]]:
        return {"network": ("off", "on")}

    def command_line(self, request: ExecutionRequest, network: bool) -> list[str]:
        """The bwrap invocation for `request` (its working directory inside the sandbox)."""
        root = request.root
        relative = PurePosixPath(*request.working_directory.relative_to(root).parts)
        args = [
            self.bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "expbuild-sandbox",
        ]
        if not network:
            args.append("--unshare-net")
        if self.root_mode:
            args += ["--bind", str(root), "/"]
            for path in self.ro_binds:
                args += ["--ro-bind-try", path, path]
            inside = PurePosixPath("/") / relative
        else:
            for path in self.ro_binds:
                if os.path.islink(path):
                    args += ["--symlink", os.readlink(path), path]
                else:
                    args += ["--ro-bind-try", path, path]
            args += ["--bind", str(root), SANDBOX_WORKDIR]
            inside = PurePosixPath(SANDBOX_WORKDIR) / relative
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", str(inside)]
        return [*args, "--", *request.arguments]

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        if not request.arguments:
            return not_started(request, EXIT_NOT_FOUND, "the command has no arguments")
        environment = dict(request.environment)
        environment.setdefault("PATH", DEFAULT_PATH)
        network = (request.property("network") or "off").lower() in ("on", "true", "yes")
        created = (
            _missing_mount_points(request.root, self._mount_points()) if self.root_mode else []
        )
        try:
            finished = await self.supervisor.run(
                Command(
                    arguments=self.command_line(request, network),
                    executable=self.bwrap,
                    environment=environment,
                    cwd=request.working_directory,
                    stdout_path=request.stdout_path,
                    stderr_path=request.stderr_path,
                ),
                name=request.name,
                timeout=request.timeout,
            )
        finally:
            _remove_mount_points(created)
        if finished.start_error is not None:
            raise RuntimeError(f"could not start bwrap: {finished.start_error.message}")
        if finished.exit_code == 1 and not finished.timed_out:
            failure = _bwrap_failure(request.stderr_path)
            if failure is not None and failure.startswith(_BWRAP_EXEC_FAILED):
                # bwrap itself could not exec the command: report it as a shell would.
                program = request.arguments[0]
                reason = failure.decode(errors="replace").rpartition(": ")[2]
                if "No such file" in reason:
                    code = EXIT_NOT_FOUND
                    message = f"{program}: command not found in the sandbox (searched PATH={environment['PATH']})"
                else:
                    code, message = (
                        EXIT_CANNOT_EXECUTE,
                        f"{program}: cannot execute in the sandbox: {reason}",
                    )
                return not_started(request, code, message, append=True)
            if failure is not None:
                raise RuntimeError(
                    f"the sandbox could not be set up: {failure.decode(errors='replace')}"
                )
        return finished_outcome(finished)

    def _mount_points(self) -> list[str]:
        return [*_SYSTEM_MOUNTS, *(p for p in self.ro_binds if os.path.exists(p))]

    def _self_test(self) -> None:
        """Fail at start-up, with bwrap's reason, on a host where sandboxes cannot work."""
        probe = [
            self.bwrap,
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-net",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--",
            "true",
        ]
        try:
            # As the action user, if any: it is who runs bwrap for every action.
            as_user: dict[str, Any] = (
                {"user": self.user.uid, "group": self.user.gid, "extra_groups": []}
                if self.user is not None
                else {}
            )
            result = subprocess.run(probe, capture_output=True, timeout=30, check=False, **as_user)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(
                f"worker.backend.type = 'sandbox': {self.bwrap} does not run: {exc}"
            ) from None
        if result.returncode != 0:
            reason = (
                result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
            )
            raise ConfigError(
                f"worker.backend.type = 'sandbox': bubblewrap cannot create a sandbox here "
                f"({reason}); as non-root it needs unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1) or a setuid bwrap"
            )


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError(
            "worker.backend.type = 'sandbox' needs bubblewrap, but `bwrap` is not on PATH "
            "(install the bubblewrap package, e.g. apt-get install bubblewrap)"
        )
    return path


def _bwrap_failure(stderr_path: Path) -> bytes | None:
    """bwrap's own error line, if that is all stderr holds (the command never ran)."""
    try:
        with open(stderr_path, "rb") as stderr:
            head = stderr.read(4096)
    except OSError:
        return None
    if head.startswith(_BWRAP_PREFIX) and head.count(b"\n") <= 1:
        return head.strip()
    return None


def _missing_mount_points(root: Path, mount_points: list[str]) -> list[Path]:
    """The first missing component of each mount point: what bwrap will create in `root`."""
    missing: list[Path] = []
    for mount_point in mount_points:
        path = root
        for part in PurePosixPath(mount_point).parts[1:]:
            path = path / part
            if not os.path.lexists(path):
                if path not in missing:
                    missing.append(path)
                break
    return missing


def _remove_mount_points(created: list[Path]) -> None:
    """Remove the empty mount points bwrap made in a "root"-mode input root, so that
    they do not show up among the outputs; anything else stays for the cleanup."""
    for top in created:
        try:
            if top.is_dir() and not top.is_symlink():
                for directory, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
                    os.rmdir(directory)
            elif top.is_file() and top.stat().st_size == 0:
                top.unlink()
        except OSError as exc:
            log.debug("Left sandbox mount point %s in place: %s", top, exc)
