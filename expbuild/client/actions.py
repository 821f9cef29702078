"""Building REAPI `Command` and `Action` messages in canonical form.

Repeated fields are sorted as REAPI requires (environment variables by name, platform
properties by name then value, output paths lexicographically), so equal inputs always
give byte-identical messages and therefore equal action digests and cache hits.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta

from expbuild.digest import Digest
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.reapi.platforms import PlatformInput, platform_message


def check_output_path(path: str) -> str:
    """Return `path` if it is a usable output path (relative, normalized, inside the
    working directory); raise `InvalidArgument` naming it otherwise."""
    if (
        not path
        or path in (".", "..")
        or path.startswith(("/", "../"))
        or "\0" in path
        or posixpath.normpath(path) != path
    ):
        raise InvalidArgument(
            f"output path {path!r} must be a normalized relative path inside the working "
            "directory, e.g. 'out.txt' or 'build/lib'"
        )
    return path


def build_command(
    arguments: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    working_directory: str = "",
    output_paths: Sequence[str] = (),
    platform: PlatformInput | None = None,
) -> re_pb2.Command:
    """A Command running `arguments` (argv[0] is the program).

    Sets `output_paths` only (REAPI v2.1+; not the deprecated output_files /
    output_directories), sorted and deduplicated. The platform is also copied into the
    deprecated `Command.platform` for servers older than v2.2; pass the same mapping to
    `build_action`.
    """
    env = env or {}
    if not arguments:
        raise InvalidArgument("the command is empty; give at least the program to run")
    for name in env:
        if not name or "=" in name:
            raise InvalidArgument(f"environment variable name {name!r} is empty or contains '='")
    if working_directory:
        check_output_path(working_directory)
    command = re_pb2.Command(
        arguments=list(arguments),
        environment_variables=[
            re_pb2.Command.EnvironmentVariable(name=n, value=env[n]) for n in sorted(env)
        ],
        output_paths=sorted({check_output_path(p) for p in output_paths}),
        working_directory=working_directory,
    )
    # An empty Platform is left unset: present-but-empty would change the digest.
    if platform:
        command.platform.CopyFrom(platform_message(platform))
    return command


def build_action(
    command_digest: Digest,
    input_root_digest: Digest,
    *,
    timeout: timedelta | None = None,
    do_not_cache: bool = False,
    platform: PlatformInput | None = None,
) -> re_pb2.Action:
    """An Action for an uploaded Command and input root.

    `timeout` None leaves the server's default; `do_not_cache` keeps the result out of the
    action cache (and lets identical actions run again).
    """
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(),
        input_root_digest=input_root_digest.to_proto(),
        do_not_cache=do_not_cache,
    )
    if platform:
        action.platform.CopyFrom(platform_message(platform))
    if timeout is not None:
        if timeout <= timedelta(0):
            raise InvalidArgument(f"timeout {timeout.total_seconds():g}s must be positive")
        action.timeout.FromTimedelta(timeout)
    return action


def parse_pair(pair: str, what: str) -> tuple[str, str]:
    """Split `KEY=VALUE` at the first '='; the value may be empty or contain '='.

    `what` names the kind of pair in the error ("platform property", "environment
    variable").
    """
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise InvalidArgument(f"{what} {pair!r} is not of the form KEY=VALUE")
    return key, value


def platform_from_pairs(pairs: Iterable[str]) -> dict[str, list[str]]:
    """`["OSFamily=Linux", "ISA=x86-64", "ISA=x86_64"]` ->
    `{"OSFamily": ["Linux"], "ISA": ["x86-64", "x86_64"]}` (repeated keys collect values in
    order given). Raises `InvalidArgument` naming a pair without '=' or with an empty key."""
    platform: dict[str, list[str]] = {}
    for pair in pairs:
        key, value = parse_pair(pair, "platform property")
        platform.setdefault(key, []).append(value)
    return platform
