"""A broker restart (``rabbitmqctl stop_app`` / ``start_app``) under live traffic.

Streams, non-streamed requests and a batch are running when the broker goes away. Promised:
streams in flight end with a clear error event (or complete), never hang; requests during
the outage get 503 ``service_paused`` at once (not after the queue timeout); the gateway and
the worker reconnect by themselves (same processes); the batch completes exactly once.
"""

from __future__ import annotations

import time

from conftest import SERVED_MODEL
from support.faults import (
    Traffic,
    assert_batch_exactly_once,
    broker_app_stopped,
    finished_batch,
    one_request,
    submit_batch,
    wait_for,
)

# Long answers, so that streams are mid-flight whenever the broker stops.
LONG = dict(model=SERVED_MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400,
            extra_body={"ignore_eos": True})
SHORT = dict(model=SERVED_MODEL, messages=[{"role": "user", "content": "Still there?"}], max_tokens=4)


def test_broker_restart_during_streams_requests_and_a_batch(gateway, served_worker, broker):
    client = gateway.client(timeout=120)  # a hang would surface as a client timeout ("hang")
    pids = (gateway.proc.pid, served_worker.proc.pid)
    n, prefix = 600, "restart"
    batch = submit_batch(client, SERVED_MODEL, n, prefix, max_tokens=16, ignore_eos=True)
    with Traffic(client, streams=4, whole=2, **LONG) as traffic:
        # A stream must have tokens when the broker stops: the streams can all be waiting behind the
        # batch's lines at the moment the rest is ready (seen once in a clean run).
        wait_for(lambda: traffic.count("ok") >= 2 and traffic.streaming
                 and client.batches.retrieve(batch.id).request_counts.completed,
                 120, "traffic, a stream with tokens and batch results before the restart")
        stopped_at = time.monotonic()
        with broker_app_stopped(broker.admin):
            gateway.wait_for(lambda h: not h["broker"]["connected"], timeout=30, what="the gateway to see the outage")
            for stream in (False, True):
                t0 = time.monotonic()
                outage = one_request(client, stream, **SHORT)
                print(f"\nduring the outage (stream={stream}): {outage.kind} {outage.status} {outage.code} "
                      f"after {(time.monotonic() - t0) * 1000:.0f} ms (queue timeout 30 s)")
                assert (outage.kind, outage.status, outage.code) == ("refused", 503, "service_paused")
            mid = client.batches.retrieve(batch.id)
            assert mid.status == "in_progress" and mid.request_counts.completed < n, mid
            print(f"batch at {mid.request_counts.completed}/{n} when the broker stopped")
        restarted_at = time.monotonic()
        gateway.wait_for(lambda h: h["broker"]["connected"] and h["models"].get(SERVED_MODEL, {}).get("ready", 0),
                         timeout=120, what="the gateway and the worker to reconnect")
        wait_for(lambda: [o for o in traffic.outcomes if o.kind == "ok" and o.after > restarted_at], 120,
                 "a request to succeed after the restart")
    print("traffic:", traffic.summary())
    assert traffic.count("hang") == 0 and traffic.count("broken") == 0, traffic.summary()
    in_flight = [o for o in traffic.outcomes if o.kind == "cut"]
    assert in_flight, "no stream was in flight when the broker stopped"
    assert {o.code for o in in_flight} <= {"service_paused"}, [o.code for o in in_flight]
    refused = [o for o in traffic.outcomes if o.kind == "refused"]
    assert all(o.status == 503 and o.code == "service_paused" for o in refused), [(o.status, o.code) for o in refused]
    assert all(stopped_at <= o.after for o in in_flight + refused), "a request failed before the fault"
    assert_batch_exactly_once(client, finished_batch(client, batch.id), n, prefix)
    assert (gateway.proc.pid, served_worker.proc.pid) == pids
    assert gateway.proc.poll() is None and served_worker.proc.poll() is None
