"""The GPU worker against a real RabbitMQ node and the real vLLM CPU engine on the tiny model.

Most tests share the session worker (``served_worker``). Tests that kill, drain or idle a worker
start their own on a queue of their own; those start together (one fixture) to share start-up.
"""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest_asyncio

from broker_config import topology
from broker_config.messages import Data, Error, Final, Head, Started
from conftest import SERVED_ADAPTER, SERVED_MODEL
from gpu_worker.main import READY_LINE
from support.amqp_client import TestGatewayClient, final_body, sse_chunks, streamed_text
from support.waiting import wait_until
from support.worker_proc import start_worker

KILL_MODEL = "tiny-kill"
DRAIN_MODEL = "tiny-drain"
KILL_TOKENS = 3000  # seconds of work even on an idle CPU: A still holds it when the test kills it, just after its start
IDLE_TIMEOUT = 30  # B starts last, so its idle clock starts only seconds before the kill test hands it work
# The short stream (400 tokens) finishes within the grace down to 20 tok/s (62 tok/s seen with
# the suite's two processes busy beside it, when 800-token shorts missed a 12 s grace); the long
# ones (30,000) cannot finish in it below 1,500 tok/s: the engine's speed varies a lot with load.
DRAIN_GRACE = 20


@pytest_asyncio.fixture(scope="module")
async def gw(broker, served_worker):
    async with TestGatewayClient(broker.url("gateway")) as client:
        yield client


def split(frames):
    started = [f for f in frames if isinstance(f, Started)]
    data = [f for f in frames if isinstance(f, Data)]
    ends = [f for f in frames if isinstance(f, (Final, Error))]
    return started, data, ends


def assert_well_formed(frames, attempt: int = 1):
    """One started first, one final/error last, seq 0..n-1, one attempt."""
    assert isinstance(frames[0], Started)
    assert isinstance(frames[-1], (Final, Error))
    assert sum(isinstance(f, (Final, Error)) for f in frames) == 1
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert {f.attempt for f in frames} == {attempt}


async def wait_log(worker, text: str, timeout: float = 20.0) -> None:
    try:
        await wait_until(lambda: text in worker.log_text(), timeout, f"{text!r} in the worker log")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{worker.log_tail()}") from None


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that have not ended (a zombie has)."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def queue_counts(broker, model: str) -> dict:
    name = topology.model_queue(model)
    for q in broker.admin.list_queues():
        if q["name"] == name:
            return q
    raise AssertionError(f"no queue {name}")


# ------------------------------------------------------------------ requests through the session worker


async def test_stream_is_coalesced_and_usage_matches(gw, served_worker):
    req = gw.request(SERVED_MODEL, stream=True, max_tokens=64, ignore_eos=True)
    frames = await gw.generate(req)
    assert_well_formed(frames)
    (started,), data, (final,) = split(frames)
    assert started.worker_id == served_worker.worker_id
    assert isinstance(frames[1], Head) and (frames[1].status, frames[1].content_type[:17]) == (200, "text/event-stream")
    assert isinstance(final, Final) and final.body is None  # streamed: the events went in data frames
    # The engine's own counts, although the client asked for no usage.
    assert final.usage.completion_tokens == 64 == sum(d.tokens for d in data)
    assert final.usage.prompt_tokens > 5  # the chat template was applied
    assert final.usage.total_tokens == final.usage.prompt_tokens + 64
    chunks = sse_chunks(frames)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"  # vLLM's own chunks, unchanged
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert data[-1].data.endswith("data: [DONE]\n\n") and "usage" not in chunks[-1]
    # How many data frames 64 tokens become depends on the machine's speed: the coalescing rule
    # itself is pinned in test_reply_frames.py, and `chatai bench` prints messages per token.


async def test_concurrent_streams_arrive_whole_and_in_order(gw):
    reqs = [gw.request(SERVED_MODEL, stream=True, max_tokens=48, ignore_eos=True) for _ in range(8)]
    for r in reqs:
        await gw.publish(r)
    results = [await gw.result(r.request_id) for r in reqs]
    for frames in results:
        assert_well_formed(frames)
        _, data, (final,) = split(frames)
        assert sum(d.tokens for d in data) == final.usage.completion_tokens == 48
        assert len(sse_chunks(frames)) >= 2 and streamed_text(frames)


async def test_non_streamed_gives_started_then_one_final_with_the_whole_response(gw):
    frames = await gw.generate(gw.request(SERVED_MODEL, stream=False, max_tokens=20, ignore_eos=True))
    assert_well_formed(frames)
    assert [type(f) for f in frames] == [Started, Final]
    final = frames[-1]
    body = final_body(frames)
    assert final.status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == final.usage.completion_tokens == 20


async def test_a_completion_of_several_prompts_is_counted_whole(gw):
    """One API request, several engine requests (one per prompt): usage sums them all."""
    req = gw.request(SERVED_MODEL, kind="completion", stream=False, max_tokens=5, ignore_eos=True)
    req.body["prompt"] = ["Once upon a time", "The cluster"]
    req.body["n"] = 2
    frames = await gw.generate(req)
    body = final_body(frames)
    assert frames[-1].status == 200, body
    assert sorted(c["index"] for c in body["choices"]) == [0, 1, 2, 3]
    assert frames[-1].usage.completion_tokens == 20 == body["usage"]["completion_tokens"]
    assert frames[-1].usage.prompt_tokens == body["usage"]["prompt_tokens"]


async def test_prompt_too_long_is_vllms_400_as_a_whole_response(gw):
    frames = await gw.generate(gw.request(SERVED_MODEL, content="hello world " * 400, stream=True))
    assert_well_formed(frames)
    assert [type(f) for f in frames] == [Started, Final]  # no head: not a stream, a refusal
    final = frames[-1]
    assert final.status == 400 and "512" in final_body(frames)["error"]["message"]
    assert final.usage.completion_tokens == 0


async def test_an_endpoint_the_model_does_not_serve_is_a_404_in_the_openai_format(gw):
    req = gw.request(SERVED_MODEL, stream=False)
    req.endpoint, req.body = "/v1/embeddings", {"model": SERVED_MODEL, "input": "hi"}
    frames = await gw.generate(req)
    assert frames[-1].status == 404 and "does not serve" in final_body(frames)["error"]["message"]


async def test_expired_deadline_is_dropped(gw, served_worker):
    req = gw.request(SERVED_MODEL, stream=True, max_tokens=8)
    req.deadline = time.time() - 1
    await gw.publish(req)
    await wait_log(served_worker, f"dropped expired request_id={req.request_id}")
    # A request published after it is served: the worker is fine, and the dropped one got nothing.
    await gw.generate(gw.request(SERVED_MODEL, stream=False, max_tokens=4))
    assert req.request_id not in gw.frames


async def test_cancel_before_start_is_honoured(gw, served_worker):
    req = gw.request(SERVED_MODEL, stream=True, max_tokens=8)
    await gw.cancel(req.request_id)
    # A full round trip after the cancel: by then the worker has read its control queue.
    await gw.generate(gw.request(SERVED_MODEL, stream=False, max_tokens=1))
    await gw.publish(req)
    await wait_log(served_worker, f"dropped cancelled request_id={req.request_id}")
    assert req.request_id not in gw.frames


async def test_heartbeat_reports_the_worker(gw, served_worker):
    hb = await gw.heartbeat_where(served_worker.worker_id, lambda h: True, since=time.time())
    assert hb.state == "ready"
    assert (hb.model, hb.capacity, hb.max_model_len) == (SERVED_MODEL, 16, 512)
    assert hb.tasks == ["generate"] and hb.adapters == [SERVED_ADAPTER]
    assert hb.node and hb.interval == 1.0


# ------------------------------------------------------------------ workers of their own: kill, drain, idle


@pytest_asyncio.fixture(scope="module")
async def own_workers(broker, tiny_model_dir, tmp_path_factory):
    """Three extra workers on queues of their own: A and the drain worker start together (start-up
    is the slow part), then B, so that B's idle clock starts just before the kill test.

    On the kill queue, A has a higher consumer priority than B: requests go to A while it lives,
    and to B once A is gone. B leaves by itself after IDLE_TIMEOUT seconds without work: started
    together with the others it could idle out while a slower one was still loading.
    """
    broker.apply([KILL_MODEL, DRAIN_MODEL])
    logs = tmp_path_factory.mktemp("own-workers")
    url, pid = broker.url("worker"), os.getpid()
    # Longer contexts than the tiny model declares (RoPE does not mind): long generations that
    # outlast a kill or a drain grace, whatever the machine's speed.
    env = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    workers = {
        "a": start_worker(tiny_model_dir, KILL_MODEL, url, logs / "kill-a.log", worker_id=f"kill-a-{pid}",
                          max_num_seqs=4, max_model_len=8192, extra_args=["--consumer-priority", "10"], env=env),
        "drain": start_worker(tiny_model_dir, DRAIN_MODEL, url, logs / "drain.log", worker_id=f"drain-{pid}",
                              max_num_seqs=3, max_model_len=32768,
                              extra_args=["--drain-grace", str(DRAIN_GRACE), "--drain-returns-whole"],
                              env=env),
    }
    try:
        for w in list(workers.values()):
            # In a thread: the event loop keeps answering the broker's heartbeats for the
            # session's AMQP client meanwhile (a loaded machine takes minutes for several engines).
            await asyncio.to_thread(w.wait_ready)
        workers["b"] = start_worker(tiny_model_dir, KILL_MODEL, url, logs / "kill-b.log", worker_id=f"kill-b-{pid}",
                                    max_num_seqs=4, max_model_len=8192,
                                    extra_args=["--idle-timeout", str(IDLE_TIMEOUT)], env=env)
        await asyncio.to_thread(workers["b"].wait_ready)
        yield workers
    finally:
        for w in workers.values():
            w.kill()


async def test_sigkill_mid_request_is_redelivered_and_idle_worker_exits(gw, broker, own_workers):
    a, b = own_workers["a"], own_workers["b"]
    req = gw.request(KILL_MODEL, stream=False, max_tokens=KILL_TOKENS, ignore_eos=True)  # seconds of work
    await gw.publish(req)
    started = await gw.wait_for(lambda: gw.frames.get(req.request_id), timeout=30)
    assert started[0].worker_id == a.worker_id  # the higher consumer priority
    a.kill()  # the worker and its engine, mid-generation, nothing acked
    assert [type(f) for f in gw.frames[req.request_id]] == [Started]

    frames = await gw.result(req.request_id, timeout=300, attempt=2)
    second = [f for f in frames if f.attempt == 2]
    assert_well_formed(second, attempt=2)
    assert second[0].worker_id == b.worker_id
    assert final_body(second)["choices"][0]["finish_reason"] == "length"
    assert second[-1].usage.completion_tokens == KILL_TOKENS
    # Nothing more to do: B leaves by itself after its idle timeout, with exit 0, and takes its
    # engine's processes along (vLLM's own shutdown may leave one behind for seconds).
    engine_procs = psutil.Process(b.proc.pid).children(recursive=True)
    rc = await asyncio.to_thread(b.wait, IDLE_TIMEOUT + 60)
    assert rc == 0
    assert "stopping: idle" in b.log_text()
    assert engine_procs
    await wait_until(lambda: not still_running(engine_procs), 30, "the engine's processes to end with the worker")
    # A normal exit looks normal: the engine was shut down before interpreter teardown, so no
    # vLLM destructor complains in the job's log (stdout and stderr both go there).
    assert "Traceback" not in b.log_text() and "Exception ignored" not in b.log_text()
    hb = gw.last_heartbeat(b.worker_id)
    assert hb is not None and hb.state == "stopped"
    counts = await asyncio.to_thread(queue_counts, broker, KILL_MODEL)
    assert counts["messages"] == 0  # acked once, after the final frame


async def test_cancel_aborts_a_running_generation(gw, own_workers):
    # On the drain worker (32k context): a generation of minutes, which a cancel must cut short.
    w = own_workers["drain"]
    req = gw.request(DRAIN_MODEL, stream=True, max_tokens=30_000, ignore_eos=True)
    await gw.publish(req)
    await gw.wait_for(lambda: any(isinstance(f, Data) for f in gw.frames[req.request_id]))
    t0 = time.monotonic()
    await gw.cancel(req.request_id)
    frames = await gw.result(req.request_id, timeout=10)
    elapsed = time.monotonic() - t0
    assert_well_formed(frames)
    final = frames[-1]
    assert isinstance(final, Final)
    assert final.aborted
    assert 0 < final.usage.completion_tokens < 30_000  # cut short: the whole run takes minutes
    print(f"\ncancelled after {final.usage.completion_tokens} tokens; the final frame came {elapsed:.2f} s after the cancel")
    hb = await gw.heartbeat_where(w.worker_id, lambda h: h.in_flight == 0, since=time.time(), timeout=5)
    assert hb.state == "ready" and hb.capacity == 3 and hb.model == DRAIN_MODEL
    assert f"cancel request_id={req.request_id}" in w.log_text()


async def test_lost_broker_connection_redelivers_without_an_error_frame(gw, broker, own_workers, served_worker):
    w = own_workers["drain"]
    req = gw.request(DRAIN_MODEL, stream=True, max_tokens=30_000, ignore_eos=True)
    await gw.publish(req)
    await gw.wait_for(lambda: any(isinstance(f, Data) for f in gw.frames[req.request_id]))
    # Every worker connection is cut (as by a broker restart or a network blip); aio-pika reconnects.
    await asyncio.to_thread(broker.admin.close_user_connections, "worker", "test: connection loss")
    started2 = await gw.wait_for(
        lambda: [f for f in gw.frames[req.request_id] if isinstance(f, Started) and f.attempt == 2], timeout=60)
    assert started2[0].worker_id == w.worker_id  # the same worker, reconnected, consuming again
    first = [f for f in gw.frames[req.request_id] if f.attempt == 1]
    assert not any(isinstance(f, (Final, Error)) for f in first), "attempt 1 must end silently"
    await gw.cancel(req.request_id)
    frames = await gw.result(req.request_id, timeout=10, attempt=2)
    assert frames[-1].aborted
    await wait_log(w, f"request_id={req.request_id} attempt=1 delivery lost")
    # The session worker reconnected as well and serves.
    again = await gw.generate(gw.request(SERVED_MODEL, stream=False, max_tokens=3), timeout=60)
    assert isinstance(again[-1], Final)


async def test_sigterm_drains_held_work_and_returns_the_rest(gw, broker, own_workers):
    """The drain worker runs with --drain-returns-whole: on SIGTERM its whole (non-streamed)
    answer goes back to the queue at once, the short stream finishes within the grace, and the
    long stream, which cannot, goes back at the grace's end."""
    w = own_workers["drain"]
    short = gw.request(DRAIN_MODEL, stream=True, max_tokens=400, ignore_eos=True)
    long = gw.request(DRAIN_MODEL, stream=True, max_tokens=30_000, ignore_eos=True)
    whole = gw.request(DRAIN_MODEL, stream=False, max_tokens=30_000, ignore_eos=True)
    extra = gw.request(DRAIN_MODEL, stream=False, max_tokens=5)
    for r in [long, whole, short]:
        await gw.publish(r)
    await gw.wait_for(lambda: all(gw.frames.get(r.request_id) for r in [long, whole, short]), timeout=30)
    # The worker is full (prefetch = capacity = 3): this one must wait in the queue, untouched.
    await gw.publish(extra)

    since = time.time()
    w.signal()  # SIGTERM to the worker process, as Slurm's --signal=B: does
    frames = await gw.result(short.request_id, timeout=30)
    assert isinstance(frames[-1], Final) and frames[-1].usage.completion_tokens == 400
    rc = await asyncio.to_thread(w.wait, 60)
    assert rc == 0
    # Neither the whole answer nor the long stream was finished: no final frame, both back in the queue.
    assert gw.done(long.request_id) is None and gw.done(whole.request_id) is None
    assert [type(f) for f in gw.frames[whole.request_id]] == [Started]  # nothing of it reached its client
    counts = await asyncio.to_thread(queue_counts, broker, DRAIN_MODEL)
    assert (counts["messages_ready"], counts["consumers"]) == (3, 0)
    states = [h.state for h in gw.heartbeats if h.worker_id == w.worker_id and h.sent_at >= since]
    assert "draining" in states and states[-1] == "stopped"
    log = w.log_text()
    assert "draining (signal SIGTERM): 3 in flight" in log, "the short one ended before SIGTERM: nothing drained"
    assert "gave 1 whole answer(s) back to the queue at once" in log
    assert "returned 1 request(s) to the queue" in log
    # The order of the worker's own log: the whole answer went back before the short stream ended.
    given_back = log.index(f"request_id={whole.request_id} attempt=1 requeued")
    assert given_back < log.index(f"request_id={short.request_id} attempt=1 final")
    assert given_back < log.index(f"request_id={long.request_id} attempt=1 requeued")
    assert extra.request_id not in gw.frames  # never delivered to the full, then draining, worker


async def test_sigterm_while_the_engine_loads_leaves_at_once(gw, broker, tiny_model_dir, tmp_path):
    """Preempted before its engine is up, a worker holds nothing and must not keep the GPU for the
    rest of the load: it exits 0 at once and takes the engine processes it had started along."""
    w = start_worker(tiny_model_dir, "tiny-abandoned", broker.url("worker"), tmp_path / "abandon.log",
                     worker_id=f"abandon-{os.getpid()}")
    try:
        me = psutil.Process(w.proc.pid)
        # The engine's core process exists: the load is under way (the core loads the weights,
        # then profiles memory and warms up before the engine counts as started).
        spawned = await asyncio.to_thread(wait_until, lambda: me.children(recursive=True), 180,
                                          "the engine load to start its processes")
        since = time.time()
        w.signal()
        t0 = time.monotonic()
        rc = await asyncio.to_thread(w.wait, 60)
        print(f"\nexited {time.monotonic() - t0:.1f} s after SIGTERM, {len(spawned)} engine process(es) at the time")
    finally:
        w.kill()
    assert rc == 0
    assert "while the engine loads: leaving without it" in w.log_text(), w.log_tail()
    assert READY_LINE not in w.log_text()
    # The engine's processes are ended before the worker exits; multiprocessing's resource tracker
    # (gpu_worker.lifecycle.engine_processes) leaves by itself once the worker is gone.
    await asyncio.to_thread(wait_until, lambda: not still_running(spawned), 15,
                            "the engine's processes and the resource tracker to end")
    hb = await gw.heartbeat_where(w.worker_id, lambda h: h.state == "stopped", since=since, timeout=10)
    assert hb.model == "tiny-abandoned"


async def test_logs_hold_ids_not_text_or_passwords(gw, broker, served_worker):
    secret = "purple-elephant-7731"
    frames = await gw.generate(gw.request(SERVED_MODEL, content=f"my secret is {secret}", stream=False,
                                          max_tokens=8, ignore_eos=True))
    await wait_log(served_worker, frames[0].request_id)
    log = served_worker.log_text()
    assert secret not in log
    text = final_body(frames)["choices"][0]["message"]["content"]
    if len(text.strip()) >= 6:  # 8 random tokens; a very short one could occur by chance
        assert text not in log
    assert broker.passwords["worker"] not in log
