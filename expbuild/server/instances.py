"""Instance names: the configured list of REAPI instances this server answers for."""

from __future__ import annotations

from expbuild.errors import InvalidArgument
from expbuild.text import check_no_nul, quoted


class InstanceNames:
    def __init__(self, names: tuple[str, ...] | list[str]):
        self.names = tuple(names)
        self._known = frozenset(self.names)

    def check(self, name: str) -> str:
        """Return `name` if this server serves it, else raise InvalidArgument naming it."""
        if name in self._known:
            return name
        if "*" in self._known:
            return check_no_nul(name, "instance name")
        served = ", ".join(repr(n) for n in self.names)
        raise InvalidArgument(
            f"unknown instance name {quoted(name)}; this server serves {served} "
            "(add it to [server] instance_names)"
        )
