"""The principal a call runs as, available to servicers through a context variable."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from expbuild.auth.scopes import ADMIN, SCOPES, expand
from expbuild.errors import PermissionDenied


@dataclass(frozen=True)
class Principal:
    # Token name, "cert:<identity>" for a client certificate, "" with auth off.
    name: str
    scopes: frozenset[str]
    # Instance names it may use; empty: all.
    instances: tuple[str, ...] = ()
    authenticated: bool = True

    @classmethod
    def of(cls, name: str, scopes, instances=()) -> Principal:
        return cls(name=name, scopes=expand(tuple(scopes)), instances=tuple(instances))

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def check_instance(self, instance_name: str) -> None:
        if self.instances and instance_name not in self.instances:
            allowed = ", ".join(repr(i) for i in self.instances)
            raise PermissionDenied(
                f"token {self.name!r} may not use instance {instance_name!r} (it may use "
                f"{allowed}); ask for a token with --instance {instance_name!r}"
            )


# Auth off: every caller is this one, and may do everything.
ANONYMOUS = Principal(name="", scopes=frozenset(SCOPES), authenticated=False)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "expbuild_principal", default=ANONYMOUS
)


def current_principal() -> Principal:
    """Who is calling (set by expbuild.auth.interceptor; ANONYMOUS with auth off)."""
    return _current.get()


def set_principal(principal: Principal) -> contextvars.Token:
    return _current.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a stream closed from another context: that context ends anyway
        pass
