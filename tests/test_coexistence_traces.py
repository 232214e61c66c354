"""Real-workload replay for the coexistence bench: the SWF and sacct readers, the window, the
fold onto the emulated nodes and the time scale. Small files written here; no Slurm needed."""

from __future__ import annotations

import gzip

import pytest

from chatai.bench.coexistence.traces import TraceFormatError, load, replay_plan
from chatai.bench.coexistence.traces.fold import FoldSpec, fold, fold_width, parse_span, resolve_start, utilisation
from chatai.bench.coexistence.traces.sacct import gpus, slurm_limit

SWF = """\
; Version: 2.2
; Computer: test machine
; MaxNodes: 8
; MaxProcs: 16
;
    1     0    5   100   16   -1 -1   16   200 -1 1 1 1 -1 1 -1 -1 -1
    2    10   -1    50    2   -1 -1    2    -1 -1 1 1 1 -1 1 -1 -1 -1
    3    20    0    -1    4   -1 -1    4   600 -1 5 1 1 -1 1 -1 -1 -1
    4    30    0    40   -1   -1 -1    8   600 -1 0 2 1 -1 1  3 -1 -1
    5    -1    0    40    4   -1 -1    4   600 -1 1 2 1 -1 1 -1 -1 -1
    6  3600    0  7200    8 18.00 -1    8  9000 -1 1 2 1 -1 1 -1 -1 -1
"""


def write(tmp_path, name, text, gz=False):
    p = tmp_path / name
    p.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return p


def test_swf_reads_header_fields_and_fills_unknowns_by_the_documented_rules(tmp_path):
    t = load(write(tmp_path, "t.swf", SWF))
    assert t.format == "swf" and t.unit == "processors" and t.capacity == 16  # MaxProcs, not MaxNodes
    by_id = {r.job_id: r for r in t.records}
    assert set(by_id) == {"1", "2", "4", "6"}
    assert t.skipped == {"never ran (run time -1 or 0)": 1, "submit time unknown": 1}
    assert by_id["1"].start == 5 and by_id["1"].requested_s == 200 and by_id["1"].end == 105
    assert by_id["2"].start == 10 and by_id["2"].requested_s == 50  # wait -1: started at submit; no limit: the run
    assert by_id["4"].width == 8 and by_id["4"].state == "FAILED" and by_id["4"].partition == "3"  # requested procs


def test_swf_gz_is_read_by_content_and_capacity_falls_back(tmp_path):
    no_header = "\n".join(ln for ln in SWF.splitlines() if not ln.startswith(";"))
    t = load(write(tmp_path, "plain-name.txt", no_header, gz=True))
    assert len(t.records) == 4 and t.capacity == 16  # the widest job


@pytest.mark.parametrize("line,why", [
    ("7 0 0 10 4 -1 -1 4 60 -1 1 1 1 -1 1 -1 -1", "expected 18 fields, got 17"),
    ("7 0 0 ten 4 -1 -1 4 60 -1 1 1 1 -1 1 -1 -1 -1", "field 4 is not a number ('ten')"),
])
def test_swf_malformed_line_says_where_and_why(tmp_path, line, why):
    p = write(tmp_path, "bad.swf", SWF + line + "\n")
    with pytest.raises(TraceFormatError) as e:
        load(p)
    assert f"bad.swf:12: {why}" in str(e.value) and e.value.line_no == 12


def test_swf_with_no_job_that_ran_is_refused(tmp_path):
    with pytest.raises(TraceFormatError, match="no job that ran"):
        load(write(tmp_path, "empty.swf", "; MaxProcs: 4\n1 0 0 -1 4 -1 -1 4 60 -1 5 1 1 -1 1 -1 -1 -1\n"))


SACCT = """\
JobID|Submit|Start|End|Elapsed|Timelimit|AllocNodes|AllocTRES|Partition|State
100|2026-11-02T08:00:00|2026-11-02T08:00:30|2026-11-02T09:00:30|01:00:00|1-00:00:00|1|billing=4,cpu=4,gres/gpu=2,mem=16G,node=1|gpu|COMPLETED
101_3|2026-11-02T08:10:00|2026-11-02T08:20:00|2026-11-02T08:50:00|00:30:00|UNLIMITED|2|cpu=8,gres/gpu:a100=4,node=2|gpu|TIMEOUT
102|2026-11-02T08:15:00|Unknown|2026-11-02T08:16:00|00:00:00|01:00:00|0||gpu|CANCELLED by 1000
103|2026-11-02T08:20:00|None|Unknown|00:00:00|01:00:00|0||gpu|PENDING
104|2026-11-02T08:25:00|2026-11-02T08:30:00|Unknown|00:40:00|2-12|1|cpu=4,gres/gpu=1,node=1|gpu|RUNNING
105|2026-11-02T08:26:00|2026-11-02T08:30:00|2026-11-02T08:35:00|00:05:00|Partition_Limit|1|cpu=4,mem=4G,node=1|cpu|COMPLETED
106|2026-11-02T08:40:00|2026-11-02T08:40:00|2026-11-02T08:45:00|00:05:00|90|1|cpu=4,gres/gpu=1,node=1|gpu|CANCELLED by 1000
"""


def test_sacct_export_reads_slurm_times_states_and_gpus(tmp_path):
    t = load(write(tmp_path, "day.sacct", SACCT))
    assert t.format == "sacct" and t.unit == "GPUs"
    by_id = {r.job_id: r for r in t.records}
    assert set(by_id) == {"100", "101_3", "106"}
    assert t.skipped == {"never started": 2, "still running when exported": 1, "no GPU (AllocTRES without gres/gpu)": 1}
    a, b, c = by_id["100"], by_id["101_3"], by_id["106"]
    assert a.start - a.submit == 30 and a.run_s == 3600 and a.requested_s == 86400 and a.width == 2
    assert b.width == 4 and b.requested_s == b.run_s == 1800 and b.state == "TIMEOUT"  # typed GPUs; UNLIMITED
    assert c.state == "CANCELLED" and c.requested_s == 5400  # "CANCELLED by 1000"; 90 = minutes
    assert t.capacity == 7  # the peak: jobs 100, 101_3 and 106 at once (2 + 4 + 1 GPUs)


def test_sacct_without_gpus_or_header_counts_nodes(tmp_path):
    rows = [ln for ln in SACCT.splitlines()[1:] if "|0|" not in ln]
    text = "\n".join(r.replace("gres/gpu", "gres/fpga") for r in rows)
    t = load(write(tmp_path, "noheader.txt", text))
    assert t.unit == "nodes" and {r.job_id: r.width for r in t.records} == {"100": 1, "101_3": 2, "105": 1, "106": 1}


@pytest.mark.parametrize("bad,why", [
    ("107|2026-11-02T08:40:00|x|y", "expected 10 '|'-separated fields, got 4"),
    ("107|2026-11-02 8h|2026-11-02T08:40:00|2026-11-02T08:45:00|00:05:00|90|1|gres/gpu=1|gpu|COMPLETED", "not a Slurm time"),
    ("107|2026-11-02T08:40:00|2026-11-02T08:40:00|2026-11-02T08:45:00|00:05:00|soon|1|gres/gpu=1|gpu|COMPLETED",
     "Timelimit 'soon' is not a Slurm duration"),
])
def test_sacct_malformed_line_says_where_and_why(tmp_path, bad, why):
    with pytest.raises(TraceFormatError) as e:
        load(write(tmp_path, "bad.sacct", SACCT + bad + "\n"))
    assert f"bad.sacct:9: {why}" in str(e.value)


def test_sacct_header_missing_columns_names_the_command(tmp_path):
    with pytest.raises(TraceFormatError, match="header lacks AllocTRES.*sacct -a -X -P"):
        load(write(tmp_path, "x.sacct", "JobID|Submit|Start|End|Timelimit|AllocNodes|State\n1|a|b|c|d|e|f\n"))


def test_slurm_limits_and_gpu_counts():
    assert slurm_limit("2-12") == 2 * 86400 + 12 * 3600 and slurm_limit("1-00:30:00") == 86400 + 1800
    assert slurm_limit("05:00") == 300 and slurm_limit("UNLIMITED") is None and slurm_limit("Partition_Limit") is None
    assert gpus("cpu=2,gres/gpu:a100=2,gres/gpu:v100=1") == 3 and gpus("gres/gpu=4,gres/gpu:a100=4") == 4
    assert gpus("cpu=2,mem=1G") == 0


def test_spans_and_window_starts(tmp_path):
    assert parse_span("1d12h") == 129600 and parse_span("90m") == 5400 and parse_span("3600") == 3600
    with pytest.raises(ValueError):
        parse_span("2 weeks")
    swf, sacct = load(write(tmp_path, "t.swf", SWF)), load(write(tmp_path, "d.sacct", SACCT))
    assert resolve_start("1h", swf) == 3600
    assert resolve_start("2026-11-02T08:30", sacct) - resolve_start("0", sacct) == 1800
    with pytest.raises(ValueError, match="give an offset"):
        resolve_start("2026-11-02T08:30", swf)


def test_fold_keeps_the_machine_share_and_the_expected_load():
    assert fold_width(128, 128, 8, "a") == 8 and fold_width(16, 128, 8, "a") == 1 and fold_width(1000, 128, 8, "a") == 8
    # 1-processor jobs of a 128-processor machine on 8 nodes: about one in 16 survives, as 1 node.
    kept = sum(fold_width(1, 128, 8, str(i)) for i in range(4000))
    assert 4000 / 16 * 0.8 < kept < 4000 / 16 * 1.2
    # 20 processors = 1.25 nodes: 1 or 2, and 1.25 on average; the same job id folds the same way.
    sizes = [fold_width(20, 128, 8, str(i)) for i in range(2000)]
    assert set(sizes) == {1, 2} and 1.15 < sum(sizes) / len(sizes) < 1.35
    assert fold_width(20, 128, 8, "42") == fold_width(20, 128, 8, "42")


def test_fold_window_time_scale_whole_minutes_and_carry_in(tmp_path):
    t = load(write(tmp_path, "t.swf", SWF))
    # Window [20, 3620) trace seconds at scale 10: jobs 1 (5-105, 16 procs) and 2 (10-60) run at its start.
    f = fold(t, 20, 3600, FoldSpec(nodes=8, time_scale=10))
    assert f.trace_jobs_in_window == 2 and f.carried_in == 2  # jobs 4 and 6 submitted in it; 1 and 2 carried
    second, first = f.jobs[0], f.jobs[1]
    assert second.arrival_s == 0 and second.nodes == 1 and second.run_s == 4.0  # 2 of 16 procs; 40 s left / 10
    assert first.arrival_s == 0 and first.nodes == 8 and first.run_s == 8.5  # 85 s left / 10
    assert first.limit_min == 1  # 180 s of limit left / 10 = 18 s -> 1 whole minute
    last = f.jobs[-1]  # job 6: 8 of 16 processors -> 4 nodes, cut at the window's end
    assert last.nodes == 4 and last.arrival_s == 358.0 and last.run_s == 2.0 and f.clipped == 1
    assert last.limit_min == 15  # 9000 s / 10 = 900 s = 15 minutes (rounded up, never tighter)
    assert [j.index for j in f.jobs] == list(range(len(f.jobs)))
    assert all(j.run_s < 60 * j.limit_min for j in f.jobs)
    unclipped = fold(t, 20, 3600, FoldSpec(nodes=8, time_scale=10, clip=False))
    assert unclipped.jobs[-1].run_s == 720.0 and unclipped.clipped == 0


def test_utilisation_of_the_trace_in_its_window(tmp_path):
    t = load(write(tmp_path, "t.swf", SWF))
    # [0, 100): job 1 (16 procs) 5-100, job 2 (2) 10-60, job 4 (8) 30-70 -> (95*16 + 50*2 + 40*8) / 1600
    assert utilisation(t.records, 16, (0, 100)) == pytest.approx((95 * 16 + 50 * 2 + 40 * 8) / 1600)
    f = fold(t, 0, 100, FoldSpec(nodes=16, time_scale=1))
    assert f.trace_utilisation == pytest.approx((95 * 16 + 50 * 2 + 40 * 8) / 1600, abs=1e-4)


def test_replay_plan_refuses_an_empty_window(tmp_path):
    p = write(tmp_path, "t.swf", SWF)
    jobs, info = replay_plan(p, "0", "2h", 8, 60.0)
    assert len(jobs) == info["jobs"] > 0 and info["format"] == "swf" and info["capacity"] == 16
    with pytest.raises(ValueError, match="no job"):
        replay_plan(p, "10d", "1h", 8, 60.0)


def test_the_bench_refuses_a_malformed_trace_before_starting_anything(tmp_path):
    """``chatai bench coexistence --trace`` reads and folds the trace before any cluster starts."""
    from typer.testing import CliRunner

    from chatai.bench.cli import app

    WIDE = {"COLUMNS": "1000"}  # typer's error box must not wrap the message
    bad = write(tmp_path, "bad.swf", SWF + "7 0 0 10 4\n")
    out = CliRunner().invoke(app, ["coexistence", "--trace", str(bad)], env=WIDE)
    assert out.exit_code != 0 and "bad.swf:12: expected 18 fields, got 5" in out.output
    out = CliRunner().invoke(app, ["coexistence", "--trace", str(write(tmp_path, "t.swf", SWF)), "--start", "10d"], env=WIDE)
    assert out.exit_code != 0 and "no job" in out.output
