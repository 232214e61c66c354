"""Prefix-cache affinity against the real parts: two vLLM workers of one model, a gateway, the broker.

Follow-up turns go back to the worker that served the conversation; a full preferred worker
does not hold a request (it spills to the shared queue, past the broker's TTL and dead-lettering,
because the worker's prefetch covers both its queues); a worker killed mid-conversation costs
its conversations only their cache: every request is answered, exactly once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal

import aio_pika
import httpx
import pytest
from aiormq.exceptions import ChannelAccessRefused

from broker_config import topology
from broker_config.messages import Final, Started
from support.amqp_client import TestGatewayClient
from support.gateway import gateway_serving
from support.waiting import wait_until, wait_until_sync
from support.worker_proc import start_worker

MODEL = "tiny-aff"
CAPACITY = 2
METRICS_TOKEN = "affinity-test-metrics-token"
SYSTEM = "You are a helpful assistant. " * 8


@pytest.fixture(scope="module")
def pair(broker, tiny_model_dir, tmp_path_factory):
    """Two workers of MODEL (capacity 2 each, started side by side) and a gateway of its own."""
    broker.apply([MODEL])
    logs = tmp_path_factory.mktemp("affinity-workers")
    workers = [start_worker(tiny_model_dir, MODEL, broker.url("worker"), logs / f"w{i}.log",
                            worker_id=f"aff-{i}-{os.getpid()}", max_num_seqs=CAPACITY, max_model_len=1024,
                            heartbeat_interval=1.0) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        with gateway_serving(tmp_path_factory.mktemp("affinity-gateway"), broker.url("gateway"), MODEL,
                             env={"CHATAI_GATEWAY_METRICS_TOKEN": METRICS_TOKEN}) as gw:
            gw.wait_for(lambda h: h["models"].get(MODEL, {}).get("ready", 0) == 2, timeout=60,
                        what="both workers' heartbeats")
            yield gw, workers
    finally:
        for w in workers:
            w.stop(timeout=30, group=True)


def served_by(workers, response_id: str) -> list[str]:
    """The workers whose log has this request's final answer (vLLM's id is chatcmpl-<request id>)."""
    rid = response_id.removeprefix("chatcmpl-")
    return [w.worker_id for w in workers for _ in re.finditer(rf"request_id={rid} attempt=\d+ final 200", w.log_text())]


async def turn(client, history: list[dict], text: str, max_tokens: int = 8) -> str:
    """One turn of a conversation: the whole history plus the new user message; returns its id."""
    history.append({"role": "user", "content": text})
    r = await client.chat.completions.create(model=MODEL, messages=history, max_tokens=max_tokens,
                                             extra_body={"ignore_eos": True})
    history.append({"role": "assistant", "content": r.choices[0].message.content or ""})
    return r.id


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM + f"Conversation {i}."}]


def worker_view(gw) -> dict[str, dict]:
    """Worker id -> its row of the status page (the metrics token shows the ids)."""
    rows = httpx.get(gw.base_url + "/api/status", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                     timeout=5).json()["workers"]
    return {w["worker_id"]: w for w in rows}


async def test_follow_up_turns_go_back_to_the_worker_of_the_conversation(pair):
    gw, workers = pair
    client = gw.async_client()
    histories = [conversation(i) for i in range(4)]
    placed: list[list[str]] = [[] for _ in histories]
    for t in range(3):
        ids = await asyncio.gather(*(turn(client, h, f"Turn {t} of {i}: tell me more.")
                                     for i, h in enumerate(histories)))
        for i, rid in enumerate(ids):
            placed[i] += await wait_until(lambda: served_by(workers, rid), 10, "the worker's log line")
    for i, where in enumerate(placed):
        assert len(where) == 3 and len(set(where)) == 1, f"conversation {i} moved between workers: {where}"
    # The workers' heartbeats carry vLLM's prefix-cache counts; the gateway shows the hit rate.
    health = gw.wait_for(lambda h: h["models"][MODEL]["prefix_cache_hits"] > 0, 10, "cache hits in heartbeats")
    cache = health["models"][MODEL]
    assert 0 < cache["prefix_cache_hits"] <= cache["prefix_cache_queries"]
    metrics = httpx.get(gw.base_url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    assert re.search(rf'chatai_prefix_cache_hit_rate{{model="{MODEL}"}} 0\.\d+', metrics)
    assert re.search(rf'chatai_affinity_requests_total{{model="{MODEL}",route="preferred"}} [1-9]', metrics)


async def test_a_full_preferred_worker_does_not_hold_a_request(pair, broker):
    """Both workers full: a request offered to one of them waits at most the spill bound in its
    affinity queue (the shared prefetch keeps the worker from taking it there), then reaches the
    shared queue, dead-lettered (attempt 3: one death), and runs once a slot frees."""
    gw, workers = pair
    async with TestGatewayClient(broker.url("gateway")) as amqp:
        fill = [amqp.request(MODEL, stream=False, max_tokens=200, ignore_eos=True) for _ in range(2 * CAPACITY)]
        for req in fill:
            await amqp.publish(req, ttl=120)
        await amqp.wait_for(lambda: all(amqp.frames.get(r.request_id) for r in fill), 60)
        assert {f.worker_id for r in fill for f in amqp.frames[r.request_id] if isinstance(f, Started)} == \
            {w.worker_id for w in workers}
        offered = await amqp.publish(amqp.request(MODEL, stream=False, max_tokens=4), ttl=120,
                                     prefer=workers[0].worker_id)
        frames = await amqp.result(offered.request_id, timeout=120)
        started = [f for f in frames if isinstance(f, Started)]
        assert [f.attempt for f in started] == [3], started
        assert isinstance(frames[-1], Final) and frames[-1].status == 200
        for r in fill:
            assert isinstance((await amqp.result(r.request_id, timeout=120))[-1], Final)


async def test_a_killed_worker_costs_its_conversations_only_their_cache(pair):
    gw, workers = pair
    client = gw.async_client(timeout=120)
    histories = [conversation(100 + i) for i in range(4)]
    first = await asyncio.gather(*(turn(client, h, "Hello.") for h in histories))
    for rid in first:
        await wait_until(lambda: served_by(workers, rid), 10, "the worker's log line")

    # Second turn of every conversation at once, long enough to be in flight when the worker dies.
    # The victim is a worker with one of them in flight (which one the gateway prefers depends on
    # what the last heartbeats said: either way it holds conversations).
    second = [asyncio.create_task(turn(client, h, "Now a long answer please.", max_tokens=300)) for h in histories]
    busy = await asyncio.to_thread(
        wait_until_sync, lambda: [w for w in workers if worker_view(gw).get(w.worker_id, {}).get("in_flight", 0) >= 1],
        60, "a second turn in flight on a worker")
    victim = busy[0]
    survivor = next(w for w in workers if w is not victim)
    victim.kill()
    ids = list(first) + await asyncio.gather(*second)  # non-streamed: a lost delivery is retried transparently
    ids += await asyncio.gather(*(turn(client, h, "And a third turn.") for h in histories))
    assert victim.proc.wait(timeout=30) == -signal.SIGKILL
    everyone = [*workers]
    for rid in ids:  # answered exactly once: one final per request across both workers' logs
        assert len(await wait_until(lambda: served_by(everyone, rid), 10, "a final log line")) == 1, rid
    for rid in ids[len(histories) * 2:]:
        assert served_by(everyone, rid) == [survivor.worker_id]


async def test_a_worker_binds_its_affinity_queue_but_cannot_make_it_publish_requests(broker):
    """Why the spill is the operator's policy: a queue argument naming the requests exchange as
    dead-letter exchange needs write on it, which the worker user does not have."""
    conn = await aio_pika.connect(broker.url("worker"))
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(topology.worker_affinity_queue("probe"), auto_delete=False)
        await queue.bind(topology.AFFINITY_EXCHANGE, arguments=topology.affinity_binding("probe"))
        await queue.delete(if_unused=False, if_empty=False)
        with pytest.raises(ChannelAccessRefused):
            await (await conn.channel()).declare_queue(
                topology.worker_affinity_queue("probe-dlx"),
                arguments={"x-dead-letter-exchange": topology.REQUESTS_EXCHANGE})
    finally:
        await conn.close()
