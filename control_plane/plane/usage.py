"""The usage keeper: this process's metering by day (observe/usage.py's book, in the ledger)
written as its own records (fleet/usage_store.py) every USAGE_FLUSH_S and when it stops; read
back, summed over every writer, for `GET /usage`. The leader (or a lone plane) drops days past
`state.usage_days` once an hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from control_plane.observe.usage import USAGE_FLUSH_S, UsageBook, summed, utc_day

log = logging.getLogger(__name__)
RETENTION_CHECK_S = 3600.0


class UsageKeeper:
    def __init__(self, book: UsageBook, store, writer: str, days: Callable[[], int], leading: Callable[[], bool]):
        """`store`: a FileUsageStore or EtcdUsageStore; `writer`: this process's name for its
        records; `days`: state.usage_days now; `leading`: whether this plane drops old days."""
        self.book, self.store, self.writer, self.days, self.leading = book, store, writer, days, leading

    async def flush(self) -> None:
        """Writes the days metered since the last flush; a day not written (the store away, or the
        flush cancelled) is tried again next time."""
        days = self.book.take_changed()
        for i, day in enumerate(days):
            try:
                await self.store.put(day, self.writer, self.book.record(day))
            except BaseException as error:
                self.book.changed.update(days[i:])
                if not isinstance(error, Exception):
                    raise
                log.warning("usage for %s not written yet: %s", day, error)
                return

    async def run(self) -> None:
        """Writes every USAGE_FLUSH_S; once an hour forgets the days past the retention (the
        leader deletes them from the store too). The plane flushes once more when it stops,
        after its access-log intake (ControlPlane.stop)."""
        checked = None
        while True:
            await asyncio.sleep(USAGE_FLUSH_S)
            await self.flush()
            now = asyncio.get_running_loop().time()
            if checked is None or now - checked >= RETENTION_CHECK_S:
                checked = now
                first_kept = (utc_day(time.time())[0] - timedelta(days=self.days() - 1)).isoformat()
                self.book.forget_before(first_kept)
                if self.leading():
                    try:
                        await self.store.drop_before(first_kept)
                    except Exception as error:  # noqa: BLE001 - tried again next hour; writing goes on
                        log.warning("usage older than %s not deleted yet: %s", first_kept, error)

    async def rows(self, first: str, last: str, key: str | None) -> list[dict]:
        """Every writer's records of those days (this one's as it stands now), summed per day,
        key and model."""
        records = await self.store.records(first, last)
        for day in self.book.days:
            if first <= day <= last:
                records.setdefault(day, {})[self.writer] = self.book.record(day)
        return summed({day: list(writers.values()) for day, writers in records.items()}, key)

    def own_rows(self, day: str) -> list[dict]:
        """This process's metering of `day` as it stands now (no I/O), summed per key and model."""
        return summed({day: [self.book.record(day)]})

    async def other_rows(self, day: str) -> list[dict]:
        """Every other writer's records of `day` as last written (other planes', and this plane's
        before a restart), summed per key and model."""
        records = (await self.store.records(day, day)).get(day, {})
        return summed({day: [record for writer, record in records.items() if writer != self.writer]})
