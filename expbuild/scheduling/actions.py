"""An Action and its Command as read from the CAS, checked before anything is queued."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import timedelta

from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message

from expbuild.cas.store import FileStore
from expbuild.digest import Digest, digest_field
from expbuild.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.node_properties import check_output_node_properties
from expbuild.reapi.platforms import PlatformSpec, platform_spec, requested_platform
from expbuild.reapi.status import blob_subject, missing_blob
from expbuild.text import quoted

# google.protobuf.Duration's own range: about 10,000 years.
_MAX_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999


@dataclass(frozen=True)
class LoadedAction:
    digest: Digest
    action: re_pb2.Action
    command: re_pb2.Command

    @property
    def platform(self) -> PlatformSpec:
        return platform_spec(requested_platform(self.action, self.command), "action platform")


def missing_violation(digest: Digest, what: str) -> Violation:
    return missing_blob(digest, f"{what} {digest} is not in the CAS")


def _parse(message_type: type[Message], data: bytes, what: str, digest: Digest):
    """Parse a blob; FAILED_PRECONDITION naming it when it is not that message."""
    try:
        return message_type.FromString(data)
    except (DecodeError, RecursionError):
        name = message_type.DESCRIPTOR.name
        raise FailedPrecondition(
            f"{what} {digest} is not a valid {name} message; upload the right blob",
            [
                Violation(
                    "INVALID",
                    blob_subject(digest),
                    f"{what} is not a {name} message",
                )
            ],
        ) from None


async def load_action(
    store: FileStore, digest: Digest, *, check_input_root: bool = True
) -> LoadedAction:
    """Read the Action and Command; FAILED_PRECONDITION listing every missing blob, or
    naming a blob that does not parse. `check_input_root=False` skips the input root's
    presence check (the lease path: Execute checked it, the worker fetches it)."""
    try:
        action = _parse(re_pb2.Action, await store.get(digest), "action", digest)
    except NotFound:
        raise FailedPrecondition(
            f"action {digest} is not in the CAS; upload it before Execute",
            [missing_violation(digest, "action")],
        ) from None
    command_digest = digest_field(action.command_digest, "action.command_digest")
    root_digest = digest_field(action.input_root_digest, "action.input_root_digest")
    wanted = [command_digest, root_digest] if check_input_root else [command_digest]
    missing = await store.find_missing(wanted)
    if missing:
        violations = [
            missing_violation(d, "command" if d == command_digest else "input root")
            for d in missing
        ]
        raise FailedPrecondition(
            f"{len(missing)} blob(s) of action {digest} are not in the CAS", violations
        )
    command = _parse(re_pb2.Command, await store.get(command_digest), "command", command_digest)
    return LoadedAction(digest, action, command)


def checked_duration(value: duration_pb2.Duration, what: str) -> timedelta:
    """A Duration field as a timedelta; INVALID_ARGUMENT when it is not a valid Duration."""
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(seconds) > _MAX_DURATION_SECONDS
        or abs(nanos) > _MAX_NANOS
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument(
            f"{what} ({seconds} s, {nanos} ns) is not a valid Duration: seconds within "
            f"±{_MAX_DURATION_SECONDS}, nanos within ±{_MAX_NANOS} and of the same sign"
        )
    return value.ToTimedelta()


def _relative_path(path: str, what: str, *, may_be_empty: bool = False) -> str:
    """A path REAPI wants relative, without a trailing slash, and free of NUL."""
    if "\x00" in path:
        raise InvalidArgument(f"{what} {quoted(path)} contains a NUL character")
    if not path and not may_be_empty:
        raise InvalidArgument(f"{what} is empty")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {quoted(path)} is absolute; REAPI paths are relative")
    if path.endswith("/"):
        raise InvalidArgument(f"{what} {quoted(path)} ends with a slash")
    return path


def _inside_root(path: str) -> bool:
    normal = posixpath.normpath(path) if path else "."
    return normal != ".." and not normal.startswith("../")


def check_command(command: re_pb2.Command) -> None:
    """Refuse, before anything is queued, a Command REAPI calls invalid (INVALID_ARGUMENT)."""
    if not command.arguments or not command.arguments[0]:
        raise InvalidArgument("command.arguments[0] (the program to run) is empty")
    for index, argument in enumerate(command.arguments):
        if "\x00" in argument:
            raise InvalidArgument(f"command.arguments[{index}] contains a NUL character")
    for variable in command.environment_variables:
        where = f"command environment variable {quoted(variable.name)}"
        if not variable.name:
            raise InvalidArgument("command has an environment variable with an empty name")
        if "=" in variable.name:
            raise InvalidArgument(f"{where}: a name cannot contain '='")
        if "\x00" in variable.name or "\x00" in variable.value:
            raise InvalidArgument(f"{where} contains a NUL character")
    check_output_node_properties(command.output_node_properties)
    working_directory = _relative_path(
        command.working_directory, "command.working_directory", may_be_empty=True
    )
    if not _inside_root(working_directory):
        raise InvalidArgument(
            f"command.working_directory {quoted(working_directory)} is outside the input root"
        )
    outputs = [
        *(("output_files", p, False) for p in command.output_files),
        *(("output_directories", p, True) for p in command.output_directories),
        *(("output_paths", p, True) for p in command.output_paths),
    ]
    for field, path, may_be_empty in outputs:
        what = f"command.{field} entry"
        _relative_path(path, what, may_be_empty=may_be_empty)
        if not _inside_root(posixpath.join(working_directory, path)):
            raise InvalidArgument(f"{what} {quoted(path)} is outside the input root")


async def check_working_directory(store: FileStore, loaded: LoadedAction) -> None:
    """FAILED_PRECONDITION unless the Command's working directory is a directory of the
    input root (REAPI: it must exist in the input tree)."""
    path = posixpath.normpath(loaded.command.working_directory or ".")
    if path == ".":
        return
    digest = digest_field(loaded.action.input_root_digest, "action.input_root_digest")
    walked: list[str] = []
    for name in path.split("/"):
        try:
            directory = _parse(re_pb2.Directory, await store.get(digest), "directory", digest)
        except NotFound:
            raise FailedPrecondition(
                f"directory {'/'.join(walked) or '(input root)'} {digest} is not in the CAS",
                [missing_violation(digest, "directory")],
            ) from None
        child = next((node for node in directory.directories if node.name == name), None)
        walked.append(name)
        if child is None:
            raise FailedPrecondition(
                f"command.working_directory {quoted(loaded.command.working_directory)}: "
                f"{quoted('/'.join(walked))} is not a directory of the input root",
                [Violation("MISSING", "working_directory", "not in the input root")],
            )
        digest = digest_field(child.digest, f"directory {quoted('/'.join(walked))}")


def effective_timeout(action: re_pb2.Action, maximum: timedelta) -> timedelta:
    """The action's own timeout, refused above `maximum`; `maximum` when it sets none."""
    if not action.HasField("timeout"):
        return maximum
    timeout = checked_duration(action.timeout, "action timeout")
    if timeout < timedelta(0):
        raise InvalidArgument(f"action timeout {timeout.total_seconds():g}s is negative")
    if timeout > maximum:
        raise InvalidArgument(
            f"action timeout {timeout.total_seconds():g}s exceeds this server's maximum of "
            f"{maximum.total_seconds():g}s ([server] max_action_timeout)"
        )
    return timeout or maximum
