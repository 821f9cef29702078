"""Check our REAPI / ByteStream / SemVer protos against an independent reference.

The reference is the set of generated stubs shipped in the PyPI wheel
``buildgrid-common==0.5.2`` (module ``buildgrid.common.protos...``). Those stubs
register the same proto file names as googleapis-common-protos
(``google/rpc/status.proto``, ``google/longrunning/operations.proto``), so they
cannot share a descriptor pool with ours: each side is loaded in its own
subprocess, which dumps every message, enum and service it defines as JSON,
and the comparison happens here.

Rules:
* every message, enum and service of the reference must exist in ours;
* every field of a reference message must exist in ours with the same number,
  type, label and message/enum type; every enum value with the same number;
  every method with the same request/response types and streaming flags;
* ours may have more (REAPI additions newer than the reference); those are
  reported as a warning, and they must not reuse a number the reference
  gives to another field or value.

If the wheel cannot be downloaded the test is skipped, except on CI
(``CI=true``) where it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

REFERENCE_REQUIREMENT = "buildgrid-common==0.5.2"
REFERENCE_WHEEL = "buildgrid_common-0.5.2-py3-none-any.whl"
# sha256 of the wheel as served by PyPI; the wheel's code runs in a subprocess.
REFERENCE_WHEEL_SHA256 = "edf814fa832c33a9e208e6e49d3ac8f738e4943deb98f80b9a7cc3ed0ed5654c"

# our generated module -> the reference module holding the same proto file
MODULE_PAIRS = {
    "expbuild.proto.remote_execution_pb2": (
        "buildgrid.common.protos.build.bazel.remote.execution.v2.remote_execution_pb2"
    ),
    "expbuild.proto.semver_pb2": "buildgrid.common.protos.build.bazel.semver.semver_pb2",
    "expbuild.proto.bytestream_pb2": "buildgrid.common.protos.google.bytestream.bytestream_pb2",
    "expbuild.proto.remote_asset_pb2": (
        "buildgrid.common.protos.build.bazel.remote.asset.v1.remote_asset_pb2"
    ),
}

# Fields upstream renamed after the reference was generated. A rename keeps
# the binary wire format (same number, type and label, which are still
# checked); only the name differs. (message, reference name) -> our name.
KNOWN_RENAMES = {
    # bazelbuild/remote-apis#205 "Pluralize repeated field names" (2021).
    ("build.bazel.remote.execution.v2.CacheCapabilities", "digest_function"): "digest_functions",
}

# Runs in a fresh interpreter: argv = [json list of sys.path entries, module...].
# Prints one JSON document describing every message, enum and service defined
# by the given modules' proto files. A module that cannot be imported (e.g. its
# generated code rejects the installed protobuf runtime) is read without being
# executed: the serialized FileDescriptorProto is taken from the
# AddSerializedFile(...) literal in its source.
_DUMP_SCRIPT = r"""
import ast, importlib, importlib.util, json, sys
for entry in reversed(json.loads(sys.argv[1])):
    sys.path.insert(0, entry)
from google.protobuf import descriptor_pb2

F = descriptor_pb2.FieldDescriptorProto


def load(module_name):
    try:
        module = importlib.import_module(module_name)
        return module.DESCRIPTOR.serialized_pb, "import"
    except Exception as exc:  # fall back to reading the source
        error = f"{type(exc).__name__}: {exc}"
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin:
        raise SystemExit(f"cannot locate {module_name} ({error})")
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "AddSerializedFile" and node.args):
            return ast.literal_eval(node.args[0]), "source (import failed: " + error + ")"
    raise SystemExit(f"no serialized descriptor in {spec.origin} ({error})")


def dump_enum(prefix, enum, file_name, out):
    out["enums"][prefix + enum.name] = {
        "file": file_name,
        "values": {v.name: v.number for v in enum.value},
    }


def dump_message(prefix, msg, file_name, out):
    full = prefix + msg.name
    out["messages"][full] = {
        "file": file_name,
        "map_entry": bool(msg.options.map_entry),
        "fields": {
            f.name: {
                "number": f.number,
                "type": F.Type.Name(f.type),
                "label": F.Label.Name(f.label),
                "type_name": f.type_name.lstrip("."),
                "oneof": (msg.oneof_decl[f.oneof_index].name
                          if f.HasField("oneof_index") and not f.proto3_optional else None),
            }
            for f in msg.field
        },
    }
    for nested in msg.nested_type:
        dump_message(full + ".", nested, file_name, out)
    for enum in msg.enum_type:
        dump_enum(full + ".", enum, file_name, out)


out = {"files": {}, "messages": {}, "enums": {}, "services": {}}
for module_name in sys.argv[2:]:
    data, how = load(module_name)
    fdp = descriptor_pb2.FileDescriptorProto.FromString(data)
    out["files"][module_name] = {"name": fdp.name, "package": fdp.package, "loaded_by": how}
    prefix = fdp.package + "." if fdp.package else ""
    for msg in fdp.message_type:
        dump_message(prefix, msg, fdp.name, out)
    for enum in fdp.enum_type:
        dump_enum(prefix, enum, fdp.name, out)
    for svc in fdp.service:
        out["services"][prefix + svc.name] = {
            "file": fdp.name,
            "methods": {
                m.name: {
                    "input": m.input_type.lstrip("."),
                    "output": m.output_type.lstrip("."),
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in svc.method
            },
        }
json.dump(out, sys.stdout, indent=1, sort_keys=True)
"""


def _dump(paths: list[Path], modules: list[str]) -> dict:
    # -I: ignore PYTHONPATH / user site and do not put the cwd on sys.path, so
    # each side sees exactly the paths handed to it (plus the venv).
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _DUMP_SCRIPT, json.dumps([str(p) for p in paths]), *modules],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=paths[0],
    )
    if proc.returncode != 0:
        pytest.fail(f"descriptor dump of {modules} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"reference wheel {REFERENCE_REQUIREMENT} unavailable on CI: {reason}")
    pytest.skip(f"reference wheel {REFERENCE_REQUIREMENT} unavailable: {reason}")


@pytest.fixture(scope="session")
def reference_root(request, tmp_path_factory) -> Path:
    """Directory holding the unpacked buildgrid-common wheel (cached across runs)."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        base = Path(cache.mkdir("buildgrid-common-0.5.2"))
    else:
        base = tmp_path_factory.mktemp("buildgrid-common-0.5.2")
    wheel = base / REFERENCE_WHEEL
    unpacked = base / "unpacked"
    marker = unpacked / ".complete"

    if not (wheel.is_file() and _sha256(wheel) == REFERENCE_WHEEL_SHA256):
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    "--quiet",
                    "-d",
                    str(base),
                    REFERENCE_REQUIREMENT,
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _unavailable(f"pip download did not run: {exc}")
        if proc.returncode != 0 or not wheel.is_file():
            _unavailable(f"pip download failed (exit {proc.returncode}): {proc.stderr.strip()}")
        digest = _sha256(wheel)
        if digest != REFERENCE_WHEEL_SHA256:
            wheel.unlink()
            pytest.fail(f"{REFERENCE_WHEEL} has sha256 {digest}, expected {REFERENCE_WHEEL_SHA256}")
        marker.unlink(missing_ok=True)

    if not marker.is_file():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        marker.write_text(REFERENCE_WHEEL_SHA256)
    return unpacked


@pytest.fixture(scope="session")
def dumps(reference_root):
    ours = _dump([REPO_ROOT], list(MODULE_PAIRS))
    ref = _dump([reference_root], list(MODULE_PAIRS.values()))
    return ours, ref


def _compare(
    ours: dict, ref: dict, renames: dict[tuple[str, str], str] | None = None
) -> tuple[list[str], list[str]]:
    """Returns (failures, differences allowed but reported: additions, renames)."""
    if renames is None:
        renames = KNOWN_RENAMES
    failures: list[str] = []
    extras: list[str] = []

    for full, rmsg in sorted(ref["messages"].items()):
        omsg = ours["messages"].get(full)
        if omsg is None:
            failures.append(f"message {full}: missing")
            continue
        if omsg["map_entry"] != rmsg["map_entry"]:
            failures.append(f"message {full}: map_entry {omsg['map_entry']} != {rmsg['map_entry']}")
        ref_numbers = {f["number"]: name for name, f in rmsg["fields"].items()}
        matched: set[str] = set()
        for name, rfield in sorted(rmsg["fields"].items()):
            our_name = name
            if name not in omsg["fields"] and (full, name) in renames:
                our_name = renames[(full, name)]
                if our_name in omsg["fields"]:
                    extras.append(
                        f"field {full}.{name} renamed to {our_name} (known upstream rename)"
                    )
            ofield = omsg["fields"].get(our_name)
            if ofield is None:
                failures.append(f"field {full}.{name} = {rfield['number']}: missing")
                continue
            matched.add(our_name)
            for key in ("number", "type", "label", "type_name", "oneof"):
                if ofield[key] != rfield[key]:
                    failures.append(
                        f"field {full}.{name}: {key} is {ofield[key]!r}, reference {rfield[key]!r}"
                    )
        for name, ofield in sorted(omsg["fields"].items()):
            if name in matched:
                continue
            clash = ref_numbers.get(ofield["number"])
            if clash is not None:
                failures.append(
                    f"field {full}.{name} = {ofield['number']}: number belongs to "
                    f"reference field {clash!r}"
                )
            else:
                extras.append(f"field {full}.{name} = {ofield['number']}")

    for full in sorted(set(ours["messages"]) - set(ref["messages"])):
        extras.append(f"message {full}")

    for full, renum in sorted(ref["enums"].items()):
        oenum = ours["enums"].get(full)
        if oenum is None:
            failures.append(f"enum {full}: missing")
            continue
        ref_numbers = {n: v for v, n in renum["values"].items()}
        for value, number in sorted(renum["values"].items()):
            if value not in oenum["values"]:
                failures.append(f"enum value {full}.{value} = {number}: missing")
            elif oenum["values"][value] != number:
                failures.append(
                    f"enum value {full}.{value}: number {oenum['values'][value]}, reference {number}"
                )
        for value, number in sorted(oenum["values"].items()):
            if value in renum["values"]:
                continue
            if number in ref_numbers:
                failures.append(
                    f"enum value {full}.{value} = {number}: number belongs to {ref_numbers[number]!r}"
                )
            else:
                extras.append(f"enum value {full}.{value} = {number}")

    for full in sorted(set(ours["enums"]) - set(ref["enums"])):
        extras.append(f"enum {full}")

    for full, rsvc in sorted(ref["services"].items()):
        osvc = ours["services"].get(full)
        if osvc is None:
            failures.append(f"service {full}: missing")
            continue
        for name, rmethod in sorted(rsvc["methods"].items()):
            omethod = osvc["methods"].get(name)
            if omethod is None:
                failures.append(f"method {full}.{name}: missing")
            elif omethod != rmethod:
                failures.append(f"method {full}.{name}: {omethod} != reference {rmethod}")
        for name in sorted(set(osvc["methods"]) - set(rsvc["methods"])):
            extras.append(f"method {full}.{name}")
    for full in sorted(set(ours["services"]) - set(ref["services"])):
        extras.append(f"service {full}")

    return failures, extras


def test_reference_was_read(dumps):
    ours, ref = dumps
    # Guard against a vacuous comparison (e.g. a reference layout change).
    assert len(ref["messages"]) >= 50, sorted(ref["messages"])
    assert "build.bazel.remote.execution.v2.Action" in ref["messages"]
    assert "google.bytestream.ByteStream" in ref["services"]
    assert "build.bazel.semver.SemVer" in ref["messages"]
    for module, info in ref["files"].items():
        print(f"reference {module}: {info['name']} loaded by {info['loaded_by']}")
    # Same packages on both sides (the wire names), file names aside.
    assert sorted(i["package"] for i in ours["files"].values()) == sorted(
        i["package"] for i in ref["files"].values()
    )


def test_protos_match_reference(dumps):
    ours, ref = dumps
    failures, extras = _compare(ours, ref)
    if extras:
        report = "\n  ".join(extras)
        print(f"allowed differences from {REFERENCE_REQUIREMENT} ({len(extras)}):\n  {report}")
        warnings.warn(
            f"{len(extras)} proto definitions differ from {REFERENCE_REQUIREMENT} in allowed ways "
            f"(REAPI additions newer than the reference, known renames): " + "; ".join(extras),
            UserWarning,
            stacklevel=1,
        )
    assert not failures, (
        f"{len(failures)} disagreements with {REFERENCE_REQUIREMENT}:\n  " + "\n  ".join(failures)
    )


def test_compare_detects_disagreements():
    """The comparison itself must catch a wrong number, type or missing field."""
    field = {
        "number": 1,
        "type": "TYPE_STRING",
        "label": "LABEL_OPTIONAL",
        "type_name": "",
        "oneof": None,
    }
    ref = {
        "messages": {
            "p.M": {
                "file": "f",
                "map_entry": False,
                "fields": {"a": field, "b": dict(field, number=2)},
            }
        },
        "enums": {"p.E": {"file": "f", "values": {"X": 0, "Y": 1}}},
        "services": {
            "p.S": {
                "file": "f",
                "methods": {
                    "Do": {
                        "input": "p.M",
                        "output": "p.M",
                        "client_streaming": False,
                        "server_streaming": True,
                    }
                },
            }
        },
    }
    ours = json.loads(json.dumps(ref))
    assert _compare(ours, ref) == ([], [])

    ours["messages"]["p.M"]["fields"]["a"]["number"] = 3
    ours["messages"]["p.M"]["fields"]["b"]["type"] = "TYPE_BYTES"
    ours["messages"]["p.M"]["fields"]["c"] = dict(field, number=4)
    ours["enums"]["p.E"]["values"]["Y"] = 2
    ours["services"]["p.S"]["methods"]["Do"]["server_streaming"] = False
    failures, extras = _compare(ours, ref)
    assert len(failures) == 4, failures
    assert extras == ["field p.M.c = 4"]

    del ours["messages"]["p.M"]
    failures, _ = _compare(ours, ref)
    assert "message p.M: missing" in failures

    # A known rename passes only when number, type and label still agree.
    ours = json.loads(json.dumps(ref))
    ours["messages"]["p.M"]["fields"]["bs"] = ours["messages"]["p.M"]["fields"].pop("b")
    assert _compare(ours, ref, renames={})[0] == [
        "field p.M.b = 2: missing",
        "field p.M.bs = 2: number belongs to reference field 'b'",
    ]
    failures, extras = _compare(ours, ref, renames={("p.M", "b"): "bs"})
    assert failures == []
    assert extras == ["field p.M.b renamed to bs (known upstream rename)"]
    ours["messages"]["p.M"]["fields"]["bs"]["label"] = "LABEL_REPEATED"
    failures, _ = _compare(ours, ref, renames={("p.M", "b"): "bs"})
    assert failures == ["field p.M.b: label is 'LABEL_REPEATED', reference 'LABEL_OPTIONAL'"]
