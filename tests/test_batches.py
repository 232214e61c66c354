"""Batches end to end: the official OpenAI SDK -> gateway process -> RabbitMQ -> real vLLM worker.

The batch tests serve a model of their own (``tiny-batch``, the tiny random Llama) from a worker
of their own, so they can kill it, and run their own gateways, so they can restart them; the
session's ``gateway`` and ``served_worker`` are not disturbed. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from gateway.keys import KeyStore
from support.gateway import GatewayProcess, start_gateway
from support.waiting import wait_until, wait_until_sync
from support.worker_proc import WorkerProcess, start_worker

BATCH_MODEL = "tiny-batch"
CHAT = "/v1/chat/completions"
# Small limits so a cancel or a restart has something in flight, and a quick dispatcher tick; a
# short batch lease, so a gateway restarted after SIGKILL takes its batches back within seconds.
GATEWAY_ENV = {"CHATAI_GATEWAY_BATCH_MAX_IN_FLIGHT": "24", "CHATAI_GATEWAY_BATCH_CANCEL_GRACE": "3",
               "CHATAI_GATEWAY_BATCH_TICK": "0.2", "CHATAI_GATEWAY_QUEUE_TIMEOUT": "60",
               "CHATAI_GATEWAY_BATCH_LEASE": "3"}


# ---------------------------------------------------------------------------------- fixtures


class Workers:
    """The worker serving BATCH_MODEL; a test may kill it and start another."""

    def __init__(self, model_dir: Path, url: str, logs: Path) -> None:
        self.model_dir, self.url, self.logs = model_dir, url, logs
        self.current: WorkerProcess | None = None
        self.started = 0

    def start(self) -> WorkerProcess:
        self.started += 1
        self.current = start_worker(self.model_dir, BATCH_MODEL, self.url, self.logs / f"worker-{self.started}.log",
                                    worker_id=f"batch-worker-{os.getpid()}-{self.started}", max_num_seqs=8,
                                    max_model_len=512, heartbeat_interval=1.0)
        return self.current.wait_ready()

    def all_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("worker-*.log")))


@pytest.fixture(scope="module")
def workers(broker, tiny_model_dir, tmp_path_factory):
    broker.apply([BATCH_MODEL])
    w = Workers(tiny_model_dir, broker.url("worker"), tmp_path_factory.mktemp("batch-workers"))
    w.start()
    yield w
    if w.current is not None:
        w.current.stop(timeout=30)


def _serving(gw: GatewayProcess) -> GatewayProcess:
    gw.wait_for(lambda h: h["models"].get(BATCH_MODEL, {}).get("ready", 0) >= 1, timeout=60,
                what="the batch worker's heartbeat")
    return gw


@pytest.fixture(scope="module")
def bgw(broker, workers, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("batch-gateway"), broker.url("gateway"), extra_env=GATEWAY_ENV)
    try:
        yield _serving(gw)
    finally:
        gw.stop()


@pytest.fixture
def own_gateway(broker, workers, tmp_path):
    """A gateway of the test's own (restart it, or give it other settings)."""
    started: list[GatewayProcess] = []

    def start(extra_env: dict[str, str] | None = None, state_dir: Path | None = None) -> GatewayProcess:
        gw = start_gateway(state_dir or tmp_path / "gw", broker.url("gateway"),
                           extra_env={**GATEWAY_ENV, **(extra_env or {})})
        started.append(gw)
        return _serving(gw)

    yield start
    for gw in started:
        gw.stop()


# ---------------------------------------------------------------------------------- helpers


def lines(n: int, prefix: str = "req", max_tokens: int = 4, **body) -> list[dict]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": CHAT,
             "body": {"model": BATCH_MODEL, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}],
                      **body}}
            for i in range(n)]


def jsonl(items: list) -> bytes:
    return ("\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n").encode()


def submit(client: openai.OpenAI, items: list, endpoint: str = CHAT):
    f = client.files.create(file=("input.jsonl", jsonl(items)), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")


def wait_batch(client: openai.OpenAI, batch_id: str, predicate, timeout: float, what: str):
    """The batch once ``predicate(batch)`` holds. Blocks, also under an async test's loop."""
    last = None

    def holds():
        nonlocal last
        last = client.batches.retrieve(batch_id)
        return last if predicate(last) else None

    try:
        return wait_until_sync(holds, timeout, what, every=0.3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {last.status} {last.request_counts}") from None


def wait_done(client: openai.OpenAI, batch_id: str, timeout: float = 240.0):
    return wait_batch(client, batch_id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
                      timeout, "the batch to end")


def read(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line.strip()]


def reason(item: dict) -> str:
    if item.get("error"):
        return item["error"]["message"]
    return item["response"]["body"]["error"]["message"]


def assert_exactly_once(outputs: list[dict], expected: set[str], max_tokens: int = 8) -> None:
    ids = [o["custom_id"] for o in outputs]
    assert len(ids) == len(set(ids)), "a custom_id was answered more than once"
    assert set(ids) == expected
    for o in outputs:
        assert o["response"]["status_code"] == 200 and o["error"] is None
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == BATCH_MODEL
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= max_tokens


def model_queue(broker) -> dict:
    return next(q for q in broker.admin.list_queues() if q["name"] == f"chatai.model.{BATCH_MODEL}")


def results_queues(broker) -> dict[str, dict]:
    """The gateways' durable batch results queues, by name."""
    return {q["name"]: q for q in broker.admin.list_queues() if q["name"].endswith(".batch-results")}


# ---------------------------------------------------------------------------------- tests


def test_500_line_batch_through_the_sdk(bgw, workers, broker):
    client = bgw.client()
    batch = submit(client, lines(500))
    assert batch.status == "validating" and batch.endpoint == CHAT and batch.completion_window == "24h"
    t0 = time.monotonic()
    done = wait_done(client, batch.id)
    elapsed = time.monotonic() - t0
    print(f"\n500-line batch: {elapsed:.1f} s ({500 / elapsed * 60:.0f} requests/min)")
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (500, 500, 0)
    assert done.error_file_id is None and done.output_file_id
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.model == BATCH_MODEL and done.usage.output_tokens > 0
    outputs = read(client, done.output_file_id)
    assert_exactly_once(outputs, {f"req-{i}" for i in range(500)})
    assert [o["custom_id"] for o in outputs] == [f"req-{i}" for i in range(500)]  # input order
    metrics = httpx.get(bgw.base_url + "/metrics", timeout=10).text
    completed = [line for line in metrics.splitlines() if line.startswith('chatai_batch_results_total{outcome="completed"}')]
    assert completed and float(completed[0].split()[-1]) >= 500

    # Files: retrieve, list (the output file is listed too), delete.
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.expires_at
    listed = [f.id for f in client.files.list()]
    assert done.input_file_id in listed and done.output_file_id in listed
    assert client.files.delete(done.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(done.input_file_id)
    assert not (bgw.state_dir / "files" / done.input_file_id).exists()

    # Batches: retrieve, list with pagination.
    assert client.batches.retrieve(batch.id).status == "completed"
    page = client.batches.list(limit=1)
    assert page.data[0].id == batch.id

    # Another key sees none of it.
    keys = KeyStore(bgw.state_dir / "gateway.db")
    other_key = keys.create("someone-else")[1]
    keys.close()
    other = openai.OpenAI(base_url=bgw.base_url + "/v1", api_key=other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert other.batches.list().data == [] and other.files.list().data == []


def test_bad_lines_land_in_the_error_file_and_the_rest_runs(bgw):
    client = bgw.client()
    good = lines(6, prefix="good")
    long_prompt = " ".join(["word"] * 900)  # past the worker's 512-token context: the model refuses it
    items = [
        good[0],
        "{this is not json",
        {"method": "POST", "url": CHAT, "body": good[1]["body"]},  # no custom_id
        good[1],
        {**good[2], "custom_id": "good-0"},  # duplicate custom_id
        {**good[3], "url": "/v1/embeddings", "custom_id": "wrong-url"},
        {"custom_id": "unknown-model", "method": "POST", "url": CHAT,
         "body": {**good[4]["body"], "model": "no-such-model"}},
        {"custom_id": "bad-body", "method": "POST", "url": CHAT,
         "body": {"model": BATCH_MODEL, "messages": [], "max_tokens": 4}},
        {"custom_id": "too-long", "method": "POST", "url": CHAT,
         "body": {"model": BATCH_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": long_prompt}]}},
        good[5],
    ]
    done = wait_done(client, submit(client, items).id, timeout=120)
    assert done.status == "completed"
    counts = done.request_counts
    assert counts.total == len(items) == 10
    assert counts.completed + counts.failed == counts.total
    assert counts.completed == 3, counts  # good-0, good-1, good-5
    outputs = read(client, done.output_file_id)
    assert_exactly_once(outputs, {"good-0", "good-1", "good-5"})
    errors = read(client, done.error_file_id)
    assert len(errors) == counts.failed == 7
    for e in errors:
        assert reason(e), e
    by_id = {e["custom_id"]: e for e in errors if e["custom_id"]}
    assert {e["error"]["code"] for e in errors if e["custom_id"] is None} == {"invalid_json", "missing_custom_id"}
    assert by_id["good-0"]["error"]["code"] == "duplicate_custom_id"
    assert by_id["wrong-url"]["error"]["code"] == "invalid_url"
    assert by_id["unknown-model"]["response"]["status_code"] == 404
    assert "no-such-model" in reason(by_id["unknown-model"])
    assert by_id["bad-body"]["response"]["status_code"] == 400
    assert by_id["too-long"]["response"]["status_code"] == 400
    assert "maximum context length" in reason(by_id["too-long"])  # vLLM's own words
    print("\nerror reasons:\n" + "\n".join(f"  {e['custom_id']}: {reason(e)}" for e in errors))

    # A file that cannot be a batch at all fails as a whole, with the reason in batch.errors.
    failed = wait_done(client, submit(client, ["", "   "]).id, timeout=30)
    assert failed.status == "failed" and failed.failed_at
    assert failed.errors.data[0].code == "empty_file" and failed.errors.data[0].message
    f = client.files.create(file=("in.jsonl", jsonl(good[:1])), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/audio/speech", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")


def test_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(bgw, workers):
    client = bgw.client()
    n = 300
    batch = submit(client, lines(n, prefix="kill", max_tokens=16, ignore_eos=True))
    wait_batch(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 10, 120,
               "some results before the kill")
    workers.current.kill()  # SIGKILL to the worker and its engine processes: no goodbye, no acks
    mid = client.batches.retrieve(batch.id)
    assert mid.status == "in_progress" and mid.request_counts.completed < n, "finished before the kill"
    print(f"\nSIGKILLed the worker at {mid.request_counts.completed}/{n}")
    replacement = workers.start()
    done = wait_done(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (n, 0)
    assert_exactly_once(read(client, done.output_file_id), {f"kill-{i}" for i in range(n)}, max_tokens=16)
    # The lines the dead worker held came back from the broker as redeliveries (attempt 2).
    redelivered = [line for line in replacement.log_text().splitlines()
                   if f"request_id={batch.id}." in line and "attempt=2" in line]
    print(f"{len(redelivered)} lines redelivered to the new worker")
    assert redelivered, "no line was redelivered: the kill did not hit work in flight"


def test_gateway_restarted_mid_batch_resumes_exactly_once(own_gateway, broker, tmp_path):
    state = tmp_path / "restarting-gw"
    gw = own_gateway(state_dir=state)
    client = gw.client()
    n = 300
    batch = submit(client, lines(n, prefix="restart", max_tokens=16, ignore_eos=True))
    before = wait_batch(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 20, 120,
                        "some results before the restart")
    assert before.request_counts.completed < n, "finished before the restart"
    consumed = {name for name, q in results_queues(broker).items() if q["consumers"]}
    gw.proc.kill()  # SIGKILL: no shutdown hooks, unacked results and in-flight lines left as they were
    gw.proc.wait()
    # The worker keeps answering into the durable results queue meanwhile: results wait there.
    wait_until(lambda: [q for name, q in results_queues(broker).items()
                        if name in consumed and not q["consumers"] and q["messages_ready"]],
               60, "results to wait in the stopped gateway's queue")
    gw2 = own_gateway(state_dir=state)
    client2 = openai.OpenAI(base_url=gw2.base_url + "/v1", api_key=gw.api_key, max_retries=0)  # the owner's key
    resumed = client2.batches.retrieve(batch.id)
    assert resumed.status == "in_progress" and resumed.request_counts.completed >= before.request_counts.completed
    done = wait_done(client2, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (n, 0)
    assert_exactly_once(read(client2, done.output_file_id), {f"restart-{i}" for i in range(n)}, max_tokens=16)


def test_cancel_a_running_batch(bgw, workers, broker):
    client = bgw.client()
    n = 400
    batch = submit(client, lines(n, prefix="cancel", max_tokens=16, ignore_eos=True))
    wait_batch(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 10, 120,
               "some results before cancelling")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_batch(client, batch.id, lambda b: b.status == "cancelled", 30, "cancelled")
    assert done.cancelled_at and done.status == "cancelled"
    counts = done.request_counts
    assert 10 <= counts.completed < n and counts.failed == 0
    outputs = read(client, done.output_file_id)
    ids = {o["custom_id"] for o in outputs}
    assert len(outputs) == len(ids) == counts.completed
    not_run = read(client, done.error_file_id)
    assert all(e["error"]["code"] == "batch_cancelled" for e in not_run)
    assert ids | {e["custom_id"] for e in not_run} == {f"cancel-{i}" for i in range(n)}
    assert not ids & {e["custom_id"] for e in not_run}

    # No further work runs for it: the model queue empties, and a batch submitted after it runs
    # to its end through the same dispatcher and worker without one more line of the cancelled one.
    wait_until(lambda: model_queue(broker)["messages"] == 0, 15, "the model queue to empty after the cancel")
    seen = workers.all_logs().count(f"request_id={batch.id}.")
    after = wait_done(client, submit(client, lines(4, prefix="after-cancel")).id)
    assert after.status == "completed" and after.request_counts.completed == 4
    assert workers.all_logs().count(f"request_id={batch.id}.") == seen
    assert model_queue(broker)["messages"] == 0
    assert client.batches.retrieve(batch.id).request_counts.completed == counts.completed
    print(f"\ncancelled after {counts.completed}/{n}; worker handled {seen} of its lines in all")
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing


async def _lines_done_before_first_token(aclient: openai.AsyncOpenAI, client: openai.OpenAI, batch_id: str) -> int:
    """How many batch lines finish between sending an interactive request and its first token."""
    def completed() -> int:
        return client.batches.retrieve(batch_id).request_counts.completed

    before = completed()
    # 16 tokens and no early end: a few random tokens of the tiny model may be an end of text or
    # an unfinished UTF-8 sequence, and then no chunk carries text at all.
    stream = await aclient.chat.completions.create(model=BATCH_MODEL, stream=True, max_tokens=16,
                                                   extra_body={"ignore_eos": True},
                                                   messages=[{"role": "user", "content": "Hello?"}])
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return completed() - before
    finally:
        await stream.close()
    raise AssertionError("no token streamed")


async def test_interactive_requests_overtake_a_running_batch(own_gateway, broker):
    # Hundreds of batch lines queued ahead: served in arrival order, an interactive request would
    # wait until all of them are done; by priority it waits only for a free engine slot, while at
    # most the lines already on the engine (8) finish. Counted in lines, not timed: the ratio holds
    # on a fast machine and a loaded one alike.
    in_flight = 400
    gw = own_gateway(extra_env={"CHATAI_GATEWAY_BATCH_MAX_IN_FLIGHT": str(in_flight)})
    aclient, client = gw.async_client(), gw.client()
    await aclient.chat.completions.create(model=BATCH_MODEL, max_tokens=4,  # warm-up
                                          messages=[{"role": "user", "content": "Hello?"}])
    # Large and slow enough to outlast the measurement on a fast machine; cancelled at the end.
    batch = submit(client, lines(8000, prefix="load", max_tokens=32, ignore_eos=True))
    wait_batch(client, batch.id, lambda b: b.request_counts and b.request_counts.completed >= 16, 120,
               "the batch to be running")
    overtaken, statuses = [], []

    def backlog() -> int | None:
        """The batch lines queued ahead, once there are enough of them to wait behind."""
        depth = model_queue(broker)["messages_ready"]
        if depth >= in_flight // 4:
            return depth
        status = client.batches.retrieve(batch.id).status
        assert status == "in_progress", f"the batch ended ({status}) before a backlog of {in_flight // 4} lines"
        return None

    for _ in range(5):
        depth = await wait_until(backlog, 60, f"a backlog of {in_flight // 4} batch lines")
        overtaken.append((depth, await _lines_done_before_first_token(aclient, client, batch.id)))
        statuses.append(client.batches.retrieve(batch.id).status)
    progress = client.batches.retrieve(batch.id).request_counts
    client.batches.cancel(batch.id)
    print(f"\n(batch lines queued ahead, batch lines done before the first token): {overtaken}; "
          f"batch {progress.completed}/{progress.total} done")
    for depth, done in overtaken:
        assert done < depth // 2, f"an interactive request waited behind the batch: {overtaken}"
    assert set(statuses) == {"in_progress"}, f"the batch ended during the measurement: make it larger {statuses}"
    wait_batch(client, batch.id, lambda b: b.status == "cancelled", 30, "the load batch to be cancelled")


def test_completions_features_in_a_batch_are_accepted_and_refused_as_interactively(bgw):
    """Several prompts, token ids, logit_bias, echo with logprobs: vLLM's layer answers a line as
    it answers the endpoint (tests/test_openai_features.py): the same shape, the same 400s, and
    what vLLM's server lets through (a bias of 101, clamped; 65 prompts) goes through here too."""
    client = bgw.client()

    def line(cid: str, **body) -> dict:
        return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
                "body": {"model": BATCH_MODEL, "max_tokens": 3, "ignore_eos": True, **body}}

    items = [
        line("several", prompt=["The cluster", "A GPU"], n=2),
        line("ids", prompt=[[5, 6, 7], [8, 9]]),
        line("bias", prompt="x", logit_bias={"5": 100}, logprobs=0),
        line("echo", prompt="The cluster is", echo=True, logprobs=1),
        line("bias-out-of-range", prompt="x", logit_bias={"5": 101}),
        line("too-many", prompt=["p"] * 65),
        line("negative-id", prompt=[1, -1]),
        line("out-of-vocab", prompt=[1, 10**6]),  # only the worker knows the vocabulary
    ]
    done = wait_done(client, submit(client, items, endpoint="/v1/completions").id, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == 6
    out = {o["custom_id"]: o["response"]["body"] for o in read(client, done.output_file_id)}
    assert [c["index"] for c in out["several"]["choices"]] == [0, 1, 2, 3]
    assert out["several"]["usage"]["completion_tokens"] == 12
    assert len(out["ids"]["choices"]) == 2 and out["ids"]["usage"]["prompt_tokens"] == 5
    assert len(set(out["bias"]["choices"][0]["logprobs"]["tokens"])) == 1  # token 5, three times
    echo = out["echo"]["choices"][0]
    assert echo["text"].startswith("The cluster is")
    assert echo["logprobs"]["token_logprobs"][0] is None
    assert len(echo["logprobs"]["tokens"]) == out["echo"]["usage"]["prompt_tokens"] + 3
    errors = {e["custom_id"]: e["response"] for e in read(client, done.error_file_id)}
    assert set(errors) == {"negative-id", "out-of-vocab"}
    assert all(r["status_code"] == 400 and r["body"]["error"]["message"] for r in errors.values())
    assert len(out["too-many"]["choices"]) == 65


def test_cli_submit_plain_prompts_wait_and_download(bgw, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Say something about the number {i}." for i in range(20)) + "\n\n")
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "CHATAI_API_KEY": bgw.api_key, "CHATAI_BASE_URL": bgw.base_url}
    cli = [sys.executable, "-m", "chatai.cli", "batch"]
    run = subprocess.run([*cli, "submit", str(prompts), "--model", BATCH_MODEL, "--max-tokens", "4", "-o", str(out),
                          "--poll", "0.3"], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    batch_id = run.stdout.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    assert "20/20 completed" in run.stderr and "completed" in run.stderr
    # No terminal here: progress comes as lines (at each change of status, and every few seconds).
    progress = [ln for ln in run.stderr.splitlines() if ln.startswith(f"{batch_id}: ")]
    assert progress and progress[-1].startswith(f"{batch_id}: completed 20/20 done, 0 failed"), run.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"prompt-{i:02d}" for i in range(1, 21)]  # line numbers
    assert all(r["response"]["status_code"] == 200 for r in results)

    status = subprocess.run([*cli, "status", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "completed" in status.stdout and "20/20" in status.stdout
    listing = subprocess.run([*cli, "list"], env={**env, "COLUMNS": "80"}, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and batch_id in listing.stdout and "…" not in listing.stdout  # ids whole
    again = tmp_path / "again.jsonl"
    dl = subprocess.run([*cli, "download", batch_id, "-o", str(again)], env=env, capture_output=True, text=True,
                        timeout=60)
    assert dl.returncode == 0 and again.read_text() == out.read_text()
    cancel = subprocess.run([*cli, "cancel", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 1 and "409" in cancel.stderr  # a completed batch cannot be cancelled
    bad = subprocess.run([*cli, "status", batch_id], env={**env, "CHATAI_API_KEY": "sk-chatai-wrong-key-000000"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "401" in bad.stderr
