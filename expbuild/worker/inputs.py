"""The per-task action directory: input root, output parents, log files.

Layout of `<work_dir>/<task_id>-<attempt>-<random>/`:

    root/      the input root, materialized from the CAS; the command runs in here
    stdout     the command's standard output
    stderr     the command's standard error

The random part keeps two attempts of one task (or two workers sharing a work_dir) apart.
The directory is removed after the task whatever happened (`remove_action_directory`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from expbuild.client.cas import CasClient
from expbuild.client.tree import BlobSource, CasSource, materialize
from expbuild.config import BackendSettings
from expbuild.digest import EMPTY, Digest
from expbuild.errors import InvalidArgument
from expbuild.proto import worker_pb2
from expbuild.worker.action_user import ActionUser, hand_over
from expbuild.worker.blob_cache import BlobCache
from expbuild.worker.limits import format_size
from expbuild.worker.outputs import output_parent_directories, working_directory

log = logging.getLogger(__name__)

# Up to this many declared outputs, an empty input root is finished on the event loop.
_INLINE_OUTPUTS = 16


@dataclass(frozen=True)
class ActionDirectory:
    path: Path
    input_root: Path
    working_directory: Path
    stdout_path: Path
    stderr_path: Path


def create_action_directory(work_dir: Path, task_id: str, attempt: int) -> Path:
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)
    path = work_dir / f"{safe_id}-{attempt}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except FileNotFoundError:  # the work_dir itself is gone: only then make it again
        work_dir.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    return path


async def prepare_inputs(
    cas: CasClient,
    task: worker_pb2.Task,
    action_path: Path,
    blob_cache: BlobCache | None = None,
    user: ActionUser | None = None,
    max_directory_size: int = BackendSettings.max_directory_size,
) -> ActionDirectory:
    """Materialize the task's input root in `action_path` and create its output parents.

    With a `blob_cache`, input files are hardlinked from it (copied when the action runs
    as the worker's own user, who could write the entries: `user` is None), and only
    what it lacks is downloaded. With a `user`, the input root's directories are its.

    Raises the client's errors for missing or invalid inputs (NotFound,
    FailedPrecondition, InvalidArgument), and InvalidArgument for bad Command paths, a
    Directory message over `max_directory_size` (before it is fetched) or a symlink
    that resolves outside the input root.
    """
    action, command = task.action, task.command
    log.info("Downloading action %s", Digest.from_proto(task.action_digest))
    # The server inlines Action and Command in the Task; only the input root is fetched.
    log.info("Downloading command %s", Digest.from_proto(action.command_digest))
    if not command.arguments:
        raise InvalidArgument("the Command has no arguments; there is nothing to run")
    input_root = action_path / "root"
    input_root.mkdir()
    input_root_digest = Digest.from_proto(action.input_root_digest)
    log.info("Downloading input root %s", input_root_digest)
    outputs = (
        len(command.output_paths) + len(command.output_files) + len(command.output_directories)
    )
    if input_root_digest == EMPTY:
        # The empty Directory: nothing to fetch or lay out, no symlink to check. With a
        # few outputs, a few mkdirs and a chown: cheaper than a thread hop.
        if outputs <= _INLINE_OUTPUTS:
            _finish_input_root(command, input_root, user, check_symlinks=False)
        else:
            await asyncio.to_thread(
                _finish_input_root, command, input_root, user, check_symlinks=False
            )
    else:
        source = blob_cache.source(cas, link=user is not None) if blob_cache else CasSource(cas)
        bounded = _BoundedDirectories(source, max_directory_size)
        await materialize(cas, input_root_digest, input_root, source=bounded)
        await asyncio.to_thread(_finish_input_root, command, input_root, user)
    return ActionDirectory(
        path=action_path,
        input_root=input_root,
        working_directory=working_directory(command, input_root),
        stdout_path=action_path / "stdout",
        stderr_path=action_path / "stderr",
    )


@dataclass
class _BoundedDirectories:
    """A `tree.BlobSource` that refuses to fetch Directory messages over `max_bytes`."""

    source: BlobSource
    max_bytes: int

    async def read_available(
        self, digests: Iterable[Digest]
    ) -> tuple[dict[Digest, bytes], list[Digest]]:
        # `materialize` reads Directory messages only through here; files are placed.
        digests = list(digests)
        for digest in digests:
            if digest.size_bytes > self.max_bytes:
                raise InvalidArgument(
                    f"Directory {digest} of the input root is {format_size(digest.size_bytes)}, "
                    f"over this worker's {format_size(self.max_bytes)} limit "
                    "([worker.backend] max_directory_size)"
                )
        return await self.source.read_available(digests)

    async def place_files(
        self, files: Mapping[Digest, Sequence[tuple[Path, bool]]]
    ) -> list[Digest]:
        return await self.source.place_files(files)


def _finish_input_root(
    command, input_root: Path, user: ActionUser | None, *, check_symlinks: bool = True
) -> None:
    # First: creating output parents must not follow a symlink out of the input root.
    if check_symlinks:
        _check_symlinks(input_root)
    _create_output_parents(command, input_root)
    if user is not None:
        hand_over(input_root, user)


def _check_symlinks(input_root: Path) -> None:
    """Refuse a symlink whose target, resolved as the kernel would, leaves the input root.

    Checked on disk, not on the target's text: `g/l -> ..` is inside, but `g/x ->
    l/../..` then resolves through `l` to the input root's parent.
    """
    root = os.path.realpath(input_root)
    for dirpath, dirnames, filenames in os.walk(input_root):  # never follows symlinks
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if os.path.commonpath([root, resolved]) != root:
                relative = os.path.relpath(path, input_root)
                raise InvalidArgument(
                    f"input symlink {relative!r} -> {os.readlink(path)!r} resolves outside "
                    "the input root"
                )


def _create_output_parents(command, input_root: Path) -> None:
    for directory in output_parent_directories(command, input_root):
        if directory == input_root:
            continue  # made by prepare_inputs
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            relative = directory.relative_to(input_root)
            raise InvalidArgument(
                f"cannot create output directory {str(relative)!r}: a file in the input root is in the way"
            ) from None


async def remove_action_directory(path: Path) -> None:
    # In a thread even when it is nearly empty: an rmdir on this ext4 takes ~1.5 ms of
    # waiting (the freed block's discard), which must not stall the event loop.
    await asyncio.to_thread(_remove_tree, path)


def _remove_tree(path: Path) -> None:
    """rmtree that also copes with read-only directories an action (or its inputs) made."""
    try:
        shutil.rmtree(path)
        return
    except OSError:
        if not path.exists():
            return
        # A directory we may not write in: make them all writable, then again.
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            try:
                mode = os.lstat(child).st_mode
                if stat.S_ISDIR(mode) and mode & stat.S_IRWXU != stat.S_IRWXU:
                    os.chmod(child, mode | stat.S_IRWXU)
            except OSError:
                pass
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("Could not remove action directory %s: %s", path, exc)
