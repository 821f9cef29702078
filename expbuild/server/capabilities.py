"""Capabilities: what this server and its instances support (REAPI 2.0 to 2.12, SHA-256, zstd)."""

from __future__ import annotations

import grpc

from expbuild.config import ServerSettings
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.proto import remote_execution_pb2_grpc as re_grpc
from expbuild.proto import semver_pb2
from expbuild.server.instances import InstanceNames
from expbuild.server.status import rpc

LOW_API_VERSION = (2, 0)
# The newest REAPI version whose every addition is implemented (docs/reapi-versions.md).
HIGH_API_VERSION = (2, 12)
DEPRECATED_API_VERSION = (2, 0)

# The queue orders by priority (lower runs sooner) over the whole int32 range of the field.
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1


def _semver(version: tuple[int, int]) -> semver_pb2.SemVer:
    return semver_pb2.SemVer(major=version[0], minor=version[1])


def server_capabilities(settings: ServerSettings) -> re_pb2.ServerCapabilities:
    """The capabilities message (the same for every served instance)."""
    sha256 = re_pb2.DigestFunction.SHA256
    zstd = re_pb2.Compressor.ZSTD
    return re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=[sha256],
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
                update_enabled=settings.allow_action_cache_updates
            ),
            max_batch_total_size_bytes=settings.max_batch_total_size_bytes,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.DISALLOWED,
            supported_compressors=[zstd],
            supported_batch_update_compressors=[zstd],
            # Chunks of this server's own choosing (no chunking parameters advertised).
            split_blob_support=True,
            splice_blob_support=True,
        ),
        execution_capabilities=re_pb2.ExecutionCapabilities(
            digest_function=sha256,
            digest_functions=[sha256],
            exec_enabled=True,
            execution_priority_capabilities=re_pb2.PriorityCapabilities(
                priorities=[
                    re_pb2.PriorityCapabilities.PriorityRange(
                        min_priority=MIN_PRIORITY, max_priority=MAX_PRIORITY
                    )
                ]
            ),
        ),
        deprecated_api_version=_semver(DEPRECATED_API_VERSION),
        low_api_version=_semver(LOW_API_VERSION),
        high_api_version=_semver(HIGH_API_VERSION),
    )


class CapabilitiesServicer(re_grpc.CapabilitiesServicer):
    def __init__(self, settings: ServerSettings, instances: InstanceNames) -> None:
        self._instances = instances
        self._capabilities = server_capabilities(settings)

    @rpc
    async def GetCapabilities(
        self, request: re_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ):
        self._instances.check(request.instance_name)
        response = re_pb2.ServerCapabilities()
        response.CopyFrom(self._capabilities)
        return response
