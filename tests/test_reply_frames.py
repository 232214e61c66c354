"""The worker's reply-frame rules, deterministic: coalescing, bundling, sequence numbers.

The end-to-end suites prove frames cross a real broker; how many messages a stream becomes
depends on how fast the machine is, so the rule itself is pinned here with a clock the test
moves and the real ``ReplyPublisher`` on an exchange that records what would be sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aio_pika

import json

from broker_config.messages import (ApiRequest, Data, Final, Head, Started, decode_frames, decode_frames_leniently,
                                     encode_frames)
from gpu_worker.replies import ReplyPublisher, ReplyStream
from support.waiting import wait_until


@dataclass
class Published:
    body: bytes
    delivery_mode: int


class RecordingExchange:
    """Stands where the broker's replies exchange (and its channel) would be; keeps what is published."""

    name = "chatai.replies"

    def __init__(self, loaded: bool = False) -> None:
        self.channel = self
        self.published: list[tuple[str, Published]] = []
        # A loaded path: the broker confirms nothing until the test says so.
        self.confirms = asyncio.Event()
        if not loaded:
            self.confirms.set()

    async def get_underlay_channel(self) -> "RecordingExchange":
        return self

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str, properties, mandatory: bool,
                            timeout: float | None = None, wait: bool = True) -> None:
        assert exchange == self.name
        self.published.append((routing_key, Published(body, properties.delivery_mode)))
        await self.confirms.wait()


class RecordingPublisher(ReplyPublisher):
    """The real publisher; its messages decoded, in publish order. ``loaded``: its confirms are
    held (``confirm_all`` lets them come), so the streams coalesce by their window."""

    def __init__(self, loaded: bool = False) -> None:
        self.exchange = RecordingExchange(loaded)
        super().__init__(self.exchange)  # type: ignore[arg-type]

    def confirm_all(self) -> None:
        self.exchange.confirms.set()

    @property
    def messages(self) -> list[list]:
        return [decode_frames(m.body) for _, m in self.exchange.published]

    @property
    def frames(self) -> list:
        return [f for m in self.messages for f in m]


async def next_turns(n: int = 3) -> None:
    """Let the event loop turn: bundles flush at the end of a turn, publishes run in the next."""
    for _ in range(n):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(stream: bool = True, batch_id: str | None = None, request_id: str = "r1",
            reply_to: str = "gw") -> ApiRequest:
    return ApiRequest(request_id=request_id, model="m", endpoint="/v1/chat/completions", reply_to=reply_to,
                      stream=stream, batch_id=batch_id, body={"model": "m", "messages": [], "stream": stream})


SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]


def event(i: int) -> bytes:
    return b'data: {"t":"t%d "}\n\n' % i


async def token_step(stream: ReplyStream, i: int) -> None:
    """One engine step as vLLM's layer shows it: the engine counted a token, then its event is sent."""
    stream.count.prompt["e"] = 7
    stream.count.output[("e", 0)] = i + 1
    await stream.body(event(i), True)


async def run_stream(stream: ReplyStream, steps: int, clock: Clock | None = None, tick: float = 0.0) -> None:
    """Engine steps as a real engine gives them: one per turn of the event loop."""
    await stream.started()
    stream.start(200, SSE)
    for i in range(steps):
        if clock is not None:
            clock.now += tick
        await token_step(stream, i)
        await next_turns()
    await stream.body(b"data: [DONE]\n\n", False)
    if isinstance(stream._pub, RecordingPublisher):
        stream._pub.confirm_all()  # the final frame is awaited until confirmed
    await stream.final()


def assert_sequenced(frames: list) -> None:
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert isinstance(frames[0], Started) and isinstance(frames[-1], Final)


async def test_started_the_head_and_the_first_data_travel_together_and_the_tail_with_the_final():
    pub, clock = RecordingPublisher(loaded=True), Clock()
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=10_000, coalesce_tokens=16, clock=clock)
    await run_stream(stream, 64, clock)
    stream.cancel_timer()
    first, *middle, last = pub.messages  # started leaves at once: in the same turn as the first token
    assert [type(f) for f in first] == [Started, Head, Data] and first[2].tokens == 1  # first token at once
    assert first[1].status == 200 and first[1].content_type == "text/event-stream"
    assert all(len(m) == 1 and m[0].tokens == 16 for m in middle)  # then every 16 tokens
    assert [type(f) for f in last] == [Data, Final]
    data = [f for f in pub.frames if isinstance(f, Data)]
    assert [d.tokens for d in data] == [1, 16, 16, 16, 15]
    assert "".join(d.data for d in data) == "".join(event(i).decode() for i in range(64)) + "data: [DONE]\n\n"
    assert_sequenced(pub.frames)
    final = pub.frames[-1]
    assert final.usage.completion_tokens == 64 and final.usage.prompt_tokens == 7 and final.body is None
    assert stream.handovers == len(pub.messages) + 1 == 6  # started and the first data: one message


async def test_the_interval_flushes_when_tokens_come_slowly():
    pub, clock = RecordingPublisher(loaded=True), Clock()
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=20, coalesce_tokens=16, clock=clock)
    await run_stream(stream, 10, clock, tick=0.025)  # each token 25 ms after the last: over the interval
    data = [f for f in pub.frames if isinstance(f, Data)]
    assert [d.tokens for d in data] == [1] * 10 + [0]  # the last one: the closing [DONE]
    assert_sequenced(pub.frames)


async def test_a_pending_tail_is_flushed_by_the_timer():
    pub = RecordingPublisher(loaded=True)
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=5, coalesce_tokens=16)
    await stream.started()
    stream.start(200, SSE)
    await token_step(stream, 0)  # first data: at once
    await next_turns()
    await token_step(stream, 1)  # within the interval: waits for the timer
    await next_turns()
    assert [d.tokens for d in pub.frames if isinstance(d, Data)] == [1]
    await wait_until(lambda: len([f for f in pub.frames if isinstance(f, Data)]) == 2, timeout=10,
                     what="the timer's flush")
    assert_sequenced(pub.frames + [Final(request_id="r1", seq=len(pub.frames))])


async def test_an_idle_path_streams_each_token_as_it_comes_and_a_loaded_one_coalesces():
    """The window is for load: while every earlier message is confirmed, a token leaves at once
    (vLLM's server sends each as it comes); while a confirm is outstanding, tokens wait for the
    window, and the next after the confirm goes at once again."""
    pub, clock = RecordingPublisher(), Clock()
    stream = ReplyStream(pub, request(), 1, "w1", coalesce_ms=10_000, coalesce_tokens=16, clock=clock)
    await stream.started()
    stream.start(200, SSE)
    for i in range(5):  # idle: confirms come at once
        await token_step(stream, i)
        await next_turns()
    assert [d.tokens for d in pub.frames if isinstance(d, Data)] == [1, 1, 1, 1, 1]
    pub.exchange.confirms.clear()  # the broker falls behind: the next message stays unconfirmed
    for i in range(5, 10):
        await token_step(stream, i)
        await next_turns()
    assert [d.tokens for d in pub.frames if isinstance(d, Data)] == [1] * 6  # one sent, four waiting
    pub.confirm_all()
    await next_turns()
    await token_step(stream, 10)  # the path is idle again: the waiting four and this one, at once
    await next_turns()
    assert [d.tokens for d in pub.frames if isinstance(d, Data)] == [1] * 6 + [5]
    stream.cancel_timer()
    assert_sequenced(pub.frames + [Final(request_id="r1", seq=len(pub.frames))])

    always = RecordingPublisher()  # --no-stream-when-idle: the window, idle or not
    stream = ReplyStream(always, request(), 1, "w1", coalesce_ms=10_000, coalesce_tokens=4, stream_when_idle=False,
                         clock=clock)
    await run_stream(stream, 9, clock)
    assert [d.tokens for d in always.frames if isinstance(d, Data)] == [1, 4, 4, 0]  # 0: the closing [DONE]


async def test_a_whole_response_travels_in_the_final_frame_with_its_status():
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(stream=False), 1, "w1")
    await stream.started()
    stream.start(200, JSON)
    stream.count.output[("e", 0)] = 5
    await stream.body(b'{"choices": []}', False)
    await stream.final()
    assert [[type(f) for f in m] for m in pub.messages] == [[Started, Final]]  # one turn: one message
    final = pub.frames[-1]
    assert (final.status, final.body, final.content_type) == (200, '{"choices": []}', "application/json")
    assert final.usage.completion_tokens == 5


async def test_a_refusal_of_a_streamed_request_is_a_whole_response_with_its_status():
    """vLLM refuses a bad streamed request with a JSON error, not a stream: no head is sent."""
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(stream=True), 1, "w1")
    await stream.started()
    stream.start(400, JSON)
    error = {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}
    await stream.body(json.dumps(error).encode(), False)
    await stream.final()
    assert [type(f) for f in pub.frames] == [Started, Final]
    assert pub.frames[-1].status == 400 and json.loads(pub.frames[-1].body) == error


async def test_a_framework_404_is_put_into_the_openai_error_format():
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(stream=False), 1, "w1")
    stream.start(404, JSON)
    await stream.body(b'{"detail":"Not Found"}', False)
    await stream.final()
    body = json.loads(pub.frames[-1].body)
    assert pub.frames[-1].status == 404 and "does not serve this endpoint" in body["error"]["message"]


async def test_batch_results_are_one_frame_per_message():
    pub, clock = RecordingPublisher(), Clock()
    stream = ReplyStream(pub, request(stream=True, batch_id="batch_1"), 1, "w1", coalesce_ms=10_000,
                         coalesce_tokens=4, clock=clock)
    await run_stream(stream, 9, clock)
    stream.cancel_timer()
    assert all(len(m) == 1 for m in pub.messages)
    assert_sequenced(pub.frames)


async def test_an_error_after_started_goes_out_in_order():
    pub = RecordingPublisher()
    stream = ReplyStream(pub, request(), 1, "w1")
    await stream.started()
    await stream.error(500, "internal_error", "bad")
    assert [f.type for f in pub.frames] == ["started", "error"]


async def test_a_lost_delivery_stops_the_attempt_and_ships_nothing_more():
    pub, lost, aborted = RecordingPublisher(), [False], []
    stream = ReplyStream(pub, request(), 1, "w1", delivery_lost=lambda: lost[0], on_lost=lambda: aborted.append(1))
    await stream.started()
    stream.start(200, SSE)
    await token_step(stream, 0)
    lost[0] = True
    await token_step(stream, 1)
    await next_turns()
    assert stream.lost and aborted == [1]
    assert [f.type for f in pub.frames] == ["started", "head", "data"]


async def test_frames_of_several_requests_ready_in_one_turn_travel_as_one_message_per_gateway():
    pub = RecordingPublisher()
    streams = [ReplyStream(pub, request(request_id=f"r{i}", reply_to=gw), 1, "w1")
               for i, gw in enumerate(["gw-a", "gw-a", "gw-b", "gw-a"])]
    for s in streams:  # one engine step: every running request gets its first token
        await s.started()
        s.start(200, SSE)
        await token_step(s, 0)
    await next_turns()
    assert [key for key, _ in pub.exchange.published] == ["gw-a", "gw-b"]
    by_gateway = dict(zip(["gw-a", "gw-b"], pub.messages))
    assert [(f.request_id, f.type) for f in by_gateway["gw-a"]] == [
        ("r0", "started"), ("r0", "head"), ("r0", "data"), ("r1", "started"), ("r1", "head"), ("r1", "data"),
        ("r3", "started"), ("r3", "head"), ("r3", "data")]
    assert [(f.request_id, f.type) for f in by_gateway["gw-b"]] == [("r2", "started"), ("r2", "head"), ("r2", "data")]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT for _, m in pub.exchange.published)
    for s in streams:  # each final is awaited until its bundle is confirmed
        s.cancel_timer()
    await asyncio.wait_for(asyncio.gather(*(s.final() for s in streams)), 10)
    assert len(pub.exchange.published) == 4  # one more message per gateway for all the finals
    finals = [f for f in pub.frames if isinstance(f, Final)]
    assert sorted(f.request_id for f in finals) == ["r0", "r1", "r2", "r3"]


async def test_batch_results_are_persistent_and_never_bundled_with_other_requests():
    pub = RecordingPublisher()
    a = ReplyStream(pub, request(stream=False, batch_id="batch_1", request_id="b1"), 1, "w1")
    b = ReplyStream(pub, request(stream=False, batch_id="batch_1", request_id="b2"), 1, "w1")
    await a.started()
    await b.started()
    await asyncio.wait_for(asyncio.gather(a.final(), b.final()), 10)
    assert all(len(m) == 1 for m in pub.messages) and len(pub.messages) == 4
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for _, m in pub.exchange.published)


def test_one_malformed_frame_of_a_bundle_does_not_take_the_other_requests_frames_with_it():
    good = [Started(request_id="r1", seq=0, worker_id="w1"),
            Data(request_id="r2", seq=1, data="data: {}\n\n", tokens=1)]
    bundle = b"[" + good[0].encode() + b',{"type":"data","request_id":"r3"},' + good[1].encode() + b"]"
    frames, malformed = decode_frames_leniently(bundle)
    assert [(f.request_id, f.type) for f in frames] == [("r1", "started"), ("r2", "data")]
    assert malformed == 1
    assert decode_frames_leniently(b"not json") == ([], 1)
    assert decode_frames_leniently(encode_frames(good)) == (good, 0)
