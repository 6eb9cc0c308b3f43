"""DNS discovery's decisions (pure) and the DNS client's parsing of hostile answers."""

from __future__ import annotations

import struct

import pytest

from control_plane.config import DiscoveryConfig
from control_plane.dns_client import A, build_query, parse_addresses
from control_plane.dns_discovery import plan
from control_plane.registry import ACTIVE, DRAINING, Entry, Registry

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


def test_an_operators_drain_is_not_undone_by_the_record_staying():
    registry = registry_after(Registry.empty(), ["10.0.0.1"])
    entry_id = registry.entries()[0].id
    registry.set_state(entry_id, DRAINING, 9e9)  # through the admin API
    assert plan(registry, ITEM, ["10.0.0.1"], 60) is None
    assert states(registry) == {"http://10.0.0.1:8000": DRAINING}


def test_addresses_another_source_serves_stay_theirs():
    registry = Registry.empty()
    configured = Entry.create("http://10.0.0.1:8000", ["m"], source="config")
    registry.config_entries = {configured.id: configured}
    registry_after(registry, ["10.0.0.1", "10.0.0.3"])
    assert sorted((e.url, e.source) for e in registry.entries()) == [
        ("http://10.0.0.1:8000", "config"), ("http://10.0.0.3:8000", "dns:engine")]


def _answer(query_id: int, flags: int, answers: bytes, count: int) -> bytes:
    question = build_query("engine", A, query_id)[12:]
    return struct.pack(">HHHHHH", query_id, flags, 1, count, 0, 0) + question + answers


def test_parses_a_records_and_refuses_truncated_or_broken_answers():
    record = b"\xc0\x0c" + struct.pack(">HHIH", A, 1, 30, 4) + bytes([10, 0, 0, 9])
    assert parse_addresses(_answer(7, 0x8180, record, 1), 7, A) == ["10.0.0.9"]
    assert parse_addresses(_answer(7, 0x8183, b"", 0), 7, A) == []  # NXDOMAIN: no engines
    with pytest.raises(OSError, match="truncated"):
        parse_addresses(_answer(7, 0x8380, record, 1), 7, A)
    with pytest.raises(OSError, match="malformed"):
        parse_addresses(_answer(7, 0x8180, record[:5], 3), 7, A)
    with pytest.raises(OSError, match="another query"):
        parse_addresses(_answer(8, 0x8180, record, 1), 7, A)
