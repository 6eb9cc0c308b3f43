"""Which backend addresses the gateway may dial: checked once, as Envoy will read them.

Envoy's EDS takes a literal IP (no IPv6 zone id, dotted-quad IPv4 only) or nothing, so a URL's
host must be exactly that or a DNS name that resolves to one. Addresses no engine can be on
(unspecified, multicast, link-local: 169.254.169.254 is the cloud metadata service) and the
gateway's own ports are refused, so a typo or a hostile call cannot poison a model or loop.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

# RFC 1123 host names: letters, digits and hyphens, labels of 1 to 63, 253 in all.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f-\uffff<>\"'`{}|\\^]")


class AddressError(ValueError):
    """Why an address cannot be a backend, said for the operator."""


def parse_backend_url(url: object) -> tuple[str, str, int]:
    """`http://host:port` or `https://host:port` -> (the URL in one spelling, host, port);
    AddressError says why not."""
    if not isinstance(url, str):
        raise AddressError(f"expected a URL string, got {url!r}")
    if len(url) > 300:
        raise AddressError(f"{url[:40]!r}... is longer than 300 characters")
    if _URL_FORBIDDEN.search(url):
        # urlsplit drops tabs and line breaks silently; a URL must mean exactly what it says.
        raise AddressError(f"{url!r} contains spaces, control characters or characters a URL may not hold")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise AddressError(f"{url!r} is not a valid URL ({error})") from None
    try:
        port = parts.port
    except ValueError:
        raise AddressError(f"{url!r} has an invalid port (1..65535)") from None
    if parts.scheme not in ("http", "https"):
        raise AddressError(f"{url!r} must start with http:// or https://")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise AddressError(f"{url!r} must not carry user info")
    if not parts.hostname:
        raise AddressError(f"{url!r} has no host")
    if port is None:
        raise AddressError(f"{url!r} needs an explicit port")
    if not 1 <= port <= 65535:
        raise AddressError(f"{url!r}: port {port} is out of range 1..65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise AddressError(f"{url!r} must be scheme://host:port with no path")
    host = parts.hostname
    check_host(host, bracketed=parts.netloc.startswith("["))
    if ":" in host:
        host = str(ipaddress.IPv6Address(host))  # one backend, one spelling
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}", host, port


def is_https(url: str) -> bool:
    """An https:// backend: TLS to it, checked by its host name."""
    return url.startswith("https://")


def check_host(host: str, bracketed: bool = False) -> None:
    """A literal IP as Envoy parses it, or an RFC 1123 host name."""
    if "%" in host:
        raise AddressError(f"{host!r}: IPv6 zone ids are not supported (Envoy refuses them)")
    if bracketed or ":" in host:
        try:
            check_ip(ipaddress.IPv6Address(host))
        except ipaddress.AddressValueError:
            raise AddressError(f"{host!r} is not a valid IPv6 address") from None
        return
    if re.fullmatch(r"[0-9.]+", host) or re.fullmatch(r"0x[0-9a-f.x]*", host):
        try:
            check_ip(ipaddress.IPv4Address(host))
        except ipaddress.AddressValueError:
            raise AddressError(f"{host!r} is not a dotted IPv4 address (a.b.c.d) nor a host name") from None
        return
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"{host[:80]!r} is not a valid host name (letters, digits and hyphens; "
                           "labels of at most 63 characters, 253 in all)")
    if labels[-1].isdigit():
        raise AddressError(f"{host!r} is not a valid host name (its last label is a number)")


def check_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Refuses addresses no engine can be reached on."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_unspecified:
        raise AddressError(f"{ip} is the unspecified address, not an engine's")
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise AddressError(f"{ip} is a multicast or broadcast address")
    if ip.is_link_local:
        raise AddressError(f"{ip} is link-local (169.254.0.0/16, fe80::/10: the cloud metadata service lives there)")


def check_resolved(address: str) -> None:
    """An address a host name resolved to, held to the rules of a literal one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise AddressError(f"resolved to {address!r}, which is not an IP address") from None
    if "%" in address:
        raise AddressError(f"resolved to {address!r}: IPv6 zone ids are not supported (Envoy refuses them)")
    check_ip(ip)


def canonical(address: str) -> str:
    """One spelling per address: an IPv4-mapped IPv6 address (::ffff:127.0.0.1, ::ffff:7f00:1) is
    its IPv4 address, which is what a socket dialling it reaches; IPv6 compressed."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


def is_local(address: str) -> bool:
    """True when `address` is one of this host's own: loopback, or one a socket can bind to."""
    ip = ipaddress.ip_address(canonical(address))
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def own_port_problem(address: str, port: int, own: dict[str, tuple[str, int]]) -> str | None:
    """Why (address, port) is one of the gateway's own listeners (`own`: name -> bound address, port)."""
    for name, (bound, bound_port) in own.items():
        if port != bound_port:
            continue
        wildcard = bound in ("0.0.0.0", "::", "")
        if (wildcard or _same_ip(canonical(bound), canonical(address))) and is_local(address):
            return f"{address}:{port} is the gateway's own {name}: sending requests there would loop"
    return None


def _same_ip(bound: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(bound) == ipaddress.ip_address(address)
    except ValueError:
        return bound == "localhost" and ipaddress.ip_address(address).is_loopback


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    """Whether a listening address is reachable only from this host."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
