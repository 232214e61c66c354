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
from rich.table import Table

from broker_config.connection import redact
from slurm_jobs.autoscale import Autoscaler, Policy
from slurm_jobs.broker_view import BrokerView
from slurm_jobs.jobs import WorkerJobs, render_script
from slurm_jobs.settings import SlurmSettings
from slurm_jobs.slurm import Slurm, SlurmError

app = typer.Typer(help="Worker jobs on Slurm: submit arrays, drain, look.", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Served model name (the queue's name).")]


def _settings(**overrides: Any) -> SlurmSettings:
    return SlurmSettings(**{k: v for k, v in overrides.items() if v is not None})


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
def up(
    model: ModelOpt,
    workers: Annotated[int, typer.Option("--workers", "-n", min=1, help="Array size: workers to add.")] = 1,
    model_path: Annotated[Optional[str], typer.Option(help="Model directory on the compute nodes.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="--time of each task.")] = None,
    time_min: Annotated[Optional[str], typer.Option(help="--time-min: backfill may start a task with less.")] = None,
    partition: Optional[str] = None,
    qos: Optional[str] = None,
    nice: Optional[int] = None,
    account: Optional[str] = None,
    gres: Annotated[Optional[str], typer.Option(help='e.g. "gpu:1".')] = None,
    cpus_per_task: Optional[int] = None,
    mem: Optional[str] = None,
    requeue: Annotated[Optional[bool], typer.Option("--requeue/--no-requeue")] = None,
    signal_grace: Annotated[Optional[int], typer.Option(help="Seconds of SIGTERM warning before the time limit.")] = None,
    drain_grace: Annotated[Optional[int], typer.Option(help="Seconds a worker may take to drain.")] = None,
    idle_timeout: Annotated[Optional[int], typer.Option(help="Seconds without work before a worker exits.")] = None,
    worker_args: Annotated[Optional[str], typer.Option(help="Extra `chatai worker` options (shell syntax).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the batch script instead of submitting it.")] = False,
) -> None:
    """Add N workers for a model: one `sbatch --array=0-(N-1)`."""
    try:
        s = _settings(time=time_limit, time_min=time_min, partition=partition, qos=qos, nice=nice, account=account,
                      gres=gres, cpus_per_task=cpus_per_task, mem=mem, requeue=requeue, signal_grace=signal_grace,
                      drain_grace=drain_grace, idle_timeout=idle_timeout, worker_args=worker_args)
        jobs = WorkerJobs(s, Slurm())
        if dry_run:
            typer.echo(render_script(s, model, jobs.model_path(model, model_path)))
            return
        job_id = jobs.submit(model, workers, model_path)
    except (SlurmError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"submitted array job {job_id} ({workers} worker(s) for {model})")


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
    busy: dict[str, int] = {}
    if not all_:  # let the least busy go first, when heartbeats can be had
        try:
            view = asyncio.run(_collect(s, [model], listen=6.0))
            busy = {hb.slurm_job_id: hb.in_flight for hb in view.book.live() if hb.slurm_job_id}
        except Exception:  # noqa: BLE001 - draining must not depend on the broker being reachable
            pass
    try:
        gone = WorkerJobs(s, Slurm()).drain(model, None if all_ else workers, busy)
    except (SlurmError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"draining {len(gone)} worker(s) of {model}: {' '.join(gone) or '-'}")


async def _collect(s: SlurmSettings, models: list[str], listen: float, jobs: set[str] | None = None) -> BrokerView:
    """Queue stats for models and heartbeats heard within ``listen`` seconds (until every
    running job in ``jobs`` has been heard, when given)."""
    view = BrokerView(s.operator_url(), "chatai-scale-status")
    await view.open()
    try:
        if listen > 0:
            await view.wait_for_heartbeats(listen, jobs)
        view.stats = {m: await view.queue_stats(m) for m in models}  # type: ignore[attr-defined]
    finally:
        await view.close()
    return view


def status_rows(s: SlurmSettings, extra_models: list[str], listen: float) -> dict[str, Any]:
    """The joined view: per model (queue, consumers, jobs, workers) and per job (with heartbeat)."""
    by_model = WorkerJobs(s, Slurm()).jobs_by_model()
    models = sorted(set(s.models) | set(by_model) | set(extra_models))
    url = s.operator_url()
    broker_error = None
    try:
        running = {j.display_id for js in by_model.values() for j in js if j.running}
        view = asyncio.run(_collect(s, models, listen if running else 0.0, running))
        hbs, stats = view.book.live(), view.stats  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - Slurm's half of the picture is still worth showing
        broker_error = f"{type(exc).__name__}: {exc}"
        hbs, stats = [], {}
    models = sorted(set(models) | {hb.model for hb in hbs})
    by_job = {hb.slurm_job_id: hb for hb in hbs if hb.slurm_job_id}
    out: dict[str, Any] = {"broker": redact(url), "broker_error": broker_error, "models": [], "jobs": [],
                           "workers": []}
    for m in models:
        st = stats.get(m)
        js = by_model.get(m, [])
        mh = [hb for hb in hbs if hb.model == m]
        out["models"].append({
            "model": m, "queue_ready": st.ready if st else None, "consumers": st.consumers if st else None,
            "running": sum(j.running for j in js), "pending": sum(j.pending for j in js),
            "workers_ready": sum(hb.state == "ready" for hb in mh),
            "workers_draining": sum(hb.state == "draining" for hb in mh),
            "in_flight": sum(hb.in_flight for hb in mh), "capacity": sum(hb.capacity for hb in mh),
        })
        for j in js:
            hb = by_job.get(j.job_id) or by_job.get(j.display_id)
            out["jobs"].append({
                "job": j.display_id, "job_id": j.job_id, "model": m, "state": j.state,
                "reason": j.reason, "node": j.nodes, "elapsed": j.elapsed, "time_left": j.time_left,
                "worker": hb.worker_id if hb else None, "worker_state": hb.state if hb else None,
                "in_flight": hb.in_flight if hb else None, "capacity": hb.capacity if hb else None,
            })
    seen = {r["worker"] for r in out["jobs"] if r["worker"]}
    out["workers"] = [hb.model_dump(mode="json") for hb in hbs if hb.worker_id not in seen]  # outside Slurm
    return out


@app.command()
def status(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Also show this model.")] = None,
    listen: Annotated[float, typer.Option(help="Seconds to wait for heartbeats.")] = 6.0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Queue depth, consumers, Slurm jobs and live worker heartbeats, joined per model."""
    try:
        data = status_rows(_settings(), list(model or []), listen)
    except (SlurmError, ValueError, OSError) as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console(width=max(Console().width, 120))
    if data["broker_error"]:
        console.print(f"[red]broker unreachable ({data['broker_error']}): queue and worker columns are empty[/red]")
    t = Table(title=f"models ({data['broker']})")
    for col in ("model", "queued", "consumers", "jobs run/pend", "workers ready/draining", "in-flight/capacity"):
        t.add_column(col)
    dash = lambda v: "-" if v is None else str(v)  # noqa: E731
    for r in data["models"]:
        t.add_row(r["model"], dash(r["queue_ready"]), dash(r["consumers"]), f"{r['running']}/{r['pending']}",
                  f"{r['workers_ready']}/{r['workers_draining']}", f"{r['in_flight']}/{r['capacity']}")
    console.print(t)
    jt = Table(title="worker jobs")
    for col in ("job", "model", "state", "node / reason", "elapsed", "left", "worker", "hb state", "in-flight"):
        jt.add_column(col)
    for r in data["jobs"]:
        where = r["node"] if r["state"] != "PENDING" else f"({r['reason']})"
        jt.add_row(r["job"], r["model"], r["state"], where, r["elapsed"], r["time_left"], dash(r["worker"]),
                   dash(r["worker_state"]), f"{dash(r['in_flight'])}/{dash(r['capacity'])}")
    console.print(jt)
    for w in data["workers"]:
        console.print(f"worker outside Slurm: {w['worker_id']} {w['model']} {w['state']} on {w['node']}")


def autoscale(
    model: Annotated[list[str], typer.Option("--model", "-m", help="NAME or NAME=PATH; repeat per model.")],
    min_workers: Annotated[int, typer.Option(min=0)] = 0,
    max_workers: Annotated[int, typer.Option(min=1)] = 2,
    backlog_per_worker: Annotated[int, typer.Option(min=1, help="Waiting requests per extra worker.")] = 8,
    cooldown: Annotated[float, typer.Option(help="Seconds between submissions per model.")] = 60.0,
    interval: Annotated[float, typer.Option(help="Seconds between rounds.")] = 5.0,
    release_pending_after: Annotated[float, typer.Option(help="Cancel unneeded pending tasks after this long.")] = 120.0,
) -> None:
    """Run the autoscaler: per model, submit array tasks on a backlog, between --min-workers and --max-workers.

    Workers leave by themselves after their idle timeout, so a model scales to zero; the
    autoscaler never signals a running worker."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = _settings()
    paths = dict(s.models)
    names = []
    for spec in model:
        name, _, path = spec.partition("=")
        names.append(name)
        if path:
            paths[name] = path
    policy = Policy(min_workers, max_workers, backlog_per_worker, cooldown, release_pending_after)
    asyncio.run(_autoscale(s, {n: policy for n in names}, paths, interval))


async def _autoscale(s: SlurmSettings, policies: dict[str, Policy], paths: dict[str, str], interval: float) -> None:
    jobs = WorkerJobs(s, Slurm())
    for m in policies:
        jobs.model_path(m, paths.get(m))  # fail now, not at the first backlog
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with BrokerView(s.operator_url(), "chatai-autoscaler") as view:
        scaler = Autoscaler(jobs, view, policies, paths, interval)
        logging.getLogger("chatai.autoscale").info(
            "autoscaling %s every %.0f s (broker %s)", ", ".join(policies), interval, redact(view.url))
        await scaler.run(stop)


