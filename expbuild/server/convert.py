"""Small protobuf <-> domain conversions shared by the servicers."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, timestamp_pb2

from expbuild.db.operations import OperationRecord
from expbuild.digest import Digest, digest_field
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.scheduling.operations import Stage, final_response_bytes, stage_of

# Any.Pack's type URL for an ExecuteResponse, so stored responses are sent as they are.
_RESPONSE_TYPE_URL = "type.googleapis.com/" + re_pb2.ExecuteResponse.DESCRIPTOR.full_name

__all__ = ["digest_field", "duration", "operation", "timestamp", "to_operation"]

# Every digest this server deals in (REAPI v2.11: operation metadata names its function).
SHA256 = re_pb2.DigestFunction.SHA256


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def duration(value: timedelta) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def operation(
    name: str,
    digest: Digest,
    stage: re_pb2.ExecutionStage.Value,
    response: re_pb2.ExecuteResponse | None = None,
) -> operations_pb2.Operation:
    """An Execute operation at `stage`; done when it carries its `response`."""
    metadata = re_pb2.ExecuteOperationMetadata(
        stage=stage, action_digest=digest.to_proto(), digest_function=SHA256
    )
    message = operations_pb2.Operation(name=name, done=response is not None)
    message.metadata.Pack(metadata)
    if response is not None:
        message.response.Pack(response)
    return message


def to_operation(record: OperationRecord) -> operations_pb2.Operation:
    metadata = re_pb2.ExecuteOperationMetadata(
        stage=stage_of(record),
        action_digest=record.action_digest.to_proto(),
        digest_function=SHA256,
    )
    if metadata.stage == Stage.EXECUTING and record.worker_id:
        # Lets clients show where their action runs while it runs.
        metadata.partial_execution_metadata.worker = record.worker_name or record.worker_id
        if record.queued_at is not None:
            metadata.partial_execution_metadata.queued_timestamp.FromDatetime(record.queued_at)
        if record.leased_at is not None:
            metadata.partial_execution_metadata.worker_start_timestamp.FromDatetime(
                record.leased_at
            )
    message = operations_pb2.Operation(name=record.name, done=record.done)
    message.metadata.Pack(metadata)
    if record.done:
        message.response.type_url = _RESPONSE_TYPE_URL
        message.response.value = final_response_bytes(record)
    return message
