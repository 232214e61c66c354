"""Per-key limits shared by replicas (gateway/shared_limits.py) on a real PostgreSQL: three
limiters, each with its own connections as three gateway processes have, count one deployment.

The gateway processes themselves are exercised in tests/test_replicas.py; here each rule is
checked at the edge: the limit-th request passes, the next one is refused, wherever it arrives.
"""

from __future__ import annotations

import pytest

from gateway.database import Database
from gateway.limits import Limits, RateLimited
from gateway.shared_limits import SharedRateLimiter
from support.waiting import wait_until


@pytest.fixture
def replicas(postgres):
    url = postgres.new_database()
    dbs = [Database(url) for _ in range(3)]
    yield [SharedRateLimiter(db, replica=f"r{i}", lease_ttl=60) for i, db in enumerate(dbs)]
    for db in dbs:
        db.close()


def _admitted(limiter: SharedRateLimiter, key: str, limits: Limits) -> bool:
    try:
        limiter.admit(key, limits).release()
    except RateLimited as exc:
        assert exc.status == 429 and int(exc.headers["retry-after"]) >= 1
        return False
    return True


def test_requests_per_minute_hold_for_all_replicas_together(replicas):
    limits = Limits(rpm=10)
    outcomes = [_admitted(replicas[i % 3], "key_a", limits) for i in range(30)]
    assert outcomes == [True] * 10 + [False] * 20  # exactly the limit, then none, wherever they arrive
    assert _admitted(replicas[0], "key_b", limits)  # another key has its own minute
    lease = replicas[1].admit("key_c", limits)
    assert lease.headers["x-ratelimit-limit-requests"] == "10"
    assert lease.headers["x-ratelimit-remaining-requests"] == "9"
    lease.release()


def test_concurrent_requests_hold_for_all_replicas_and_come_free_on_release(replicas):
    limits = Limits(max_concurrent=2)
    first, second = replicas[0].admit("key_a", limits), replicas[1].admit("key_a", limits)
    with pytest.raises(RateLimited) as refused:
        replicas[2].admit("key_a", limits)
    assert refused.value.code == "concurrency_limit_exceeded"
    assert replicas[2].active("key_a") == 2
    first.release()
    third = replicas[2].admit("key_a", limits)  # a slot came free, seen by another replica
    second.release()
    third.release()
    assert replicas[0].active("key_a") == 0


def test_a_dead_replicas_slots_come_free_when_its_leases_run_out(postgres):
    url = postgres.new_database()
    dead_db, live_db = Database(url), Database(url)
    dead = SharedRateLimiter(dead_db, replica="dead", lease_ttl=3.0)
    live = SharedRateLimiter(live_db, replica="live", lease_ttl=60)
    limits = Limits(max_concurrent=1)
    held = dead.admit("key_a", limits)  # never released, never renewed: its process is gone
    with pytest.raises(RateLimited):
        live.admit("key_a", limits)
    lease = wait_until(lambda: _try(live, "key_a", limits), 30, "the dead replica's slot to come free")
    lease.release()
    live.renew()  # upkeep drops the expired row
    assert dead_db.one("SELECT COUNT(*) FROM limit_leases")[0] == 0
    held.release()  # (only so that the test's object lets go; the row is gone already)
    dead_db.close()
    live_db.close()


def _try(limiter: SharedRateLimiter, key: str, limits: Limits):
    try:
        return limiter.admit(key, limits)
    except RateLimited:
        return None


def test_tokens_charged_on_one_replica_hold_back_the_others(replicas):
    limits = Limits(tpm=100)
    replicas[0].admit("key_a", limits).release(tokens=60)
    assert not replicas[1].over("key_a", limits)
    replicas[1].charge("key_a", 40)  # a batch line's result, committed by another replica
    assert replicas[2].over("key_a", limits)  # its batch lines wait
    with pytest.raises(RateLimited) as refused:
        replicas[2].admit("key_a", limits)
    assert "tokens per minute" in refused.value.message
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
