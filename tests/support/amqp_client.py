"""The gateway's own AMQP side (``gateway.cluster.broker.GatewayBroker``), recording every frame for tests.

It has exactly what a gateway process has: its reply and heartbeat queues, wired by the gateway's
code with the gateway user's rights, and its publishing of ApiRequests (confirms, mandatory)
and Cancels. It files incoming frames per request and keeps every heartbeat, so worker tests can
await exactly the frames they expect.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Callable

from broker_config import topology
from broker_config.messages import AnyFrame, ApiRequest, Data, Error, Final, Heartbeat, ScalerHeartbeat
from gateway.cluster.broker import GatewayBroker, Subscription


class _HeartbeatLog:
    """Stands in for the gateway's worker registry: keeps every heartbeat, in arrival order."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.heartbeats: list[Heartbeat] = []
        self.scalers: list[ScalerHeartbeat] = []  # autoscalers' heartbeats
        self._on_change = on_change

    def update(self, hb: Heartbeat) -> None:
        self.heartbeats.append(hb)
        self._on_change()

    def update_scaler(self, hb: ScalerHeartbeat) -> None:
        self.scalers.append(hb)

    def listening(self) -> None:
        pass


class TestGatewayClient:
    __test__ = False  # not a pytest class

    def __init__(self, url: str, gateway_id: str | None = None) -> None:
        self._changed = asyncio.Event()
        self._beats = _HeartbeatLog(self._changed.set)
        self.broker = GatewayBroker(url, self._beats, gateway_id=gateway_id or f"test-{uuid.uuid4().hex[:8]}")
        self.user = self.broker.user  # like a gateway: its broker user names its queues
        self.reply_queue = self.broker.reply_queue_name
        self.heartbeats = self._beats.heartbeats
        self.frames: dict[str, list[AnyFrame]] = defaultdict(list)
        self._pumps: list[asyncio.Task] = []
        self._subscribed: set[str] = set()

    async def __aenter__(self) -> "TestGatewayClient":
        self.broker.start()
        await asyncio.wait_for(self.broker.ready.wait(), 60)
        return self

    async def __aexit__(self, *exc) -> None:
        for task in self._pumps:
            task.cancel()
        await self.broker.close()

    async def _pump(self, sub: Subscription) -> None:
        """File the frames of one request as the gateway routes them to it."""
        try:
            while True:
                frame = await sub.frames.get()  # (not inline: the key exists only once a frame came)
                self.frames[sub.request_id].append(frame)
                self._changed.set()
        finally:
            sub.close()

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0):
        """Wait until predicate() is truthy (re-checked on every incoming frame/heartbeat)."""
        async def _wait():
            while True:
                self._changed.clear()
                if result := predicate():
                    return result
                await self._changed.wait()

        return await asyncio.wait_for(_wait(), timeout)

    def request(self, model: str, *, kind: str = "chat", content: str = "Hello there, how are you?",
                stream: bool = True, **options) -> ApiRequest:
        """A chat (or completion) request as a gateway would publish it; ``options`` go into the
        OpenAI body (max_tokens, ignore_eos, ...)."""
        rid = f"req-{uuid.uuid4().hex[:12]}"
        body: dict = {"model": model, "stream": stream, **options}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": content}]
        else:
            body["prompt"] = content
        endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        return ApiRequest(request_id=rid, model=model, endpoint=endpoint, body=body, stream=stream,
                          reply_to=self.reply_queue)

    async def publish(self, req: ApiRequest, *, ttl: float | None = None,
                      priority: int = topology.INTERACTIVE_PRIORITY, prefer: str | None = None) -> ApiRequest:
        """Publish as the gateway does (confirmed, mandatory; ``prefer``: to that worker's affinity
        queue); its frames are filed from now on."""
        if req.request_id not in self._subscribed:
            self._subscribed.add(req.request_id)
            self._pumps.append(asyncio.create_task(self._pump(self.broker.subscribe(req.request_id))))
        await self.broker.publish_request(req, priority=priority, ttl=ttl, prefer=prefer)
        return req

    async def cancel(self, request_id: str, reason: str = "test") -> None:
        await self.broker.cancel(request_id, reason)

    def done(self, request_id: str, attempt: int | None = None) -> list[AnyFrame] | None:
        """The frames of a request once its final or error frame arrived (of that attempt)."""
        frames = self.frames.get(request_id, [])
        if attempt is not None:
            frames = [f for f in frames if f.attempt == attempt]
        if frames and isinstance(frames[-1], (Final, Error)):
            return list(frames)
        return None

    async def result(self, request_id: str, timeout: float = 60.0, attempt: int | None = None) -> list[AnyFrame]:
        return await self.wait_for(lambda: self.done(request_id, attempt), timeout)

    async def generate(self, req: ApiRequest, timeout: float = 60.0) -> list[AnyFrame]:
        await self.publish(req)
        return await self.result(req.request_id, timeout)

    def last_heartbeat(self, worker_id: str) -> Heartbeat | None:
        for hb in reversed(self.heartbeats):
            if hb.worker_id == worker_id:
                return hb
        return None

    async def heartbeat_where(self, worker_id: str, pred: Callable[[Heartbeat], bool],
                              timeout: float = 30.0, since: float | None = None) -> Heartbeat:
        since = since if since is not None else 0.0

        def find():
            for hb in reversed(self.heartbeats):
                if hb.worker_id == worker_id and hb.sent_at >= since and pred(hb):
                    return hb
            return None

        return await self.wait_for(find, timeout)


def sse_chunks(frames: list[AnyFrame]) -> list[dict]:
    """The OpenAI chunks of a streamed answer's data frames (without the closing [DONE])."""
    import json

    text = "".join(f.data for f in frames if isinstance(f, Data))
    return [json.loads(event[len("data: "):]) for event in text.split("\n\n")
            if event.startswith("data: ") and event != "data: [DONE]"]


def streamed_text(frames: list[AnyFrame]) -> str:
    """The concatenated content of a streamed chat (or completion) answer's chunks."""
    out = []
    for chunk in sse_chunks(frames):
        for choice in chunk.get("choices", []):
            out.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(out)


def final_body(frames: list[AnyFrame]) -> dict:
    """The whole response of a non-streamed answer."""
    import json

    final = next(f for f in frames if isinstance(f, Final))
    return json.loads(final.body or "null")
