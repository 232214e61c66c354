"""The coexistence experiment's pure parts: the seeded trace, the job completion log, the measures."""

from __future__ import annotations

from datetime import datetime

import pytest

from chatai.bench.coexistence import measures as m
from chatai.bench.coexistence.jobcomp import JobRecord, expand_hostlist, parse_ctld_times, parse_jobcomp, refine
from chatai.bench.coexistence.trace import TraceSpec, generate


def test_trace_is_reproducible_and_within_bounds():
    spec = TraceSpec(seed=3, day_s=300, load=0.6)
    a, b = generate(spec), generate(spec)
    assert a == b and len(a) > 5
    assert generate(TraceSpec(seed=4, day_s=300)) != a
    assert [j.arrival_s for j in a] == sorted(j.arrival_s for j in a)
    for j in a:
        assert 0 <= j.arrival_s < 300 and 1 <= j.nodes <= 4 and j.limit_min in spec.limits_min
        assert 0 < j.run_s < 60 * j.limit_min


def test_trace_load_scales_the_number_of_jobs():
    low = generate(TraceSpec(seed=1, day_s=3000, load=0.2))
    high = generate(TraceSpec(seed=1, day_s=3000, load=0.8))
    assert len(high) > 2 * len(low)


@pytest.mark.parametrize("bad", [dict(load=0), dict(load=1.5), dict(day_s=0), dict(limits_min=()),
                                 dict(run_fraction=(0.5, 1.0))])
def test_trace_refuses_impossible_specs(bad):
    with pytest.raises(ValueError):
        generate(TraceSpec(**bad))


def test_hostlist_expansion():
    assert expand_hostlist("vm-n[0-2,5]") == ("vm-n0", "vm-n1", "vm-n2", "vm-n5")
    assert expand_hostlist("vm-n3") == ("vm-n3",)
    assert expand_hostlist("a[01-02],b7") == ("a01", "a02", "b7")
    assert expand_hostlist("(null)") == ()


def test_jobcomp_lines_become_records():
    text = (
        "JobId=7 UserId=root(0) GroupId=root(0) Name=regular-001 JobState=COMPLETED Partition=regular "
        "TimeLimit=2 StartTime=2026-11-25T10:00:05 EndTime=2026-11-25T10:00:35 NodeList=vm-n[0-1] NodeCnt=2 "
        "ProcCnt=2 WorkDir=/tmp/a b ReservationName= Tres=cpu=2 Account= QOS= WcKey= Cluster=unknown "
        "SubmitTime=2026-11-25T10:00:01 EligibleTime=2026-11-25T10:00:01 DerivedExitCode=0:0 ExitCode=0:0\n"
        "JobId=8 UserId=root(0) GroupId=root(0) Name=w JobState=CANCELLED Partition=scavenger TimeLimit=2 "
        "StartTime=Unknown EndTime=2026-11-25T10:00:09 NodeList=(null) NodeCnt=0 SubmitTime=2026-11-25T10:00:01\n"
        "JobId=9 UserId=root(0) GroupId=root(0) Name=chatai-worker-x JobState=PREEMPTED Partition=scavenger "
        "TimeLimit=2 StartTime=2026-11-25T10:00:02 EndTime=2026-11-25T10:00:06 NodeList=vm-n4 NodeCnt=1 "
        "SubmitTime=2026-11-25T10:00:01 ArrayJobId=9 ArrayTaskId=0\n"
    )
    reg, worker = parse_jobcomp(text)
    assert reg.name == "regular-001" and reg.nodes == ("vm-n0", "vm-n1") and reg.end - reg.start == 30
    assert reg.start - reg.submit == 4 and reg.partition == "regular"
    assert worker.job_id == "9_0" and worker.state == "PREEMPTED" and worker.nodes == ("vm-n4",)


def test_slurmctld_log_gives_the_job_records_their_milliseconds():
    log = (
        "[2026-11-25T10:00:01.250] _slurm_rpc_submit_batch_job: JobId=7 InitPrio=4294901759 usec=1905\n"
        "[2026-11-25T10:00:01.300] _slurm_rpc_submit_batch_job: JobId=9 InitPrio=1 usec=12\n"
        "[2026-11-25T10:00:02.990] sched/backfill: _start_job: Started JobId=9_0(9) in scavenger on vm-n4\n"
        "[2026-11-25T10:00:05.700] sched: Allocate JobId=7 NodeList=vm-n[0-1] #CPUs=2 Partition=regular\n"
        "[2026-11-25T10:00:06.100] _job_complete: JobId=9_0(9) WEXITSTATUS 0\n"
        "[2026-11-25T10:00:06.101] _job_complete: JobId=9_0(9) done\n"
        "[2026-11-25T10:00:35.420] _job_complete: JobId=7 WEXITSTATUS 0\n"
        "[2026-11-25T10:00:35.421] _job_complete: JobId=7 done\n"
        "[2026-11-25T10:00:40.000] sched: Allocate JobId=70 NodeList=vm-n2 #CPUs=1 Partition=regular\n"
    )
    times = parse_ctld_times(log)
    assert set(times) == {"7", "9", "9_0", "70"}
    assert times["7"]["end"] - times["7"]["start"] == pytest.approx(29.721)
    t = lambda s: datetime.fromisoformat(f"2026-11-25T10:00:{s}").timestamp()  # noqa: E731
    records = [JobRecord("7", "regular-001", "regular", "COMPLETED", ("vm-n0", "vm-n1"), t("01"), t("05"), t("35")),
               JobRecord("9_0", "chatai-worker-x", "scavenger", "COMPLETED", ("vm-n4",), t("01"), t("02"), t("06")),
               # the log says 10:00:40 for job 70: a line of another run, not this record's
               JobRecord("70", "regular-002", "regular", "COMPLETED", ("vm-n2",), t("50"), t("50"), t("55"))]
    reg, worker, other = refine(records, times)
    assert reg.start - reg.submit == pytest.approx(4.45) and reg.end - reg.start == pytest.approx(29.721)
    assert worker.submit == pytest.approx(t("01.300")) and worker.start == pytest.approx(t("02.990"))
    assert worker.end == pytest.approx(t("06.101"))
    assert other == records[2]


def test_idle_spans_and_overlap():
    busy = {"a": [(2, 4), (3, 6)], "b": []}
    idle = m.idle_spans(busy, ["a", "b"], (0, 10))
    assert idle == {"a": [(0, 2), (6, 10)], "b": [(0, 10)]}
    assert m.overlap([(0, 5)], [(1, 2), (4, 8)]) == 2
    assert m.gap_overlap_fraction(idle, {"a": [(0, 2)], "b": [(0, 5)]}) == pytest.approx(7 / 16)


def test_absorbed_fraction_counts_worker_time_inside_the_window_only():
    worker = {"a": [(-5, 4), (3, 6)], "b": [(8, 20)]}
    assert m.absorbed_fraction(16, worker, (0, 10)) == pytest.approx((6 + 2) / 16)
    assert m.absorbed_fraction(4, worker, (0, 10)) == 1.0
    assert m.absorbed_fraction(0, worker, (0, 10)) == 0.0


def test_start_delays_compare_waits_not_clock_times():
    def rec(name, submit, start):
        return JobRecord("1", name, "regular", "COMPLETED", ("a",), submit, start, start + 10)

    base = [rec("r1", 100, 100), rec("r2", 105, 110)]
    run = [rec("r1", 500, 503), rec("r2", 505, 509), rec("r3", 0, 0)]
    assert m.start_delays(base, run) == {"r1": 3, "r2": -1}
    assert m.summary([3, -1, 0]) == {"count": 3, "median": 0, "max": 3, "mean": pytest.approx(2 / 3)}
    assert m.summary([])["count"] == 0


def test_gap_fill_latency_is_the_empty_stretch_a_worker_ends():
    I = m.Interval
    items = [I("a", 0, 10, "regular", "r"), I("a", 12, 20, "worker", "w"), I("a", 20, 30, "regular", "r2"),
             I("a", 35, 40, "regular", "r3"), I("b", 3, 50, "worker", "w2")]
    assert sorted(m.gap_fill_latencies(items, (0, 100))) == [2, 3]
