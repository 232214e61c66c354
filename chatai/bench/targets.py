"""The paths ``chatai bench`` compares, each started with exactly the worker's engine settings.

- ``vllm_server``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``;
  the ``vllm serve`` command does not start with the CPU package);
- ``chatai_stack``: this project's whole path through ``chatai dev``'s harness: gateway, SSH
  tunnel into a local sshd with the circuit breaker armed, RabbitMQ, one worker;
- ``ceiling``: the worker's engine adapter in-process (see ``chatai.bench.ceiling``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from chatai.bench.placement import Placement, cpu_list
from chatai.devstack.processes import free_port, http_ok, spawn
from gpu_worker.settings import WorkerSettings

SHARED = Placement.choose("shared")

# Worker options that shape the engine, passed to the worker as flags (same names as its CLI).
ENGINE_FLAGS = ("max_num_seqs", "max_model_len", "dtype", "gpu_memory_utilization", "kv_cache_space_gb")


@dataclass
class Endpoint:
    base_url: str  # ends in /v1
    api_key: str
    model: str
    pid: int  # the process that relays the tokens (vLLM's server, or the gateway)
    worker_pids: tuple[int, ...] = ()  # chatai's workers, when they run as children here


def vllm_server_argv(settings: WorkerSettings, port: int) -> list[str]:
    """vLLM's server command line for the worker's engine arguments."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), "--disable-uvicorn-access-log", *settings.vllm_argv()]


@contextmanager
def vllm_server(settings: WorkerSettings, log_dir: Path, timeout: float = 600.0,
                placement: Placement = SHARED) -> Iterator[Endpoint]:
    """vLLM's server, on the placement's node CPUs (its HTTP front end runs on the GPU node too)."""
    port = free_port()
    server = spawn("vllm-server", placement.node_command(vllm_server_argv(settings, port)),
                   log_dir / "vllm-server.log", env=settings.engine_env())
    try:
        server.wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/v1/models"), timeout, "vLLM's server to answer",
                        every=0.5)
        yield Endpoint(f"http://127.0.0.1:{port}/v1", "none", settings.served_model_name or "", server.pid)
    finally:
        server.stop(timeout=30, group=True)  # SIGTERM the group: vLLM's engine core is a child


def worker_flags(settings: WorkerSettings, names: tuple[str, ...] = ENGINE_FLAGS) -> list[str]:
    flags: list[str] = []
    for name in names:
        value = getattr(settings, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


@contextmanager
def chatai_stack(settings: WorkerSettings, state_dir: Path, tunnel: bool = True,
                 worker_env: dict[str, str] | None = None, timeout: float = 600.0,
                 gateway_replicas: int = 1, placement: Placement = SHARED, workers: int = 1) -> Iterator[Endpoint]:
    """The whole path as ``chatai dev`` runs it (tunnel and breaker on unless ``tunnel`` is False;
    ``gateway_replicas`` gateway processes on one port, sharing a private PostgreSQL).

    Always on a private broker node: a shared local RabbitMQ may carry another stack's workers
    for the same model, whose tokens would then be counted as this one's.
    """
    from chatai.devstack.stack import DevStack

    stack = DevStack(state_dir=state_dir, port=free_port(), model=settings.model,
                     served_model_name=settings.served_model_name or "tiny", tunnel=tunnel, broker="private",
                     worker_args=worker_flags(settings), worker_env=worker_env or {},
                     # The load is the point: no per-key rate or concurrency limit may shape it.
                     key_limits={"rpm": 0, "tpm": 0, "max_concurrent": 0}, ready_timeout=timeout,
                     gateway_replicas=gateway_replicas, workers=workers,
                     worker_cpus=cpu_list(placement.node) if placement.name != "shared" else None)
    try:
        info = stack.start()
        stack.wait_until_serving()
        workers_here = tuple(c.pid for name, c in stack.processes.items() if name.startswith("worker"))
        yield Endpoint(info["gateway_url"], stack.api_key or "", stack.served_model_name,
                       stack.processes["gateway"].pid, workers_here)
    finally:
        stack.stop()


def ceiling(settings: WorkerSettings, levels: list[dict], log_dir: Path, timeout: float = 1800.0,
            placement: Placement = SHARED) -> list[dict]:
    """Run the in-process ceiling in a child process (on the node's CPUs); its level results as dicts."""
    log = log_dir / "ceiling.log"
    with open(log, "ab") as err:
        out = subprocess.run(placement.node_command([sys.executable, "-m", "chatai.bench.ceiling",
                                                     settings.model_dump_json(), json.dumps(levels)]),
                             env={**os.environ, **settings.engine_env()}, stdout=subprocess.PIPE, stderr=err,
                             stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the ceiling run failed ({out.returncode}); log {log}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def scratch_dir(prefix: str) -> Path:
    """A private scratch folder (sshd insists its key folders are not world-writable)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
