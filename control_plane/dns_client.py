"""A minimal DNS client (A and AAAA over UDP) for discovery against a named server.

The system resolver (getaddrinfo) serves compose and Kubernetes; this is for a nameserver given
in the config, which the system resolver cannot be pointed at per lookup.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct

A, AAAA = 1, 28
_NXDOMAIN = 3


def build_query(name: str, record_type: int, query_id: int) -> bytes:
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return header + labels + b"\x00" + struct.pack(">HH", record_type, 1)


def _skip_name(message: bytes, offset: int) -> int:
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:  # a compression pointer ends the name
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def parse_addresses(message: bytes, query_id: int, record_type: int) -> list[str]:
    """Addresses of `record_type` in a response; [] for a name that does not exist."""
    try:
        return _parse(message, query_id, record_type)
    except (struct.error, IndexError):
        raise OSError("malformed DNS answer") from None


def _parse(message: bytes, query_id: int, record_type: int) -> list[str]:
    answer_id, flags, questions, answers, _, _ = struct.unpack_from(">HHHHHH", message, 0)
    if answer_id != query_id:
        raise OSError("DNS answer for another query")
    if flags & 0x0200:
        # Truncated: a partial record set taken as whole would drain the missing backends.
        raise OSError("DNS answer truncated (more records than fit in UDP)")
    rcode = flags & 0x000F
    if rcode == _NXDOMAIN:
        return []
    if rcode != 0:
        raise OSError(f"DNS server answered rcode {rcode}")
    offset = 12
    for _ in range(questions):
        offset = _skip_name(message, offset) + 4
    found = []
    for _ in range(answers):
        offset = _skip_name(message, offset)
        kind, _, _, length = struct.unpack_from(">HHIH", message, offset)
        offset += 10
        data = message[offset:offset + length]
        offset += length
        if kind == record_type == A and length == 4:
            found.append(socket.inet_ntop(socket.AF_INET, data))
        elif kind == record_type == AAAA and length == 16:
            found.append(socket.inet_ntop(socket.AF_INET6, data))
    return found


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, error: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(error)


async def _query(name: str, record_type: int, nameserver: tuple[str, int], timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    query_id = secrets.randbelow(65536)
    transport, protocol = await loop.create_datagram_endpoint(_Exchange, remote_addr=nameserver)
    try:
        transport.sendto(build_query(name, record_type, query_id))
        reply = await asyncio.wait_for(protocol.answer, timeout)
    except TimeoutError:
        raise OSError(f"no answer from DNS server {nameserver[0]}:{nameserver[1]}") from None
    finally:
        transport.close()
    return parse_addresses(reply, query_id, record_type)


async def lookup(name: str, nameserver: tuple[str, int], timeout: float = 2.0) -> list[str]:
    """A records of `name` from `nameserver`, then AAAA ones if the server answers for those."""
    addresses = await _query(name, A, nameserver, timeout)
    try:
        addresses += await _query(name, AAAA, nameserver, timeout)
    except OSError:
        pass  # many servers ignore AAAA; the A answer stands
    return addresses
