"""Remote Asset qualifiers: which ones this server understands, and what they mean.

- `checksum.sri`: a Subresource Integrity string (`sha256-<base64>`, also sha384 and
  sha512; several space-separated are all checked); downloaded content must match it,
  and any known content with the same checksum answers the request, whatever its URI.
- `bazel.canonical_id`: part of the asset's key only (Bazel's cache-busting id).
- `http_header:<Name>`: sent as that header on the download (e.g. Authorization); never
  stored or recorded, since it may carry a credential.

Any other qualifier is refused with INVALID_ARGUMENT, as the API asks, rather than
silently answering with content the qualifier would have excluded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from expbuild.errors import InvalidArgument
from expbuild.text import check_no_nul, quoted

CHECKSUM_SRI = "checksum.sri"
CANONICAL_ID = "bazel.canonical_id"
HTTP_HEADER_PREFIX = "http_header:"
_SRI_ALGORITHMS = {"sha256": 32, "sha384": 48, "sha512": 64}


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # a hashlib name
    expected: bytes

    def sri(self) -> str:
        return f"{self.algorithm}-{base64.b64encode(self.expected).decode()}"


def parse_sri(value: str) -> list[Checksum]:
    """The checksums of an SRI string; INVALID_ARGUMENT naming what is wrong."""
    checksums = []
    for entry in value.split():
        algorithm, sep, encoded = entry.partition("-")
        encoded = encoded.split("?", 1)[0]  # SRI options are allowed and mean nothing here
        if not sep or algorithm not in _SRI_ALGORITHMS:
            raise InvalidArgument(
                f"qualifier {CHECKSUM_SRI} {quoted(value)}: expected <algorithm>-<base64> with "
                f"algorithm one of {', '.join(_SRI_ALGORITHMS)}"
            )
        try:
            expected = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(
                f"qualifier {CHECKSUM_SRI} {quoted(value)}: {quoted(encoded)} is not base64"
            ) from None
        if len(expected) != _SRI_ALGORITHMS[algorithm]:
            raise InvalidArgument(
                f"qualifier {CHECKSUM_SRI} {quoted(value)}: a {algorithm} digest is "
                f"{_SRI_ALGORITHMS[algorithm]} bytes, this one {len(expected)}"
            )
        checksums.append(Checksum(algorithm, expected))
    if not checksums:
        raise InvalidArgument(f"qualifier {CHECKSUM_SRI} is empty")
    return checksums


@dataclass(frozen=True)
class Qualifiers:
    """A request's qualifiers, checked: the key they form and what they ask of a download."""

    values: dict[str, str]
    checksums: tuple[Checksum, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> dict[str, str]:
        """What identifies the content (stored, recorded): header values are left out, since
        they say how to download (and may hold credentials), not what."""
        return {k: v for k, v in self.values.items() if not k.startswith(HTTP_HEADER_PREFIX)}

    @property
    def checksum_sri(self) -> str | None:
        return self.values.get(CHECKSUM_SRI)

    def hashers(self) -> dict[str, Hasher]:
        return {c.algorithm: hashlib.new(c.algorithm) for c in self.checksums}

    def mismatch(self, hashers: dict[str, Hasher]) -> str | None:
        """None if every checksum matches the hashed content, else what was got instead."""
        for checksum in self.checksums:
            got = hashers[checksum.algorithm].digest()
            if got != checksum.expected:
                return (
                    f"content has {checksum.algorithm}-{base64.b64encode(got).decode()}, "
                    f"{CHECKSUM_SRI} asks for {checksum.sri()}"
                )
        return None


def parse_qualifiers(pairs: list[tuple[str, str]]) -> Qualifiers:
    values: dict[str, str] = {}
    checksums: list[Checksum] = []
    headers: list[tuple[str, str]] = []
    for name, value in pairs:
        check_no_nul(name, "qualifier name")
        check_no_nul(value, f"qualifier {name} value")
        if name in values:
            raise InvalidArgument(f"qualifier {quoted(name)} is given twice")
        if name == CHECKSUM_SRI:
            checksums = parse_sri(value)
        elif name.startswith(HTTP_HEADER_PREFIX):
            header = name[len(HTTP_HEADER_PREFIX) :]
            if not header or any(c in header for c in ":\r\n ") or any(c in value for c in "\r\n"):
                raise InvalidArgument(f"qualifier {quoted(name)} does not name a valid header")
            headers.append((header, value))
        elif name != CANONICAL_ID:
            raise InvalidArgument(
                f"qualifier {quoted(name)} is not supported; this server understands "
                f"{CHECKSUM_SRI}, {CANONICAL_ID} and {HTTP_HEADER_PREFIX}<name>"
            )
        values[name] = value
    return Qualifiers(values, tuple(checksums), tuple(headers))


# An asset's key (instance name, URI, qualifiers) is one entry of the assets table's
# primary-key btree, which PostgreSQL caps at 2704 bytes: longer keys are refused up front.
MAX_ASSET_KEY_BYTES = 2400


def check_asset_key(instance_name: str, uris: list[str], qualifiers: Qualifiers) -> None:
    """INVALID_ARGUMENT naming the URI whose key would be too long to store."""
    common = len(instance_name.encode()) + len(json.dumps(qualifiers.key).encode())
    for i, uri in enumerate(uris):
        size = common + len(uri.encode())
        if size > MAX_ASSET_KEY_BYTES:
            raise InvalidArgument(
                f"uris[{i}] with the instance name and qualifiers is {size} bytes, longer "
                f"than the {MAX_ASSET_KEY_BYTES} bytes an asset's key may have"
            )
