"""The audit trail: every change made through the admin API, who made it, and what it changed.

A record is {id, at, who, token_id, role, source, action, target, before, after}: `who` is the
token's name ("bootstrap" for the token the control plane starts with, whose token_id is null),
`source` the client's address, `action` what was called ("keys.create"), `target` the id of the
object changed, and `before`/`after` that object as the API shows it (null where it did not exist
before, or no longer does), never a secret nor a digest. A record is written only once the change
was applied (saved and published), before the API answers; a change that failed writes none.

Left out: changes the control plane makes on its own (DNS discovery, drains that finish, rotated
key secrets whose grace ends): they follow from the config or from an earlier admin change, which
the trail holds. Calls that changed nothing (draining a backend already draining) are left out too.

Where: with the state file, `audit.jsonl` in the state dir, one record a line, appended and
fsynced; with state.etcd, one key per record, `<prefix>audit/<id>`, so the records of every
control plane sharing the state make one trail. Ids start with the time in microseconds, so
their order is the records' order in both.

Retention: the newest MAX_RECORDS (100,000) records, by count rather than age, so that a script
gone wrong cannot fill the disk or etcd's quota; the oldest go in batches once TRIM_SLACK more
have been written (the file is then rewritten whole, atomically).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from control_plane.fleet.local_store import write_atomically

AUDIT_FILE = "audit.jsonl"
MAX_RECORDS = 100_000
TRIM_SLACK = 1_000
MAX_LIMIT = 1000  # records in one answer
_ID_START = b'{"id":"'  # how each line of the file begins (records are written id first)
_MICROS_DIGITS = 16


def now_micros() -> int:
    return time.time_ns() // 1000


def iso(micros: int) -> str:
    """ISO 8601 in UTC, to the microsecond, with a Z."""
    moment = datetime.fromtimestamp(micros / 1e6, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_since(text: str) -> int:
    """An ISO 8601 time (UTC unless it says otherwise) as epoch microseconds; ValueError if not one."""
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1_000_000)


def since_key(micros: int) -> str:
    """The smallest record id at or after `micros`: ids compare as their times do."""
    return f"{max(0, micros):0{_MICROS_DIGITS}d}"


def make_record(who: str, token_id: str | None, role: str, source: str, action: str, target: str,
                before: dict | None, after: dict | None, micros: int | None = None) -> dict:
    micros = now_micros() if micros is None else micros
    return {"id": f"{micros:0{_MICROS_DIGITS}d}-{secrets.token_hex(4)}", "at": iso(micros), "who": who,
            "token_id": token_id, "role": role, "source": source, "action": action, "target": target,
            "before": before, "after": after}


def encode(record: dict) -> bytes:
    """One line: compact JSON, id first."""
    return json.dumps(record, separators=(",", ":")).encode()


def _line_id(line: bytes) -> bytes:
    return line[len(_ID_START):len(_ID_START) + _MICROS_DIGITS] if line.startswith(_ID_START) else b""


def _decode(lines) -> list[dict]:
    """The records among `lines`; a line cut short by a crash is skipped."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _pick(ordered, since: str | None, limit: int) -> tuple[list, bool]:
    """From items in order (each (id, item)): with `since`, the first `limit` whose id is at or
    after it; without, the last `limit`. And whether more were left out."""
    if since is not None:
        chosen = []
        for record_id, item in ordered:
            if record_id >= since:
                if len(chosen) == limit:
                    return chosen, True
                chosen.append(item)
        return chosen, False
    last: deque = deque(maxlen=limit)
    total = 0
    for _, item in ordered:
        last.append(item)
        total += 1
    return list(last), total > limit


class FileAudit:
    """The trail in the state dir (the state file's mode)."""

    def __init__(self, directory: Path, keep: int = MAX_RECORDS, slack: int = TRIM_SLACK):
        self.path = directory / AUDIT_FILE
        self.keep, self.slack = keep, slack
        self._count: int | None = None  # lines in the file, counted at the first append
        self._lock = asyncio.Lock()

    async def append(self, record: dict) -> None:
        async with self._lock:
            await asyncio.to_thread(self._append, encode(record) + b"\n")

    async def read(self, since: str | None, limit: int) -> tuple[list[dict], bool]:
        async with self._lock:  # not while the file is rewritten
            return await asyncio.to_thread(self._read, since, limit)

    def _append(self, line: bytes) -> None:
        if self._count is None:
            self._count = self._prepare()
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)
        self._count += 1
        if self._count > self.keep + self.slack:
            self._trim()

    def _prepare(self) -> int:
        """The lines in the file; a last line a crash cut short is ended, so the next record
        starts a line of its own (the reader skips the broken one)."""
        count, last = 0, b"\n"
        try:
            with open(self.path, "rb") as file:
                while chunk := file.read(1 << 20):
                    count += chunk.count(b"\n")
                    last = chunk[-1:]
        except FileNotFoundError:
            return 0
        if last != b"\n":
            with open(self.path, "ab") as file:
                file.write(b"\n")
                file.flush()
                os.fsync(file.fileno())
            count += 1
        return count

    def _trim(self) -> None:
        with open(self.path, "rb") as file:
            kept = deque(file, maxlen=self.keep)
        write_atomically(self.path, b"".join(kept), mode=0o600)
        self._count = len(kept)

    def _read(self, since: str | None, limit: int) -> tuple[list[dict], bool]:
        try:
            file = open(self.path, "rb")
        except FileNotFoundError:
            return [], False
        with file:
            lines = (line for line in file if line.strip())
            if since is not None:  # the id's time, read without parsing the line
                chosen, more = _pick(((_line_id(line).decode(errors="replace") or "0", line) for line in lines),
                                     since, limit)
            else:
                chosen, more = _pick(((None, line) for line in lines), None, limit)
        return _decode(chosen), more


class EtcdAudit:
    """The trail in etcd (state.etcd): control_plane/fleet/etcd_state.py keeps the records."""

    def __init__(self, shared, keep: int = MAX_RECORDS, slack: int = TRIM_SLACK):
        self.shared, self.keep, self.slack = shared, keep, slack

    async def append(self, record: dict) -> None:
        await self.shared.add_audit_record(record["id"], encode(record), self.keep, self.slack)

    async def read(self, since: str | None, limit: int) -> tuple[list[dict], bool]:
        values, more = await self.shared.audit_records(since, limit)
        return _decode(values), more


class MemoryAudit:
    """For a control plane without a state dir (tests that run one in process)."""

    def __init__(self, keep: int = MAX_RECORDS):
        self.records: deque[dict] = deque(maxlen=keep)

    async def append(self, record: dict) -> None:
        self.records.append(json.loads(encode(record)))

    async def read(self, since: str | None, limit: int) -> tuple[list[dict], bool]:
        return _pick(((r["id"], r) for r in self.records), since, limit)


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
