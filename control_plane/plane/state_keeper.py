"""The state runtime changes change, and where it is kept.

The registry (runtime backends, drains), the API keys and the named admin tokens: restored at
start from the state file or etcd, and changed whole or not at all (saved durably, then
published). With state.etcd the state is shared with the other control planes: a change is
written on the revision served and made again on top of a newer one (a conflict), another
plane's change is adopted when the watch reports it, and the leader alone runs what must happen
once (DNS discovery, finished drains, expired key secrets).

It publishes through the publisher (the config last published, and `publish_config`); it never
reads what the Envoys report or what a round decides.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import TypeVar

from control_plane.config import GatewayConfig
from control_plane.fleet.dns_discovery import plan as plan_dns
from control_plane.fleet.etcd_state import Conflict, EtcdState, StateUnavailable
from control_plane.fleet.local_store import StateStore
from control_plane.fleet.registry import Entry, Registry, Source, config_entries
from control_plane.operator.tokens import TokenTable
from control_plane.plane import StartupError
from control_plane.plane.publisher import Publisher
from control_plane.tenants.keys import KeyTable

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a change is made again on top of another control plane's newer state before giving up
# (each try waits a little longer, at random, so two planes busy with changes take turns).
CONFLICT_RETRIES = 20
# How long an admin change waits for every Envoy to apply it (a key works everywhere when the
# answer comes) before answering with the Envoys that have not yet (`not_applied_by`).
ADMIN_ACK_TIMEOUT_S = 2.0


class StateKeeper:
    def __init__(self, publisher: Publisher, store: StateStore | None, plane_id: str, changing: asyncio.Lock,
                 on_leading: Callable[[bool], Awaitable[None]]):
        """`store`: the state file (None: nowhere, or etcd per the config's `state`); `changing`:
        held while a change is made; `on_leading`: told when this plane starts or stops leading."""
        self.publisher = publisher
        self.store = store
        # With state.etcd the state lives there, shared with the other control planes (not in the file).
        self.shared: EtcdState | None = None  # made at start
        self.revision = 0  # the shared state's revision this plane serves
        self.plane_id = plane_id
        self.leader = not publisher.config.state.etcd  # alone, a control plane leads
        self.registry = Registry.empty()
        self.keys = KeyTable()
        self.tokens = TokenTable()  # named admin tokens (control_plane/operator/tokens.py), kept with the keys
        self.changing = changing
        self._on_leading = on_leading

    @property
    def config(self) -> GatewayConfig:
        return self.publisher.config

    # -- at start, and the other planes ------------------------------------------------------------

    async def restore_saved(self) -> None:
        """The saved state (etcd's, else the state file's) into the registry and the keys."""
        try:
            if (etcd := self.config.state).etcd:
                password = None
                if etcd.etcd_password_env and not (password := os.environ.get(etcd.etcd_password_env)):
                    raise StartupError(f"state.etcd_password_env: the environment variable {etcd.etcd_password_env} "
                                       "is not set")
                self.shared = EtcdState(etcd.etcd, etcd.prefix, etcd.timeout_s, tls=etcd.etcd_tls, user=etcd.etcd_user,
                                        password=password)
                saved, self.revision = await self.shared.load()
            else:
                saved = self.store.load() if self.store is not None else None
            self._restore(saved)
        except StateUnavailable as error:
            raise StartupError(f"state.etcd: {error}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise StartupError(f"cannot restore state: {error}") from None

    def shared_tasks(self, envoys_here: Callable[[], int]) -> list[Coroutine]:
        """With state.etcd, what runs for as long as the plane does: following the other planes'
        changes, and this plane's presence (its Envoys' count, and leadership); none alone."""
        if self.shared is None:
            return []
        return [self.shared.follow(self.revision, self._on_shared_state),
                self.shared.presence(self.plane_id, self._leading, envoys_here)]

    def envoys_total(self) -> int | None:
        """The Envoys on every control plane, as last read (state.etcd); None when not known."""
        return None if self.shared is None else self.shared.envoys_total

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.step_down()
            await self.shared.close()

    def status(self) -> dict:
        return {"store": "etcd" if self.shared is not None else "file", "revision": self.revision,
                "leader": self.leader, "plane": self.plane_id}

    # -- publishing the config with the state ------------------------------------------------------

    async def apply(self, config: GatewayConfig) -> None:
        """Publishes `config` with the registry's runtime changes; on failure nothing changes."""
        previous = copy.deepcopy(self.registry)
        try:
            await self._publish(config)
        except Exception:
            self.registry = previous
            raise

    async def reload(self, config: GatewayConfig) -> None:
        """apply(), once no change is being made."""
        async with self.changing:
            await self.apply(config)

    async def _publish(self, config: GatewayConfig) -> None:
        """apply() without its rollback: for callers that hold their own copy (_change())."""
        self.registry.set_config(config_entries(config))
        await self.publisher.publish_config(config, self.registry)

    # -- runtime changes (the admin API, DNS discovery, finished drains) ---------------------------

    async def change(self, mutate: Callable[[Registry], None]) -> None:
        """Applies a registry change whole or not at all: saved durably, then published."""
        await self._change(lambda: mutate(self.registry))

    async def change_tokens(self, mutate: Callable[[TokenTable], T]) -> T:
        """The same for the named admin tokens (nothing an Envoy sees): returns what `mutate` returned."""
        return await self._change(lambda: mutate(self.tokens), publish=False)

    async def change_keys(self, mutate: Callable[[KeyTable], T]) -> tuple[T, list[str]]:
        """The same for the API keys: what `mutate` returned, once every responsive Envoy applied the
        change (so a secret handed out works at once) or ADMIN_ACK_TIMEOUT_S passed, and the node
        ids of the Envoys that had not applied it when the wait timed out (a lagging one is not waited
        for, and not named once it is lagging: /status names it)."""
        result = await self._change(lambda: mutate(self.keys))
        behind = await self.publisher.routes_not_applied(ADMIN_ACK_TIMEOUT_S)
        if behind:
            log.warning("a key change is not yet applied by %s after %.0f s", ", ".join(behind), ADMIN_ACK_TIMEOUT_S)
        return result, behind

    async def add_backend(self, entry: Entry) -> Entry:
        served = {m.name for m in self.publisher.fleet.models}

        def add(registry: Registry) -> None:
            registry.add(entry)
            registry.api_models += [m for m in entry.models if m not in served and m not in registry.api_models]

        await self.change(add)
        return self.registry.get(entry.id)

    async def on_dns_records(self, item, addresses: list[str]) -> None:
        """DNS discovery reports a name's records; they become registry changes here."""
        if plan_dns(self.registry, item, addresses, self.config.drain_timeout_s) is None:
            return
        log.info("DNS %s now has %s", item.name, addresses or "no records")

        def replan(registry: Registry) -> None:  # planned again on the state it is made on (state.etcd)
            if (change := plan_dns(registry, item, addresses, self.config.drain_timeout_s)) is not None:
                change(registry)
        await self.change(replan)

    async def expire_secrets(self) -> None:
        """Rotated-out key secrets stop working at the end of their grace (the leader drops them);
        without waiting for the Envoys' ACKs, as the loop must go on."""
        if self.leader and (ends := self.keys.next_expiry()) is not None and ends <= time.time():
            try:
                await self._change(lambda: self.keys.expire(time.time()))
            except Exception:
                log.exception("dropping expired key secrets failed; trying again next round")

    def saved_state(self) -> dict:
        return self.registry.to_json() | {"keys": self.keys.to_state(), "admin_tokens": self.tokens.to_state()}

    async def _change(self, mutate: Callable[[], T], publish: bool = True) -> T:
        """`publish`: the change reaches the Envoys (False: admin tokens, which no Envoy sees)."""
        async with self.changing:
            for attempt in range(CONFLICT_RETRIES):
                before = copy.deepcopy(self.registry), copy.deepcopy(self.keys), copy.deepcopy(self.tokens)
                change_id = uuid.uuid4().hex  # tells a write of ours whose answer was lost
                try:
                    result = mutate()
                    if self.shared is not None:
                        written = await self._save_shared(change_id)
                    elif self.store is not None:
                        await asyncio.to_thread(self.store.save, self.saved_state())
                    if publish:
                        await self._publish(self.config)
                    if self.shared is not None:
                        self.revision = written
                    return result
                except Conflict as newer:  # another control plane changed the state first: on top of theirs
                    self.registry, self.keys, self.tokens = before
                    await self._adopt(*newer.args)
                    await asyncio.sleep(random.uniform(0, 0.005 * attempt))
                except Exception:
                    saved = self.saved_state()
                    self.registry, self.keys, self.tokens = before
                    if self.shared is None and self.store is not None and saved != self.saved_state():
                        await asyncio.to_thread(self.store.save, self.saved_state())
                    raise
            raise StateUnavailable("the state kept changing on other control planes; try again")

    async def _save_shared(self, change_id: str) -> int:
        """Writes the changed state to etcd on the revision served; its new revision. A write whose
        answer was lost and that etcd took anyway (its change id is there) counts as done; any
        other Conflict carries the newer state and its revision, for the change to be made on."""
        try:
            return await self.shared.save(self.saved_state() | {"change": change_id}, self.revision)
        except Conflict:
            saved, revision = await self.shared.load()
            if saved is not None and saved.get("change") == change_id:
                return revision
            raise Conflict(saved, revision) from None

    # -- several control planes (state.etcd) -------------------------------------------------------

    def _restore(self, saved: dict | None) -> None:
        """The saved state into a fresh registry, key table and admin tokens (the config's backends join on publish)."""
        self.registry = Registry.empty()
        self.keys = KeyTable()
        self.tokens = TokenTable()
        if saved is not None:
            self.registry.restore(saved)
            self.keys = KeyTable.from_state(saved.get("keys", []))
            self.tokens = TokenTable.from_state(saved.get("admin_tokens", []))
            names = {item.name for item in self.config.discovery}
            for entry in [e for e in self.registry.entries() if e.source is Source.DNS and e.dns_name not in names]:
                self.registry.remove(entry.id)  # found under a name the config no longer lists

    async def _adopt(self, saved: dict | None, revision: int) -> bool:
        """Serves the shared state as another control plane left it (called holding `changing`);
        False when this plane already serves that revision or a newer one."""
        if revision <= self.revision:
            return False
        registry, keys, tokens = self.registry, self.keys, self.tokens
        try:
            self._restore(saved)
            await self._publish(self.config)
            self.revision = revision
        except Exception:
            self.registry, self.keys, self.tokens = registry, keys, tokens
            raise
        return True

    async def _on_shared_state(self, saved: dict, revision: int) -> None:
        async with self.changing:
            try:
                if await self._adopt(saved, revision):
                    log.info("state revision %d from another control plane applied", revision)
            except Exception:
                log.exception("state revision %d from another control plane could not be applied; trying again",
                              revision)
                raise

    async def _leading(self, leading: bool) -> None:
        """The leader alone runs DNS discovery, finishes drains and expires key secrets: each then
        happens once, written to the shared state for all."""
        self.leader = leading
        await self._on_leading(leading)
