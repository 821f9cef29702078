"""Output node properties (REAPI v2.1 `Command.output_node_properties`).

A client lists the node properties it wants reported for its outputs; ExpBuild knows the
two that are fields of `NodeProperties`: `mtime` and `unix_mode`. Any other name is
refused at Execute with INVALID_ARGUMENT, as REAPI asks for a property the server does
not recognise. The worker then sets them on every OutputFile and OutputSymlink and on
the FileNode, SymlinkNode and Directory messages inside output directories.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.text import quoted

SUPPORTED = ("mtime", "unix_mode")


def check_output_node_properties(names: Iterable[str]) -> None:
    for name in names:
        if name not in SUPPORTED:
            raise InvalidArgument(
                f"command.output_node_properties: {quoted(name)} is not a node property this "
                f"server reports; it knows {', '.join(SUPPORTED)}"
            )


def node_properties(st: os.stat_result, wanted: frozenset[str]) -> re_pb2.NodeProperties | None:
    """The NodeProperties of a file with stat `st` (from lstat), or None if none wanted."""
    if not wanted:
        return None
    properties = re_pb2.NodeProperties()
    if "mtime" in wanted:
        properties.mtime.FromNanoseconds(st.st_mtime_ns)
    if "unix_mode" in wanted:
        properties.unix_mode.value = stat.S_IMODE(st.st_mode)
    return properties
