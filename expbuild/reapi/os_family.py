"""The `OSFamily` platform property, spelled as REAPI's platform lexicon spells it.

The lexicon's values are lower case (`linux`, `macos`, ...); BuildStream sends nothing
else. Bazel users write their own platforms and often say `Linux`, and ExpBuild's workers
used to advertise `platform.system()`'s `Linux`. So a value that names a lexicon family in
any case is read as the lexicon's spelling, on both sides of the match: what a worker
offers and what an action asks for. Values outside the lexicon are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

OS_FAMILY = "OSFamily"

# REAPI platform-lexicon.md, "OSFamily".
LEXICON = frozenset(
    ("aix", "freebsd", "hpux", "linux", "macos", "netbsd", "openbsd", "solaris", "windows")
)
# platform.system() names that differ from the lexicon's.
_SYSTEM_NAMES = {"darwin": "macos", "sunos": "solaris", "hp-ux": "hpux"}


def lexicon_spelling(value: str) -> str:
    """`Linux` -> `linux`; a value that is no lexicon family comes back unchanged."""
    lower = value.lower()
    return lower if lower in LEXICON else value


def os_family_of_system(system: str) -> str:
    """`platform.system()` (`Linux`, `Darwin`, ...) as the lexicon's OSFamily."""
    lower = system.lower()
    return _SYSTEM_NAMES.get(lower, lower)


def respelled(values: Sequence[str]) -> list[str]:
    """OSFamily values in the lexicon's spelling, without duplicates, in order."""
    return list(dict.fromkeys(lexicon_spelling(value) for value in values))


def with_lexicon_os_family(platform: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """`platform` ({name: [values]}) with its OSFamily values in the lexicon's spelling."""
    return {
        name: respelled(values) if name == OS_FAMILY else list(values)
        for name, values in platform.items()
    }
