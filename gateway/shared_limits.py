"""Per-key limits that hold for a whole deployment of gateway replicas, counted in PostgreSQL.

``gateway/limits.py`` counts in one process's memory: N replicas would allow N times every
limit. With ``CHATAI_GATEWAY_DATABASE_URL=postgresql://...`` the gateway counts here instead,
with the same rules (a sliding minute in half-second buckets, tokens charged after the fact,
requests in flight held by a lease) and the same answers (``RateLimited``, ``Lease``).

Why PostgreSQL, not the broker or Redis: the replicas already share it, it is the engine made
for this kind of state, and one admission is one call of a server-side function
(``chatai_admit``: one round trip, well under a millisecond on a LAN) that takes a per-key
advisory lock, so admissions of one key are serialised across replicas: requests per minute
and concurrency are exact for the deployment, not approximately so. Redis would add a second
stateful service to run and secure for no accuracy gained. The clock is the database
server's, so replicas on machines whose clocks drift still agree on the window.

Requests in flight are rows (``limit_leases``) a replica renews while it runs; a replica that
dies stops renewing, and its slots come free after ``LEASE_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from gateway.database import Database, replica_name
from gateway.limits import GRAIN, WINDOW, Lease, Limits, RateLimited, duration

log = logging.getLogger("chatai.gateway.limits")

LEASE_TTL = 60.0  # seconds a dead replica's requests keep their concurrency slots
RENEW_EVERY = 15.0  # seconds between a live replica's renewals of its leases

_SCHEMA = """
CREATE TABLE IF NOT EXISTS limit_usage (
    key_id TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, bucket)
);
CREATE TABLE IF NOT EXISTS limit_leases (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    replica TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS limit_leases_key ON limit_leases (key_id, expires);
CREATE INDEX IF NOT EXISTS limit_leases_replica ON limit_leases (replica)
"""

# The window's live buckets: a bucket b counts while (b + 1) * GRAIN + WINDOW > now.
_ADMIT = f"""
CREATE OR REPLACE FUNCTION chatai_admit(p_key TEXT, p_rpm BIGINT, p_tpm BIGINT, p_max BIGINT, p_cost BIGINT,
                                        p_lease TEXT, p_replica TEXT, p_ttl DOUBLE PRECISION)
RETURNS TABLE (verdict TEXT, used_requests BIGINT, used_tokens BIGINT, in_flight BIGINT, db_now DOUBLE PRECISION,
               first_request BIGINT, last_request BIGINT, first_token BIGINT, last_token BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    t DOUBLE PRECISION;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('chatai-limit:' || p_key));
    t := extract(epoch FROM clock_timestamp());
    db_now := t;
    SELECT COALESCE(SUM(u.requests), 0), COALESCE(SUM(u.tokens), 0),
           MIN(u.bucket) FILTER (WHERE u.requests > 0), MAX(u.bucket) FILTER (WHERE u.requests > 0),
           MIN(u.bucket) FILTER (WHERE u.tokens > 0), MAX(u.bucket) FILTER (WHERE u.tokens > 0)
      INTO used_requests, used_tokens, first_request, last_request, first_token, last_token
      FROM limit_usage u WHERE u.key_id = p_key AND (u.bucket + 1) * {GRAIN} + {WINDOW} > t;
    SELECT COUNT(*) INTO in_flight FROM limit_leases l WHERE l.key_id = p_key AND l.expires > t;
    IF p_rpm > 0 AND (used_requests >= p_rpm OR (used_requests > 0 AND used_requests + p_cost > p_rpm)) THEN
        verdict := 'requests';
    ELSIF p_tpm > 0 AND used_tokens >= p_tpm THEN
        verdict := 'tokens';
    ELSIF p_max > 0 AND in_flight >= p_max THEN
        verdict := 'concurrent';
    ELSE
        verdict := 'ok';
        INSERT INTO limit_usage AS u (key_id, bucket, requests, tokens) VALUES (p_key, floor(t / {GRAIN}), p_cost, 0)
            ON CONFLICT (key_id, bucket) DO UPDATE SET requests = u.requests + EXCLUDED.requests;
        INSERT INTO limit_leases (id, key_id, replica, expires) VALUES (p_lease, p_key, p_replica, t + p_ttl);
        used_requests := used_requests + p_cost;
        in_flight := in_flight + 1;
        last_request := floor(t / {GRAIN});
        first_request := COALESCE(first_request, last_request);
    END IF;
    RETURN NEXT;
END $$
"""

_CHARGE = f"""INSERT INTO limit_usage AS u (key_id, bucket, requests, tokens)
VALUES (?, floor(extract(epoch FROM clock_timestamp()) / {GRAIN}), 0, ?)
ON CONFLICT (key_id, bucket) DO UPDATE SET tokens = u.tokens + EXCLUDED.tokens"""
_LIVE = f"(bucket + 1) * {GRAIN} + {WINDOW} > extract(epoch FROM clock_timestamp())"


def _schema_v1(db: Database) -> None:
    db.ddl(_SCHEMA)
    db.conn.raw.execute(_ADMIT)  # one statement with semicolons inside: not split


class SharedRateLimiter:
    """``RateLimiter``'s interface, for all replicas on one PostgreSQL database."""

    def __init__(self, db: Database, replica: str | None = None, lease_ttl: float = LEASE_TTL) -> None:
        if not db.postgres:
            raise ValueError("shared limits need PostgreSQL (one SQLite gateway counts in memory)")
        self._db = db
        self._db.migrate("limits", (_schema_v1,))
        self.replica = replica or replica_name()
        self.lease_ttl = lease_ttl
        self._renewer: asyncio.Task | None = None

    # ------------------------------------------------------------------ the request path

    def admit(self, key_id: str, limits: Limits, cost: int = 1) -> Lease:
        """Admit one request of ``key_id`` for the whole deployment, or raise RateLimited (429).
        A key without rate or concurrency limits costs no round trip: there is nothing to count."""
        if not (limits.rpm or limits.tpm or limits.max_concurrent):
            return Lease(self, key_id, {})
        lease_id = secrets.token_hex(12)
        row = self._db.one("SELECT * FROM chatai_admit(?, ?, ?, ?, ?, ?, ?, ?)",
                           (key_id, limits.rpm, limits.tpm, limits.max_concurrent, cost, lease_id, self.replica,
                            self.lease_ttl))
        headers = _headers(row, limits)
        verdict, at = row["verdict"], row["db_now"]
        if verdict == "requests":
            wait = _expiry(row["first_request"]) - at
            raise RateLimited(
                f"Rate limit reached for requests per minute: limit {limits.rpm}, used {row['used_requests']}. "
                f"Please try again in {duration(wait)}.", "rate_limit_exceeded", headers, wait)
        if verdict == "tokens":
            wait = _expiry(row["first_token"]) - at
            raise RateLimited(
                f"Rate limit reached for tokens per minute: limit {limits.tpm}, used {row['used_tokens']}. "
                f"Please try again in {duration(wait)}.", "rate_limit_exceeded", headers, wait)
        if verdict == "concurrent":
            raise RateLimited(
                f"Too many concurrent requests for this API key: limit {limits.max_concurrent}. "
                "Wait for one of your requests to finish.", "concurrency_limit_exceeded", headers, 1.0)
        return Lease(self, key_id, headers, lease_id=lease_id)

    def _release(self, key_id: str, tokens: int, lease_id: str = "") -> None:
        if not lease_id:
            return  # admitted without limits: nothing was counted
        with self._db.tx() as db:
            db.execute("DELETE FROM limit_leases WHERE id = ?", (lease_id,))
            if tokens > 0:
                db.execute(_CHARGE, (key_id, tokens))

    def over(self, key_id: str, limits: Limits) -> bool:
        """Whether the key has used its requests or tokens of the last minute (its batch lines wait)."""
        if not (limits.rpm or limits.tpm):
            return False
        row = self._db.one(f"SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0) FROM limit_usage "
                           f"WHERE key_id = ? AND {_LIVE}", (key_id,))
        return bool((limits.rpm and row[0] >= limits.rpm) or (limits.tpm and row[1] >= limits.tpm))

    def charge(self, key_id: str, tokens: int) -> None:
        """Count tokens used outside an admitted request (a batch line's result)."""
        if tokens > 0:
            self._db.execute(_CHARGE, (key_id, tokens))

    def active(self, key_id: str) -> int:
        """Requests of the key in flight on all replicas."""
        return int(self._db.one("SELECT COUNT(*) FROM limit_leases WHERE key_id = ? AND "
                                "expires > extract(epoch FROM clock_timestamp())", (key_id,))[0])

    # ------------------------------------------------------------------ upkeep

    def renew(self) -> None:
        """Keep this replica's leases alive and drop what no window can see any more."""
        with self._db.tx() as db:
            db.execute("UPDATE limit_leases SET expires = extract(epoch FROM clock_timestamp()) + ? "
                       "WHERE replica = ?", (self.lease_ttl, self.replica))
            db.execute("DELETE FROM limit_leases WHERE expires < extract(epoch FROM clock_timestamp())")
            db.execute(f"DELETE FROM limit_usage WHERE NOT {_LIVE}")

    async def start(self) -> None:
        from broker_config.timing import run_periodically

        async def renew() -> None:
            await asyncio.to_thread(self.renew)

        self._renewer = asyncio.create_task(run_periodically(renew, RENEW_EVERY, what="limit lease renewal",
                                                             logger=log), name="limit-leases")

    async def stop(self) -> None:
        """Stop renewing; this replica's remaining leases are given back (a clean stop)."""
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        try:
            await asyncio.to_thread(self._db.execute, "DELETE FROM limit_leases WHERE replica = ?", (self.replica,))
        except Exception as exc:  # noqa: BLE001 - they expire by themselves
            log.warning("could not give back this replica's limit leases (%s)", type(exc).__name__)
        self._db.close()


def _expiry(bucket: int | None) -> float:
    return (bucket + 1) * GRAIN + WINDOW if bucket is not None else 0.0


def _headers(row, limits: Limits) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, as ``RateLimiter`` sends them."""
    headers: dict[str, str] = {}
    at = row["db_now"]
    for name, limit, used, last in (("requests", limits.rpm, row["used_requests"], row["last_request"]),
                                    ("tokens", limits.tpm, row["used_tokens"], row["last_token"])):
        if limit:
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, limit - int(used)))
            headers[f"x-ratelimit-reset-{name}"] = duration(max(0.0, _expiry(last) - at) if last is not None else 0.0)
    return headers

