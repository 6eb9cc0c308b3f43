"""Lookups against a nameserver named in the config, for DNS discovery (dnspython).

The system resolver (getaddrinfo) serves compose and Kubernetes; a nameserver given in the
config cannot be set per lookup there, so dnspython's async resolver asks it directly.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver


async def lookup(name: str, nameserver: tuple[str, int], timeout: float = 2.0) -> list[str]:
    """Every A and AAAA address of `name`, sorted; [] when the name has none (NXDOMAIN or no
    records). OSError when the server cannot be asked or its answer cannot be trusted
    (truncated, malformed, for another query): discovery then changes nothing."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [nameserver[0]]
    resolver.port = nameserver[1]
    resolver.lifetime = timeout
    addresses: set[str] = set()
    for record_type in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, record_type, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as error:
            raise OSError(f"DNS lookup of {name} at {nameserver[0]}:{nameserver[1]} failed: {error}") from None
        addresses |= {record.address for record in answer}
    return sorted(addresses)
