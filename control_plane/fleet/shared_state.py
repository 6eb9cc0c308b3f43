"""The state the admin API, drains and keys create, in etcd: several control planes share it.

One JSON document under `<prefix>state`, the same document the state file holds. A change is
read-modify-write with an etcd transaction that succeeds only if the document's revision is the
one the change was made on; otherwise the control plane takes the newer document and makes its
change again, so changes made on two control planes at once never lose each other. Every
control plane watches the key and applies what another one wrote, typically within
milliseconds. etcd unreachable: the last state keeps being served, and changes are refused
(StateUnavailable, the admin API's 503) until it answers again.

The members, resolved to IPv4 addresses at start, share one gRPC channel that moves to the next
member when one fails, so losing one member of three goes unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable

import aetcd
import aetcd.exceptions
import grpc

from control_plane.fleet.addresses import is_ip_address

log = logging.getLogger(__name__)

RETRY_S = 0.5  # how soon a broken watch is made again
RETRY_CALL_S = 0.1  # between tries of one call
DOWN_TRY_S = 0.5  # how long a call may take while etcd is known to be away
# A control plane's lease: its leadership and its Envoy count go this long after it stops
# renewing (killed, cut off), so another takes over within about that.
LEASE_TTL_S = 3


class StateUnavailable(RuntimeError):
    """etcd cannot be reached (or did not answer in time): nothing was changed."""


class Conflict(RuntimeError):
    """Another control plane changed the state first."""


def resolve_members(endpoints: tuple[str, ...]) -> list[str]:
    """The members as IPv4:port; names (compose's service names) are resolved here, once."""
    addresses = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not is_ip_address(host):
            try:
                host = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            except OSError as error:
                raise StateUnavailable(f"state.etcd: {host} does not resolve ({error})") from None
        addresses.append(f"{host}:{port}")
    return addresses


def channel_target(members: list[str]) -> tuple[str, int]:
    """aetcd dials `host:port`; gRPC's `ipv4:a:p,b:q` target lists every member instead, and its
    pick-first policy moves to the next one when the one in use refuses or drops connections."""
    *first, last = members
    host, _, port = last.rpartition(":")
    return "ipv4:" + ",".join([*first, host]), int(port)


class EtcdState:
    def __init__(self, endpoints: tuple[str, ...], prefix: str, timeout_s: float):
        self.members = resolve_members(endpoints)
        self.prefix = prefix.encode()
        self.key = self.prefix + b"state"
        self.timeout_s = timeout_s
        self.reachable = True  # false from a call that found etcd away to the next that did not
        self.lease = None  # this control plane's, while presence() holds one
        self.envoys_total: int | None = None  # Envoys on every control plane, as last read
        self.client = self._connect()
        self._moved = asyncio.Event()  # set when the client is replaced: the watch moves with it

    def _connect(self) -> aetcd.Client:
        host, port = channel_target(self.members)
        return aetcd.Client(host, port, timeout=self.timeout_s,
                            options={"grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1000})

    def _move_on(self) -> None:
        """The member in use holds calls without answering (hung, or cut off from the others): a
        new channel that tries the next member first. Pick-first would stay, as its connection
        is still open."""
        self.members = self.members[1:] + self.members[:1]
        old, self.client = self.client, self._connect()
        self._moved.set()
        # Closed once the calls still on it have timed out: closing cancels them, and a cancelled
        # call would end the request that made it as if its client had gone.
        loop = asyncio.get_running_loop()
        loop.call_later(2 * self.timeout_s, lambda: loop.create_task(_quietly(old.close())))

    async def _call(self, make: Callable[[], Awaitable]):
        """One etcd call, tried again until `timeout_s` x 2 has passed: a member lost makes the
        next call wait for etcd's election (about a second), which nobody should notice. While
        etcd is known to be away, one short try: nothing waits on it for long."""
        loop = asyncio.get_running_loop()
        budget = 2 * self.timeout_s if self.reachable else min(self.timeout_s, DOWN_TRY_S)
        deadline = loop.time() + budget
        while True:
            try:
                try:
                    result = await asyncio.wait_for(make(), max(0.05, min(self.timeout_s, deadline - loop.time())))
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # this call's caller is being cancelled
                    raise OSError("the call was cancelled under it (its channel closed)") from None
                if not self.reachable:
                    log.info("etcd answers again")
                self.reachable = True
                return result
            except (asyncio.TimeoutError, aetcd.exceptions.ClientError, grpc.RpcError, OSError) as error:
                log.debug("etcd call failed: %r", error)
                if isinstance(error, asyncio.TimeoutError) and len(self.members) > 1:
                    self._move_on()
                if loop.time() + RETRY_CALL_S >= deadline:
                    if self.reachable:
                        log.warning("etcd does not answer (%s): serving the last state, refusing changes", error)
                    self.reachable = False
                    raise StateUnavailable(f"etcd does not answer ({type(error).__name__}); the gateway keeps serving "
                                           "its last state, and changes wait until etcd is back") from None
                await asyncio.sleep(RETRY_CALL_S)

    async def load(self) -> tuple[dict | None, int]:
        """The document and its revision (0: none yet)."""
        found = await self._call(lambda: self.client.get(self.key))
        if found is None:
            return None, 0
        return _parse(found.value), found.mod_revision

    async def save(self, data: dict, revision: int) -> int:
        """Writes `data` if the document is still at `revision`; the new revision, else Conflict."""
        txn = self.client.transactions
        body = json.dumps(data, sort_keys=True).encode()
        succeeded, responses = await self._call(lambda: self.client.transaction(
            compare=[txn.mod(self.key) == revision], success=[txn.put(self.key, body)], failure=[]))
        if not succeeded:
            raise Conflict("the state changed on another control plane")
        return responses[0].response_put.header.revision

    async def follow(self, revision: int, on_change: Callable[[dict, int], Awaitable[None]]) -> None:
        """Calls `on_change(document, revision)` for each version newer than `revision`, for ever;
        a broken watch, or one on a member given up (`_move_on`), is made again from where it
        stopped (a read first catches up)."""
        seen = [revision]
        while True:
            events = moved = None
            try:
                data, latest = await self.load()
                if latest > seen[0] and data is not None:
                    await on_change(data, latest)
                    seen[0] = latest
                self._moved = asyncio.Event()
                events = asyncio.create_task(self._events(seen, on_change))
                moved = asyncio.create_task(self._moved.wait())
                await asyncio.wait({events, moved}, return_when=asyncio.FIRST_COMPLETED)
                if events.done():
                    events.result()  # its error, if any, is logged below
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - etcd away, a member gone: catch up and watch again
                log.debug("etcd watch ended (%s); watching again", error)
            finally:
                for task in (events, moved):
                    if task is not None:
                        task.cancel()
            await asyncio.sleep(RETRY_S)

    async def _events(self, seen: list[int], on_change: Callable[[dict, int], Awaitable[None]]) -> None:
        async for event in await self.client.watch(self.key, start_revision=seen[0] + 1):
            if event.kv.mod_revision > seen[0] and event.kv.value:
                await on_change(_parse(event.kv.value), event.kv.mod_revision)
                seen[0] = event.kv.mod_revision  # only once applied: a failure is tried again

    async def presence(self, plane_id: str, on_leading: Callable[[bool], Awaitable[None]],
                       own_envoys: Callable[[], int]) -> None:
        """For ever: keeps this control plane's lease, and makes it the leader (the one that runs
        DNS discovery, finishes drains and expires key secrets) whenever no other one is.
        `on_leading(True/False)` is called when that changes. Each second it also writes how many
        Envoys are connected here and reads the sum over every plane (`envoys_total`): quotas are
        split among all of them. None of this waits in the load loop."""
        txn = self.client.transactions
        leader_key, envoys_prefix = self.prefix + b"leader", self.prefix + b"envoys/"
        leading, written = False, None
        while True:
            try:
                self.lease = await self._call(lambda: self.client.lease(LEASE_TTL_S))
                written = None
                while True:
                    if not leading:
                        # The key is ours if it was made now, or by a try of ours whose answer was lost.
                        made, answers = await self._call(lambda: self.client.transaction(
                            compare=[txn.create(leader_key) == 0],
                            success=[txn.put(leader_key, plane_id.encode(), lease=self.lease)],
                            failure=[txn.get(leader_key)]))
                        holder = answers[0][0][0] if not made and answers and answers[0] else None
                        if made or holder == plane_id.encode():
                            leading = True
                            log.info("leading: this control plane runs DNS discovery and finishes drains")
                            await self._tell(on_leading, True)
                    if (count := own_envoys()) != written:
                        await self._call(lambda: self.client.put(envoys_prefix + plane_id.encode(),
                                                                 str(count).encode(), lease=self.lease))
                        written = count
                    found = await self._call(lambda: self.client.get_prefix(envoys_prefix))
                    self.envoys_total = sum(int(kv.value) for kv in found)
                    await asyncio.sleep(LEASE_TTL_S / 3)
                    answer = await self._call(lambda: self.client.refresh_lease(self.lease.id))
                    if getattr(answer, "TTL", 1) <= 0:
                        raise StateUnavailable("the lease expired")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - lease lost or etcd away: step down, try again
                log.debug("presence: %r", error)
                self.lease = None
                if leading:
                    leading = False
                    log.warning("no longer leading (%s)", error)
                    await self._tell(on_leading, False)
                await asyncio.sleep(RETRY_S)

    @staticmethod
    async def _tell(on_leading: Callable[[bool], Awaitable[None]], leading: bool) -> None:
        """A failure there must not end the presence loop (no plane would lead again)."""
        try:
            await on_leading(leading)
        except Exception:  # noqa: BLE001
            log.exception("acting on leadership (%s) failed", leading)

    async def step_down(self) -> None:
        """Gives up the lease at once (a clean stop): another control plane leads without waiting."""
        if self.lease is not None:
            try:
                await asyncio.wait_for(self.lease.revoke(), self.timeout_s)
            except Exception:  # noqa: BLE001 - it expires anyway
                pass

    async def close(self) -> None:
        await self.client.close()


async def _quietly(closing: Awaitable) -> None:
    try:
        await closing
    except Exception:  # noqa: BLE001 - a channel to a dead member may fail to close; nobody waits
        pass


def _parse(value: bytes) -> dict:
    data = json.loads(value)
    if not isinstance(data, dict):
        raise ValueError("the state in etcd is not a JSON object")
    return data
