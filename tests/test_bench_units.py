"""`chatai bench`'s own logic: one set of engine arguments for every path, honest figures."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import typer

from chatai.bench import vllm_client
from chatai.bench.cli import _levels, _relay_levels, requests_for
from chatai.bench.load import RequestRecord, percentile, summarize
from chatai.bench.placement import Placement
from chatai.bench.relay import sample, sample_process
from chatai.bench.report import markdown, ratios
from chatai.bench.targets import vllm_server_argv, worker_flags
from gpu_worker.settings import WorkerSettings
from support.waiting import wait_until


def test_vllm_server_gets_exactly_the_workers_engine_arguments(tmp_path):
    s = WorkerSettings(model=tmp_path / "m", served_model_name="tiny", max_num_seqs=16, max_model_len=512)
    argv = vllm_server_argv(s, 8123)
    flags = " ".join(argv)
    for expected in ("--model " + str(tmp_path / "m"), "--served-model-name tiny", "--max-num-seqs 16",
                     "--max-model-len 512", "--dtype float32", "--enforce-eager",
                     "--distributed-executor-backend uni", "--disable-log-stats", "--port 8123"):
        assert expected in flags
    assert "--trust-remote-code" not in flags  # False flags are left out, not passed as "False"
    assert worker_flags(s) == ["--max-num-seqs", "16", "--max-model-len", "512", "--kv-cache-space-gb", "1.0"]


def test_engine_default_capacity_is_left_to_vllm(tmp_path):
    argv = vllm_server_argv(WorkerSettings(model=tmp_path / "m"), 1)
    assert "--max-num-seqs" not in argv


def test_itl_and_throughput_come_from_usage_not_chunks():
    records = [RequestRecord(ttft=0.010, latency=0.010 + 63 * 0.002, completion_tokens=64),
               RequestRecord(ttft=0.020, latency=0.020 + 63 * 0.004, completion_tokens=64),
               RequestRecord(error="HTTP 503")]
    r = summarize(16, records, wall_s=2.0)
    assert (r.ok, r.failed, r.output_tokens, r.output_tok_s) == (2, 1, 128, 64.0)
    assert r.itl_p50_ms == pytest.approx(2.0) and r.itl_p99_ms == pytest.approx(4.0)
    assert r.ttft_p50_ms == pytest.approx(10.0) and r.errors == ["HTTP 503"]
    assert math.isnan(percentile([], 50))


def test_ratios_compare_level_by_level():
    level = lambda c, tps, ttft: {"concurrency": c, "output_tok_s": tps, "ttft_p50_ms": ttft}  # noqa: E731
    out = ratios({"vllm": [level(1, 400, 9.0), level(16, 3000, 40.0)],
                  "chatai": [level(1, 380, 12.0), level(16, 3300, 45.0)],
                  "ceiling": [level(16, 5000, 5.0)]})
    assert out[0] == {"concurrency": 1, "throughput_ratio_vs_vllm": 0.95, "ttft_p50_added_ms": 3.0}
    assert out[1]["throughput_ratio_vs_vllm"] == 1.1 and out[1]["throughput_ratio_vs_ceiling"] == 0.66


def test_markdown_names_the_machine():
    result = {"paths": {}, "ratios": [], "machine": {"cpus": 2, "cpu": "X", "memory_gib": 23.5, "python": "3.11",
                                                     "vllm": "0.32", "torch": "2", "load_average_at_start": [0.1],
                                                     "date": "today"}}
    assert "2 CPUs (X)" in markdown(result)


def test_bad_levels_are_refused_with_a_clear_message():
    assert _levels("1,16,64") == [1, 16, 64]
    assert _relay_levels("64x20@20,1000x1@200") == [(64, 20, 20.0), (1000, 1, 200.0)]
    for bad in ("", "a,b", "0"):
        with pytest.raises(typer.BadParameter):
            _levels(bad)
    for bad in ("64-50", "64x50", "64x0@20"):
        with pytest.raises(typer.BadParameter, match="64"):
            _relay_levels(bad)
    assert requests_for(1, None) == 32 and requests_for(64, None) == 256 and requests_for(64, 10) == 10


def test_relay_samples_the_gateway_with_its_replicas():
    """`chatai bench relay --replicas N` watches uvicorn's parent: its workers' memory and CPU count too."""
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        wait_until(lambda: sample_process(child.pid).rss_mb > 60, 20, "the child to hold its memory")
        alone, with_children = sample_process(os.getpid()), sample(os.getpid())
        assert with_children.rss_mb >= alone.rss_mb + 60
    finally:
        child.kill()
        child.wait()


def test_vllm_client_arguments_parse_with_vllms_own_parser(tmp_path):
    """The installed vLLM accepts every argument `chatai bench` gives its benchmark client, and
    reads them as meant: a closed loop of `concurrency` clients, random prompts, ignore_eos."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    level = {"concurrency": 16, "requests": 64, "max_tokens": 64, "warmup": 8}
    args_list = vllm_client.argv("http://127.0.0.1:8000/v1", "tiny", tmp_path / "tok", level, 32, tmp_path, "r.json")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(args_list)
    assert args.base_url == "http://127.0.0.1:8000" and args.endpoint == "/v1/chat/completions"
    assert (args.max_concurrency, args.num_prompts, args.num_warmups) == (16, 64, 8)
    assert (args.random_input_len, args.random_output_len, float(args.random_range_ratio)) == (32, 64, 0)
    assert args.ignore_eos and args.request_rate == math.inf and args.backend == "openai-chat"
    assert args.save_result and args.result_dir == str(tmp_path) and args.result_filename == "r.json"


def test_vllm_client_figures_become_a_report_row():
    raw = {"completed": 30, "failed": 2, "duration": 4.0, "total_output_tokens": 1920, "output_throughput": 480.0,
           "median_ttft_ms": 12.5, "p99_ttft_ms": 40.0, "median_itl_ms": 3.0, "p99_itl_ms": 9.0,
           "median_tpot_ms": 3.1, "p99_tpot_ms": 5.0, "ttfts": [0.1] * 32,
           "errors": [""] * 30 + ["Bad Request: 429", "Bad Request: 429"]}
    row = vllm_client.figures(raw, 16)
    assert (row["concurrency"], row["requests"], row["ok"], row["failed"]) == (16, 32, 30, 2)
    assert (row["output_tok_s"], row["ttft_p50_ms"], row["itl_p99_ms"], row["wall_s"]) == (480.0, 12.5, 9.0, 4.0)
    assert "ttfts" not in row["vllm"] and row["vllm"]["completed"] == 30  # per-request lists left out
    assert row["errors"] == ["2 x Bad Request: 429"]
    assert math.isnan(vllm_client.figures({"completed": 0}, 1)["ttft_p50_ms"])  # missing: NaN, not 0


def test_deployment_placement_gives_the_engine_the_upper_half_and_everything_else_the_rest():
    place = Placement.choose("deployment", {0, 1, 2, 3})
    assert (place.node, place.rest) == ({2, 3}, {0, 1})
    assert place.node_command(["python", "-m", "gpu_worker"]) == ["taskset", "--cpu-list", "2,3", "python", "-m",
                                                                  "gpu_worker"]
    assert Placement.choose("deployment", {0, 1}).node == {1}
    shared = Placement.choose("shared", {0, 1})
    assert shared.node == shared.rest == {0, 1} and shared.node_command(["x"]) == ["x"]
    with pytest.raises(ValueError, match="--placement shared"):
        Placement.choose("deployment", {0})


def test_placement_pins_what_this_process_starts_and_gives_the_cpus_back():
    before = os.sched_getaffinity(0)
    place = Placement(name="deployment", node=frozenset(before), rest=frozenset({min(before)}))
    with place.elsewhere():
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True)
        pinned = subprocess.run(place.node_command([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]),
                                capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str([min(before)])  # inherited: the client, gateway, broker, sshd
    assert pinned.stdout.strip() == str(sorted(before))  # taskset: the node's CPUs, whatever its parent had
    assert os.sched_getaffinity(0) == before
