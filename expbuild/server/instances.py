"""Instance names: the configured list of REAPI instances this server answers for."""

from __future__ import annotations

from expbuild.auth.principal import current_principal
from expbuild.errors import InvalidArgument
from expbuild.text import check_no_nul, quoted


class InstanceNames:
    def __init__(self, names: tuple[str, ...] | list[str]):
        self.names = tuple(names)
        self._known = frozenset(self.names)

    def check(self, name: str) -> str:
        """Return `name` if this server serves it and the caller may use it; else raise
        InvalidArgument (unknown instance) or PermissionDenied (not the caller's token's)."""
        if name not in self._known:
            if "*" not in self._known:
                served = ", ".join(repr(n) for n in self.names)
                raise InvalidArgument(
                    f"unknown instance name {quoted(name)}; this server serves {served} "
                    "(add it to [server] instance_names)"
                )
            check_no_nul(name, "instance name")
            # Path-like names: `a/./b` or `a/../b` would be a second spelling of another.
            for segment in (".", ".."):
                if segment in name.split("/"):
                    raise InvalidArgument(f"instance name {quoted(name)} has a {segment!r} segment")
        # The one gate every servicer passes: a token may be limited to some instances.
        current_principal().check_instance(name)
        return name
