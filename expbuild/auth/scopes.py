"""Scopes, and the one table of which scope each gRPC method needs."""

from __future__ import annotations

CAS_READ = "cas:read"
CAS_WRITE = "cas:write"
EXECUTE = "execute"
AC_WRITE = "ac:write"
WORKER = "worker"
ADMIN = "admin"
SCOPES = (CAS_READ, CAS_WRITE, EXECUTE, AC_WRITE, WORKER, ADMIN)

# What a scope brings along: an admin may do everything; a worker must fetch its inputs
# and upload its outputs.
IMPLIED: dict[str, frozenset[str]] = {
    ADMIN: frozenset(SCOPES),
    WORKER: frozenset({WORKER, CAS_READ, CAS_WRITE}),
}

# Requirements that are not a scope.
ANY_TOKEN = "any valid token"
OPEN = "open"

_REAPI = "build.bazel.remote.execution.v2"
_WORKER = "expbuild.worker.v1"
_ASSET = "build.bazel.remote.asset.v1"
METHOD_SCOPES: dict[str, str] = {
    f"/{_REAPI}.Execution/Execute": EXECUTE,
    f"/{_REAPI}.Execution/WaitExecution": EXECUTE,
    f"/{_REAPI}.ActionCache/GetActionResult": CAS_READ,
    f"/{_REAPI}.ActionCache/UpdateActionResult": AC_WRITE,
    f"/{_REAPI}.ContentAddressableStorage/FindMissingBlobs": CAS_READ,
    f"/{_REAPI}.ContentAddressableStorage/BatchReadBlobs": CAS_READ,
    f"/{_REAPI}.ContentAddressableStorage/GetTree": CAS_READ,
    f"/{_REAPI}.ContentAddressableStorage/SplitBlob": CAS_READ,
    f"/{_REAPI}.ContentAddressableStorage/BatchUpdateBlobs": CAS_WRITE,
    f"/{_REAPI}.ContentAddressableStorage/SpliceBlob": CAS_WRITE,
    f"/{_REAPI}.Capabilities/GetCapabilities": ANY_TOKEN,
    # A fetch is a read by name; a download it causes also needs cas:write, checked inside
    # (expbuild/assets/catalog.py). A push changes what everyone's fetches answer.
    f"/{_ASSET}.Fetch/FetchBlob": CAS_READ,
    f"/{_ASSET}.Fetch/FetchDirectory": CAS_READ,
    f"/{_ASSET}.Push/PushBlob": CAS_WRITE,
    f"/{_ASSET}.Push/PushDirectory": CAS_WRITE,
    "/google.bytestream.ByteStream/Read": CAS_READ,
    "/google.bytestream.ByteStream/Write": CAS_WRITE,
    "/google.bytestream.ByteStream/QueryWriteStatus": CAS_WRITE,
    "/google.longrunning.Operations/GetOperation": EXECUTE,
    "/google.longrunning.Operations/ListOperations": EXECUTE,
    "/google.longrunning.Operations/CancelOperation": EXECUTE,
    "/google.longrunning.Operations/DeleteOperation": EXECUTE,
    "/google.longrunning.Operations/WaitOperation": EXECUTE,
    f"/{_WORKER}.WorkerService/RegisterWorker": WORKER,
    f"/{_WORKER}.WorkerService/Heartbeat": WORKER,
    f"/{_WORKER}.WorkerService/PollTasks": WORKER,
    f"/{_WORKER}.WorkerService/CompleteTask": WORKER,
    f"/{_WORKER}.WorkerService/ReleaseTask": WORKER,
    f"/{_WORKER}.WorkerService/DeregisterWorker": WORKER,
    f"/{_WORKER}.WorkerService/OpenSession": WORKER,
    f"/{_WORKER}.WorkerAdminService/ListWorkers": ADMIN,
    f"/{_WORKER}.WorkerAdminService/DrainWorker": ADMIN,
    f"/{_WORKER}.WorkerAdminService/ListTasks": ADMIN,
    f"/{_WORKER}.WorkerAdminService/GetTaskHistory": ADMIN,
    # Load balancers and orchestrators probe health without credentials.
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY_TOKEN,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY_TOKEN,
}


def required_scope(method: str) -> str:
    """The scope `method` (`/package.Service/Method`) needs; an unlisted method needs
    `admin`, so a service added without an entry here is closed, not open."""
    return METHOD_SCOPES.get(method, ADMIN)


def expand(scopes: tuple[str, ...] | list[str]) -> frozenset[str]:
    granted: set[str] = set()
    for scope in scopes:
        granted |= IMPLIED.get(scope, {scope})
    return frozenset(granted)


def check_scopes(scopes: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError naming a scope that does not exist."""
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"give at least one scope: {', '.join(SCOPES)}")
