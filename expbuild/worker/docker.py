"""The `docker` backend: each action in a fresh container of the image it names.

The image comes from the action's `container-image` platform property
(`docker://busybox:1.36` or plain `busybox:1.36`); an action without one fails with
FAILED_PRECONDITION. Images are never pulled (`--pull never`): an image missing from the
worker's engine fails the action at once with a message saying so, instead of hanging
on a registry that may be unreachable. The worker offers the images its engine holds
at start-up as `container-image` values, so the server routes only runnable actions.

Each action: `docker create` (input root bind-mounted at /work, working directory
/work/<working_directory>, the worker's uid:gid, `--init`, `--network none` unless the platform
says `network = on`, `[worker.limits]` as --memory/--cpus/--pids-limit/--ulimit), then
`docker start -a` with stdout/stderr going straight to the action's files, then
`docker inspect` (exit code, OOM kill) and `docker rm -f`. The container is named after
the action, so a timeout or cancellation stops exactly it (`docker stop`: SIGTERM, then
SIGKILL after the grace period). The CLI is driven as a subprocess: no extra
dependency, and `DOCKER_HOST` / contexts work as operators expect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import PurePosixPath

from google.rpc import code_pb2

from expbuild.config import ConfigError, LimitsSettings
from expbuild.errors import FailedPrecondition, RemoteError
from expbuild.worker import limits as limit_checks
from expbuild.worker.action_user import ActionUser
from expbuild.worker.execution import ExecutionOutcome, ExecutionRequest
from expbuild.worker.host import EXIT_NOT_FOUND, not_started

log = logging.getLogger(__name__)

CONTAINER_WORKDIR = "/work"
IMAGE_PROPERTY = "container-image"
DOCKER_SCHEME = "docker://"
# `docker` calls other than the action itself (create, inspect, rm, stop).
CLI_TIMEOUT = 60.0


class DockerExecutor:
    """Runs each action in its own container through the `docker` CLI."""

    def __init__(
        self,
        *,
        limits: LimitsSettings | None = None,
        terminate_grace: float = 1.0,
        user: ActionUser | None = None,
    ):
        self.limits = limits or LimitsSettings()
        self.user = user
        self.terminate_grace = terminate_grace
        docker = shutil.which("docker")
        if docker is None:
            raise ConfigError(
                "worker.backend.type = 'docker' needs the docker CLI, but `docker` is not on "
                "PATH (install docker.io, or docker-ce-cli for a remote engine)"
            )
        self.docker: str = docker
        self._images = self._local_images()

    async def close(self) -> None:
        pass  # each action's container is gone when its execute() returns

    def platform(self) -> dict[str, tuple[str, ...]]:
        offers: dict[str, tuple[str, ...]] = {"network": ("off", "on")}
        if self._images:
            offers[IMAGE_PROPERTY] = self._images
        return offers

    def _local_images(self) -> tuple[str, ...]:
        """`docker://repo:tag` for each image the engine holds (`repo` alone for :latest)."""
        try:
            listing = subprocess.run(
                [self.docker, "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"],
                capture_output=True,
                text=True,
                timeout=CLI_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("Cannot list the Docker engine's images (%s); offering none", exc)
            return ()
        if listing.returncode != 0:
            log.warning(
                "Cannot list the Docker engine's images (%s); offering none",
                listing.stderr.strip(),
            )
            return ()
        images: set[str] = set()
        for line in listing.stdout.split():
            if "<none>" in line:
                continue
            images.add(DOCKER_SCHEME + line)
            if line.endswith(":latest"):
                images.add(DOCKER_SCHEME + line.removesuffix(":latest"))
        return tuple(sorted(images))

    # -- one action -----------------------------------------------------------------------

    def create_arguments(self, request: ExecutionRequest, image: str, name: str) -> list[str]:
        relative = PurePosixPath(*request.working_directory.relative_to(request.root).parts)
        network = (request.property("network") or "off").lower() in ("on", "true", "yes")
        args = [
            self.docker,
            "create",
            "--pull",
            "never",
            "--name",
            name,
            "--label",
            "expbuild.action=1",
            # An init as PID 1: the command then gets default signal handling (the kernel
            # ignores SIGTERM and SIGXCPU sent to a PID 1 without handlers).
            "--init",
            "--user",
            f"{self.user.uid}:{self.user.gid}" if self.user else f"{os.getuid()}:{os.getgid()}",
            "--volume",
            f"{request.root}:{CONTAINER_WORKDIR}",
            "--workdir",
            str(PurePosixPath(CONTAINER_WORKDIR) / relative),
            "--network",
            "bridge" if network else "none",
        ]
        limits = self.limits
        if limits.memory is not None:
            # The same value for memory+swap: no escape into swap.
            args += ["--memory", str(limits.memory), "--memory-swap", str(limits.memory)]
        if limits.cpus is not None:
            args += ["--cpus", f"{limits.cpus:g}"]
        if limits.max_processes is not None:
            args += ["--pids-limit", str(limits.max_processes)]
        if limits.cpu_time is not None:
            args += ["--ulimit", f"cpu={limits.cpu_time}:{limits.cpu_time + 1}"]
        if limits.max_output_size is not None:
            args += ["--ulimit", f"fsize={limits.max_output_size}:{limits.max_output_size}"]
        for key, value in request.environment.items():
            args += ["--env", f"{key}={value}"]
        return [*args, image, *request.arguments]

    async def execute(self, request: ExecutionRequest) -> ExecutionOutcome:
        image = request.property(IMAGE_PROPERTY)
        if not image:
            raise FailedPrecondition(
                f"platform property {IMAGE_PROPERTY} is required for the docker backend"
            )
        image = image.removeprefix(DOCKER_SCHEME)
        if not request.arguments:
            return not_started(request, EXIT_NOT_FOUND, "the command has no arguments")
        name = f"expbuild-{request.name or os.urandom(6).hex()}"
        try:
            created = await self._cli("create", self.create_arguments(request, image, name))
            if created.returncode != 0:
                raise self._create_error(created.stderr, image)
            return await self._start(request, name)
        finally:
            await asyncio.shield(self._cli("rm", [self.docker, "rm", "--force", "--volumes", name]))

    async def _start(self, request: ExecutionRequest, name: str) -> ExecutionOutcome:
        started_at = _now()
        # Creating two local files is quick; not worth a thread hop.
        stdout = open(request.stdout_path, "wb")  # noqa: ASYNC230, SIM115
        stderr = open(request.stderr_path, "wb")  # noqa: ASYNC230, SIM115
        with stdout, stderr:
            attached = await asyncio.create_subprocess_exec(
                self.docker,
                "start",
                "--attach",
                name,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        timed_out = False
        try:
            await asyncio.wait_for(attached.wait(), request.timeout)
        except TimeoutError:
            timed_out = True
            log.info("Container %s timed out after %gs; stopping it", name, request.timeout)
            await self._stop(name, attached)
        except asyncio.CancelledError:
            log.info("Execution cancelled; stopping container %s", name)
            await asyncio.shield(self._stop(name, attached))
            raise
        state = await self._state(name)
        fallback = attached.returncode if attached.returncode is not None else -1
        exit_code = int(state.get("ExitCode", fallback))
        if state.get("Status") == "created" and state.get("Error"):
            # The container never ran its command (missing or unrunnable program).
            return not_started(
                request,
                exit_code if exit_code in (126, 127) else EXIT_NOT_FOUND,
                f"{request.arguments[0]}: cannot execute in the container: {state['Error']}",
                append=True,
            )
        return ExecutionOutcome(
            exit_code=exit_code,
            timed_out=timed_out,
            started_at=started_at,
            completed_at=_now(),
            limit_exceeded=None if timed_out else self._limit_hit(state, exit_code),
        )

    def _limit_hit(self, state: dict, exit_code: int) -> str | None:
        limits = self.limits
        if limits.memory is not None and state.get("OOMKilled"):
            return limit_checks.memory_exceeded(limits)
        signum = limit_checks.death_signal(exit_code)
        if limits.cpu_time is not None and signum == limit_checks.SIGXCPU:
            # The container's CPU usage is gone with it; its init's 152 is the evidence.
            return limit_checks.cpu_time_exceeded(limits, signum, float(limits.cpu_time))
        if limits.max_output_size is not None and signum == limit_checks.SIGXFSZ:
            return limit_checks.file_size_exceeded(limits)
        return None

    async def _stop(self, name: str, attached: asyncio.subprocess.Process) -> None:
        grace = max(math.ceil(self.terminate_grace), 0)
        await self._cli("stop", [self.docker, "stop", "--time", str(grace), name])
        try:
            await asyncio.wait_for(attached.wait(), CLI_TIMEOUT)
        except TimeoutError:
            attached.kill()
            await attached.wait()

    async def _state(self, name: str) -> dict:
        inspected = await self._cli(
            "inspect", [self.docker, "inspect", "--format", "{{json .State}}", name]
        )
        try:
            return json.loads(inspected.stdout) if inspected.returncode == 0 else {}
        except ValueError:
            return {}

    async def _cli(self, what: str, args: list[str]) -> subprocess.CompletedProcess[str]:
        """Run a short `docker` command; its output is captured (small)."""
        process = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
        except asyncio.CancelledError:
            # Let it finish (its output is a line): a `docker create` still under way
            # would otherwise make its container after the `docker rm` that follows.
            await asyncio.shield(asyncio.wait_for(process.wait(), CLI_TIMEOUT))
            raise
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RemoteError(
                code_pb2.UNAVAILABLE,
                f"the worker's Docker engine did not answer `docker {what}` within {CLI_TIMEOUT:g}s",
            ) from None
        result = subprocess.CompletedProcess(
            args,
            process.returncode or 0,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
        if result.returncode != 0 and what != "create":
            log.warning("docker %s failed: %s", what, result.stderr.strip())
        return result

    def _create_error(self, stderr: str, image: str) -> Exception:
        message = stderr.strip()
        if "No such image" in message or "pull access denied" in message:
            return FailedPrecondition(
                f"container image {image} is not present on the worker's Docker engine, and the "
                "docker backend never pulls (load it with docker pull/load/import on the worker)"
            )
        if "Cannot connect to the Docker daemon" in message or "connection refused" in message:
            return RemoteError(
                code_pb2.UNAVAILABLE, f"the worker's Docker engine is unreachable: {message}"
            )
        return RuntimeError(f"docker create failed: {message}")


def _now() -> datetime:
    return datetime.now(UTC)
