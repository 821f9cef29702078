"""Platforms: REAPI's Platform message ⇄ {name: [values]}, for client, worker, server and db.

A property name may appear with several values. The message lists properties sorted by
name, then value (what REAPI requires, so equal platforms give equal action digests);
the database stores the canonical form (`normalize_platform`: sorted, unique strings)
so that jsonb containment matches an action against a worker's offer.

The `OSFamily` property is read in REAPI's platform-lexicon spelling, lower case (`linux`,
`macos`, ...); BuildStream sends nothing else. Bazel users write their own platforms and
often say `Linux`, and ExpBuild's workers used to advertise `platform.system()`'s `Linux`.
So a value that names a lexicon family in any case is read as the lexicon's spelling, on
both sides of the match: what a worker offers and what an action asks for. Values outside
the lexicon are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from expbuild.errors import InvalidArgument
from expbuild.proto import remote_execution_pb2 as re_pb2
from expbuild.text import check_no_nul, quoted

# Name -> values, in the order the message (or the user) gave them.
PlatformSpec = dict[str, list[str]]
# What callers may pass: a value, or a sequence of values, per name.
PlatformInput = Mapping[str, str | Sequence[str]]

OS_FAMILY = "OSFamily"
# REAPI platform-lexicon.md, "OSFamily".
OS_FAMILY_LEXICON = frozenset(
    ("aix", "freebsd", "hpux", "linux", "macos", "netbsd", "openbsd", "solaris", "windows")
)
# platform.system() names that differ from the lexicon's.
_SYSTEM_NAMES = {"darwin": "macos", "sunos": "solaris", "hp-ux": "hpux"}


def _values(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple | set | frozenset) else [value]


def platform_message(platform: PlatformInput) -> re_pb2.Platform:
    """A Platform with one property per (name, value), sorted by name then value; duplicate
    pairs are dropped, an empty name is refused."""
    pairs: set[tuple[str, str]] = set()
    for name, values in platform.items():
        if not name.strip():
            raise InvalidArgument("a platform property has an empty name")
        pairs.update((name, value) for value in _values(values))
    return re_pb2.Platform(
        properties=[re_pb2.Platform.Property(name=n, value=v) for n, v in sorted(pairs)]
    )


def platform_spec(platform: re_pb2.Platform, where: str = "platform") -> PlatformSpec:
    """A Platform's properties as {name: [values]}, values in message order, OSFamily in the
    lexicon's spelling (`Linux` -> `linux`); INVALID_ARGUMENT (naming `where`) for an empty
    name or a NUL character."""
    spec: PlatformSpec = {}
    for prop in platform.properties:
        if not prop.name.strip():
            raise InvalidArgument(
                f"{where}: a property has an empty name (value {quoted(prop.value)})"
            )
        check_no_nul(prop.name, f"{where}: property name")
        check_no_nul(prop.value, f"{where}: property {quoted(prop.name)} value")
        spec.setdefault(prop.name, []).append(prop.value)
    return with_lexicon_os_family(spec)


def requested_platform(action: re_pb2.Action, command: re_pb2.Command) -> re_pb2.Platform:
    """REAPI 2.2 puts the platform in the Action; older clients in the Command."""
    return action.platform if action.platform.properties else command.platform


def normalize_platform(properties: Mapping[str, Any]) -> PlatformSpec:
    """The canonical form the database stores and matches: names kept, values as sorted
    unique lists of strings (a single value counts as a list of one)."""
    return {
        str(name): sorted({str(v) for v in _values(values)}) for name, values in properties.items()
    }


def platform_summary(platform: Mapping[str, Sequence[str]]) -> dict[str, str | list[str]]:
    """A platform for a log line: a lone value without its list."""
    return {k: v[0] if len(v) == 1 else list(v) for k, v in platform.items()}


def platform_text(platform: Mapping[str, Sequence[str]], separator: str = ", ") -> str:
    """A platform for people: `Arch=x86_64, OSFamily=linux|macos`, names sorted, a
    name's values joined by `|`; "" for an empty platform."""
    return separator.join(f"{name}={'|'.join(platform[name])}" for name in sorted(platform))


def lexicon_spelling(value: str) -> str:
    """An OSFamily value: `Linux` -> `linux`; a value that is no lexicon family comes back
    unchanged."""
    lower = value.lower()
    return lower if lower in OS_FAMILY_LEXICON else value


def os_family_of_system(system: str) -> str:
    """`platform.system()` (`Linux`, `Darwin`, ...) as the lexicon's OSFamily."""
    lower = system.lower()
    return _SYSTEM_NAMES.get(lower, lower)


def respelled(values: Sequence[str]) -> list[str]:
    """OSFamily values in the lexicon's spelling, without duplicates, in order."""
    return list(dict.fromkeys(lexicon_spelling(value) for value in values))


def with_lexicon_os_family(platform: Mapping[str, Sequence[str]]) -> PlatformSpec:
    """`platform` ({name: [values]}) with its OSFamily values in the lexicon's spelling."""
    return {
        name: respelled(values) if name == OS_FAMILY else list(values)
        for name, values in platform.items()
    }
