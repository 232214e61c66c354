"""The measures of both runs in one dict (the JSON), and the table printed and put in the docs."""

from __future__ import annotations

from chatai.bench.coexistence import measures as m
from chatai.bench.coexistence.cluster import REGULAR, SCAVENGER
from chatai.bench.coexistence.jobcomp import JobRecord
from chatai.bench.coexistence.runner import RunResult


# A regular job "started later than alone" when its wait grew by more than this. Job times are read
# to the millisecond (slurmctld's log), but most jobs here start in slurmctld's once-a-second
# backfill pass, and each run's pass clock stands differently against its start: a job that only
# waited for its pass can show a few tenths of a second either way that nothing caused
# (docs/coexistence.md, "Millisecond times").
DELAYED_AFTER_S = 0.5


def kind_of(r: JobRecord) -> str | None:
    if r.partition == REGULAR:
        return "regular"
    if r.partition == SCAVENGER and r.name.startswith("chatai-worker-"):
        return "worker"
    return None


def compute(base: RunResult, run: RunResult, grace_s: int, plan: dict) -> dict:
    window = (0.0, base.last_regular_end)
    b_items = m.intervals(base.records, base.t0, kind_of)
    w_items = m.intervals(run.records, run.t0, kind_of)
    b_idle = m.idle_spans(m.by_node(b_items, "regular"), base.nodes, window)
    idle_s = sum(m.total(g) for g in b_idle.values())
    workers = m.by_node(w_items, "worker")
    delays = m.start_delays([r for r in base.records if r.partition == REGULAR],
                            [r for r in run.records if r.partition == REGULAR])
    latencies = m.gap_fill_latencies(w_items, (0.0, run.last_regular_end))
    worker_jobs = [r for r in run.records if kind_of(r) == "worker"]
    t = run.traffic
    return {
        "idle_absorbed_fraction": round(m.absorbed_fraction(idle_s, workers, window), 4),
        "gap_overlap_fraction": round(m.gap_overlap_fraction(b_idle, workers), 4),
        "baseline_idle_gpu_s": round(idle_s, 1),
        "baseline_gpu_utilisation": round(1 - idle_s / (len(base.nodes) * window[1]), 4) if window[1] > 0 else 0.0,
        "trace_utilisation": plan.get("trace", {}).get("trace_utilisation"),
        "headroom": plan.get("headroom", 0),
        "give_way": plan.get("give_way", False),
        "window_s": round(window[1], 1),
        "regular_jobs": len(delays),
        "regular_start_delay_s": {k: round(v, 2) if isinstance(v, float) else v for k, v in m.summary(delays.values()).items()},
        "regular_delayed_jobs": sum(1 for d in delays.values() if d > DELAYED_AFTER_S),
        "regular_makespan_s": {"baseline": round(base.last_regular_end, 1), "with_workers": round(run.last_regular_end, 1)},
        "grace_s": grace_s,
        "drain_grace_s": plan.get("drain_grace_s"),
        "worker_start_latency_s": {k: round(v, 2) if isinstance(v, float) else v for k, v in m.summary(latencies).items()},
        "worker_jobs": len(worker_jobs),
        "worker_jobs_preempted": sum(1 for r in worker_jobs if r.state == "PREEMPTED"),
        "workers_real_vllm_jobs": sum(1 for r in worker_jobs if r.name.endswith("-tiny")),
        "requests_sent": sum(t.get("sent", {}).values()),
        "requests_served": sum(t.get("served", {}).values()),
        "requests_lost": sum(t.get("lost", {}).values()),
        "requests_by_model": {k: {"sent": t.get("sent", {}).get(k, 0), "served": t.get("served", {}).get(k, 0),
                                  "lost": t.get("lost", {}).get(k, 0)} for k in t.get("sent", {})},
        "requests_redone_after_drain": run.redone,
        "requests_returned_by_draining_workers": run.returned,
        "request_latency_s": {"p50": t.get("latency_p50_s"), "p99": t.get("latency_p99_s")},
        "request_errors": t.get("errors", []),
        "delays_by_job": {k: round(v, 2) for k, v in sorted(delays.items())},
        "plan": plan,
    }


def table(r: dict) -> str:
    d, lat = r["regular_start_delay_s"], r["worker_start_latency_s"]
    rows = [
        ("baseline idle GPU-time absorbed by workers", f"{r['idle_absorbed_fraction']:.0%} (target >= 80%)"),
        ("same node and time as a baseline gap", f"{r['gap_overlap_fraction']:.0%}"),
        ("regular jobs", f"{r['regular_jobs']} ({r['regular_delayed_jobs']} started over {DELAYED_AFTER_S} s later than alone)"),
        ("regular start delay, median / max", f"{d['median']:.2f} s / {d['max']:.2f} s (target 0 / <= drain grace {r.get('drain_grace_s')} s; GraceTime {r['grace_s']} s)"),
        ("regular makespan alone / with workers", f"{r['regular_makespan_s']['baseline']:.0f} s / {r['regular_makespan_s']['with_workers']:.0f} s"),
        ("worker jobs (preempted; real vLLM)", f"{r['worker_jobs']} ({r['worker_jobs_preempted']}; {r['workers_real_vllm_jobs']})"),
        ("worker start latency into a gap, median / max", f"{lat['median']:.1f} s / {lat['max']:.1f} s"),
        ("requests sent / served / lost", f"{r['requests_sent']} / {r['requests_served']} / {r['requests_lost']} (target 0 lost)"),
        ("requests returned by a drain / redone", f"{r['requests_returned_by_draining_workers']} / {r['requests_redone_after_drain']}"),
    ]
    if r.get("trace_utilisation") is not None:
        rows.insert(0, ("utilisation: the trace's machine in the window / the replay alone (baseline)",
                        f"{r['trace_utilisation']:.0%} / {r['baseline_gpu_utilisation']:.0%}"))
    if r.get("give_way"):
        rows.insert(0, ("giving way (the autoscaler drains workers for waiting regular jobs)", "yes"))
    if r.get("headroom"):
        rows.insert(0, ("headroom (GPUs the autoscaler leaves free)", str(r["headroom"])))
    out = ["| measure | value |", "| --- | --- |"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)
