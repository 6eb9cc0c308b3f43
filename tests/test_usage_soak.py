"""Nothing lost: in a soak with an engine, a control plane (stopped) and an Envoy (drained, then
stopped) restarted while clients send clips, /usage bills exactly what the clients were served.
(A control plane killed outright loses what it metered since its last write, up to 5 s: not
tested here; docs/operations.md, Usage for billing.)"""

from __future__ import annotations

import asyncio
import http.client
import threading

import aiohttp
import pytest

from control_plane.supervisor import drain_envoy
from harness.processes import Envoy, GatewayStack, start_engine, transcribe, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

MODEL = "whisper-large-v3-turbo"
CLIP_S = 0.5


class Clients:
    """Threads sending CLIP_S clips with a key until stopped; each counts what it was answered."""

    def __init__(self, url: str, secret: str, threads: int = 3):
        self.url, self.secret = url, secret
        self.served, self.answered, self.lock, self.done = 0, {}, threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                status = transcribe(self.url, MODEL, seconds=CLIP_S, headers={"Authorization": f"Bearer {self.secret}"}).status
            except (OSError, http.client.HTTPException):  # refused while the Envoy restarts: never metered
                status = 0
            with self.lock:
                self.answered[status] = self.answered.get(status, 0) + 1
            if status != 200:
                self.done.wait(0.05)

    def count(self, status: int = 200) -> int:
        with self.lock:
            return self.answered.get(status, 0)

    def more(self, n: int = 30) -> None:
        """Waits until n more clips were served."""
        start = self.count()
        wait_until(lambda: self.count() >= start + n, 20, f"{n} more clips served")

    def stop(self) -> dict[int, int]:
        self.done.set()
        for thread in self.threads:
            thread.join(30)
        return dict(self.answered)


def billed(stack, key_id: str) -> tuple[int, float]:
    rows = [r for r in stack.admin.call("GET", f"/usage?key={key_id}").json()["data"]]
    return sum(r["requests"] for r in rows), round(sum(r["audio_served_s"] for r in rows), 3)


def test_usage_equals_what_clients_were_served_across_engine_plane_and_envoy_restarts(tmp_path):
    engines = [start_engine(tmp_path, MODEL, name, time_scale=0.0001) for name in ("s1", "s2")]
    stack = GatewayStack(tmp_path, MODEL, [url for _, url in engines], auth={"api_keys": "required"}, workers=2)
    clients = None
    try:
        key = stack.admin.call("POST", "/keys", {"name": "soak"}).json()
        clients = Clients(stack.envoy.url, key["secret"])
        clients.more()
        for round_ in range(2):
            # an engine restarted: its requests in flight fail (or go to the other), none is lost
            process, url = engines[0]
            process.stop()
            engines[0] = start_engine(tmp_path, MODEL, f"s1-{round_}", port=int(url.rsplit(":", 1)[1]), time_scale=0.0001)
            clients.more()
            # the control plane stopped and started: Envoy keeps the entries it logs meanwhile
            stack.restart_plane()
            clients.more()
            # the Envoy drained (its last entries sent), stopped and started on the same ports
            async def drain() -> bool:
                async with aiohttp.ClientSession() as session:
                    return await drain_envoy(session, stack.envoy.admin, 20)
            asyncio.run(drain())  # False past its deadline: the count below says what that lost
            stack.envoy.stop()
            stack.envoy = Envoy(tmp_path, stack.raw, name=f"envoy-again-{round_}", node_id="envoy", workers=2)
            stack.envoy.wait_serving()
            clients.more()
        answered = clients.stop()
        served = answered.get(200, 0)
        gateway_answers = sum(n for status, n in answered.items() if status != 0)
        try:
            wait_until(lambda: billed(stack, key["id"])[1] >= round(served * CLIP_S, 3), 15, "the last entries metered")
        except AssertionError:
            raise AssertionError(f"answers {answered}: {round(served * CLIP_S, 3)} s served; billed (requests, "
                                 f"seconds) {billed(stack, key['id'])}") from None
        requests, seconds = billed(stack, key["id"])
        assert seconds == round(served * CLIP_S, 3), (answered, requests, seconds)
        assert requests == gateway_answers, (answered, requests, seconds)
    finally:
        if clients is not None:
            clients.stop()
        stack.stop()
        for process, _ in engines:
            process.stop()
