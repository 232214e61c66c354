"""The limiter's arithmetic with a hand-driven clock (the behaviour through the API is in test_limits.py)."""

from __future__ import annotations

import pytest

from gateway.limits import Limits, RateLimited, RateLimiter, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_is_a_sliding_window():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = Limits(rpm=3)
    for _ in range(3):
        limiter.admit("k", limits).release()
        clock.now += 10
    with pytest.raises(RateLimited) as caught:
        limiter.admit("k", limits)
    # The first request (at t=1000) leaves the window 60-60.5 s after it was admitted; now is 1030.
    assert 30 <= float(caught.value.headers["retry-after-ms"]) / 1000 <= 30.5
    assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now = 1060.5
    limiter.admit("k", limits).release()  # one slot free again
    with pytest.raises(RateLimited):
        limiter.admit("k", limits)
    assert limiter.admit("other", limits)  # keys are independent


def test_tokens_are_charged_on_release_and_admit_while_under_the_limit():
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = Limits(tpm=100)
    lease = limiter.admit("k", limits)
    assert lease.headers["x-ratelimit-remaining-tokens"] == "100"
    second = limiter.admit("k", limits)  # nothing charged yet: admitted
    lease.release(70)
    lease.release(70)  # idempotent
    third = limiter.admit("k", limits)
    assert third.headers["x-ratelimit-remaining-tokens"] == "30"
    second.release(40)  # 110 used: over
    with pytest.raises(RateLimited) as caught:
        limiter.admit("k", limits)
    assert caught.value.code == "rate_limit_exceeded" and "tokens per minute" in caught.value.message
    clock.now += 61
    limiter.admit("k", limits)


def test_concurrency_slots_come_back_on_release_and_when_a_lease_is_dropped():
    limiter = RateLimiter(Clock())
    limits = Limits(max_concurrent=1)
    lease = limiter.admit("k", limits)
    with pytest.raises(RateLimited) as caught:
        limiter.admit("k", limits)
    assert caught.value.code == "concurrency_limit_exceeded" and caught.value.headers["retry-after"] == "1"
    lease.release()
    dropped = limiter.admit("k", limits)
    del dropped  # a lease nobody released (an unforeseen path) frees its slot when collected
    assert limiter.admit("k", limits)


def test_zero_means_unlimited_and_key_values_override_defaults():
    limiter = RateLimiter(Clock())
    for _ in range(1000):
        limiter.admit("k", Limits())
    defaults = Limits(rpm=600, tpm=0, max_concurrent=64, upload_bytes=10, open_batches=20)
    assert defaults.merged({"rpm": 3, "tpm": None, "open_batches": 0}) == Limits(3, 0, 64, 10, 0)


def test_reset_durations_use_openai_format():
    assert [duration(s) for s in (0, 0.25, 1, 17.46, 59.99, 60, 360.2)] == \
        ["0ms", "250ms", "1s", "17.5s", "60s", "1m0s", "6m1s"]
