"""Worker configuration: one settings class, from ``CHATAI_WORKER_*`` variables and CLI flags.

The broker URL carries the worker user's password: pass it through the environment (argv is
visible to every user in ``ps``), and it is a ``SecretStr`` so it never lands in a log or repr.
"""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
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

    broker_url: SecretStr = Field(SecretStr("amqp://worker:worker@127.0.0.1:5672/chatai"),
                                  description="Prefer CHATAI_WORKER_BROKER_URL: argv shows in ps.")

    # The engine.
    model: Path | None = Field(None, description="Model folder (Hugging Face layout).")
    served_model_name: str | None = Field(None, description="Model name clients ask for; the queue to consume "
                                          "(default: the folder's name).")
    # Engine concurrency = AMQP prefetch = advertised capacity. None: vLLM's own default for this
    # hardware, the one its OpenAI server uses (256 on most GPUs, 1024 on 70+ GB ones, 128 on CPU).
    max_num_seqs: int | None = Field(None, description="Engine concurrency = prefetch = capacity.")
    max_model_len: int | None = Field(None, description="Context length (default: the model's).")
    # None: float32 on CPU (bf16 crashes there), auto on GPU
    dtype: str | None = Field(None, description="float32 on CPU, auto on GPU by default.")
    gpu_memory_utilization: float | None = Field(None, description="Default 0.9 on GPU, 0.1 on CPU (CPU RAM).")
    kv_cache_space_gb: float = Field(1.0, description="KV cache GiB (CPU backend only).")
    # vLLM's CPU backend otherwise runs the model in a third process (its "mp" executor), one more
    # interpreter importing torch and vLLM: about 10 s of every start-up here. One engine process
    # is what vLLM does on a GPU at one GPU per engine; docs/worker.md, "Engine processes".
    cpu_single_process: bool = Field(True, description="CPU backend: run the model in the engine process.")
    # no compilation: start-up in seconds matters for backfill jobs
    enforce_eager: bool = Field(True, description="Skip graph compilation (start in seconds).")
    tensor_parallel_size: int = Field(1, description="GPUs per engine.")
    trust_remote_code: bool = Field(False, description="Let the model folder run its own code.")

    # vLLM's OpenAI layer, as its own server takes them (docs/worker.md has a table per family).
    tool_call_parser: str | None = Field(None, description="vLLM tool-call parser (hermes, llama3_json, "
                                         "mistral, openai, ...): tools in chat requests.")
    enable_auto_tool_choice: bool = Field(False, description="Let the model decide to call tools "
                                          "(tool_choice auto); needs --tool-call-parser.")
    reasoning_parser: str | None = Field(None, description="vLLM reasoning parser (deepseek_r1, qwen3, ...).")
    chat_template: str | None = Field(None, description="A chat template file instead of the model's own.")
    runner: str | None = Field(None, description="vLLM runner: generate (default) or pooling "
                               "(embedding models, /v1/embeddings).")
    convert: str | None = Field(None, description="vLLM model conversion, e.g. embed: serve a "
                                "causal LM's weights as an embedding model.")
    lora_modules: str = Field("", description="LoRA adapters served beside the base model: "
                              "'name=path name2=path2' (each name is a model clients may ask for).")
    max_lora_rank: int | None = Field(None, description="Largest LoRA rank to serve (vLLM's default: 16).")
    vllm_args: str = Field("", description="More of vLLM's serve arguments, as one shell-quoted string, "
                           "passed through unchanged (e.g. '--max-logprobs 10').")

    # Lifecycle.
    heartbeat_interval: float = Field(5.0, description="Seconds between heartbeats.")
    idle_timeout: float = Field(0.0, description="Exit 0 after this many idle seconds; 0 = never.")
    drain_grace: float = Field(30.0, description="Seconds to finish held work after SIGTERM.")
    # A stream's tokens are already with its user, so only another worker's redo of a whole
    # answer is invisible to the client (it waits longer); giving those back frees the GPU as
    # soon as the streams end, which is what a regular job waiting for it needs (docs/worker.md).
    drain_returns_whole: bool = Field(False, description="On SIGTERM, give whole (non-streamed) answers "
                                      "back to the queue at once, for another worker to redo; only "
                                      "streams are finished within the grace.")
    # vLLM waits 5 s for its engine core process to end by itself; on the CPU build that is how
    # long it takes every time, and a preempted worker's GPU waits for it (docs/worker.md).
    engine_stop_timeout: float = Field(2.0, gt=0, description="Seconds the engine's processes get to "
                                       "end by themselves on the way out before they are killed.")
    job_end_margin: float = Field(30.0, description="Extra seconds kept before the Slurm job ends.")
    job_end_poll: float = Field(60.0, description="Seconds between re-reads of the job's end time.")
    # RabbitMQ consumer priority (x-priority): a queue feeds higher-priority workers first and
    # lower ones only when those are full, e.g. reserved nodes before backfill scavengers.
    consumer_priority: int = Field(0, description="Higher-priority workers get requests first.")
    cancel_memory: float = Field(300.0, description="Seconds a cancelled id is remembered.")
    affinity: bool = Field(True, description="Also take follow-up turns of the conversations this worker "
                           "served from a queue of its own (prefix-cache affinity; they spill to the "
                           "shared queue after a few tens of ms when it has no room).")

    # "vllm" serves the model. "synthetic" is a load-test tool (gpu_worker/synthetic.py): filler
    # tokens on a fixed step clock, no model, for measuring the relay path alone.
    engine: Literal["vllm", "synthetic"] = Field("vllm", description="vllm, or synthetic: a load-test token "
                                                 "source, no model.")
    synthetic_step_ms: float = Field(20.0, description="Synthetic engine: ms between steps.")
    synthetic_tokens_per_step: int = Field(1, description="Synthetic engine: tokens per request per step.")

    # Reply coalescing: the first delta at once, then (under load) at most every ms / tokens.
    coalesce_ms: float = Field(20.0, description="Most time between two delta messages.")
    coalesce_tokens: int = Field(16, description="Most tokens in one delta message.")
    stream_when_idle: bool = Field(True, description="While the reply path is idle (every earlier message "
                                   "confirmed), send each streamed piece at once; off: always coalesce.")

    worker_id: str = Field("", description="Default: node-slurmjob-pid or node-pid.")

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

    def adapters(self) -> dict[str, str]:
        """LoRA adapter name -> its folder, from ``lora_modules``."""
        out: dict[str, str] = {}
        for item in self.lora_modules.split():
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules: {item!r} is not name=path")
            out[name] = path
        return out

    def serving_kwargs(self) -> dict[str, object]:
        """vLLM's OpenAI-layer options (beyond the engine's)."""
        adapters = self.adapters()
        return {
            "tool_call_parser": self.tool_call_parser,
            "enable_auto_tool_choice": self.enable_auto_tool_choice,
            "reasoning_parser": self.reasoning_parser,
            "chat_template": self.chat_template,
            "runner": self.runner,
            "convert": self.convert,
            "enable_lora": bool(adapters),
            "lora_modules": [f"{n}={p}" for n, p in adapters.items()] or None,
            "max_lora_rank": self.max_lora_rank,
        }

    def vllm_argv(self) -> list[str]:
        """The same configuration as vLLM's own server's command line (``vllm serve`` flags):
        what the worker hands vLLM's argument parser, and what ``chatai bench`` starts vLLM's
        server with, so both sides of a comparison run exactly one configuration."""
        argv: list[str] = []
        for name, value in {**self.engine_kwargs(), **self.serving_kwargs()}.items():
            flag = "--" + name.replace("_", "-")
            if value is None or value is False:
                continue
            if value is True:
                argv.append(flag)
            elif isinstance(value, list):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]
        return argv + shlex.split(self.vllm_args)

    def engine_env(self) -> dict[str, str]:
        """Environment the engine reads at start-up: the CPU backend's KV cache size (GiB), and
        whether it may run the model in its engine process (no effect on a GPU)."""
        env = {"VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_space_gb:g}"}
        if self.cpu_single_process and not _on_gpu():
            # Lets the CPU backend keep its "uni" executor, which a GPU engine of one GPU has anyway.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return env
