"""``chatai scale up|down|status`` and ``chatai autoscale``: the operator's commands.

Run them on a login or service node as the operator account that owns the worker jobs.
Slurm options come from ``CHATAI_SLURM_*`` settings; flags override them per call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from broker_config.connection import redact
from broker_config.settings_cli import settings_options
from slurm_jobs.announce import Announcer
from slurm_jobs.autoscale import ROUND_INTERVAL, YIELD_INTERVAL, Autoscaler, Policy
from slurm_jobs.capacity import NodeRoom, TaskRequest, start_warnings
from slurm_jobs.jobs import WorkerJobs, render_script
from slurm_jobs.overview import broker_problem, busy_by_job, open_view, print_fleet, slurm_problem, status_rows
from slurm_jobs.settings import SlurmSettings
from slurm_jobs.slurm import Slurm, SlurmError

app = typer.Typer(help="Worker jobs on Slurm: submit arrays, drain, look.", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Served model name (the queue's name).")]


def _settings(**overrides: Any) -> SlurmSettings:
    return SlurmSettings(**{k: v for k, v in overrides.items() if v is not None})


def _fail(exc: Exception) -> None:
    msg = f"slurm: {slurm_problem(exc)}" if isinstance(exc, SlurmError) else str(exc)
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


SUBMIT_FIELDS = ("time", "time_min", "partition", "qos", "nice", "account", "gres", "cpus_per_task", "mem",
                 "constraint", "requeue", "signal_grace", "drain_grace", "idle_timeout", "worker_args")


@app.command()
@settings_options(SlurmSettings, SUBMIT_FIELDS)
def up(
    model: ModelOpt,
    overrides: dict[str, Any],
    workers: Annotated[int, typer.Option("--workers", "-n", min=1, help="Array size: workers to add.")] = 1,
    model_path: Annotated[Optional[str], typer.Option(help="Model directory on the compute nodes.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the batch script instead of submitting it.")] = False,
) -> None:
    """Add N workers for a model: one `sbatch --array=0-(N-1)`. Options not given come from CHATAI_SLURM_*."""
    try:
        s = _settings(**overrides)
        jobs = WorkerJobs(s, Slurm())
        if dry_run:
            typer.echo(render_script(s, model, jobs.model_path(model, model_path)))
            return
        warnings = _start_warnings(s, jobs.slurm, workers)  # before: our own tasks would take the room
        job_id = jobs.submit(model, workers, model_path)
    except (SlurmError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"submitted array job {job_id} ({workers} worker(s) for {model})")
    for line in warnings:
        typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)


def _start_warnings(s: SlurmSettings, slurm: Slurm, workers: int) -> list[str]:
    """What would keep tasks from starting, from the nodes' resources (nothing if unknown)."""
    try:
        nodes = [NodeRoom.from_scontrol(f) for f in slurm.show_nodes()]
        return start_warnings(nodes, TaskRequest.from_settings(s), workers, s.partition)
    except (SlurmError, ValueError):
        return []


@app.command()
def down(
    model: ModelOpt,
    workers: Annotated[Optional[int], typer.Option("--workers", "-n", min=1, help="How many to let go.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Let every worker of the model go.")] = False,
) -> None:
    """Let workers go: pending tasks are cancelled, running ones get SIGTERM and drain.

    A draining worker finishes what it holds, returns the rest to the queue and exits; nothing
    here ever sends SIGKILL."""
    if (workers is None) == (not all_):
        _fail(ValueError("give either --workers N or --all"))
    s = _settings()
    busy = {} if all_ else busy_by_job(s, model, 6.0)  # the least busy go first, when heartbeats can be had
    try:
        cancelled, draining = WorkerJobs(s, Slurm()).let_go(model, None if all_ else workers, busy)
    except (SlurmError, ValueError) as exc:
        _fail(exc)
    for line in let_go_lines(model, cancelled, draining):
        typer.echo(line)


def let_go_lines(model: str, cancelled: list[str], draining: list[str]) -> list[str]:
    """What ``scale down`` did, in words: cancelled pending tasks, draining running workers, or nothing."""
    if not cancelled and not draining:
        return [f"no worker jobs of {model} to let go (none running or pending)"]
    out = []
    if cancelled:
        out.append(f"cancelled {len(cancelled)} pending task(s) of {model} (they held nothing): {' '.join(cancelled)}")
    if draining:
        out.append(f"draining {len(draining)} running worker(s) of {model}: {' '.join(draining)} (each finishes "
                   "what it holds, returns the rest to the queue and exits)")
    return out


@app.command()
def status(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Also show this model.")] = None,
    listen: Annotated[float, typer.Option(help="Most seconds to listen for heartbeats (at least one interval "
                                          "once a worker is heard).")] = 6.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Queue depth, consumers, Slurm jobs and live worker heartbeats, joined per model."""
    try:
        data = status_rows(_settings(), list(model or []), listen)
    except (ValueError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    print_fleet(Console(), data)


_POLICY = Policy()  # the defaults, declared once (slurm_jobs.autoscale)


@settings_options(SlurmSettings, SUBMIT_FIELDS)
def autoscale(
    overrides: dict[str, Any],
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME or NAME=PATH; repeat per model.")],
    min_workers: Annotated[int, typer.Option(min=0)] = _POLICY.min_workers,
    max_workers: Annotated[int, typer.Option(min=1)] = _POLICY.max_workers,
    backlog_per_worker: Annotated[int, typer.Option(
        min=1, help="Waiting requests per extra worker.")] = _POLICY.backlog_per_worker,
    cooldown: Annotated[float, typer.Option(help="Seconds between submissions per model.")] = _POLICY.cooldown,
    interval: Annotated[float, typer.Option(help="Seconds between rounds.")] = ROUND_INTERVAL,
    release_pending_after: Annotated[float, typer.Option(
        help="Cancel unneeded pending tasks after this long.")] = _POLICY.release_pending_after,
    yield_to_pending: Annotated[bool, typer.Option(
        help="When regular jobs wait for GPUs workers hold, tell that many workers to drain at once, and "
             "tell again one that did not hear (docs/coexistence.md, 'Giving way'). One autoscaler per "
             "cluster needs it.")] = False,
    yield_interval: Annotated[float, typer.Option(
        min=0.1, help="Seconds between two looks for waiting regular jobs (--yield-to-pending); each look "
                      "is one 'scontrol show job'.")] = YIELD_INTERVAL,
) -> None:
    """Run the autoscaler: per model, submit array tasks on a backlog, between --min-workers and --max-workers.

    Workers leave by themselves after their idle timeout, so a model scales to zero; the
    autoscaler signals a running worker only to give way to waiting regular jobs (--yield-to-pending)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = _settings(**overrides)
    paths = dict(s.models)
    names = []
    for spec in model:
        name, _, path = spec.partition("=")
        names.append(name)
        if path:
            paths[name] = path
    policy = Policy(min_workers, max_workers, backlog_per_worker, cooldown, release_pending_after)
    try:
        asyncio.run(_autoscale(s, {n: policy for n in names}, paths, interval, yield_to_pending, yield_interval))
    except (SlurmError, ValueError) as exc:
        _fail(exc)


async def _autoscale(s: SlurmSettings, policies: dict[str, Policy], paths: dict[str, str], interval: float,
                     yield_to_pending: bool = False, yield_interval: float = YIELD_INTERVAL) -> None:
    jobs = WorkerJobs(s, Slurm())
    for m in policies:
        jobs.model_path(m, paths.get(m))  # fail now, not at the first backlog
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        view = await open_view(s.operator_url(), "chatai-autoscaler")
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback
        raise ValueError(f"broker: {broker_problem(exc)}") from None
    try:
        scaler = Autoscaler(jobs, view, policies, paths, interval, announcer=Announcer(view.connection, interval),
                            yield_to_pending=yield_to_pending, yield_interval=yield_interval)
        logging.getLogger("chatai.autoscale").info(
            "autoscaling %s every %.0f s (broker %s)", ", ".join(policies), interval, redact(view.url))
        await scaler.run(stop)
    finally:
        await view.close()


