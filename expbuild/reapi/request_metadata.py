"""RequestMetadata: which tool, build and target a call comes from.

Clients send it as the binary gRPC header `build.bazel.remote.execution.v2.requestmetadata-bin`
(Bazel on every call: its version, the invocation id, the action's mnemonic, target and
configuration). It is optional. ExpBuild records it with each queued task and gives each
invocation its own turn in the queue (docs/scheduling.md).

A header that is sent but does not parse is refused (INVALID_ARGUMENT naming the header), not
ignored: a client that sends one means it, and quietly dropping it would schedule that build
as somebody else's, with nothing to say why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from google.protobuf.message import DecodeError

from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.text import check_no_nul

HEADER = "build.bazel.remote.execution.v2.requestmetadata-bin"


@dataclass(frozen=True)
class RequestMetadata:
    """The header's fields; an empty string is a field the client did not set."""

    tool_name: str = ""
    tool_version: str = ""
    action_id: str = ""
    tool_invocation_id: str = ""
    correlated_invocations_id: str = ""
    action_mnemonic: str = ""
    target_id: str = ""
    configuration_id: str = ""

    def as_dict(self) -> dict[str, str]:
        """The fields that were set, by their proto names (the shape stored in the database)."""
        return {name: value for name, value in asdict(self).items() if value}

    def to_proto(self) -> re_pb2.RequestMetadata:
        message = re_pb2.RequestMetadata(
            action_id=self.action_id,
            tool_invocation_id=self.tool_invocation_id,
            correlated_invocations_id=self.correlated_invocations_id,
            action_mnemonic=self.action_mnemonic,
            target_id=self.target_id,
            configuration_id=self.configuration_id,
        )
        message.tool_details.tool_name = self.tool_name
        message.tool_details.tool_version = self.tool_version
        return message

    def header(self) -> tuple[str, bytes]:
        """The (key, value) pair a client adds to a call's metadata."""
        return HEADER, self.to_proto().SerializeToString()


def parse_request_metadata(value: bytes | str) -> RequestMetadata:
    """The header's value as sent; INVALID_ARGUMENT, naming the header, if it is not a
    RequestMetadata message or holds text PostgreSQL cannot store."""
    if isinstance(value, str):  # only a misbehaving proxy sends a -bin header as text
        raise InvalidArgument(f"header {HEADER} must be binary (a serialized RequestMetadata)")
    message = re_pb2.RequestMetadata()
    try:
        message.ParseFromString(value)
    except (DecodeError, ValueError) as exc:
        raise InvalidArgument(
            f"header {HEADER} is not a RequestMetadata message ({exc or 'cannot parse'})"
        ) from None
    parsed = RequestMetadata(
        tool_name=message.tool_details.tool_name,
        tool_version=message.tool_details.tool_version,
        action_id=message.action_id,
        tool_invocation_id=message.tool_invocation_id,
        correlated_invocations_id=message.correlated_invocations_id,
        action_mnemonic=message.action_mnemonic,
        target_id=message.target_id,
        configuration_id=message.configuration_id,
    )
    for name, text in parsed.as_dict().items():
        check_no_nul(text, f"header {HEADER} field {name}")
    return parsed


def request_metadata_of(
    invocation_metadata: Iterable[tuple[str, str | bytes]] | None,
) -> RequestMetadata | None:
    """The RequestMetadata among a call's headers (the first, if sent twice); None if absent."""
    for key, value in invocation_metadata or ():
        if key == HEADER:
            return parse_request_metadata(value)
    return None
