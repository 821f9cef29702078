"""The execution backend named by `[worker.backend] type` (see `expbuild.worker.execution`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from expbuild.config import BackendSettings, LimitsSettings
from expbuild.worker.action_user import check_reachable, resolve_action_user
from expbuild.worker.docker import DockerExecutor
from expbuild.worker.execution import Executor
from expbuild.worker.host import HostExecutor
from expbuild.worker.sandbox import SandboxExecutor

log = logging.getLogger(__name__)


def make_executor(settings: BackendSettings, limits: LimitsSettings | None = None) -> Executor:
    """The configured backend, running actions as `run_as` says; raises ConfigError when
    it cannot work on this host."""
    limits = limits or LimitsSettings()
    user = resolve_action_user(settings.run_as)
    if user is not None:
        check_reachable(Path(settings.work_dir), user)
        log.info("Actions run as %s", user)
    if settings.type == "host":
        return HostExecutor(limits=limits, user=user, pool_key=os.path.abspath(settings.work_dir))
    if settings.type == "sandbox":
        return SandboxExecutor(settings, limits=limits, user=user)
    if settings.type == "docker":
        return DockerExecutor(limits=limits, user=user)
    raise ValueError(
        f"worker.backend.type = {settings.type!r} is not supported (use host, sandbox or docker)"
    )
