"""An Action and its Command as read from the CAS, checked before anything is queued."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from expbuild.cas.store import FileStore
from expbuild.db.queue import PlatformSpec
from expbuild.digest import Digest, digest_field
from expbuild.errors import FailedPrecondition, InvalidArgument, NotFound, Violation
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.scheduling.platforms import platform_spec


@dataclass(frozen=True)
class LoadedAction:
    digest: Digest
    action: re_pb2.Action
    command: re_pb2.Command

    @property
    def platform(self) -> PlatformSpec:
        """REAPI 2.2 puts the platform in the Action; older clients in the Command."""
        action, command = self.action, self.command
        return platform_spec(
            action.platform if action.platform.properties else command.platform,
            "action platform",
        )


def missing_violation(digest: Digest, what: str) -> Violation:
    return Violation(
        type="MISSING",
        subject=f"blobs/{digest.hash}/{digest.size_bytes}",
        description=f"{what} {digest} is not in the CAS",
    )


async def load_action(store: FileStore, digest: Digest) -> LoadedAction:
    """Read the Action and Command; FAILED_PRECONDITION listing every missing blob."""
    try:
        action = re_pb2.Action.FromString(await store.get(digest))
    except NotFound:
        raise FailedPrecondition(
            f"action {digest} is not in the CAS; upload it before Execute",
            [missing_violation(digest, "action")],
        ) from None
    command_digest = digest_field(action.command_digest, "action.command_digest")
    root_digest = digest_field(action.input_root_digest, "action.input_root_digest")
    missing = await store.find_missing([command_digest, root_digest])
    if missing:
        violations = [
            missing_violation(d, "command" if d == command_digest else "input root")
            for d in missing
        ]
        raise FailedPrecondition(
            f"{len(missing)} blob(s) of action {digest} are not in the CAS", violations
        )
    command = re_pb2.Command.FromString(await store.get(command_digest))
    return LoadedAction(digest, action, command)


def effective_timeout(action: re_pb2.Action, maximum: timedelta) -> timedelta:
    """The action's own timeout, refused above `maximum`; `maximum` when it sets none."""
    if not action.HasField("timeout"):
        return maximum
    timeout = action.timeout.ToTimedelta()
    if timeout < timedelta(0):
        raise InvalidArgument(f"action timeout {timeout.total_seconds():g}s is negative")
    if timeout > maximum:
        raise InvalidArgument(
            f"action timeout {timeout.total_seconds():g}s exceeds this server's maximum of "
            f"{maximum.total_seconds():g}s ([server] max_action_timeout)"
        )
    return timeout or maximum
