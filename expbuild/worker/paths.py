"""Validation of the relative paths a Command names (working directory, outputs).

REAPI paths are `/`-separated and relative: the working directory to the input root,
outputs to the working directory. An output path may climb with `..` as long as it stays
inside the input root — BuildStream asks for `../../../buildstream-install` from the
working directory `buildstream/tiny/hello` — so paths are normalised lexically against
their base (as the server does at Execute) and refused with `InvalidArgument` only when
they are absolute or leave the input root. `check_inside` then guards what lexical
normalisation cannot see: symlinks on disk that lead out.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from expbuild.errors import InvalidArgument


def relative_parts(path: str, what: str) -> tuple[str, ...]:
    """The components of a REAPI relative path, `..` included; `""` and `"."` name the
    base itself.

    Empty and `.` components (`a//b`, `./a`) are tolerated and dropped: they are harmless
    and some clients produce them.
    """
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL character")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} is absolute; it must be relative")
    return tuple(part for part in path.split("/") if part not in ("", "."))


def join_inside(root: Path, base: Path, path: str, what: str) -> Path:
    """`base/path` normalised lexically (`a/b/../c` is `a/c`), where `base` is `root` or
    a directory under it; `InvalidArgument` when the result leaves `root`."""
    parts = list(base.relative_to(root).parts)
    for part in relative_parts(path, what):
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            raise InvalidArgument(f"{what} {path!r} leads outside the input root")
    return root.joinpath(*parts)


def check_inside(root: Path, path: Path, what: str, *, follow_last: bool = False) -> None:
    """Refuse `path` if symlinks along it lead outside `root`.

    Only the existing prefix of `path` is resolved. Its last component is followed only
    with `follow_last` (a working directory is entered; an output that is itself a
    symlink is reported as one, not followed).
    """
    if path == root:
        return
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path if follow_last else path.parent))
    if real != real_root and not real.is_relative_to(real_root):
        relative = PurePosixPath(*path.relative_to(root).parts)
        raise InvalidArgument(
            f"{what} {str(relative)!r} leads outside the input root through a symlink (to {real})"
        )
