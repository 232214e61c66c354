"""The worker's request ladder, without broker or engine: how each attempt ends and is settled.

An answer is acked after its final frame; drain and a dead engine give the message back; a lost
delivery sends nothing more and settles nothing; an unexpected error sends an error frame and
acks. The slow suites prove the same across a real broker; these pin each end of the ladder.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from broker_config.messages import Error, Final, Started
from gpu_worker.consumer import Consumer
from gpu_worker.engine import EngineDead
from test_reply_frames import RecordingPublisher, next_turns, request


class Message:
    """A delivered message: records how it was settled; its channel can be lost."""

    def __init__(self, body: bytes) -> None:
        self.body, self.redelivered, self.message_id, self.user_id = body, False, "m1", "gw"
        self.settled: list[str] = []
        self.lost = False

    @property
    def channel(self) -> object:
        if self.lost:
            raise RuntimeError("channel closed")
        return object()

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject requeue={requeue}")


class Engine:
    """Answers with one JSON body, after ``before`` (which may raise or change the job)."""

    max_num_seqs = 4

    def __init__(self, before=lambda consumer: None) -> None:
        self.before, self.consumer, self.aborted = before, None, []

    async def handle(self, req, sink, count) -> None:
        self.before(self.consumer)
        sink.start(200, [(b"content-type", b"application/json")])
        await sink.body(b"{}", False)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


async def answer(engine: Engine, message: Message | None = None) -> tuple[Message, list, list]:
    """One delivery through the consumer, to its end; the message, the frames sent, fatal errors."""
    pub, fatal = RecordingPublisher(), []
    settings = SimpleNamespace(worker_id="w1", coalesce_ms=20.0, coalesce_tokens=16, stream_when_idle=True,
                               cancel_memory=60.0)
    consumer = Consumer(settings, engine, pub, on_fatal=fatal.append)  # type: ignore[arg-type]
    engine.consumer = consumer
    consumer.accepting = True
    message = message or Message(request(stream=False).encode())
    await consumer._on_message(message)  # type: ignore[arg-type]
    await asyncio.gather(*(j.task for j in consumer.jobs.values() if j.task))
    await next_turns()
    assert not consumer.jobs and consumer.completed == 1
    return message, [type(f) for f in pub.frames], fatal


def _drain_timed_out(consumer: Consumer) -> None:
    consumer.jobs["r1"].requeue = True


def _engine_died(consumer: Consumer) -> None:
    raise EngineDead("the engine core died")


def _bug(consumer: Consumer) -> None:
    raise RuntimeError("a bug")


async def test_an_answer_is_acked_after_its_final_frame():
    message, frames, fatal = await answer(Engine())
    assert frames == [Started, Final] and message.settled == ["ack"] and not fatal


async def test_drain_gives_the_message_back_without_a_final_frame():
    message, frames, fatal = await answer(Engine(_drain_timed_out))
    assert frames == [Started] and message.settled == ["reject requeue=True"] and not fatal


async def test_a_dead_engine_gives_the_message_back_and_stops_the_worker():
    message, frames, fatal = await answer(Engine(_engine_died))
    assert frames == [Started] and message.settled == ["reject requeue=True"]
    assert [type(e) for e in fatal] == [EngineDead]


async def test_a_lost_delivery_sends_and_settles_nothing_more():
    message = Message(request(stream=False).encode())

    def lose(consumer: Consumer) -> None:
        message.lost = True

    message, frames, _ = await answer(Engine(lose), message)
    assert frames == [Started] and message.settled == []


async def test_an_unexpected_error_sends_an_error_frame_then_acks():
    message, frames, fatal = await answer(Engine(_bug))
    assert frames == [Started, Error] and message.settled == ["ack"] and not fatal


async def test_an_unexpected_error_after_a_lost_delivery_sends_nothing():
    message = Message(request(stream=False).encode())

    def lose_then_fail(consumer: Consumer) -> None:
        message.lost = True
        raise RuntimeError("the channel went with the connection")

    engine = Engine(lose_then_fail)
    message, frames, _ = await answer(engine, message)
    assert frames == [Started] and message.settled == [] and engine.aborted == ["r1"]
