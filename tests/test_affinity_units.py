"""Prefix-cache affinity in memory: conversation keys, the bounded memory, which worker to
prefer, attempt numbers across a spill, and the broker definitions that make the spill."""

from __future__ import annotations

import re
from types import SimpleNamespace

from broker_config import topology as t
from broker_config.definitions import Definitions, gateway_permissions, permissions_for
from broker_config.heartbeats import PrefixCacheFigures, percent
from broker_config.messages import Heartbeat
from gateway.cluster.affinity import Affinity, ConversationMemory, Hasher, preferred_worker
from gpu_worker.consumer import attempt_of

SYSTEM = {"role": "system", "content": "be brief"}


def chat(*contents: str) -> dict:
    roles = ["user", "assistant"]
    return {"messages": [SYSTEM, *({"role": roles[i % 2], "content": c} for i, c in enumerate(contents))]}


def hb(worker_id: str = "w1", *, model: str = "m", state: str = "ready", in_flight: int = 0, capacity: int = 2,
       affinity: bool = True, **kw) -> Heartbeat:
    return Heartbeat(worker_id=worker_id, model=model, state=state, capacity=capacity, in_flight=in_flight,
                     node="n", sent_at=0.0, affinity=affinity, **kw)


def test_a_follow_up_turn_finds_the_previous_turn_and_nothing_else_does():
    h = Hasher()
    turn1 = h.keys("m", chat("hi"))
    turn2 = h.keys("m", chat("hi", "hello!", "and then?"))
    assert turn1.remember[0] in turn2.lookup  # turn 2 begins with all of turn 1's messages
    assert turn2.lookup[0] == turn2.remember[0]  # the same request again (a retry) finds itself first
    assert not set(turn1.remember) & set(h.keys("m", chat("other")).lookup)
    assert not set(turn1.remember) & set(h.keys("other-model", chat("hi", "hello!", "x")).lookup)
    # Keyed per process: another gateway's hashes of the same text differ (no guessing texts).
    assert Hasher().keys("m", chat("hi")).remember != turn1.remember


def test_the_clients_own_key_names_the_conversation():
    h = Hasher()
    a = h.keys("m", {"prompt_cache_key": "conv-7", **chat("hi")})
    b = h.keys("m", {"prompt_cache_key": "conv-7", **chat("something else entirely")})
    assert a == b and a.lookup
    assert h.keys("m", {"prompt": "a completion"}).lookup == ()  # nothing to recognise: no affinity
    by_user = h.keys("m", {"prompt": "a completion", "user": "u1"})
    assert by_user.lookup and by_user == h.keys("m", {"prompt": "another", "user": "u1"})


def test_the_memory_forgets_after_its_ttl_and_beyond_its_size():
    now = [0.0]
    memory = ConversationMemory(ttl=10, max_entries=2, clock=lambda: now[0])
    memory.remember([b"a"], "w1")
    now[0] = 5
    memory.remember([b"b"], "w2")
    assert memory.recall([b"x", b"a"]) == "w1"
    now[0] = 11
    assert memory.recall([b"a"]) is None and memory.recall([b"b"]) == "w2"
    memory.remember([b"c"], "w1")
    memory.remember([b"d"], "w1")
    assert len(memory) == 2 and memory.recall([b"b"]) is None  # the least recent went first


def test_only_a_ready_worker_with_room_that_takes_affinity_is_preferred():
    assert preferred_worker("w1", "m", [hb()]) == "w1"
    assert preferred_worker("w1", "m", [hb(in_flight=2)]) is None
    assert preferred_worker("w1", "m", [hb(state="draining")]) is None
    assert preferred_worker("w1", "m", [hb(affinity=False)]) is None
    assert preferred_worker("w1", "m", [hb(model="other")]) is None
    assert preferred_worker("gone", "m", [hb()]) is None
    # Full as of its heartbeat, but this gateway saw it answer since: the slot is free.
    assert preferred_worker("w1", "m", [hb(in_flight=2)], lambda w: True) == "w1"
    assert preferred_worker("w1", "m", [hb(in_flight=2, state="draining")], lambda w: True) is None


def test_affinity_remembers_the_worker_that_started_a_turn():
    now = [100.0]
    heard = {"w1": 50.0}
    live = [hb(in_flight=2)]
    affinity = Affinity(True, ConversationMemory(), lambda: live, heard.get, clock=lambda: now[0])
    keys1 = affinity.keys("m", chat("hi"))
    affinity.started(keys1, "w1")
    keys2 = affinity.keys("m", chat("hi", "hello", "more"))
    assert affinity.prefer("m", keys2) is None  # full, as far as this gateway knows
    affinity.finished("w1")  # ... until it answered one after its last heartbeat
    assert affinity.prefer("m", keys2) == "w1"
    off = Affinity(False, ConversationMemory(), lambda: [hb()])
    assert off.keys("m", chat("hi")).lookup == ()


def _message(redelivered: bool, deaths: int = 0) -> SimpleNamespace:
    headers = {"x-death": [{"count": deaths, "reason": "expired", "queue": "chatai.wk.w.affinity"}]} if deaths else {}
    return SimpleNamespace(redelivered=redelivered, headers=headers)


def test_every_later_delivery_of_a_request_has_a_higher_attempt():
    # Taken from the affinity queue, given back within the bound, taken again, lost, spilled,
    # lost again on the shared queue: each delivery outranks the one before.
    path = [_message(False), _message(True), _message(False, deaths=1), _message(True, deaths=1)]
    attempts = [attempt_of(m) for m in path]
    assert attempts == sorted(set(attempts)) and attempts[0] == 1
    assert attempt_of(_message(True)) < attempt_of(_message(False, deaths=1))


def test_the_affinity_queue_spills_by_policy_and_workers_still_cannot_publish_requests():
    doc = Definitions(models=["m"], passwords={u: "x" for u in ("gateway", "worker", "operator")}).render()
    (policy,) = doc["policies"]
    assert policy["definition"]["dead-letter-exchange"] == t.REQUESTS_EXCHANGE
    assert 0 < policy["definition"]["message-ttl"] < 1000 < policy["definition"]["expires"]
    assert "dead-letter-routing-key" not in policy["definition"]  # the message keeps its model key
    assert re.match(policy["pattern"], t.worker_affinity_queue("node-1.x-42"))
    assert not re.match(policy["pattern"], t.worker_control_queue("node-1"))
    assert not re.match(policy["pattern"], t.model_queue("m"))
    assert {"name": t.AFFINITY_EXCHANGE, "type": "headers"}.items() <= \
        next(e for e in doc["exchanges"] if e["name"] == t.AFFINITY_EXCHANGE).items()
    worker = permissions_for("worker", "worker")
    assert not re.match(worker["write"], t.REQUESTS_EXCHANGE) and not re.match(worker["write"], t.AFFINITY_EXCHANGE)
    assert re.match(worker["read"], t.AFFINITY_EXCHANGE)  # to bind its own queue
    assert re.match(worker["configure"], t.worker_affinity_queue("w"))
    gw = gateway_permissions("gateway")
    assert re.match(gw["write"], t.AFFINITY_EXCHANGE)
    assert not re.match(gw["read"], t.worker_affinity_queue("w")) and not re.match(gw["configure"], t.AFFINITY_EXCHANGE)


def test_the_hit_rate_of_a_model_sums_its_workers():
    figures = PrefixCacheFigures.of([hb(prefix_cache_queries=300, prefix_cache_hits=200),
                                     hb("w2", prefix_cache_queries=100, prefix_cache_hits=0)])
    assert (figures.queries, figures.hits, percent(figures.hit_rate)) == (400, 200, "50%")
    assert percent(PrefixCacheFigures.of([hb()]).hit_rate) == "-"
