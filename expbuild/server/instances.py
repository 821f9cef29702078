"""Instance names: the configured list of REAPI instances this server answers for."""

from __future__ import annotations

from expbuild.auth.principal import current_principal
from expbuild.errors import InvalidArgument


class InstanceNames:
    def __init__(self, names: tuple[str, ...] | list[str]):
        self.names = tuple(names)
        self._known = frozenset(self.names)

    def check(self, name: str) -> str:
        """Return `name` if this server serves it and the caller may use it; else raise
        InvalidArgument (unknown instance) or PermissionDenied (not the caller's)."""
        if name in self._known or "*" in self._known:
            current_principal().check_instance(name)
            return name
        served = ", ".join(repr(n) for n in self.names)
        raise InvalidArgument(
            f"unknown instance name {name!r}; this server serves {served} "
            "(add it to [server] instance_names)"
        )
