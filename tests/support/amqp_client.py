"""A minimal stand-in for the gateway's AMQP side, with the gateway user's rights only.

It publishes GenerateRequests and Cancels, owns an exclusive reply queue bound to the replies
exchange and a heartbeat queue bound to the workers fanout, and sorts incoming frames per
request, so worker tests can await exactly the frames they expect.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from broker_config import topology
from broker_config.connection import user_of
from broker_config.messages import (
    CONTENT_TYPE,
    Cancel,
    Delta,
    Error,
    Final,
    GenerateRequest,
    Heartbeat,
    Started,
    decode_frames,
)

AnyFrame = Started | Delta | Final | Error


class TestGatewayClient:
    __test__ = False  # not a pytest class

    def __init__(self, url: str, gateway_id: str | None = None) -> None:
        self.url = url
        self.gateway_id = gateway_id or f"test-{uuid.uuid4().hex[:8]}"
        self.user = user_of(url)  # like a gateway: its broker user names its queues
        self.reply_queue = topology.gateway_reply_queue(self.user, self.gateway_id)
        self.frames: dict[str, list[AnyFrame]] = defaultdict(list)
        self.heartbeats: list[Heartbeat] = []
        self._cond: asyncio.Condition | None = None
        self._conn = None
        self._channel = None

    async def __aenter__(self) -> "TestGatewayClient":
        self._cond = asyncio.Condition()
        self._conn = await aio_pika.connect_robust(self.url)
        self._channel = await self._conn.channel(publisher_confirms=True)
        replies = await self._channel.declare_queue(self.reply_queue, exclusive=True, auto_delete=True)
        await replies.bind(topology.REPLIES_EXCHANGE, routing_key=self.reply_queue)
        await replies.consume(self._on_reply, no_ack=True)
        beats = await self._channel.declare_queue(topology.gateway_workers_queue(self.user, self.gateway_id),
                                                  exclusive=True, auto_delete=True)
        await beats.bind(topology.WORKERS_EXCHANGE, routing_key="")
        await beats.consume(self._on_heartbeat, no_ack=True)
        self._requests = await self._channel.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
        self._control = await self._channel.get_exchange(topology.CONTROL_EXCHANGE, ensure=False)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._conn.close()

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        for frame in decode_frames(message.body):
            self.frames[frame.request_id].append(frame)
        await self._notify()

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        self.heartbeats.append(Heartbeat.model_validate_json(message.body))
        await self._notify()

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0):
        """Wait until predicate() is truthy (re-checked on every incoming frame/heartbeat)."""
        async def _wait():
            async with self._cond:
                while not (result := predicate()):
                    await self._cond.wait()
                return result

        return await asyncio.wait_for(_wait(), timeout)

    def request(self, model: str, *, kind: str = "chat", content: str = "Hello there, how are you?",
                stream: bool = True, **sampling) -> GenerateRequest:
        rid = f"req-{uuid.uuid4().hex[:12]}"
        body: dict = dict(request_id=rid, model=model, kind=kind, stream=stream, reply_to=self.reply_queue,
                          sampling=sampling)
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": content}]
        else:
            body["prompt"] = content
        return GenerateRequest.model_validate(body)

    async def publish(self, req: GenerateRequest, *, ttl: float | None = None,
                      priority: int = topology.INTERACTIVE_PRIORITY) -> GenerateRequest:
        msg = aio_pika.Message(req.encode(), content_type=CONTENT_TYPE, priority=priority,
                               expiration=ttl, message_id=req.request_id, user_id=self.user)
        await self._requests.publish(msg, routing_key=req.model)
        return req

    async def cancel(self, request_id: str) -> None:
        msg = aio_pika.Message(Cancel(request_id=request_id).encode(), content_type=CONTENT_TYPE, user_id=self.user)
        await self._control.publish(msg, routing_key="", mandatory=False)

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

    async def generate(self, req: GenerateRequest, timeout: float = 60.0) -> list[AnyFrame]:
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


def now() -> float:
    return time.time()
