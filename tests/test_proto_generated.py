"""The committed protobuf stubs are current and importable."""

from __future__ import annotations

import importlib
import importlib.metadata
import re

import pytest

from expbuild.proto import generate as gen

PROTO_MODULES = ["bytestream", "remote_asset", "remote_execution", "semver", "worker"]

# proto module -> {service full name: sorted method names}
EXPECTED_SERVICES = {
    "remote_execution": {
        "build.bazel.remote.execution.v2.Execution": ["Execute", "WaitExecution"],
        "build.bazel.remote.execution.v2.ActionCache": ["GetActionResult", "UpdateActionResult"],
        "build.bazel.remote.execution.v2.ContentAddressableStorage": [
            "BatchReadBlobs",
            "BatchUpdateBlobs",
            "FindMissingBlobs",
            "GetTree",
            "SpliceBlob",
            "SplitBlob",
        ],
        "build.bazel.remote.execution.v2.Capabilities": ["GetCapabilities"],
    },
    "remote_asset": {
        "build.bazel.remote.asset.v1.Fetch": ["FetchBlob", "FetchDirectory"],
        "build.bazel.remote.asset.v1.Push": ["PushBlob", "PushDirectory"],
    },
    "bytestream": {
        "google.bytestream.ByteStream": ["QueryWriteStatus", "Read", "Write"],
    },
    "worker": {
        "expbuild.worker.v1.WorkerService": [
            "CompleteTask",
            "DeregisterWorker",
            "Heartbeat",
            "OpenSession",
            "PollTasks",
            "RegisterWorker",
            "ReleaseTask",
        ],
        "expbuild.worker.v1.WorkerAdminService": [
            "DrainWorker",
            "GetTaskHistory",
            "ListTasks",
            "ListWorkers",
        ],
    },
    "semver": {},
}

# (service, method) -> (client_streaming, server_streaming); all others are unary.
STREAMING = {
    ("build.bazel.remote.execution.v2.Execution", "Execute"): (False, True),
    ("build.bazel.remote.execution.v2.Execution", "WaitExecution"): (False, True),
    ("build.bazel.remote.execution.v2.ContentAddressableStorage", "GetTree"): (False, True),
    ("google.bytestream.ByteStream", "Read"): (False, True),
    ("google.bytestream.ByteStream", "Write"): (True, False),
    ("expbuild.worker.v1.WorkerService", "OpenSession"): (False, True),
}


def _generated_with() -> str | None:
    text = (gen.PROTO_DIR / "remote_execution_pb2_grpc.py").read_text()
    m = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.MULTILINE)
    return m.group(1) if m else None


def test_proto_sources_are_the_expected_set():
    assert [p.stem for p in gen.proto_files()] == PROTO_MODULES


def test_generated_stubs_are_up_to_date(tmp_path):
    written = gen.generate(tmp_path)
    assert written == gen.expected_outputs(tmp_path)

    problems = []
    for fresh in written:
        committed = gen.PROTO_DIR / fresh.name
        if not committed.is_file():
            problems.append(f"{fresh.name}: not committed")
        elif committed.read_bytes() != fresh.read_bytes():
            problems.append(f"{fresh.name}: differs from a fresh generation")
    fresh_names = {p.name for p in written}
    for suffix in gen.GENERATED_SUFFIXES:
        for committed in sorted(gen.PROTO_DIR.glob("*" + suffix)):
            if committed.name not in fresh_names:
                problems.append(f"{committed.name}: no longer generated (its .proto is gone)")

    if problems:
        installed = importlib.metadata.version("grpcio-tools")
        hint = ""
        if _generated_with() != installed:
            hint = (
                f"\n(the committed stubs were made with grpcio-tools {_generated_with()}, "
                f"this environment has {installed}: regenerate only with the pinned version)"
            )
        pytest.fail(
            "generated protobuf stubs are stale, run `make proto`:\n  "
            + "\n  ".join(problems)
            + hint
        )


def test_generation_is_deterministic(tmp_path):
    first = {p.name: p.read_bytes() for p in gen.generate(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in gen.generate(tmp_path / "b")}
    assert first == second


@pytest.mark.parametrize("name", PROTO_MODULES)
def test_generated_modules_import(name):
    pb2 = importlib.import_module(f"expbuild.proto.{name}_pb2")
    grpc_mod = importlib.import_module(f"expbuild.proto.{name}_pb2_grpc")

    assert pb2.DESCRIPTOR.name == f"expbuild/proto/{name}.proto"
    expected = EXPECTED_SERVICES[name]
    services = {s.full_name: s for s in pb2.DESCRIPTOR.services_by_name.values()}
    assert sorted(services) == sorted(expected)

    for full_name, methods in expected.items():
        service = services[full_name]
        assert sorted(m.name for m in service.methods) == methods
        for method in service.methods:
            streaming = STREAMING.get((full_name, method.name), (False, False))
            assert (method.client_streaming, method.server_streaming) == streaming, method.full_name
        short = service.name
        for attr in (f"{short}Stub", f"{short}Servicer", f"add_{short}Servicer_to_server"):
            assert hasattr(grpc_mod, attr), f"{grpc_mod.__name__} lacks {attr}"


def test_longrunning_dependency_links_to_googleapis():
    from google.longrunning import operations_pb2

    from expbuild.proto import remote_execution_pb2

    deps = {d.name for d in remote_execution_pb2.DESCRIPTOR.dependencies}
    assert "google/longrunning/operations.proto" in deps
    assert "google/rpc/status.proto" in deps
    assert "google/api/annotations.proto" not in deps
    execute = remote_execution_pb2.DESCRIPTOR.services_by_name["Execution"].methods_by_name[
        "Execute"
    ]
    assert execute.output_type is operations_pb2.Operation.DESCRIPTOR


def test_package_names_are_wire_names():
    from expbuild.proto import bytestream_pb2, remote_execution_pb2, semver_pb2, worker_pb2

    assert remote_execution_pb2.DESCRIPTOR.package == "build.bazel.remote.execution.v2"
    assert bytestream_pb2.DESCRIPTOR.package == "google.bytestream"
    assert semver_pb2.DESCRIPTOR.package == "build.bazel.semver"
    assert worker_pb2.DESCRIPTOR.package == "expbuild.worker.v1"
    assert (
        remote_execution_pb2.ServerCapabilities.DESCRIPTOR.fields_by_name[
            "high_api_version"
        ].message_type.full_name
        == "build.bazel.semver.SemVer"
    )
