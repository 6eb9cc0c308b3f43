"""The registry's transitions and the drain rule, as state machines: no processes, milliseconds."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from control_plane.app import ControlPlane
from control_plane.plane.drains import IDLE_SCRAPES_TO_FINISH_DRAIN
from control_plane.config import parse_config
from control_plane.observe.metrics_parser import ModelLoad
from control_plane.fleet.registry import ACTIVE, DRAINED, DRAINING, Entry, Registry, Source
from control_plane.xds.cache import EnvoyStatus
from control_plane.xds.types import ENDPOINT

MODEL = "m"


def registry_with(source: str) -> tuple[Registry, str]:
    registry = Registry.empty()
    kind, _, name = source.partition(":")
    entry = Entry.create("http://10.0.0.1:8000", [MODEL], source=Source(kind), dns_name=name or None)
    registry.add(entry)
    return registry, entry.id


TRANSITIONS = [
    # (source, steps, expected state afterwards, or None when gone)
    ("api", [("drain",)], DRAINING),
    ("api", [("drain",), ("resume",)], ACTIVE),
    ("api", [("drain",), ("remove",)], None),
    ("config", [("drain",)], DRAINING),
    ("config", [("drain",), ("remove",)], DRAINED),  # config backends are parked, not deleted
    ("config", [("drain",), ("remove",), ("resume",)], ACTIVE),
    ("dns:engine", [("drain",)], DRAINING),
    ("dns:engine", [("drain",), ("remove",)], None),
    ("dns:engine", [("drain",), ("resume",)], ACTIVE),
]


@pytest.mark.parametrize("source,steps,expected", TRANSITIONS, ids=[f"{t[0]}:{'-'.join(s[0] for s in t[1])}"
                                                                     for t in TRANSITIONS])
def test_transitions(source, steps, expected):
    registry, entry_id = registry_with(source)
    for (step,) in steps:
        if step == "drain":
            registry.set_state(entry_id, DRAINING, time.time() + 60)
        elif step == "resume":
            registry.set_state(entry_id, ACTIVE)
        else:
            registry.remove(entry_id)
    entry = registry.get(entry_id)
    assert (entry.state if entry else None) == expected
    # What the state file keeps restores to the same states.
    restored = Registry.empty()
    restored.restore(registry.to_json())
    for entry in registry.entries():  # config backends come back from the config, DNS ones with the state
        if entry.source is Source.CONFIG:
            restored.add(replace(entry, drain=None))
    assert [(e.id, e.state) for e in restored.entries()] == [(e.id, e.state) for e in registry.entries()]


def test_an_unknown_state_file_version_is_refused():
    with pytest.raises(ValueError, match="version"):
        Registry.empty().restore({"version": 2})


class DrainRig:
    """A ControlPlane with one config backend, driven by hand: scrapes and Envoy ACKs are set here."""

    def __init__(self):
        raw = {"models": [MODEL], "backends": [{"url": "http://127.0.0.1:9", "models": [MODEL]}]}
        self.plane = ControlPlane(parse_config(raw), lua_source="")
        asyncio.run(self.plane.apply(self.plane.config))
        self.entry_id = self.plane.registry.entries()[0].id
        self.envoy = EnvoyStatus(1, "envoy-1", "whisper-gateway", "test")
        self.plane.cache.stream_opened(self.envoy)

    def drain(self) -> None:
        asyncio.run(self.plane.drain(self.entry_id, 60))

    def envoy_applies(self) -> None:
        self.envoy.applied[ENDPOINT] = dict(self.plane.cache.snapshot.hashes[ENDPOINT])

    def scrape(self, running: int) -> None:
        now = asyncio.run(_now())
        self.plane.tracker.record_load(self.entry_id, MODEL, ModelLoad(running=running), now)
        asyncio.run(self.plane.check_drains())

    @property
    def state(self) -> str:
        return self.plane.registry.get(self.entry_id).state


async def _now() -> float:
    return asyncio.get_running_loop().time()


def test_a_drain_finishes_after_every_envoy_applied_it_and_two_idle_scrapes():
    rig = DrainRig()
    rig.drain()
    rig.scrape(running=0)
    rig.scrape(running=0)
    assert rig.state == DRAINING  # sent, but no Envoy has applied the draining endpoints
    rig.envoy_applies()
    rig.scrape(running=1)
    rig.scrape(running=0)
    assert rig.state == DRAINING  # one idle scrape is not two in a row
    for _ in range(IDLE_SCRAPES_TO_FINISH_DRAIN - 1):
        rig.scrape(running=0)
    assert rig.state == DRAINED


def test_a_drain_ends_at_its_deadline_whatever_happens():
    rig = DrainRig()
    asyncio.run(rig.plane.drain(rig.entry_id, 60))
    rig.plane.registry.set_state(rig.entry_id, DRAINING, time.time() - 1)  # the deadline passed
    asyncio.run(rig.plane.check_drains())
    assert rig.state == DRAINED
