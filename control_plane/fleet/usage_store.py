"""Where each control-plane process's usage records live (control_plane/observe/usage.py): one
record per UTC day and writer, never shared, so a write never contends and a restart only adds a
record. In the state dir (`usage/<day>/<writer>.json`, written atomically) for one control plane,
or in etcd beside the shared state (`<prefix>usage/<day>/<writer>`) for several: every plane
then reads every plane's records. Days before the retention are deleted.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from control_plane.fleet.local_store import write_atomically

DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _parse(value: bytes) -> dict:
    """A record read back; one that is not a JSON object counts as empty (observe/usage.py
    bounds each figure)."""
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class MemoryUsageStore:
    """For a plane with neither a state dir nor etcd (tests): records live as long as it does."""

    def __init__(self) -> None:
        self.days: dict[str, dict[str, dict]] = {}

    async def put(self, day: str, writer: str, record: dict) -> None:
        self.days.setdefault(day, {})[writer] = record

    async def records(self, first: str, last: str) -> dict[str, dict[str, dict]]:
        return {day: dict(writers) for day, writers in self.days.items() if first <= day <= last}

    async def drop_before(self, day: str) -> None:
        for old in [d for d in self.days if d < day]:
            del self.days[old]


class FileUsageStore:
    def __init__(self, directory: Path):
        self.directory = directory / "usage"

    async def put(self, day: str, writer: str, record: dict) -> None:
        """Written and synced in a thread: the event loop serves ADS and the logs meanwhile."""
        await asyncio.to_thread(write_atomically, self.directory / day / f"{writer}.json",
                                json.dumps(record, sort_keys=True).encode())

    async def records(self, first: str, last: str) -> dict[str, dict[str, dict]]:
        """{day: {writer: its record}} for the days from `first` to `last`, inclusive."""
        out: dict[str, dict[str, dict]] = {}
        if not self.directory.is_dir():
            return out
        for folder in sorted(self.directory.iterdir()):
            if DAY.fullmatch(folder.name) and first <= folder.name <= last:
                out[folder.name] = {path.stem: _parse(path.read_bytes()) for path in sorted(folder.glob("*.json"))}
        return out

    async def drop_before(self, day: str) -> None:
        if self.directory.is_dir():
            for folder in self.directory.iterdir():
                if DAY.fullmatch(folder.name) and folder.name < day:
                    shutil.rmtree(folder, ignore_errors=True)


class EtcdUsageStore:
    """Over fleet/etcd_state.py's client: `call(make)` runs one etcd call with its retries and
    timeout (EtcdState._call), `client()` the client."""

    def __init__(self, prefix: bytes, call: Callable[[Callable[[], Awaitable]], Awaitable], client: Callable):
        self.prefix, self.call, self.client = prefix + b"usage/", call, client

    async def put(self, day: str, writer: str, record: dict) -> None:
        key, value = self.prefix + f"{day}/{writer}".encode(), json.dumps(record, sort_keys=True).encode()
        await self.call(lambda: self.client().put(key, value))

    async def records(self, first: str, last: str) -> dict[str, dict[str, dict]]:
        start, end = self.prefix + first.encode(), self.prefix + last.encode() + b"/\xff"
        found = await self.call(lambda: self.client().get_range(start, end))
        out: dict[str, dict[str, dict]] = {}
        for kv in found:
            day, _, writer = kv.key[len(self.prefix):].decode(errors="replace").partition("/")
            if DAY.fullmatch(day):
                out.setdefault(day, {})[writer] = _parse(kv.value)
        return out

    async def drop_before(self, day: str) -> None:
        start, end = self.prefix, self.prefix + day.encode()
        await self.call(lambda: self.client().delete_range(start, end))
