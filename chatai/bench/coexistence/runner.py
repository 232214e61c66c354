"""One run of the experiment: a fresh cluster, the trace's regular jobs at their times, and
(optionally) the broker, gateway, two ``chatai autoscale`` daemons and a chat stream.

Why a fresh cluster per run: both runs must start from the same empty state and job numbering,
and the job completion log of one run must hold that run only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatai.bench.coexistence.cluster import NODES, REGULAR, SCAVENGER, jobcomp_path, make_cluster
from chatai.bench.coexistence.jobcomp import JobRecord, parse_ctld_times, parse_jobcomp, refine
from chatai.bench.coexistence.trace import TraceJob
from chatai.devstack.processes import Child, free_port, http_ok, spawn, start_gateway, wait_until
from slurm_jobs.slurm import Slurm

SYNTHETIC = "synthetic"
REAL = "tiny"


@dataclass(frozen=True)
class WorkerPlan:
    """The inference side of the run with workers."""

    synthetic_floor: int  # synthetic workers the autoscaler keeps running or pending
    real_workers: int  # real vLLM workers (tiny model), 0 or 1 on this machine
    model_dir: Path | None  # the tiny model (needed for real workers)
    drain_grace_s: int
    request_rate: float = 2.0  # chat requests per second
    real_share: float = 0.2  # of the requests, for the real worker's model
    max_tokens: int = 32
    synthetic_step_ms: float = 50.0
    time: str = "00:30:00"
    time_min: str | None = "00:05:00"
    give_way: bool = False  # the autoscaler drains workers for waiting regular jobs (--yield-to-pending)
    yield_interval_s: float = 0.2  # its looks for them (--yield-interval), a fifth of the cluster's 1 s pass
    drain_returns_whole: bool = False  # a draining worker gives its non-streamed answers back at once

    def worker_args(self, args: str) -> str:
        """``chatai worker`` options for the workers' sbatch script: the engine's, then the drain's."""
        return args + (" --drain-returns-whole" if self.drain_returns_whole else "")


@dataclass
class RunResult:
    t0: float
    records: list[JobRecord]
    nodes: list[str]
    last_regular_end: float  # seconds after t0
    traffic: dict = field(default_factory=dict)
    redone: int = 0
    returned: int = 0


def regular_script(job: TraceJob) -> str:
    return f"#!/bin/bash\nexec sleep {job.run_s:.1f}\n"


def regular_options(job: TraceJob) -> list[str]:
    return [f"--partition={REGULAR}", f"--job-name={job.name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
            "--gres=gpu:1", f"--time={job.limit_min}", "--no-requeue", "--output=/dev/null"]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _say(msg: str) -> None:
    print(f"coexistence: {msg}", flush=True)


def run_once(trace: list[TraceJob], work: Path, grace_s: int, plan: WorkerPlan | None, nodes: int = NODES) -> RunResult:
    """Run the trace on a fresh cluster of ``nodes`` (with workers when ``plan`` is given) and collect the jobs."""
    work.mkdir(parents=True, exist_ok=True)
    cluster = make_cluster(work / "slurm", grace_s, nodes)
    cluster.start()
    slurm = Slurm(env=cluster.env)
    services: _Services | None = None
    try:
        if plan is not None:
            services = _Services(work, cluster.env, plan)
            services.start()
            services.settle(slurm)
        t0 = time.time()
        for job in trace:
            delay = t0 + job.arrival_s - time.time()
            if delay > 0:
                time.sleep(delay)
            slurm.sbatch(regular_script(job), regular_options(job))
            if services:
                services.check()
        _say(f"all {len(trace)} regular jobs submitted; waiting for them to end")
        wait_until(lambda: not [j for j in slurm.squeue() if j.name.startswith("regular-")],
                   3600, "the regular jobs to end", every=1.0)
        traffic: dict = {}
        redone = returned = 0
        if services is not None:
            traffic = services.finish()
            redone, returned = services.redone()
    finally:
        if services is not None:
            services.stop()
        cluster.stop()
    records = refine(parse_jobcomp(_read(jobcomp_path(cluster))), parse_ctld_times(_read(cluster.ctld_log)))
    regular_end = max((r.end for r in records if r.partition == REGULAR), default=t0) - t0
    return RunResult(t0, records, [n.name for n in cluster.nodes], regular_end, traffic, redone, returned)


class _Services:
    """Broker, gateway, autoscalers and traffic for the run with workers."""

    def __init__(self, work: Path, slurm_env: dict[str, str], plan: WorkerPlan) -> None:
        self.work, self.slurm_env, self.plan = work, slurm_env, plan
        self.node = None
        self.children: list[Child] = []
        self.gateway: Child | None = None
        self._traffic_thread: threading.Thread | None = None
        self._traffic_stop: asyncio.Event | None = None
        self._traffic_loop: asyncio.AbstractEventLoop | None = None
        self._traffic_result: dict = {}

    @property
    def models(self) -> list[str]:
        return [SYNTHETIC] + ([REAL] if self.plan.real_workers else [])

    def start(self) -> None:
        from broker_config.definitions import Definitions, load_or_create_passwords
        from broker_config.provision import apply as apply_definitions
        from broker_config.admin import BrokerAdmin
        from chatai.devstack.broker_node import LocalBrokerNode
        from gateway import private
        from gateway.keys import KeyStore

        self.node = LocalBrokerNode.create(name="chatai-coexist")
        self.node.start()
        passwords = load_or_create_passwords(self.work / "broker-secrets.json")
        apply_definitions(BrokerAdmin(node=self.node.node), Definitions(models=self.models, passwords=passwords))
        url = lambda role: f"amqp://{role}:{passwords[role]}@127.0.0.1:{self.node.port}/chatai"  # noqa: E731
        url_file = self.work / "worker-broker-url"
        url_file.touch(mode=0o600, exist_ok=True)
        url_file.write_text(url("worker") + "\n")
        gw_state = self.work / "gateway"
        keys = KeyStore(private.database(gw_state))
        self.api_key = keys.create("bench", limits={"rpm": 0, "tpm": 0, "max_concurrent": 0})[1]
        keys.close()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.gateway = start_gateway(gw_state, port, url("gateway"), self.work / "gateway.log",
                                     args=["--broker-direct"], env={"CHATAI_GATEWAY_QUEUE_TIMEOUT": "900"})
        self.children.append(self.gateway)
        self.gateway.wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60, "the gateway")
        p = self.plan
        self.log_dir = self.work / "worker-logs"
        base_env = {
            **os.environ, **self.slurm_env,
            "CHATAI_SLURM_BROKER_URL_FILE": str(url_file),
            "CHATAI_SLURM_OPERATOR_BROKER_URL": url("operator"),
            "CHATAI_SLURM_LOG_DIR": str(self.log_dir),
            "CHATAI_SLURM_PARTITION": SCAVENGER, "CHATAI_SLURM_GRES": "gpu:1", "CHATAI_SLURM_CPUS_PER_TASK": "1",
            "CHATAI_SLURM_TIME": p.time, "CHATAI_SLURM_TIME_MIN": p.time_min or "none",
            "CHATAI_SLURM_SIGNAL_GRACE": str(p.drain_grace_s + 10), "CHATAI_SLURM_DRAIN_GRACE": str(p.drain_grace_s),
            "CHATAI_SLURM_IDLE_TIMEOUT": "0",
            "CHATAI_WORKER_HEARTBEAT_INTERVAL": "1",
            "CHATAI_WORKER_SYNTHETIC_STEP_MS": f"{p.synthetic_step_ms:g}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                        os.environ.get("PYTHONPATH")])),
        }
        base_env.pop("CHATAI_WORKER_BROKER_URL", None)
        model_path = str(p.model_dir or self.work)
        self._autoscale(SYNTHETIC, model_path, p.synthetic_floor, {**base_env,
                        "CHATAI_SLURM_WORKER_ARGS": p.worker_args("--engine synthetic --max-num-seqs 64")},
                        give_way=p.give_way)  # one daemon gives way for every worker
        if p.real_workers:
            self._autoscale(REAL, str(p.model_dir), p.real_workers, {
                **base_env, "CHATAI_SLURM_WORKER_ARGS": p.worker_args("--max-num-seqs 4 --max-model-len 512"),
                "CHATAI_WORKER_KV_CACHE_SPACE_GB": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
        self._start_traffic()

    def _autoscale(self, model: str, path: str, floor: int, env: dict[str, str], give_way: bool = False) -> None:
        argv = [sys.executable, "-m", "chatai.cli", "autoscale", "--model", f"{model}={path}",
                "--min-workers", str(floor), "--max-workers", str(floor), "--interval", "1",
                "--yield-to-pending" if give_way else "--no-yield-to-pending",
                "--yield-interval", str(self.plan.yield_interval_s)]
        child = spawn(f"autoscale-{model}", argv, self.work / f"autoscale-{model}.log", env=env)
        self.children.append(child)

    def _start_traffic(self) -> None:
        from chatai.bench.coexistence.traffic import steady_stream

        weights = {SYNTHETIC: 1.0 - (self.plan.real_share if self.plan.real_workers else 0.0)}
        if self.plan.real_workers:
            weights[REAL] = self.plan.real_share
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._traffic_loop = loop
            self._traffic_stop = asyncio.Event()
            ready.set()
            counts = loop.run_until_complete(steady_stream(self.base_url, self.api_key, weights, self.plan.request_rate,
                                                           self.plan.max_tokens, self._traffic_stop))
            self._traffic_result = counts.as_dict()
            loop.close()

        self._traffic_thread = threading.Thread(target=run, name="coexistence-traffic", daemon=True)
        self._traffic_thread.start()
        ready.wait(10)

    def settle(self, slurm: Slurm, timeout: float = 90.0) -> None:
        """Wait until the autoscalers' floor runs, so the trace starts on a cluster whose idle GPUs
        workers already hold, as on a site where they have run all along: otherwise the first
        seconds of every gap are the autoscaler's start-up, not the policy."""
        floor = self.plan.synthetic_floor + self.plan.real_workers
        try:
            wait_until(lambda: sum(1 for j in slurm.squeue() if j.name.startswith("chatai-worker-") and j.running)
                       >= floor, timeout, "the workers' floor to run", every=0.5, check=self.check)
        except TimeoutError as exc:  # a slow start is reported, the run goes on
            _say(f"workers not all running before the trace: {exc}")

    def check(self) -> None:
        for c in self.children:
            c.check()

    def finish(self, timeout: float = 600.0) -> dict:
        """Stop sending, and wait for every answer (the workers keep serving meanwhile)."""
        _say("stopping the chat stream; waiting for the last answers")
        if self._traffic_loop and self._traffic_stop:
            self._traffic_loop.call_soon_threadsafe(self._traffic_stop.set)
        if self._traffic_thread:
            self._traffic_thread.join(timeout)
        return self._traffic_result

    def redone(self) -> tuple[int, int]:
        """(requests another worker redid after a drain returned them, requests returned), from worker logs."""
        returned, redone = set(), set()
        for f in self.log_dir.glob("*.out"):
            for line in f.read_text(errors="replace").splitlines():
                m = re.search(r"request_id=(\S+) attempt=(\d+) (\w+)", line)
                if not m:
                    continue
                if m.group(3) == "requeued":
                    returned.add(m.group(1))
                elif m.group(3) == "final" and int(m.group(2)) > 1:
                    redone.add(m.group(1))
        return len(redone & returned) or len(redone), len(returned)

    def stop(self) -> None:
        for c in self.children:
            if c.name.startswith("autoscale"):
                c.signal(signal.SIGTERM)
        for c in self.children:
            if c.name.startswith("autoscale"):
                try:
                    c.wait(20)
                except subprocess.TimeoutExpired:
                    c.kill()
        slurm = Slurm(env=self.slurm_env)
        try:
            jobs = [j for j in slurm.squeue() if j.name.startswith("chatai-worker-")]
            slurm.cancel([j.display_id for j in jobs if j.pending])
            slurm.signal([j.display_id for j in jobs if j.running], "TERM")
            wait_until(lambda: not [j for j in slurm.squeue() if j.name.startswith("chatai-worker-")],
                       self.plan.drain_grace_s + 30, "the workers to drain", every=0.5)
        except Exception as exc:  # noqa: BLE001 - the cluster's stop kills what is left
            _say(f"workers did not all drain: {exc}")
        if self.gateway is not None:
            self.gateway.stop(timeout=20)
        if self.node is not None:
            self.node.stop()
