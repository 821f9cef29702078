"""Regenerate the committed Python stubs from ``expbuild/proto/*.proto``.

Usage::

    python -m expbuild.proto.generate      # what ``make proto`` runs

For every ``expbuild/proto/NAME.proto`` this writes ``NAME_pb2.py``,
``NAME_pb2.pyi`` and ``NAME_pb2_grpc.py`` next to it, using the protoc bundled
with ``grpcio-tools``. The output only depends on the .proto files and on the
installed grpcio-tools / googleapis-common-protos, so running it twice gives
identical bytes; ``tests/test_proto_generated.py`` checks that the committed
stubs are up to date.

Include paths handed to protoc, in order:

1. the repository root, so imports read ``import "expbuild/proto/x.proto";``
   and the generated code imports ``from expbuild.proto import x_pb2``;
2. grpc_tools' bundled ``_proto`` dir (``google/protobuf/*.proto``);
3. a temporary dir holding ``google/longrunning/operations.proto``. The
   googleapis-common-protos wheel ships that file as
   ``google/longrunning/operations_proto.proto``, but its generated module
   ``google.longrunning.operations_pb2`` registers the descriptor under
   ``google/longrunning/operations.proto``; the copy gives protoc the name that
   makes our stubs import ``google.longrunning.operations_pb2``;
4. the googleapis-common-protos site-packages dir (``google/rpc/status.proto``
   and the ``google/api/*.proto`` files that operations.proto imports).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
# Path of the .proto files relative to the repo root (== their import path).
PROTO_PACKAGE_PATH = PROTO_DIR.relative_to(REPO_ROOT)

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_LONGRUNNING_SHIPPED = "google/longrunning/operations_proto.proto"
_LONGRUNNING_WANTED = "google/longrunning/operations.proto"


def proto_files() -> list[Path]:
    """The .proto sources, sorted for a stable protoc invocation."""
    return sorted(PROTO_DIR.glob("*.proto"))


def expected_outputs(out_dir: Path) -> list[Path]:
    """The files ``generate(out_dir)`` writes, sorted."""
    target = Path(out_dir) / PROTO_PACKAGE_PATH
    return sorted(
        target / (src.stem + suffix) for src in proto_files() for suffix in GENERATED_SUFFIXES
    )


def _grpc_tools_proto_dir() -> Path:
    import grpc_tools

    path = Path(grpc_tools.__file__).resolve().parent / "_proto"
    if not (path / "google/protobuf/descriptor.proto").is_file():
        raise RuntimeError(f"grpc_tools ships no well-known protos at {path}")
    return path


def _googleapis_root() -> Path:
    """site-packages dir holding googleapis-common-protos' ``google/...`` tree."""
    from google.rpc import status_pb2

    # .../site-packages/google/rpc/status_pb2.py -> .../site-packages
    root = Path(status_pb2.__file__).resolve().parent.parent.parent
    for rel in ("google/rpc/status.proto", _LONGRUNNING_SHIPPED, "google/api/annotations.proto"):
        if not (root / rel).is_file():
            raise RuntimeError(
                f"{rel} not found under {root}; is googleapis-common-protos installed?"
            )
    return root


def _check_longrunning_name() -> None:
    """Make sure the installed operations_pb2 registers the name we compile against."""
    from google.longrunning import operations_pb2

    name = operations_pb2.DESCRIPTOR.name
    if name != _LONGRUNNING_WANTED:
        raise RuntimeError(
            f"google.longrunning.operations_pb2 registers {name!r}, expected "
            f"{_LONGRUNNING_WANTED!r}; the generated stubs would not link"
        )


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every ``expbuild/proto/*.proto``.

    Outputs go under ``out_dir`` at the sources' repository path, i.e. into
    ``out_dir/expbuild/proto/``; ``generate(REPO_ROOT)`` regenerates the stubs
    in place. Returns the paths written, sorted.
    """
    out_dir = Path(out_dir).resolve()
    sources = proto_files()
    if not sources:
        raise RuntimeError(f"no .proto files in {PROTO_DIR}")

    _check_longrunning_name()
    googleapis_root = _googleapis_root()
    well_known = _grpc_tools_proto_dir()

    (out_dir / PROTO_PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="expbuild-proto-") as tmp:
        shim = Path(tmp) / _LONGRUNNING_WANTED
        shim.parent.mkdir(parents=True)
        shutil.copyfile(googleapis_root / _LONGRUNNING_SHIPPED, shim)

        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO_ROOT}",
            f"--proto_path={well_known}",
            f"--proto_path={tmp}",
            f"--proto_path={googleapis_root}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *(str(PROTO_PACKAGE_PATH / src.name) for src in sources),
        ]
        # protoc runs in its own process: importing grpc_tools.protoc here would
        # install its import hooks into this interpreter.
        env = dict(os.environ, GRPC_PYTHON_DISABLE_DYNAMIC_STUBS="1")
        proc = subprocess.run(
            args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"protoc failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )

    outputs = expected_outputs(out_dir)
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write: {', '.join(missing)}")
    return outputs


def remove_stale(out_dir: Path) -> list[Path]:
    """Delete generated stubs whose .proto no longer exists."""
    target = Path(out_dir) / PROTO_PACKAGE_PATH
    wanted = set(expected_outputs(out_dir))
    stale = [
        p
        for suffix in GENERATED_SUFFIXES
        for p in sorted(target.glob("*" + suffix))
        if p not in wanted
    ]
    for p in stale:
        p.unlink()
    return stale


def main() -> int:
    written = generate(REPO_ROOT)
    for p in remove_stale(REPO_ROOT):
        print(f"removed stale {p.relative_to(REPO_ROOT)}")
    for p in written:
        print(f"wrote {p.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
