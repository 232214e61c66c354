"""``chatai bench coexistence --quick`` end to end: an emulated 8-GPU Slurm (regular and
preemptible scavenger partitions), a seeded regular workload run alone and then with workers
that two ``chatai autoscale`` daemons keep in the scavenger partition (the recommended setting:
giving way to waiting regular jobs, and workers that hand whole answers back at once when they
leave, which another worker then redoes), a steady chat stream
through the real gateway and broker. Checks what must hold whatever the machine's speed: no
request is lost, and the workers ran in the regular jobs' gaps. Speed figures are printed, not
asserted (docs/coexistence.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chatai.bench.coexistence.measures import Interval, by_node, idle_spans, overlap
from chatai.devstack.broker_node import rabbitmq_installed
from chatai.devstack.slurm_cluster import slurm_installed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    if not (slurm_installed() and rabbitmq_installed() and os.geteuid() == 0):
        pytest.fail("needs Slurm, RabbitMQ and root (scripts/install.sh sets them up)")
    out = tmp_path_factory.mktemp("coexistence") / "quick.json"
    # A shorter day than --quick's 50 s (each of the two runs takes the day plus its last jobs'
    # minute), as full: 4 regular jobs of 2-4 nodes arrive within 7 s on the 8 nodes, so workers
    # are preempted and jobs wait. What is checked holds for any day; the suite is 40 s shorter.
    proc = subprocess.run([sys.executable, "-m", "chatai.cli", "bench", "coexistence", "--quick", "--day-s", "30",
                           "--load", "1.0", "--give-way", "--drain-returns-whole", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out.with_suffix(".png")).stat().st_size > 0
    return json.loads(out.read_text())


def test_no_request_is_lost(quick):
    assert quick["requests_sent"] > 0
    assert quick["requests_lost"] == 0, quick["request_errors"]
    assert quick["requests_served"] == quick["requests_sent"]


def test_workers_ran_in_the_gaps_of_the_regular_jobs(quick):
    assert quick["regular_jobs"] > 0 and quick["worker_jobs"] > 0
    assert quick["idle_absorbed_fraction"] > 0
    base = [Interval(**i) for i in quick["intervals"]["baseline"]]
    run = [Interval(**i) for i in quick["intervals"]["workers"]]
    nodes = sorted({i.node for i in base + run})
    gaps = idle_spans(by_node(base, "regular"), nodes, (0.0, quick["baseline_window_s"]))
    workers = by_node(run, "worker")
    assert sum(overlap(gaps[n], workers.get(n, [])) for n in nodes) > 0
    # In the run itself, a worker never shares a node with a regular job beyond its drain.
    regular = by_node(run, "regular")
    for n in nodes:
        assert overlap(regular.get(n, []), workers.get(n, [])) <= quick["grace_s"] * len(regular.get(n, [])) + 1


def test_keys_the_docs_promise(quick):
    for key in ("idle_absorbed_fraction", "regular_start_delay_s", "grace_s", "requests_served", "requests_lost"):
        assert key in quick
    assert {"median", "max"} <= set(quick["regular_start_delay_s"])
    assert quick["plan"]["give_way"] is True and quick["plan"]["drain_returns_whole"] is True
