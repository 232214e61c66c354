"""Worker configuration: one settings class, from ``CHATAI_WORKER_*`` variables and CLI flags.

The broker URL carries the worker user's password: pass it through the environment (argv is
visible to every user in ``ps``), and it is a ``SecretStr`` so it never lands in a log or repr.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpu_worker import slurm


def _on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch always exists where vLLM does
        return False


def default_worker_id() -> str:
    """Unique and readable: the Slurm array task or job when there is one, else node-pid."""
    node = socket.gethostname().split(".")[0]
    if job := slurm.job_id():
        return f"{node}-{job}-{os.getpid()}"
    return f"{node}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATAI_WORKER_", extra="ignore")

    broker_url: SecretStr = SecretStr("amqp://worker:worker@127.0.0.1:5672/chatai")

    # The engine.
    model: Path | None = None  # a Hugging Face model folder
    served_model_name: str | None = None  # the queue to consume; default: the folder's name
    # Engine concurrency = AMQP prefetch = advertised capacity. None: vLLM's own default for this
    # hardware, the one its OpenAI server uses (256 on most GPUs, 1024 on 70+ GB ones, 128 on CPU).
    max_num_seqs: int | None = None
    max_model_len: int | None = None  # None: the model's own context length
    dtype: str | None = None  # None: float32 on CPU (bf16 crashes there), auto on GPU
    gpu_memory_utilization: float | None = None  # None: 0.9 on GPU, 0.1 on CPU (means CPU RAM)
    kv_cache_space_gb: float = 1.0  # VLLM_CPU_KVCACHE_SPACE, CPU backend only
    enforce_eager: bool = True  # no compilation: start-up in seconds matters for backfill jobs
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False

    # Lifecycle.
    heartbeat_interval: float = 5.0
    idle_timeout: float = 0.0  # seconds with nothing in flight and nothing received; 0 = never
    drain_grace: float = 30.0  # after SIGTERM, time to finish held work before returning the rest
    job_end_margin: float = 30.0  # extra time kept before the Slurm job's end
    job_end_poll: float = 60.0  # how often to re-read the job's end time (it may be extended)
    # RabbitMQ consumer priority (x-priority): a queue feeds higher-priority workers first and
    # lower ones only when those are full, e.g. reserved nodes before backfill scavengers.
    consumer_priority: int = 0
    cancel_memory: float = 300.0  # seconds a cancelled id is remembered, for cancels that overtake

    # "vllm" serves the model. "synthetic" is a load-test tool (gpu_worker/synthetic.py): filler
    # tokens on a fixed step clock, no model, for measuring the relay path alone.
    engine: Literal["vllm", "synthetic"] = "vllm"
    synthetic_step_ms: float = 20.0
    synthetic_tokens_per_step: int = 1

    # Reply coalescing: the first delta at once, then at most every ms / tokens.
    coalesce_ms: float = 20.0
    coalesce_tokens: int = 16

    worker_id: str = ""

    @model_validator(mode="after")
    def _defaults(self) -> "WorkerSettings":
        if not self.worker_id:
            self.worker_id = default_worker_id()
        if self.engine == "synthetic" and not self.served_model_name:
            self.served_model_name = "synthetic"
        if self.model is not None and not self.served_model_name:
            self.served_model_name = Path(self.model).name
        return self

    def resolved_dtype(self) -> str:
        return self.dtype or ("auto" if _on_gpu() else "float32")

    def resolved_gpu_memory_utilization(self) -> float:
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return 0.9 if _on_gpu() else 0.1

    def engine_kwargs(self) -> dict[str, object]:
        """vLLM engine arguments, the one place they are derived: the worker, ``chatai bench``'s
        vLLM server and its in-process ceiling all run the engine with exactly these."""
        if self.model is None:
            raise ValueError("no model: give --model PATH or CHATAI_WORKER_MODEL")
        return {
            "model": str(self.model),
            "served_model_name": [self.served_model_name] if self.served_model_name else None,
            "dtype": self.resolved_dtype(),
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "gpu_memory_utilization": self.resolved_gpu_memory_utilization(),
            "enforce_eager": self.enforce_eager,
            "tensor_parallel_size": self.tensor_parallel_size,
            # One GPU: run the model in the engine core process instead of one more spawned
            # process (seconds less start-up, one interpreter less in memory).
            "distributed_executor_backend": "uni" if self.tensor_parallel_size == 1 else None,
            "trust_remote_code": self.trust_remote_code,
            "disable_log_stats": True,
        }

    def engine_env(self) -> dict[str, str]:
        """Environment the engine reads at start-up (the CPU backend's KV cache size, in GiB)."""
        return {"VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_space_gb:g}"}
