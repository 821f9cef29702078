"""Validation of the relative paths a Command names (working directory, outputs).

REAPI paths are `/`-separated and relative; a path that is absolute or climbs out with
`..` would let an action read or write outside its own directory, so it is refused with
`InvalidArgument` before anything touches the disk.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from expbuild.errors import InvalidArgument


def relative_parts(path: str, what: str) -> tuple[str, ...]:
    """The components of a REAPI relative path; `""` and `"."` name the base itself.

    Empty and `.` components (`a//b`, `./a`) are tolerated and dropped: they are harmless
    and some clients produce them.
    """
    if "\0" in path:
        raise InvalidArgument(f"{what} {path!r} contains a NUL character")
    if path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} is absolute; it must be relative")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{what} {path!r} contains '..'; it must stay inside the input root")
    return parts


def join_inside(base: Path, path: str, what: str) -> Path:
    """`base/path` after checking `path` is a safe relative path."""
    return base.joinpath(*relative_parts(path, what))


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
