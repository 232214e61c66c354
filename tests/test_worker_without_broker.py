"""A worker told to leave while its broker is away still leaves.

Slurm's SIGTERM (preemption, scancel, the time limit) may come during a broker outage. The
worker's goodbye to the broker (cancel its consumers, say "draining" and "stopped") cannot be
delivered then, and must not hold it: before this test, a robust channel's basic.cancel waited
for the broker to return, and the worker never exited (Slurm's SIGKILL after GraceTime ended it).

The synthetic token source stands in for vLLM here: nothing is served, and this is about the
worker's way out, not its engine (tests/test_worker.py drains real vLLM workers).
"""

from __future__ import annotations

import signal
import time

import pytest

from broker_config.admin import BrokerAdmin
from broker_config.definitions import DEFAULT_GATEWAY, ROLES, Definitions, new_password
from broker_config.provision import Limits
from broker_config.provision import apply as apply_definitions
from chatai.devstack.broker_node import LocalBrokerNode
from support.waiting import wait_until
from support.worker_proc import start_worker

pytestmark = pytest.mark.slow

DRAIN_GRACE = 3.0


def test_sigterm_during_a_broker_outage_ends_the_worker_within_its_grace(tmp_path):
    node = LocalBrokerNode.create(name="chatai-outage")
    node.start()
    worker = None
    try:
        passwords = {user: new_password() for user in (DEFAULT_GATEWAY, *ROLES)}
        apply_definitions(BrokerAdmin(node=node.node), Definitions(models=["synthetic"], passwords=passwords),
                          Limits())
        url = f"amqp://worker:{passwords['worker']}@127.0.0.1:{node.port}/chatai"
        (tmp_path / "model").mkdir()
        worker = start_worker(tmp_path / "model", "synthetic", url, tmp_path / "worker.log",
                              extra_args=["--engine", "synthetic", "--drain-grace", str(DRAIN_GRACE)])
        worker.wait_ready(120)
        node.stop()  # the broker is gone; the worker's connection keeps trying to come back
        log = worker.log_path
        wait_until(lambda: "Reconnecting" in log.read_text(errors="replace"), 60, "the worker to miss its broker")
        told = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        # The grace, the bounded goodbye and the engine's stop, with room for a loaded machine.
        code = worker.proc.wait(timeout=DRAIN_GRACE + 30)
        took = time.monotonic() - told
        print(f"\nleft {took:.1f} s after SIGTERM, exit code {code}")
        assert code == 0, log.read_text(errors="replace")[-2000:]
        assert "stopped: served 0 request(s)" in log.read_text(errors="replace")
    finally:
        if worker is not None and worker.proc.poll() is None:
            worker.kill()
        node.stop()
