"""The per-task action directory: input root, output parents, log files.

Layout of `<work_dir>/<task_id>-<attempt>-<random>/`:

    root/      the input root, materialized from the CAS; the command runs in here
    stdout     the command's standard output
    stderr     the command's standard error

The random part keeps two attempts of one task (or two workers sharing a work_dir) apart.
After the task, whatever happened, the directory is removed, or, when its action left it
bare, emptied and kept as a spare for the next action (`ActionDirectories`).
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
from expbuild.worker import owners
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
    """A fresh action directory with its (empty) input root."""
    path = work_dir / _action_name(task_id, attempt)
    try:
        path.mkdir()
    except FileNotFoundError:  # the work_dir itself is gone: only then make it again
        work_dir.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    (path / "root").mkdir()
    return path


def _action_name(task_id: str, attempt: int) -> str:
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)
    return f"{safe_id}-{attempt}-{uuid.uuid4().hex[:8]}"


# Spare action directories a worker keeps (a few per slot is plenty).
KEEP_SPARE = 16
SPARE_PREFIX = ".spare-"
# Logs larger than this in all are not emptied for reuse: the directory is removed in a
# thread instead.
SPARE_LOG_BYTES = 64 * 1024


class ActionDirectories:
    """The action directories of one worker in its work_dir: made, or reused.

    Making an action directory and its input root and removing them is most of a small
    action's file work: on this ext4, two mkdirs cost ~0.2 ms of CPU and two rmdirs ~3 ms
    of waiting (the freed blocks' discard). So a directory its action left bare (an
    empty input root as it was made, stdout and stderr) has its logs emptied and is
    renamed `.spare-<worker pid>.<start time>-<n>`; the next action renames it to its
    own name. Anything else is removed as before. Spares are the worker's own: `close`
    removes them, and a worker starting removes those of dead workers in its work_dir.
    """

    def __init__(self, work_dir: Path, keep: int = KEEP_SPARE) -> None:
        self.work_dir = work_dir
        self.keep = keep
        self.spares: list[Path] = []
        self.owner = owners.this_process()
        self._serial = 0
        self._root_mode: int | None = None  # as mkdir makes an input root here
        _remove_dead_spares(work_dir)

    def create(self, task_id: str, attempt: int) -> Path:
        """The action's directory with an empty input root (blocking, but a rename or two
        mkdirs)."""
        path = self.work_dir / _action_name(task_id, attempt)
        while self.spares:
            try:
                os.rename(self.spares.pop(), path)
                return path
            except OSError:
                continue  # gone meanwhile: try the next, or make one
        path = create_action_directory(self.work_dir, task_id, attempt)
        if self._root_mode is None:
            self._root_mode = stat.S_IMODE(os.lstat(path / "root").st_mode)
        return path

    async def remove(self, path: Path) -> None:
        if len(self.spares) < self.keep and self._bare(path):
            self._serial += 1
            spare = self.work_dir / f"{SPARE_PREFIX}{self.owner}-{self._serial}"
            try:
                os.rename(path, spare)
                self.spares.append(spare)
                return
            except OSError:
                pass
        await remove_action_directory(path)

    def _bare(self, path: Path) -> bool:
        """Whether `path` holds only an input root as made (empty, same mode, no extended
        attributes such as ACLs) and regular stdout/stderr files of at most
        SPARE_LOG_BYTES in all; empties those."""
        try:
            root = path / "root"
            st = os.lstat(root)
            if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != self._root_mode:
                return False
            if os.listxattr(root, follow_symlinks=False):
                return False
            with os.scandir(root) as entries:
                if next(entries, None) is not None:
                    return False
            logs = []
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.name in ("stdout", "stderr") and entry.is_file(follow_symlinks=False):
                        logs.append(entry)
                    elif entry.name != "root":
                        return False
            sizes = [entry.stat(follow_symlinks=False).st_size for entry in logs]
            if sum(sizes) > SPARE_LOG_BYTES:
                return False  # freeing their blocks could stall the loop: the thread does it
            for entry, size in zip(logs, sizes, strict=True):
                if size:
                    os.truncate(entry.path, 0)
        except OSError:
            return False
        return True

    async def close(self) -> None:
        """Remove the spares; call once no action runs any more."""
        spares, self.spares = self.spares, []
        if spares:
            await asyncio.to_thread(_remove_all, spares)


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        _remove_tree(path)


def _remove_dead_spares(work_dir: Path) -> None:
    """Remove spares whose worker is gone (blocking; at start-up)."""
    try:
        entries = [e for e in os.scandir(work_dir) if e.name.startswith(SPARE_PREFIX)]
    except OSError:
        return
    for entry in entries:
        owner = entry.name[len(SPARE_PREFIX) :].rsplit("-", 1)[0]
        pid, _, started = owner.partition(".")
        if not (pid.isdigit() and started.lstrip("-").isdigit()):
            continue
        if not owners.is_alive(int(pid), int(started)):
            _remove_tree(Path(entry.path))


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
    input_root = action_path / "root"  # made empty with the action directory
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
