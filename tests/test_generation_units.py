"""The wire protocol's rules as the gateway applies them (``gateway/cluster/generation.py``), in memory.

``Generation`` talks to the broker only through ``BrokerPort``; here an in-memory implementation
of that port plays the broker and the worker: it delivers scripted frames, says which workers
live, and records cancellations. The same rules run end to end against RabbitMQ and vLLM in
``test_gateway_e2e.py`` and ``test_worker.py``; these tests reach the cases a real worker only
shows by accident (duplicates, stale attempts, a worker vanishing at a chosen moment).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from broker_config.messages import ApiRequest, Data, Error, Final, Head, Started, Usage
from broker_config.timing import await_until
from gateway.cluster.broker_port import BrokerPort, Subscription
from gateway.cluster.errors import ClusterError, ClusterUnavailable, ModelNotFound, ModelNotLoaded, NoWorkerAvailable, QueueFull
from gateway.cluster.errors import ClusterOverloaded, WorkerFailed, WorkerLost, WorkerTimeout
from gateway.errors import to_api_error
from gateway.cluster.generation import Generation, Timeouts

Script = Callable[[str], list]


class InMemoryBroker:
    """A ``BrokerPort``: publishing queues the scripted frames for the request, at once."""

    reply_queue_name = "chatai.gw.test.replies"

    def __init__(self, script: Script = lambda rid: [], refuse: ClusterError | None = None) -> None:
        self.script, self.refuse = script, refuse
        self.connected = True
        self.alive: set[str] = {"w1", "w2"}
        self.published: list[ApiRequest] = []
        self.cancelled: list[tuple[str, str]] = []
        self.subscriptions: dict[str, Subscription] = {}

    def subscribe(self, request_id: str) -> Subscription:
        sub = Subscription(request_id, lambda rid: self.subscriptions.pop(rid, None))
        self.subscriptions[request_id] = sub
        return sub

    async def publish_request(self, request: ApiRequest, *, priority: int, ttl: float | None,
                              persistent: bool = False, prefer: str | None = None) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.published.append(request)
        for frame in self.script(request.request_id):
            self.deliver(frame)

    def deliver(self, frame: object) -> None:
        for sub in self.subscriptions.values():
            sub.frames.put_nowait(frame)

    async def cancel(self, request_id: str, reason: str) -> None:
        self.cancelled.append((request_id, reason))

    def worker_alive(self, worker_id: str) -> bool:
        return worker_id in self.alive


def _port(broker: InMemoryBroker) -> BrokerPort:
    return broker  # checked by the type checker: the in-memory broker is a BrokerPort


def started(rid: str, attempt: int = 1, worker: str = "w1") -> Started:
    return Started(request_id=rid, attempt=attempt, seq=0, worker_id=worker)


def delta(rid: str, seq: int, text: str = "tok", attempt: int = 1, tokens: int = 1) -> Data:
    return Data(request_id=rid, attempt=attempt, seq=seq, data=text, tokens=tokens)


def head(rid: str, seq: int, attempt: int = 1) -> Head:
    return Head(request_id=rid, attempt=attempt, seq=seq)


def final(rid: str, seq: int, attempt: int = 1) -> Final:
    return Final(request_id=rid, attempt=attempt, seq=seq,
                 usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))


def generation(broker: InMemoryBroker, queue: float = 30.0, idle: float = 30.0) -> Generation:
    return Generation.build(_port(broker), Timeouts(queue=queue, idle=idle, liveness=0.01), model="tiny",
                            endpoint="/v1/completions", body={"model": "tiny", "prompt": "hi", "stream": True},
                            stream=True)


async def collect(gen: Generation) -> list:
    return [frame async for frame in gen.frames()]


async def test_frames_pass_in_order_and_the_outcome_is_recorded():
    broker = InMemoryBroker(lambda rid: [started(rid), delta(rid, 1, "a", tokens=2), delta(rid, 2, "b"),
                                         final(rid, 3)])
    gen = generation(broker)
    frames = await collect(gen)
    assert [type(f).__name__ for f in frames] == ["Started", "Data", "Data", "Final"]
    assert [f.data for f in frames if isinstance(f, Data)] == ["a", "b"]
    assert gen.outcome.streamed_tokens == 3 and gen.outcome.worker_id == "w1" and gen.outcome.attempts == [1]
    assert gen.outcome.final is frames[-1]
    assert broker.published[0].deadline is not None and broker.published[0].reply_to == broker.reply_queue_name
    assert broker.cancelled == [] and broker.subscriptions == {}


async def test_duplicates_and_an_older_attempts_frames_are_dropped():
    """A redelivery before any token restarts transparently; stale and repeated frames vanish."""
    broker = InMemoryBroker(lambda rid: [
        started(rid, 1, "w1"), started(rid, 2, "w2"),
        delta(rid, 1, "stale", attempt=1),  # the first worker's, after the restart
        delta(rid, 1, "new", attempt=2), delta(rid, 1, "again", attempt=2),  # a duplicate sequence number
        started(rid, 2, "w2"),  # a duplicate start
        final(rid, 2, attempt=2)])
    gen = generation(broker)
    frames = await collect(gen)
    assert [type(f).__name__ for f in frames] == ["Started", "Started", "Data", "Final"]
    assert frames[2].data == "new"
    assert gen.outcome.attempts == [1, 2] and gen.outcome.worker_id == "w2"


async def test_frames_of_a_newer_attempt_before_its_start_are_ignored():
    broker = InMemoryBroker(lambda rid: [started(rid), delta(rid, 1, "early", attempt=2), delta(rid, 1, "ours"),
                                         final(rid, 2)])
    frames = await collect(generation(broker))
    assert [f.data for f in frames if isinstance(f, Data)] == ["ours"]


async def test_a_redelivery_after_the_head_ends_the_stream_with_worker_lost():
    """The client has its 200 once the head is relayed: a restart could not be hidden from it."""
    broker = InMemoryBroker(lambda rid: [started(rid, 1, "w1"), head(rid, 1), started(rid, 2, "w2")])
    with pytest.raises(WorkerLost):
        await collect(generation(broker))


async def test_a_redelivery_after_tokens_ends_the_stream_with_worker_lost():
    broker = InMemoryBroker(lambda rid: [started(rid, 1, "w1"), delta(rid, 1), started(rid, 2, "w2")])
    gen = generation(broker)
    with pytest.raises(WorkerLost):
        await collect(gen)
    rid = gen.request.request_id
    await await_until(lambda: broker.cancelled, what="a cancellation of the abandoned request")
    assert broker.cancelled == [(rid, "client gone")]


async def test_an_error_frame_fails_with_the_workers_status_and_code():
    broker = InMemoryBroker(lambda rid: [started(rid), Error(request_id=rid, seq=1, status=400,
                                                            code="context_length_exceeded", message="too long")])
    with pytest.raises(WorkerFailed) as exc:
        await collect(generation(broker))
    assert (exc.value.status, exc.value.code) == (400, "context_length_exceeded")


@pytest.mark.parametrize("refusal", [ModelNotFound("tiny"), QueueFull("tiny"), ClusterUnavailable()])
async def test_nothing_queued_means_nothing_to_cancel(refusal: ClusterError):
    broker = InMemoryBroker(refuse=refusal)
    with pytest.raises(type(refusal)):
        await collect(generation(broker))
    await asyncio.sleep(0)  # a cancellation task, had one been made, would have run
    assert broker.cancelled == [] and broker.subscriptions == {}


async def test_no_start_within_the_queue_timeout_is_no_worker_available():
    broker = InMemoryBroker()
    with pytest.raises(NoWorkerAvailable) as exc:
        await collect(generation(broker, queue=0.05))
    assert exc.value.model == "tiny"
    await await_until(lambda: broker.cancelled, what="the queued message to be cancelled")


async def test_a_silent_live_worker_times_out():
    broker = InMemoryBroker(lambda rid: [started(rid), delta(rid, 1)])
    with pytest.raises(WorkerTimeout):
        await collect(generation(broker, queue=30.0, idle=0.05))


async def test_a_vanished_worker_gives_the_redelivery_one_queue_timeout():
    """Its worker gone from the heartbeats, a started request waits for a restart, not for
    the (much longer) idle timeout, and fails as 'no worker' if none comes."""
    broker = InMemoryBroker(lambda rid: [started(rid, 1, "w1")])
    broker.alive = set()
    gen = generation(broker, queue=0.05, idle=3600.0)
    with pytest.raises(NoWorkerAvailable):
        await collect(gen)
    assert gen.outcome.worker_id is None


async def test_a_vanished_worker_is_replaced_by_the_redelivery():
    broker = InMemoryBroker(lambda rid: [started(rid, 1, "w1")])
    broker.alive = {"w2"}
    gen = generation(broker, queue=30.0, idle=3600.0)
    frames = gen.frames()
    assert isinstance(await frames.__anext__(), Started)
    rid = gen.request.request_id
    waiting = asyncio.ensure_future(frames.__anext__())
    await await_until(lambda: gen.outcome.worker_id is None, what="the lost worker to be noticed")
    for frame in (started(rid, 2, "w2"), delta(rid, 1, "x", attempt=2), final(rid, 2, attempt=2)):
        broker.deliver(frame)
    rest = [await waiting] + [f async for f in frames]
    assert [type(f).__name__ for f in rest] == ["Started", "Data", "Final"]
    assert gen.outcome.attempts == [1, 2] and broker.cancelled == []


async def test_losing_the_broker_while_waiting_is_cluster_unavailable():
    broker = InMemoryBroker(lambda rid: [started(rid)])
    gen = generation(broker)
    frames = gen.frames()
    await frames.__anext__()
    broker.connected = False
    with pytest.raises(ClusterUnavailable):
        await frames.__anext__()


async def test_a_connection_lost_and_back_at_once_still_ends_the_stream():
    """Frames sent while the connection was down are gone with its reply queue: a stream must
    not go on with a gap (or wait for a Final that was lost), even if the broker is back by the
    time the generation looks."""
    broker = InMemoryBroker(lambda rid: [started(rid), delta(rid, 1)])
    gen = generation(broker, idle=3600.0)
    frames = gen.frames()
    await frames.__anext__()
    await frames.__anext__()
    broker.subscriptions[gen.request.request_id].connection_lost()
    broker.deliver(delta(gen.request.request_id, 5, "after the gap"))
    assert broker.connected
    with pytest.raises(ClusterUnavailable):
        await frames.__anext__()


async def test_a_client_that_leaves_cancels_the_request():
    broker = InMemoryBroker(lambda rid: [started(rid), delta(rid, 1)])
    gen = generation(broker)
    frames = gen.frames()
    await frames.__anext__()
    await frames.__anext__()
    await frames.aclose()
    await await_until(lambda: broker.cancelled, what="a cancellation")
    assert broker.cancelled == [(gen.request.request_id, "client gone")] and broker.subscriptions == {}


@pytest.mark.parametrize("error, status, code", [
    (ModelNotFound("m"), 404, "model_not_found"),
    (QueueFull("m"), 429, "queue_full"),
    (ClusterUnavailable(), 503, "service_paused"),
    (ClusterOverloaded(), 503, "cluster_overloaded"),
    (NoWorkerAvailable("m", 5), 503, "no_worker_available"),
    (ModelNotLoaded("m"), 503, "model_not_loaded"),
    (WorkerLost(), 502, "worker_lost"),
    (WorkerTimeout(), 504, "worker_timeout"),
    (WorkerFailed(400, "context_length_exceeded", "too long"), 400, "context_length_exceeded"),
])
def test_each_cluster_failure_has_one_http_answer(error: ClusterError, status: int, code: str):
    api = to_api_error(error)
    assert (api.status, api.code, api.message) == (status, code, error.message)
    assert api.body()["error"]["type"] in ("invalid_request_error", "rate_limit_error", "server_error",
                                           "service_unavailable")


def test_an_unknown_models_404_names_the_models_that_exist():
    api = to_api_error(ModelNotFound("lama", ["llama-3-8b", "tiny"]))
    assert api.status == 404 and "'lama' does not exist" in api.message and "llama-3-8b, tiny" in api.message
    many = ModelNotFound("x", [f"m{i:02}" for i in range(25)]).message
    assert "m19" in many and "m20" not in many and "5 more" in many
