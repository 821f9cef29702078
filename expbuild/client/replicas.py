"""One gRPC target for several server replicas, so that a channel moves between them.

gRPC's `pick_first` policy connects to the first address of its target that answers and,
when that connection breaks, tries the list again: a worker given several replicas keeps
working when one dies. A DNS name with several addresses behaves the same way through
gRPC's own resolver. A list of `host:port` is turned into one `ipv4:`/`ipv6:` target by
resolving each host when the channel is made. With TLS the certificate must match the
name dialled, so several TLS replicas are given as one DNS name, not as a list.
"""

from __future__ import annotations

import ipaddress
import socket

from expbuild.client.channel import TLS_PREFIX
from expbuild.config import ConfigError, parse_address


def replicas_target(addresses: tuple[str, ...], key: str = "worker.server_url") -> str:
    """A gRPC target for `addresses` (each `host:port`): the one address itself, or an
    `ipv4:a:p,b:p` (`ipv6:[a]:p,…`) list of every address they resolve to."""
    if len(addresses) == 1:
        return addresses[0]
    if any(address.startswith(TLS_PREFIX) for address in addresses):
        raise ConfigError(
            f"{key}: several TLS replicas must be one DNS name with several addresses "
            "(the certificate is checked against the name dialled), not a list"
        )
    resolved: list[str] = []
    families = set()
    for address in addresses:
        host, port = parse_address(address, key)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConfigError(f"{key}: cannot resolve {host!r}: {exc.strerror}") from None
        for _family, _type, _proto, _name, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            families.add(ip.version)
            entry = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
            if entry not in resolved:
                resolved.append(entry)
    if len(families) > 1:
        # One gRPC target holds one address family; keep IPv4, which every host has.
        resolved = [entry for entry in resolved if not entry.startswith("[")]
        families = {4}
    scheme = "ipv6" if families == {6} else "ipv4"
    return f"{scheme}:{','.join(resolved)}"
