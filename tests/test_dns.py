"""DNS discovery's decisions (pure) and how a named nameserver's hostile answers are taken."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import pytest

from control_plane.config import DiscoveryConfig
from control_plane.fleet.dns_client import lookup
from control_plane.fleet.dns_discovery import plan
from control_plane.fleet.registry import ACTIVE, DRAINING, Entry, Registry, Source

ITEM = DiscoveryConfig(name="engine", port=8000, models=("m",))


def registry_after(registry: Registry, addresses: list[str]) -> Registry:
    change = plan(registry, ITEM, addresses, drain_timeout_s=60)
    if change is not None:
        change(registry)
    return registry


def states(registry: Registry) -> dict[str, str]:
    return {e.url: e.state for e in registry.entries()}


def test_records_come_and_go_as_drains():
    registry = registry_after(Registry.empty(), ["10.0.0.1", "10.0.0.2"])
    assert states(registry) == {"http://10.0.0.1:8000": ACTIVE, "http://10.0.0.2:8000": ACTIVE}
    registry_after(registry, ["10.0.0.1"])
    assert states(registry)["http://10.0.0.2:8000"] == DRAINING  # drained, not cut
    registry_after(registry, ["10.0.0.1", "10.0.0.2"])
    assert states(registry)["http://10.0.0.2:8000"] == ACTIVE  # its record came back
    assert plan(registry, ITEM, ["10.0.0.1", "10.0.0.2"], 60) is None  # nothing to do, nothing saved


def test_https_discovery_names_the_engines_by_the_dns_name():
    """Found by `engine` over https: each record is an https:// backend whose certificate must carry
    the DNS name (it is sent as SNI), not the record's address."""
    from control_plane.config import parse_config
    from control_plane.fleet.resolve import resolve_fleet

    item = DiscoveryConfig(name="engine", port=8443, models=("m",), scheme="https")
    registry = Registry.empty()
    plan(registry, item, ["10.0.0.1"], 60)(registry)
    assert states(registry) == {"https://10.0.0.1:8443": ACTIVE}
    fleet = asyncio.run(resolve_fleet(parse_config({"models": ["m"]}), registry))
    (backend,) = fleet.backends
    assert backend.tls and backend.host == "engine" and backend.address == "10.0.0.1"


def test_an_operators_drain_is_not_undone_by_the_record_staying():
    registry = registry_after(Registry.empty(), ["10.0.0.1"])
    entry_id = registry.entries()[0].id
    registry.set_state(entry_id, DRAINING, 9e9)  # through the admin API
    assert plan(registry, ITEM, ["10.0.0.1"], 60) is None
    assert states(registry) == {"http://10.0.0.1:8000": DRAINING}


def test_addresses_another_source_serves_stay_theirs():
    registry = Registry.empty()
    registry.add(Entry.create("http://10.0.0.1:8000", ["m"], source=Source.CONFIG))
    registry_after(registry, ["10.0.0.1", "10.0.0.3"])
    assert sorted((e.url, e.origin) for e in registry.entries()) == [
        ("http://10.0.0.1:8000", "config"), ("http://10.0.0.3:8000", "dns:engine")]


class HostileDns:
    """A real UDP nameserver on loopback that answers each query as `reply(query)` says."""

    def __init__(self, reply):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.address = self.socket.getsockname()
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.socket.recvfrom(4096)
            except OSError:
                return
            answer = self.reply(query)
            if answer is not None:
                self.socket.sendto(answer, peer)

    def close(self) -> None:
        self.socket.close()


def _question(query: bytes) -> tuple[bytes, int]:
    """The question section of a query, and its record type."""
    offset = 12
    while query[offset]:
        offset += query[offset] + 1
    end = offset + 5
    return query[12:end], struct.unpack(">H", query[end - 4:end - 2])[0]


def _answer(flags: int, record: bytes = b"", count: int = 1, other_id: bool = False):
    def reply(query: bytes) -> bytes:
        question, record_type = _question(query)
        query_id = (query[0] << 8 | query[1]) ^ (1 if other_id else 0)
        answers, n = (record, count) if record_type == A else (b"", 0)
        return struct.pack(">HHHHHH", query_id, flags, 1, n, 0, 0) + question + answers
    return reply


A = 1
RECORD = b"\xc0\x0c" + struct.pack(">HHIH", A, 1, 30, 4) + bytes([10, 0, 0, 9])
HOSTILE = [
    ("an A record", _answer(0x8180, RECORD), ["10.0.0.9"]),
    ("NXDOMAIN: no engines", _answer(0x8183, b"", 0), []),
    ("truncated (and no TCP)", _answer(0x8380, RECORD), OSError),
    ("malformed: fewer records than counted", _answer(0x8180, RECORD[:5], 3), OSError),
    ("an answer to another query", _answer(0x8180, RECORD, other_id=True), OSError),
]


@pytest.mark.parametrize("what,reply,expected", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_named_nameservers_answers_are_trusted_only_when_sound(what, reply, expected):
    server = HostileDns(reply)
    try:
        if expected is OSError:
            with pytest.raises(OSError):
                asyncio.run(lookup("engine.test", server.address, timeout=0.5))
        else:
            assert asyncio.run(lookup("engine.test", server.address, timeout=0.5)) == expected
    finally:
        server.close()


def test_host_names_are_looked_up_once_per_ttl(monkeypatch):
    """A change to one of many named backends does not resolve every other name again."""
    from control_plane.fleet import resolve

    lookups = []

    async def counted(host, port):
        lookups.append(host)
        return "127.0.0.1"
    monkeypatch.setattr(resolve, "resolve_host", counted)
    now = [0.0]
    cache = resolve.HostCache(ttl_s=30, clock=lambda: now[0])

    async def twice():
        return [await cache.address("engine-a.internal", 8000) for _ in range(2)] + [await cache.address("10.0.0.9", 1)]
    assert asyncio.run(twice()) == ["127.0.0.1", "127.0.0.1", "10.0.0.9"]
    assert lookups == ["engine-a.internal"]  # addresses need no lookup
    now[0] = 31.0
    asyncio.run(cache.address("engine-a.internal", 8000))
    assert lookups == ["engine-a.internal"] * 2


def test_a_plane_that_stops_leading_pauses_discovery_without_reporting_names_gone():
    """restart(()) reports each name with no records (its engines drain: a config reload that
    drops a name); pause() reports nothing, so a change of leader drains nothing."""
    from control_plane.fleet.dns_discovery import DnsDiscovery

    reported = []

    async def on_records(item, addresses):
        reported.append((item.name, addresses))

    async def run():
        discovery = DnsDiscovery(on_records)
        discovery.items = (ITEM,)  # as if it had been watching
        await discovery.pause()
        paused = list(reported)
        discovery.items = (ITEM,)
        await discovery.restart(())
        return paused
    assert asyncio.run(run()) == []
    assert reported == [("engine", [])]
