"""Small protobuf <-> domain conversions shared by the servicers."""

from __future__ import annotations

from datetime import datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from expbuild.db.queue import PlatformSpec
from expbuild.digest import Digest
from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2


def platform_spec(platform: re_pb2.Platform, where: str = "platform") -> PlatformSpec:
    """REAPI Platform properties -> {name: [values]}; a name may appear with several values."""
    spec: PlatformSpec = {}
    for prop in platform.properties:
        if not prop.name.strip():
            raise InvalidArgument(f"{where}: a property has an empty name (value {prop.value!r})")
        spec.setdefault(prop.name, []).append(prop.value)
    return spec


def digest_field(message: re_pb2.Digest, field: str) -> Digest:
    """Validate a Digest field, naming the field in the error."""
    try:
        return Digest.from_proto(message)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


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
