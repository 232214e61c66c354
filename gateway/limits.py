"""Per-API-key limits: requests and tokens per minute, concurrent requests (in memory).

Why in memory and hand-written: the checks sit on every request's path and must cost nothing
(no broker or database round trip); the state is a few counters per key. Libraries such as
``limits`` count tokens as one timestamp per token and know no concurrency, so they fit badly.

- **Requests per minute**: a sliding window of the last 60 s (kept in half-second buckets, so a
  key's state is bounded whatever its limit). ``rpm`` requests in any 60 s, never more: the
  ``rpm + 1``-th request within a minute is refused, however fast or slow the machine. A
  request counts for its choices (``n`` x prompts): 16 choices are 16 generations on the GPU.
- **Tokens per minute**: prompt + completion tokens of the requests and batch lines that ended in
  the last 60 s,
  charged **after the fact** from the worker's final usage (a stream the client left early is
  charged the tokens it was sent). The gateway has no tokenizer, so an estimate up front would
  be a guess (and ``max_tokens`` is often absent); instead a request is admitted while the key
  has used less than its limit. The overshoot is bounded by what the key's requests in flight
  can use (``max_concurrent`` of them), and the next requests wait for it.
- **Concurrent requests**: streams and whole requests in flight, from admission until the last
  byte of the response is sent (or the client leaves).

Requests refused here are not counted. A refusal is a 429 in the OpenAI format with the headers
OpenAI sends (``x-ratelimit-limit/remaining/reset-requests`` and ``-tokens``) plus
``retry-after`` and ``retry-after-ms``, which the OpenAI SDK uses for its back-off. Successful
responses carry the ``x-ratelimit-*`` headers too.

The state here lives in one gateway process, enough for one gateway on SQLite. Replicas on a
shared PostgreSQL database count in it instead, with the same rules and answers
(``gateway/shared_limits.py``), so the limits hold for the deployment as a whole. Upload bytes
and open batches are counted in the database on either engine (``gateway/batches``).
All methods run on the event loop thread: no locks.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace

from gateway.errors import APIError

WINDOW = 60.0  # seconds: "per minute"
GRAIN = 0.5  # bucket width of the sliding windows


@dataclass(frozen=True)
class Limits:
    """A key's effective limits; 0 means unlimited."""

    rpm: int = 0  # requests per minute (chat, completions, responses: by choices, n x prompts)
    tpm: int = 0  # prompt + completion tokens per minute
    max_concurrent: int = 0  # requests in flight at once
    upload_bytes: int = 0  # total bytes of the key's uploaded files kept at once
    open_batches: int = 0  # batches not yet in a terminal state

    def merged(self, overrides: Mapping[str, int | None]) -> "Limits":
        """These defaults with a key's own values (None: keep the default)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


class SlidingWindow:
    """Amounts added in the last ``WINDOW`` seconds, in half-second buckets (at most ~121).

    An amount counts for at least ``WINDOW`` seconds and at most half a second longer.
    """

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()  # [bucket index, amount], oldest first
        self._total = 0

    @staticmethod
    def _expiry(bucket: int) -> float:
        return (bucket + 1) * GRAIN + WINDOW

    def _expire(self, now: float) -> None:
        while self._buckets and self._expiry(self._buckets[0][0]) <= now:
            self._total -= self._buckets.popleft()[1]

    def used(self, now: float) -> int:
        self._expire(now)
        return self._total

    def add(self, now: float, amount: int) -> None:
        self._expire(now)
        bucket = int(now // GRAIN)
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1][1] += amount
        else:
            self._buckets.append([bucket, amount])
        self._total += amount

    def free_in(self, now: float, limit: int, need: int = 1) -> float:
        """Seconds until ``need`` more fit under ``limit``."""
        excess = self.used(now) + need - limit
        if excess <= 0:
            return 0.0
        freed = 0
        for bucket, amount in self._buckets:
            freed += amount
            if freed >= excess:
                return self._expiry(bucket) - now
        return WINDOW

    def empty_in(self, now: float) -> float:
        """Seconds until everything in the window has expired (OpenAI's "reset")."""
        self._expire(now)
        return self._expiry(self._buckets[-1][0]) - now if self._buckets else 0.0

    def __bool__(self) -> bool:
        return bool(self._buckets)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``250ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass
class _KeyState:
    requests: SlidingWindow = field(default_factory=SlidingWindow)
    tokens: SlidingWindow = field(default_factory=SlidingWindow)
    active: int = 0


class RateLimited(APIError):
    def __init__(self, message: str, code: str, headers: dict[str, str], retry_after: float) -> None:
        super().__init__(429, message, code=code)
        # retry-after in whole seconds (rounded up), retry-after-ms exact: the SDK prefers the latter.
        self.headers = {**headers, "retry-after": str(max(1, math.ceil(retry_after))),
                        "retry-after-ms": str(max(1, math.ceil(retry_after * 1000)))}


class Lease:
    """One admitted request: holds a concurrency slot until released with the tokens it used."""

    def __init__(self, limiter: "RateLimiter", key_id: str, headers: dict[str, str], lease_id: str = "") -> None:
        self._limiter = limiter
        self._key_id = key_id
        self._lease_id = lease_id  # its row, where replicas share the limits (gateway/shared_limits.py)
        self.headers = headers  # x-ratelimit-* as of admission, for the response
        self._released = False

    def release(self, tokens: int = 0) -> None:
        """Free the slot and charge ``tokens`` (idempotent: only the first call counts)."""
        if self._released:
            return
        self._released = True
        self._limiter._release(self._key_id, tokens, self._lease_id)

    def __del__(self) -> None:
        # A backstop: a lease dropped on a path nobody foresaw must not hold a slot forever.
        if not self._released:
            self.release()


class RateLimiter:
    """The per-key request, token and concurrency limits of one gateway process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key_id: str, limits: Limits, cost: int = 1) -> Lease:
        """Admit one request of ``key_id`` or raise RateLimited (429). ``cost``: what it counts for
        in requests per minute (its choices: ``n`` x prompts). A request costing more than the
        whole limit is admitted only into an empty window, so it is never refused for ever."""
        now = self._clock()
        st = self._keys.setdefault(key_id, _KeyState())
        used = st.requests.used(now)
        if limits.rpm and (used >= limits.rpm or (used and used + cost > limits.rpm)):
            wait = st.requests.free_in(now, limits.rpm, min(cost, limits.rpm))
            raise RateLimited(
                f"Rate limit reached for requests per minute: limit {limits.rpm}, used {st.requests.used(now)}. "
                f"Please try again in {duration(wait)}.",
                "rate_limit_exceeded", self._headers(st, limits, now), wait)
        if limits.tpm and st.tokens.used(now) >= limits.tpm:
            wait = st.tokens.free_in(now, limits.tpm)
            raise RateLimited(
                f"Rate limit reached for tokens per minute: limit {limits.tpm}, used {st.tokens.used(now)}. "
                f"Please try again in {duration(wait)}.",
                "rate_limit_exceeded", self._headers(st, limits, now), wait)
        if limits.max_concurrent and st.active >= limits.max_concurrent:
            raise RateLimited(
                f"Too many concurrent requests for this API key: limit {limits.max_concurrent}. "
                "Wait for one of your requests to finish.",
                "concurrency_limit_exceeded", self._headers(st, limits, now), 1.0)
        st.requests.add(now, cost)
        st.active += 1
        return Lease(self, key_id, self._headers(st, limits, now))

    def over(self, key_id: str, limits: Limits) -> bool:
        """Whether the key has used its requests or tokens of the last minute: its batch lines
        wait (they are not refused, only held back) until the window has room again."""
        st = self._keys.get(key_id)
        if st is None:
            return False
        now = self._clock()
        return bool((limits.rpm and st.requests.used(now) >= limits.rpm)
                    or (limits.tpm and st.tokens.used(now) >= limits.tpm))

    def charge(self, key_id: str, tokens: int) -> None:
        """Count tokens used outside an admitted request (a batch line's result)."""
        if tokens > 0:
            self._keys.setdefault(key_id, _KeyState()).tokens.add(self._clock(), tokens)
        self._forget_if_idle(key_id)

    def _release(self, key_id: str, tokens: int, lease_id: str = "") -> None:
        now = self._clock()
        st = self._keys[key_id]
        st.active -= 1
        if tokens > 0:
            st.tokens.add(now, tokens)
        self._forget_if_idle(key_id)

    def _forget_if_idle(self, key_id: str) -> None:
        st = self._keys.get(key_id)
        now = self._clock()
        if st is not None and not st.active and not st.requests.used(now) and not st.tokens.used(now):
            del self._keys[key_id]  # nothing left to remember: keep the table small

    def active(self, key_id: str) -> int:
        st = self._keys.get(key_id)
        return st.active if st else 0

    async def start(self) -> None:
        """Nothing to keep up (the shared limiter renews its leases)."""

    async def stop(self) -> None:
        """Nothing to give back."""

    @staticmethod
    def _headers(st: _KeyState, limits: Limits, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, limit, window in (("requests", limits.rpm, st.requests), ("tokens", limits.tpm, st.tokens)):
            if limit:
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - window.used(now)))
                headers[f"x-ratelimit-reset-{name}"] = duration(window.empty_in(now))
        return headers
