"""The google.longrunning Operations service over `expbuild.scheduling.operations`."""

from __future__ import annotations

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2

from expbuild.auth.principal import current_principal
from expbuild.scheduling.operations import OperationTracker
from expbuild.server.convert import to_operation
from expbuild.server.status import rpc


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, tracker: OperationTracker):
        self.tracker = tracker

    @rpc
    async def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ):
        return to_operation(await self.tracker.get(current_principal(), request.name))

    @rpc
    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ):
        page = await self.tracker.list(
            current_principal(), request.filter, request.page_size, request.page_token
        )
        return operations_pb2.ListOperationsResponse(
            operations=[to_operation(r) for r in page.records],
            next_page_token=page.next_page_token,
        )

    @rpc
    async def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: grpc.aio.ServicerContext
    ):
        await self.tracker.cancel(current_principal(), request.name)
        return empty_pb2.Empty()

    @rpc
    async def DeleteOperation(
        self, request: operations_pb2.DeleteOperationRequest, context: grpc.aio.ServicerContext
    ):
        await self.tracker.delete(current_principal(), request.name)
        return empty_pb2.Empty()
