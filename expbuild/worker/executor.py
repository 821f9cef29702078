"""The execution backend named by `[worker.backend] type` (see `expbuild.worker.execution`)."""

from __future__ import annotations

from expbuild.config import BackendSettings, LimitsSettings
from expbuild.worker.docker import DockerExecutor
from expbuild.worker.execution import Executor
from expbuild.worker.host import HostExecutor
from expbuild.worker.sandbox import SandboxExecutor


def make_executor(settings: BackendSettings, limits: LimitsSettings | None = None) -> Executor:
    """The configured backend; raises ConfigError when it cannot work on this host."""
    limits = limits or LimitsSettings()
    if settings.type == "host":
        return HostExecutor(limits=limits)
    if settings.type == "sandbox":
        return SandboxExecutor(settings, limits=limits)
    if settings.type == "docker":
        return DockerExecutor(limits=limits)
    raise ValueError(
        f"worker.backend.type = {settings.type!r} is not supported (use host, sandbox or docker)"
    )
