"""The worker's reply-frame rules, deterministic: coalescing, bundling, sequence numbers.

The end-to-end suites prove frames cross a real broker; how many messages a stream becomes
depends on how fast the machine is, so the rule itself is pinned here with a clock the test
moves and a publisher that records what would be sent.
"""

from __future__ import annotations

import asyncio

from broker_config.messages import Delta, Final, GenerateRequest, SamplingParams, Started, decode_frames
from gpu_worker.engine import ChoiceDelta, Step
from gpu_worker.replies import ReplyStream
from support.waiting import wait_until


class RecordingPublisher:
    """Keeps each message's frames, in hand-over order."""

    def __init__(self) -> None:
        self.messages: list[list] = []

    def send(self, req: GenerateRequest, body: bytes) -> asyncio.Future:
        self.messages.append(decode_frames(body))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    @property
    def frames(self) -> list:
        return [f for m in self.messages for f in m]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(stream: bool = True, batch_id: str | None = None) -> GenerateRequest:
    return GenerateRequest(request_id="r1", model="m", kind="chat", reply_to="gw", stream=stream,
                           batch_id=batch_id, sampling=SamplingParams(max_tokens=64))


def token_step(i: int, finished: bool = False) -> Step:
    return Step(prompt_tokens=7, finished=finished,
                choices=[ChoiceDelta(index=0, text=f"t{i} ", tokens=1,
                                     finish_reason="length" if finished else None)])


async def run_stream(stream: ReplyStream, steps: int, clock: Clock | None = None, tick: float = 0.0) -> None:
    await stream.started(7)
    for i in range(steps):
        if clock is not None:
            clock.now += tick
        await stream.add(token_step(i, finished=i == steps - 1))
    await stream.final(1)


def assert_sequenced(frames: list) -> None:
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert isinstance(frames[0], Started) and isinstance(frames[-1], Final)


async def test_started_travels_with_the_first_delta_and_the_tail_with_the_final():
    pub, clock = RecordingPublisher(), Clock()
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=10_000, coalesce_tokens=16, clock=clock)
    await run_stream(stream, 64, clock)
    stream.cancel_timer()
    first, *middle, last = pub.messages
    assert [type(f) for f in first] == [Started, Delta] and first[1].tokens == 1  # first token at once
    assert all(len(m) == 1 and m[0].tokens == 16 for m in middle)  # then every 16 tokens
    assert [type(f) for f in last] == [Delta, Final]
    deltas = [f for f in pub.frames if isinstance(f, Delta)]
    assert [d.tokens for d in deltas] == [1, 16, 16, 16, 15]
    assert "".join(d.text for d in deltas) == "".join(f"t{i} " for i in range(64))
    assert_sequenced(pub.frames)
    assert pub.frames[-1].usage.completion_tokens == 64 and pub.frames[-1].usage.prompt_tokens == 7
    assert stream.messages_sent == len(pub.messages) == 5


async def test_the_interval_flushes_when_tokens_come_slowly():
    pub, clock = RecordingPublisher(), Clock()
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=20, coalesce_tokens=16, clock=clock)
    await run_stream(stream, 10, clock, tick=0.025)  # each token 25 ms after the last: over the interval
    deltas = [f for f in pub.frames if isinstance(f, Delta)]
    assert [d.tokens for d in deltas] == [1] * 10
    assert_sequenced(pub.frames)


async def test_a_pending_tail_is_flushed_by_the_timer():
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=5, coalesce_tokens=16)
    await stream.started(7)
    await stream.add(token_step(0))  # first delta: at once
    await stream.add(token_step(1))  # within the interval: waits for the timer
    assert [d.tokens for d in pub.frames if isinstance(d, Delta)] == [1]
    await wait_until(lambda: len([f for f in pub.frames if isinstance(f, Delta)]) == 2, timeout=10,
                     what="the timer's flush")
    assert_sequenced(pub.frames + [Final(request_id="r1", seq=len(pub.frames), choices=[], usage={})])


async def test_non_streamed_requests_get_started_then_one_final_with_the_text():
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(stream=False), 1, "w1")
    await run_stream(stream, 5)
    assert [[type(f) for f in m] for m in pub.messages] == [[Started], [Final]]
    assert pub.frames[-1].choices[0].text == "t0 t1 t2 t3 t4 "


async def test_batch_results_are_one_frame_per_message():
    pub, clock = RecordingPublisher(), Clock()
    stream = ReplyStream(pub, request(stream=True, batch_id="batch_1"), 1, "w1", coalesce_ms=10_000,
                         coalesce_tokens=4, clock=clock)
    await run_stream(stream, 9, clock)
    stream.cancel_timer()
    assert all(len(m) == 1 for m in pub.messages)
    assert_sequenced(pub.frames)


async def test_an_error_after_started_goes_out_with_it():
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(), 1, "w1")
    await stream.started(0)
    await stream.error(400, "invalid_request_error", "bad")
    assert [[f.type for f in m] for m in pub.messages] == [["started", "error"]]
