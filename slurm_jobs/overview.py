"""The operator's joined view of one model fleet: Slurm jobs, queues and live workers.

Why apart from the CLI: ``chatai scale status``, ``chatai scale down`` (least busy first) and
``chatai status`` all need it. Each half that cannot be reached is reported in one line and
the other half is still shown: a site without Slurm still sees its queues and workers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from broker_config.connection import check_url, redact
from broker_config.heartbeats import PrefixCacheFigures, percent
from broker_config.terminal import print_rows
from slurm_jobs.broker_view import BrokerView
from slurm_jobs.jobs import WorkerJobs
from slurm_jobs.settings import SlurmSettings
from slurm_jobs.slurm import Job, Slurm, SlurmError

CONNECT_TIMEOUT = 10.0  # an unreachable broker is reported, not waited for
SLURM_CONF_PATHS = (Path("/etc/slurm/slurm.conf"), Path("/etc/slurm-llnl/slurm.conf"), Path("/usr/local/etc/slurm.conf"))


def slurm_problem(exc: SlurmError) -> str:
    """One line for a Slurm failure; "not configured" instead of the DNS SRV lookup errors
    Slurm prints when it has no slurm.conf (configless mode)."""
    if shutil.which("squeue") is None:
        return "not installed (no squeue on the PATH)"
    conf = os.environ.get("SLURM_CONF")
    if not conf and not any(p.exists() for p in SLURM_CONF_PATHS):
        return "not configured (no slurm.conf; set SLURM_CONF)"
    if conf and not Path(conf).exists():
        return f"not configured (SLURM_CONF={conf} does not exist)"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else str(exc)


def broker_problem(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"unreachable (no answer within {CONNECT_TIMEOUT:.0f} s)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"unreachable ({type(exc).__name__}: {text})"


async def open_view(url: str, name: str, heartbeats: bool = True) -> BrokerView:
    """An open operator view, or an error within seconds (a malformed URL at once)."""
    view = BrokerView(check_url(url), name)
    try:
        await asyncio.wait_for(view.open(heartbeats), CONNECT_TIMEOUT)
    except BaseException:
        await view.close()
        raise
    return view


async def listen(view: BrokerView, seconds: float, jobs: set[str] | None = None) -> None:
    """Heartbeats for up to ``seconds``: until each running job in ``jobs`` was heard, and at
    least one heartbeat interval after the first one (workers outside Slurm beat at their own
    moments; stopping at the first heartbeat missed them)."""
    if seconds <= 0:
        return
    book = view.book
    end = book.clock() + seconds
    if not await view.wait_for_heartbeats(seconds, jobs):
        return
    first, heard = book.first_heard(), book.live()
    if first is None or not heard:
        return
    interval = max(hb.interval for hb in heard)
    left = min(end, first + interval * 1.2) - book.clock()
    if left > 0:
        await asyncio.sleep(left)  # the listening window itself, not a wait for a condition


async def collect(s: SlurmSettings, models: list[str], seconds: float, jobs: set[str] | None = None) -> BrokerView:
    """Queue stats for ``models`` and the heartbeats heard while listening."""
    view = await open_view(s.operator_url(), "chatai-scale-status")
    try:
        await listen(view, seconds, jobs)
        view.stats = {m: await view.queue_stats(m) for m in models}  # type: ignore[attr-defined]
    finally:
        await view.close()
    return view


def busy_by_job(s: SlurmSettings, model: str, seconds: float) -> dict[str, int]:
    """In-flight requests per Slurm job of ``model`` from heartbeats; empty when the broker
    cannot be reached (draining must not depend on it)."""
    try:
        view = asyncio.run(collect(s, [model], seconds))
    except Exception:  # noqa: BLE001
        return {}
    return {hb.slurm_job_id: hb.in_flight for hb in view.book.live() if hb.slurm_job_id}


def status_rows(s: SlurmSettings, extra_models: list[str], seconds: float, slurm: Slurm | None = None) -> dict[str, Any]:
    """The joined view: per model (queue, consumers, jobs, workers) and per job (with its
    heartbeat); ``slurm_error`` / ``broker_error`` say in one line what could not be reached."""
    slurm_error = None
    conf = os.environ.get("SLURM_CONF")
    try:
        if conf and not Path(conf).exists():  # squeue would wait out its timeouts first
            raise SlurmError(f"SLURM_CONF={conf} does not exist")
        by_model: dict[str, list[Job]] = WorkerJobs(s, slurm or Slurm()).jobs_by_model()
    except SlurmError as exc:
        slurm_error, by_model = slurm_problem(exc), {}
    models = sorted(set(s.models) | set(by_model) | set(extra_models))
    broker_error = url = None
    hbs, stats = [], {}
    try:
        raw = s.operator_url()
        url = "(malformed URL)"  # a mistyped URL is never echoed: it may hold a password
        url = redact(check_url(raw))
        running = {j.display_id for js in by_model.values() for j in js if j.running}
        view = asyncio.run(collect(s, models, seconds, running))
        hbs, stats = view.book.live(), view.stats  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - Slurm's half of the picture is still worth showing
        broker_error = broker_problem(exc)
    models = sorted(set(models) | {hb.model for hb in hbs})
    by_job = {hb.slurm_job_id: hb for hb in hbs if hb.slurm_job_id}
    out: dict[str, Any] = {"broker": url, "broker_error": broker_error, "slurm_error": slurm_error,
                           "models": [], "jobs": [], "workers": []}
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
            "prefix_cache_hit_rate": PrefixCacheFigures.of(mh).hit_rate,
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


def print_fleet(console: Console, data: dict[str, Any]) -> None:
    """The joined view as tables; one line for each half that could not be reached."""
    if data["slurm_error"]:
        console.print(f"[yellow]slurm: {data['slurm_error']}[/yellow]")
    if data["broker_error"]:
        console.print(f"[red]broker: {data['broker_error']}[/red]")
    if not data["models"] and not data["workers"]:
        console.print(f"models: none seen (broker {data['broker'] or '-'}; no worker jobs, queues or heartbeats)")
        return
    dash = lambda v: "-" if v is None else str(v)  # noqa: E731
    rows = [[r["model"], dash(r["queue_ready"]), dash(r["consumers"]), f"{r['running']}/{r['pending']}",
             f"{r['workers_ready']}/{r['workers_draining']}", f"{r['in_flight']}/{r['capacity']}",
             percent(r.get("prefix_cache_hit_rate"))] for r in data["models"]]
    print_rows(console, ["model", "queued", "consumers", "jobs run/pend", "workers ready/draining",
                         "in-flight/capacity", "prefix cache hits"], rows, title=f"models ({data['broker'] or 'no broker'})")
    if not data["jobs"]:
        console.print("worker jobs: none" + (" (Slurm not reachable)" if data["slurm_error"] else ""))
    else:
        rows = [[r["job"], r["model"], r["state"], r["node"] if r["state"] != "PENDING" else f"({r['reason']})",
                 r["elapsed"], r["time_left"], dash(r["worker"]), dash(r["worker_state"]),
                 f"{dash(r['in_flight'])}/{dash(r['capacity'])}"] for r in data["jobs"]]
        print_rows(console, ["job", "model", "state", "node / reason", "elapsed", "left", "worker", "hb state",
                             "in-flight"], rows, title="worker jobs")
    for w in data["workers"]:
        console.print(f"worker outside Slurm: {w['worker_id']} {w['model']} {w['state']} on {w['node']}")
