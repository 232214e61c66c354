"""Worker churn under load: Slurm array tasks of real vLLM workers are scancelled while
streamed, non-streamed and batch traffic runs, and new tasks start in their place.

Promised: no request is lost (every one ends: non-streamed ones are answered, the returned
ones by the next worker; a stream whose worker went mid-answer ends with a clear error event,
since tokens cannot be unsent), no batch result is duplicated, and the error rate is printed.

The short soak (``CHATAI_SOAK_SECONDS``, default 30: one churn cycle, sometimes two) runs in the
suite; the long one is the same test with a longer time (docs/reliability.md):

    CHATAI_SOAK_SECONDS=1800 python -m pytest tests/faults/test_worker_churn.py -s

The Slurm cluster, the operator's settings and the gateway are test_slurm.py's fixtures (its
model ``slurm-tiny``: only these workers serve it).
"""

from __future__ import annotations

import os
import re
import time

import pytest

from slurm_jobs.slurm import Slurm
from support.faults import Traffic, assert_batch_exactly_once, finished_batch, submit_batch, wait_for
from test_slurm import MODEL, chatai, job_log, operator_env, slurm_cluster, slurm_gateway, worker_jobs  # noqa: F401

SOAK_SECONDS = float(os.environ.get("CHATAI_SOAK_SECONDS", "30"))
WORKERS = 2  # what a 2-core machine runs beside the broker, gateway and Slurm
STREAM = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about Slurm."}], max_tokens=300,
              extra_body={"ignore_eos": True})
WHOLE = dict(STREAM, max_tokens=24)


def _ready(gw) -> int:
    return gw.health()["models"].get(MODEL, {}).get("ready", 0)


def _running() -> list:
    return sorted((j for j in worker_jobs() if j.running), key=lambda j: int(j.job_id))


def _scale_up(env: dict[str, str], n: int) -> str:
    return re.search(r"array job (\d+)", chatai(env, "scale", "up", "--model", MODEL, "--workers", str(n))).group(1)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 900)  # the suite's 900 s, plus the soak
def test_worker_churn_under_mixed_traffic_loses_and_duplicates_nothing(operator_env, slurm_gateway):
    gw, slurm = slurm_gateway, Slurm()
    _scale_up(operator_env, WORKERS)
    try:
        wait_for(lambda: _ready(gw) >= WORKERS, 300, f"{WORKERS} workers to be ready")
        client = gw.client(timeout=180)  # a hang surfaces as a client timeout
        n, prefix = 400, "churn"
        batch = submit_batch(client, MODEL, n, prefix, max_tokens=16, ignore_eos=True)
        streams = Traffic(client, streams=2, whole=0, **STREAM)
        whole = Traffic(client, streams=0, whole=1, **WHOLE)
        cycles, started = 0, time.monotonic()

        def soaked() -> float:
            return time.monotonic() - started

        with streams, whole:
            wait_for(lambda: streams.count("ok") and whole.count("ok"), 180, "traffic before the churn")
            started = time.monotonic()
            while cycles == 0 or soaked() < SOAK_SECONDS:
                # Cancel a task only while the others are all serving: one worker is always up.
                wait_for(lambda: len(_running()) >= WORKERS and _ready(gw) >= WORKERS or soaked() >= SOAK_SECONDS,
                         SOAK_SECONDS + 300, "the new task's worker to be ready")
                if cycles and soaked() >= SOAK_SECONDS:
                    break
                oldest = _running()[0]
                # As a preemption or an operator's scancel does; by task id ("12_0"): a bare job id
                # may be the array's base id, which Slurm applies to every task of the array.
                slurm.cancel([oldest.display_id])
                wait_for(lambda: oldest.job_id not in {j.job_id for j in worker_jobs()}, 120,
                         f"task {oldest.display_id} to leave the queue")
                _scale_up(operator_env, 1)
                cycles += 1
                progress = client.batches.retrieve(batch.id).request_counts
                print(f"\ncycle {cycles}: cancelled {oldest.display_id} at {soaked():.0f} s and started another; "
                      f"batch {progress.completed}/{n}; "
                      f"streams {streams.summary()}; non-streamed {whole.summary()}")
            soak_time = soaked()
        # The last replacement starts serving, once the load is gone if not before.
        wait_for(lambda: len(_running()) >= WORKERS and _ready(gw) >= WORKERS, 300, "the last new worker to be ready")
        done = finished_batch(client, batch.id, timeout=600)
    except BaseException:
        print(job_log(operator_env))
        raise
    finally:
        slurm.cancel([j.display_id for j in worker_jobs()])
        wait_for(lambda: not worker_jobs(), 120, "every worker job to leave")

    everything = streams.outcomes + whole.outcomes
    errors = [o for o in everything if o.kind != "ok"]
    print(f"soak {soak_time:.0f} s, {cycles} tasks cancelled and replaced; {len(everything)} requests, "
          f"error rate {len(errors) / max(1, len(everything)):.1%} "
          f"({sorted({(o.kind, o.code) for o in errors}, key=str)}); batch {done.request_counts}")
    assert streams.count("hang") + whole.count("hang") == 0, "a request never ended"
    assert streams.count("broken") + whole.count("broken") == 0, "a connection broke without an answer"
    # Non-streamed requests are restarted on another worker: none fails.
    assert whole.count("ok") == len(whole.outcomes), [(o.kind, o.status, o.code) for o in whole.outcomes]
    # A stream whose worker went after its first tokens ends with an error event naming the worker.
    assert all(o.kind == "cut" and "worker" in (o.code or "") for o in streams.outcomes if o.kind != "ok"), \
        [(o.kind, o.status, o.code) for o in streams.outcomes if o.kind != "ok"]
    assert_batch_exactly_once(client, done, n, prefix)
