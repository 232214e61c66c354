"""``chatai bench affinity``: multi-turn conversations against 1 worker, then 2 with affinity off and on.

Each conversation is a closed loop: its next turn (the whole history plus a new user message) is
sent when the last answer ends, all conversations at once. Every run uses texts of its own, so
no run finds another's prefixes in a worker's cache. Per run it measures the prefix-cache hit rate
(the workers' own counts, from their heartbeats as the gateway shows them), time to first token of
follow-up turns (turn 2 on), throughput, which worker answered each request (the workers' logs)
and whether any request was lost or answered twice.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from chatai.bench.load import StreamFailed, percentile, sse_chunks
from broker_config.topology import AFFINITY_SPILL_MS
from chatai.devstack import processes

MODEL = "tiny"
FINAL_LINE = re.compile(r"request_id=(\S+) attempt=(\d+) final 200")


@dataclass
class ConversationLoad:
    conversations: int = 48
    turns: int = 6
    system_tokens: int = 400
    user_tokens: int = 60
    max_tokens: int = 32


@dataclass
class Turn:
    conversation: int
    turn: int
    request_id: str | None = None
    ttft: float = math.nan
    latency: float = math.nan
    completion_tokens: int = 0
    error: str | None = None


class Texts:
    """Made-up text of about a given number of tokens (counted with the model's tokenizer)."""

    def __init__(self, model_dir: Path, seed: int) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self._rng = random.Random(seed)
        self._words = ["cluster", "queue", "worker", "cache", "prefix", "token", "model", "slurm", "broker",
                       "gateway", "node", "batch", "stream", "answer", "question", "turn", "memory", "job"]

    def make(self, tokens: int) -> str:
        words: list[str] = []
        while len(self._tok.encode(" ".join(words))) < tokens:
            words += [self._rng.choice(self._words) + str(self._rng.randrange(100)) for _ in range(8)]
        return " ".join(words)


async def _turn(client: httpx.AsyncClient, messages: list[dict], rec: Turn, max_tokens: int) -> str:
    """One streamed turn; returns the answer's text (the next turn's history needs it)."""
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    text: list[str] = []
    t0 = time.perf_counter()
    try:
        async for chunk in sse_chunks(client, "/chat/completions", body):
            rec.request_id = rec.request_id or chunk.get("id", "").removeprefix("chatcmpl-") or None
            for choice in chunk.get("choices") or []:
                if piece := choice.get("delta", {}).get("content"):
                    if math.isnan(rec.ttft):
                        rec.ttft = time.perf_counter() - t0
                    text.append(piece)
            if chunk.get("usage"):
                rec.completion_tokens = chunk["usage"]["completion_tokens"]
        rec.latency = time.perf_counter() - t0
    except StreamFailed as exc:
        rec.error = str(exc)
    except (httpx.HTTPError, ValueError) as exc:
        rec.error = type(exc).__name__
    return "".join(text)


async def drive(base_url: str, api_key: str, load: ConversationLoad, texts: Texts) -> tuple[list[Turn], float]:
    """All conversations at once, each a closed loop of its turns; the turns and the wall time."""
    system = texts.make(load.system_tokens)  # shared by every conversation of the run
    users = [[texts.make(load.user_tokens) for _ in range(load.turns)] for _ in range(load.conversations)]
    records: list[Turn] = []
    limits = httpx.Limits(max_connections=load.conversations + 4, max_keepalive_connections=load.conversations + 4)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                                 timeout=600) as client:
        async def conversation(c: int) -> None:
            messages = [{"role": "system", "content": system}]
            for t in range(load.turns):
                messages.append({"role": "user", "content": users[c][t]})
                rec = Turn(c, t)
                records.append(rec)
                messages.append({"role": "assistant", "content": await _turn(client, messages, rec, load.max_tokens)})
                if rec.error:
                    return

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(load.conversations)))
        return records, time.perf_counter() - t0


@dataclass
class RunResult:
    name: str
    workers: int
    affinity: bool
    requests: int
    failed: int
    hit_rate: float | None
    followup_ttft_p50_ms: float
    followup_ttft_p99_ms: float
    first_turn_ttft_p50_ms: float
    output_tok_s: float
    share: dict[str, int] = field(default_factory=dict)  # worker id -> requests answered
    lost: int = 0  # failed, or answered by no worker
    duplicated: int = 0  # answered more than once
    load_average: list[float] = field(default_factory=list)

    @property
    def max_worker_share(self) -> float:
        total = sum(self.share.values())
        return max(self.share.values()) / total if total else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "max_worker_share": self.max_worker_share}


def finals(logs: dict[str, Path]) -> dict[str, list[str]]:
    """Request id -> the workers whose log says they answered it (200)."""
    out: dict[str, list[str]] = {}
    for worker_id, path in logs.items():
        for m in FINAL_LINE.finditer(path.read_text(errors="replace")):
            out.setdefault(m.group(1), []).append(worker_id)
    return out


def cache_totals(base_url: str) -> tuple[int, int]:
    model = httpx.get(base_url + "/health", timeout=10).json()["models"].get(MODEL, {})
    return model.get("prefix_cache_queries", 0), model.get("prefix_cache_hits", 0)


def summarize(name: str, workers: int, affinity: bool, turns: list[Turn], wall: float,
              cache: tuple[int, int], answered: dict[str, list[str]]) -> RunResult:
    ok = [t for t in turns if t.error is None and t.request_id]
    share = Counter(w for t in ok for w in answered.get(t.request_id or "", [])[:1])
    lost = sum(1 for t in turns if t.error or not answered.get(t.request_id or ""))
    ms = lambda values, p: round(percentile(values, p) * 1000, 1)  # noqa: E731
    followups = [t.ttft for t in ok if t.turn > 0]
    return RunResult(
        name=name, workers=workers, affinity=affinity, requests=len(turns), failed=len(turns) - len(ok),
        hit_rate=round(cache[1] / cache[0], 4) if cache[0] else None,
        followup_ttft_p50_ms=ms(followups, 50), followup_ttft_p99_ms=ms(followups, 99),
        first_turn_ttft_p50_ms=ms([t.ttft for t in ok if t.turn == 0], 50),
        output_tok_s=round(sum(t.completion_tokens for t in ok) / wall, 1) if wall else 0.0,
        share=dict(share), lost=lost, duplicated=sum(1 for t in ok if len(answered.get(t.request_id or "", [])) > 1),
        load_average=[round(x, 2) for x in os.getloadavg()])


@dataclass
class Bench:
    """The broker node, the workers and a gateway of one bench run, all private and stopped at the end."""

    work: Path
    model_dir: Path
    max_num_seqs: int
    max_model_len: int
    children: list[processes.Child] = field(default_factory=list)
    worker_logs: dict[str, Path] = field(default_factory=dict)

    @contextmanager
    def broker(self) -> Iterator[dict[str, str]]:
        from broker_config.admin import BrokerAdmin
        from broker_config.definitions import DEFAULT_GATEWAY, ROLES, Definitions, new_password
        from broker_config.provision import Limits, apply
        from broker_config.topology import VHOST
        from chatai.devstack.broker_node import LocalBrokerNode

        node = LocalBrokerNode.create(name="chatai-bench-affinity")
        node.start()
        try:
            passwords = {u: new_password() for u in (DEFAULT_GATEWAY, *ROLES)}
            apply(BrokerAdmin(node=node.node), Definitions(models=[MODEL], passwords=passwords),
                  Limits(gateway_max_connections=64, gateway_max_channels=1024))
            yield {u: f"amqp://{u}:{p}@127.0.0.1:{node.port}/{VHOST}" for u, p in passwords.items()}
        finally:
            for child in self.children:
                child.stop(timeout=30, group=True)
            node.stop()

    def start_worker(self, url: str, n: int) -> processes.Child:
        worker_id = f"bench-w{n}-{os.getpid()}"
        log = self.work / f"{worker_id}.log"
        child = processes.start_worker(
            self.model_dir, MODEL, url, log, name=f"worker {n}",
            args=["--max-num-seqs", str(self.max_num_seqs), "--max-model-len", str(self.max_model_len),
                  "--heartbeat-interval", "1", "--worker-id", worker_id],
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1"})
        self.children.append(child)
        self.worker_logs[worker_id] = log
        return child

    @contextmanager
    def gateway(self, url: str, affinity: bool, name: str) -> Iterator[tuple[str, str]]:
        from gateway import private
        from gateway.keys import KeyStore

        state = self.work / f"gateway-{name}"
        state.mkdir(parents=True)
        keys = KeyStore(private.database(state))
        _, key = keys.create("bench", limits={"rpm": 0, "tpm": 0, "max_concurrent": 0})
        keys.close()
        port = processes.free_port()
        gw = processes.start_gateway(state, port, url, state / "gateway.log", args=["--broker-direct"],
                                     env={"CHATAI_GATEWAY_AFFINITY": "true" if affinity else "false"})
        base = f"http://127.0.0.1:{port}"
        try:
            gw.wait_until(lambda: processes.http_ok(base + "/health"), 60, "the gateway to answer")
            yield base, key
        finally:
            gw.stop(timeout=20)


def wait_serving(base: str, workers: int, timeout: float = 120.0) -> None:
    def ready() -> bool:
        try:
            return httpx.get(base + "/health", timeout=5).json()["models"].get(MODEL, {}).get("ready", 0) >= workers
        except (httpx.HTTPError, ValueError):
            return False

    processes.wait_until(ready, timeout, f"{workers} ready worker(s) in the gateway's view")


def one_run(bench: Bench, url: str, name: str, workers: int, affinity: bool, load: ConversationLoad,
            texts: Texts, say) -> RunResult:
    with bench.gateway(url, affinity, name) as (base, key):
        wait_serving(base, workers)
        time.sleep(2.5)  # every worker's latest counts in the gateway's view
        before = cache_totals(base)
        turns, wall = asyncio.run(drive(base + "/v1", key, load, texts))
        time.sleep(2.5)  # the heartbeats that carry the run's last counts
        after = cache_totals(base)
    answered = finals(bench.worker_logs)
    result = summarize(name, workers, affinity, turns, wall, (after[0] - before[0], after[1] - before[1]), answered)
    say(f"  {name}: hit rate {_pct(result.hit_rate)}, follow-up TTFT p50 {result.followup_ttft_p50_ms} ms "
        f"p99 {result.followup_ttft_p99_ms} ms, {result.output_tok_s} tok/s, shares {result.share}, "
        f"lost {result.lost}, duplicated {result.duplicated}, load {result.load_average}")
    return result


async def spill_probe(gateway_url: str, busy: str, idle: str, capacity: int, max_model_len: int,
                      samples: int = 8) -> dict:
    """How long a request offered to a full worker waits before another starts it (the spill),
    next to one offered to an idle worker (no spill): queue-wait figures in ms, through the broker
    as a gateway publishes (``GatewayBroker``), the full worker kept busy with long requests."""
    from broker_config.messages import ApiRequest, Started
    from broker_config.topology import INTERACTIVE_PRIORITY
    from gateway.cluster.broker import GatewayBroker
    from gateway.cluster.registry import WorkerRegistry

    broker = GatewayBroker(gateway_url, WorkerRegistry())
    broker.start()
    await asyncio.wait_for(broker.ready.wait(), 60)

    def request(i: str, max_tokens: int) -> ApiRequest:
        return ApiRequest(request_id=f"probe-{i}-{os.getpid()}-{time.monotonic_ns()}", model=MODEL,
                          endpoint="/v1/chat/completions", reply_to=broker.reply_queue_name,
                          body={"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True,
                                "messages": [{"role": "user", "content": f"probe {i}"}]})

    async def started(req: ApiRequest, prefer: str) -> tuple[float, str]:
        sub = broker.subscribe(req.request_id)
        t0 = time.perf_counter()
        await broker.publish_request(req, priority=INTERACTIVE_PRIORITY, ttl=120, prefer=prefer)
        while not isinstance(frame := await asyncio.wait_for(sub.frames.get(), 120), Started):
            pass
        return (time.perf_counter() - t0) * 1000, frame.worker_id

    try:
        # As long as the context allows: they outlast the probe (and are cancelled after it).
        fill = [request(f"fill{i}", max_model_len - 64) for i in range(capacity)]
        holders = await asyncio.gather(*(started(r, busy) for r in fill))
        spilled, direct = [], []
        for i in range(samples):
            spilled.append(await started(request(f"spill{i}", 1), busy))
            direct.append(await started(request(f"direct{i}", 1), idle))
        for r in fill:
            await broker.cancel(r.request_id, "probe done")
        ms = [round(t, 1) for t, _ in spilled]
        return {"full_worker_held": sum(w == busy for _, w in holders), "capacity": capacity,
                "spilled_wait_ms": ms, "spilled_to_other_worker": sum(w == idle for _, w in spilled),
                "direct_wait_ms": [round(t, 1) for t, _ in direct],
                "spill_delay_p50_ms": round(percentile(ms, 50) - percentile([t for t, _ in direct], 50), 1)}
    finally:
        await broker.close()


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def run(model_dir: Path, work: Path, load: ConversationLoad, max_num_seqs: int, max_model_len: int, say) -> dict:
    """The three runs: one worker; two, affinity off; two, affinity on."""
    from chatai.bench.report import machine

    info = machine()
    bench = Bench(work, model_dir, max_num_seqs, max_model_len)
    runs: dict[str, RunResult] = {}
    with bench.broker() as urls:
        first = bench.start_worker(urls["worker"], 1)
        processes.worker_ready(first, 300)
        say("run 1/3: one worker")
        runs["one_worker"] = one_run(bench, urls["gateway"], "one_worker", 1, True, load, Texts(model_dir, 1), say)
        second = bench.start_worker(urls["worker"], 2)
        processes.worker_ready(second, 300)
        say("run 2/3: two workers, affinity off")
        runs["affinity_off"] = one_run(bench, urls["gateway"], "affinity_off", 2, False, load, Texts(model_dir, 2), say)
        say("run 3/3: two workers, affinity on")
        runs["affinity_on"] = one_run(bench, urls["gateway"], "affinity_on", 2, True, load, Texts(model_dir, 3), say)
        say("spill probe: requests offered to a full worker, and to an idle one")
        ids = list(bench.worker_logs)
        probe = asyncio.run(spill_probe(urls["gateway"], ids[0], ids[1], max_num_seqs, max_model_len))
        say(f"  {probe}")
    names = ("one_worker", "affinity_off", "affinity_on")
    return {
        "machine": info,
        "load": asdict(load), "max_num_seqs": max_num_seqs, "max_model_len": max_model_len,
        "hit_rate": {n: runs[n].hit_rate for n in names},
        "followup_ttft_p50_ms": {n: runs[n].followup_ttft_p50_ms for n in names},
        "followup_ttft_p99_ms": {n: runs[n].followup_ttft_p99_ms for n in names},
        "output_tok_s": {n: runs[n].output_tok_s for n in names},
        "max_worker_share": runs["affinity_on"].max_worker_share,
        "max_worker_share_affinity_off": runs["affinity_off"].max_worker_share,
        "requests_lost": sum(r.lost for r in runs.values()),
        "requests_duplicated": sum(r.duplicated for r in runs.values()),
        "spill_bound_ms": AFFINITY_SPILL_MS,
        "spill_probe": probe,
        "runs": {n: r.as_dict() for n, r in runs.items()},
    }
