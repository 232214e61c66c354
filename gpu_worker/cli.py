"""``chatai worker``: flags override ``CHATAI_WORKER_*`` variables.

The broker URL holds the worker user's password; give it as CHATAI_WORKER_BROKER_URL (argv is
world-readable in ``ps``). ``--broker-url`` exists for local experiments only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def worker(
    model: Optional[Path] = typer.Option(None, help="Model folder (Hugging Face layout)."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients ask for; the queue to consume."),
    max_num_seqs: Optional[int] = typer.Option(None, help="Engine concurrency = prefetch = capacity."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default: the model's)."),
    dtype: Optional[str] = typer.Option(None, help="float32 on CPU, auto on GPU by default."),
    gpu_memory_utilization: Optional[float] = typer.Option(None),
    kv_cache_space_gb: Optional[float] = typer.Option(None, help="KV cache GiB (CPU backend only)."),
    tensor_parallel_size: Optional[int] = typer.Option(None),
    heartbeat_interval: Optional[float] = typer.Option(None, help="Seconds between heartbeats."),
    idle_timeout: Optional[float] = typer.Option(None, help="Exit 0 after this many idle seconds; 0 = never."),
    drain_grace: Optional[float] = typer.Option(None, help="Seconds to finish held work after SIGTERM."),
    job_end_margin: Optional[float] = typer.Option(None, help="Extra seconds kept before the Slurm job ends."),
    coalesce_ms: Optional[float] = typer.Option(None, help="Most time between two delta messages."),
    coalesce_tokens: Optional[int] = typer.Option(None, help="Most tokens in one delta message."),
    consumer_priority: Optional[int] = typer.Option(None, help="Higher-priority workers get requests first."),
    worker_id: Optional[str] = typer.Option(None, help="Default: node-slurmjob-pid or node-pid."),
    engine: Optional[str] = typer.Option(None, help="vllm (default), or synthetic: a load-test token source, no model."),
    synthetic_step_ms: Optional[float] = typer.Option(None, help="Synthetic engine: ms between steps."),
    synthetic_tokens_per_step: Optional[int] = typer.Option(None, help="Synthetic engine: tokens per request per step."),
    broker_url: Optional[str] = typer.Option(None, help="Prefer CHATAI_WORKER_BROKER_URL: argv shows in ps."),
) -> None:
    """Serve one model from its RabbitMQ queue with vLLM until stopped, drained or idle."""
    from gpu_worker.main import main
    from gpu_worker.settings import WorkerSettings

    overrides = {k: v for k, v in locals().items() if v is not None and k not in {"main", "WorkerSettings"}}
    settings = WorkerSettings(**overrides)
    if settings.model is None and settings.engine == "vllm":
        raise typer.BadParameter("give --model PATH or CHATAI_WORKER_MODEL", param_hint="--model")
    raise typer.Exit(main(settings))


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


def standalone() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(worker)
    app()
