"""Batch state in the gateway's database (SQLite, or PostgreSQL shared by replicas): files'
metadata, batches and one row per batch line.

The database is the single source of truth for a batch's progress, so the gateway can be
killed at any moment and resume from here. Every state change that matters is one
transaction; in particular a line's result and the batch's counters change together, and only
for a line that has no result yet (``record_result``): that conditional update is what makes
each custom_id's result exactly-once however often the broker redelivers it.

Line states:
``pending``    not yet sent;
``publishing`` being published, the broker's confirm not yet seen (after a crash: unknown
               whether the broker has it, so it is sent again);
``queued``     the broker confirmed it: it sits in a durable queue or on a worker, and its
               result will arrive on the durable results queue (not sent again, except after
               ``republish_after``);
``done`` / ``failed``  result written (output file / error file);
``cancelled``  never ran (batch cancelled or expired).

One connection per thread (``gateway/database.py``): the event loop reads and makes small state
changes, worker threads do the heavy writes (validation inserts, group commits of results,
output files), so an fsync never stalls interactive traffic in the same process.

Replicas (several gateway processes on one PostgreSQL database): a batch is driven by one
replica at a time, the holder of its lease (``claim_batches``: ``leased_by``, ``lease_until``,
taken in one transaction, renewed every dispatcher step). A replica that dies leaves its
leases to expire; the next holder sends again the lines it left ``publishing`` (their duplicate
results are dropped as above). Results are committed by whichever replica consumes them, each
once (``record_result``), with the batch's row locked first so that group commits of two
replicas never deadlock.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.batches.states import ACTIVE, IN_FLIGHT, OPEN, TERMINAL
from gateway.database import Connection, Database, open_database

log = logging.getLogger("chatai.gateway.batches")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS batch_files_owner ON batch_files (owner, seq);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,
    metadata TEXT,
    output_ttl REAL,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    ended_at INTEGER
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, seq);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    line_no INTEGER NOT NULL,
    custom_id TEXT,
    state TEXT NOT NULL,
    request TEXT,
    result TEXT,
    sent_at REAL,
    PRIMARY KEY (batch_id, line_no)
);
CREATE TABLE IF NOT EXISTS batch_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batch_lines_state ON batch_lines (batch_id, state, line_no);
"""


def _schema_v1(db: Database) -> None:
    """The tables (and ``result_bytes`` on a database of an older version)."""
    db.ddl(_SCHEMA)
    if "result_bytes" not in db.columns("batches"):
        db.ddl("ALTER TABLE batches ADD COLUMN result_bytes INTEGER NOT NULL DEFAULT 0")


def _schema_v2(db: Database) -> None:
    """Replicas: which gateway process drives a batch, until when."""
    db.ddl("ALTER TABLE batches ADD COLUMN leased_by TEXT; ALTER TABLE batches ADD COLUMN lease_until REAL")


_MIGRATIONS = (_schema_v1, _schema_v2)


@dataclass(frozen=True)
class LineRow:
    batch_id: str
    line_no: int
    custom_id: str | None
    state: str
    request: dict[str, Any] | None
    sent_at: float | None


def now() -> int:
    return int(time.time())


class BatchStore:
    def __init__(self, database: "str | Path | Database") -> None:
        """``database``: a URL (``sqlite:///...``, ``postgresql://...``), an SQLite path, or an open
        ``Database``."""
        self.db = open_database(database)
        self.db.migrate("batches", _MIGRATIONS)

    @property
    def _db(self) -> Connection:
        """This thread's connection (SQLite's WAL lets the event loop read while a writer thread
        commits, so a group commit's fsync in a worker thread never holds up the loop)."""
        return self.db.conn

    def close(self) -> None:
        self.db.close()

    def tx(self) -> AbstractContextManager[Connection]:
        """One write transaction; nested use joins the outer one (see ``Database.tx``)."""
        return self.db.tx()

    def part(self) -> AbstractContextManager[None]:
        """Inside ``tx()``: a part that rolls back alone if it raises (a savepoint), so one bad
        item of a group commit never takes the others with it."""
        return self.db.part()

    def _one(self, sql: str, args: Iterable[Any] = ()) -> Any:
        return self.db.one(sql, args)

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        return self.db.all(sql, args)

    def deployment_id(self) -> str:
        """A random id made once per database: names this deployment's results queue."""
        self._db.execute("INSERT INTO batch_meta (key, value) VALUES ('deployment', ?) ON CONFLICT (key) DO NOTHING",
                         (secrets.token_hex(8),))  # the first replica's value stays
        return self._one("SELECT value FROM batch_meta WHERE key = 'deployment'")["value"]

    # ------------------------------------------------------------------ files

    def add_file(self, file_id: str, owner: str, filename: str, purpose: str, size: int,
                 expires_at: int | None, *, conn: Connection | None = None) -> None:
        sql = ("INSERT INTO batch_files (id, owner, filename, purpose, bytes, created_at, expires_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
               "filename = excluded.filename, purpose = excluded.purpose, bytes = excluded.bytes, "
               "created_at = excluded.created_at, expires_at = excluded.expires_at")
        args = (file_id, owner, filename, purpose, size, now(), expires_at)
        if conn is not None:
            conn.execute(sql, args)
        else:
            self._db.execute(sql, args)

    _STORED = ("SELECT (SELECT COALESCE(SUM(bytes), 0) FROM batch_files WHERE owner = ?) + "
               f"(SELECT COALESCE(SUM(result_bytes), 0) FROM batches WHERE owner = ? AND status IN "
               f"({','.join(repr(s) for s in sorted(ACTIVE))}))")

    def stored_bytes(self, owner: str) -> int:
        """What ``owner`` keeps on the gateway's disk: its uploads, its batches' output and error
        files, and the results its running batches have collected so far (the storage quota)."""
        return int(self._db.execute(self._STORED, (owner, owner)).fetchone()[0])

    def add_upload(self, file_id: str, owner: str, filename: str, purpose: str, size: int,
                   expires_at: int | None, max_total: int) -> bool:
        """Record an upload unless it takes the owner's uploads past ``max_total`` bytes (0: no cap).

        Checked and inserted in one write transaction, so concurrent uploads, even through
        several gateway processes, can never pass the cap together.
        """
        with self.tx() as db:
            if max_total:
                used = db.execute(self._STORED, (owner, owner)).fetchone()[0]
                if used + size > max_total:
                    return False
            self.add_file(file_id, owner, filename, purpose, size, expires_at, conn=db)
        return True

    def get_file(self, file_id: str, owner: str | None = None) -> Any:
        if owner is None:
            return self._one("SELECT * FROM batch_files WHERE id = ?", (file_id,))
        return self._one("SELECT * FROM batch_files WHERE id = ? AND owner = ?", (file_id, owner))

    def list_files(self, owner: str, *, purpose: str | None, limit: int, after: str | None,
                   order: str) -> tuple[list[Any], bool]:
        return self._page("batch_files", owner, limit, after, order,
                          extra=("purpose = ?", purpose) if purpose else None)

    def delete_file(self, file_id: str) -> bool:
        deleted = self._db.execute("DELETE FROM batch_files WHERE id = ?", (file_id,)).rowcount == 1
        self.scrub()
        return deleted

    def scrub(self) -> None:
        """After a delete: erase the old page images the WAL still holds (see gateway/private.py).

        Deleted rows are already overwritten with zeros in their pages (secure_delete); this
        truncates the WAL, whose earlier frames may still hold the text.
        """
        self.db.scrub()

    def expired_files(self, at: int) -> list[str]:
        return [r["id"] for r in self._all(
            "SELECT id FROM batch_files WHERE expires_at IS NOT NULL AND expires_at <= ?", (at,))]

    def _page(self, table: str, owner: str, limit: int, after: str | None, order: str,
              extra: tuple[str, Any] | None = None) -> tuple[list[Any], bool]:
        """Cursor pagination as OpenAI does it: ``after`` is the last id of the previous page."""
        desc = order != "asc"
        where, args = ["owner = ?"], [owner]
        if extra:
            where.append(extra[0])
            args.append(extra[1])
        if after:
            cursor = self._one(f"SELECT seq FROM {table} WHERE id = ? AND owner = ?", (after, owner))
            if cursor is not None:
                where.append("seq < ?" if desc else "seq > ?")
                args.append(cursor["seq"])
        rows = self._all(f"SELECT * FROM {table} WHERE {' AND '.join(where)} "
                         f"ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    # ------------------------------------------------------------------ batches

    def open_batches(self, owner: str) -> int:
        """Batches of ``owner`` not yet in a terminal state."""
        row = self._one(f"SELECT COUNT(*) AS n FROM batches WHERE owner = ? AND status IN "
                        f"({','.join('?' * len(ACTIVE))})", (owner, *ACTIVE))
        return int(row["n"]) if row else 0

    def create_batch(self, batch_id: str, owner: str, endpoint: str, input_file_id: str,
                     completion_window: str, expires_at: int, metadata: dict | None,
                     output_ttl: float | None, max_open: int = 0) -> bool:
        """A new batch, unless ``owner`` already has ``max_open`` open ones (0: no cap); checked and
        inserted in one transaction, so the cap holds across concurrent requests and processes."""
        with self.tx() as db:
            if max_open:
                n = db.execute(f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status IN "
                               f"({','.join('?' * len(ACTIVE))})", (owner, *ACTIVE)).fetchone()[0]
                if n >= max_open:
                    return False
            db.execute(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, "
                "metadata, output_ttl, created_at, expires_at) VALUES (?, ?, ?, ?, ?, 'validating', ?, ?, ?, ?)",
                (batch_id, owner, endpoint, input_file_id, completion_window,
                 json.dumps(metadata) if metadata is not None else None, output_ttl, now(), expires_at))
        return True

    def get_batch(self, batch_id: str, owner: str | None = None) -> Any:
        if owner is None:
            return self._one("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return self._one("SELECT * FROM batches WHERE id = ? AND owner = ?", (batch_id, owner))

    def list_batches(self, owner: str, *, limit: int, after: str | None) -> tuple[list[Any], bool]:
        return self._page("batches", owner, limit, after, "desc")

    def batches_in(self, statuses: Iterable[str]) -> list[Any]:
        s = tuple(statuses)
        return self._all(f"SELECT * FROM batches WHERE status IN ({','.join('?' * len(s))}) ORDER BY seq", s)

    def set_status(self, batch_id: str, status: str, *, only_from: Iterable[str] = (),
                   **fields: Any) -> bool:
        """Move a batch to ``status`` (stamping ``<status>_at``), optionally only from given states."""
        sets = {"status": status, f"{status}_at": now(), **fields}
        if status in TERMINAL:
            sets["ended_at"] = now()
        sql = f"UPDATE batches SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?"
        args: list[Any] = [*sets.values(), batch_id]
        src = tuple(only_from)
        if src:
            sql += f" AND status IN ({','.join('?' * len(src))})"
            args.extend(src)
        return self._db.execute(sql, args).rowcount == 1

    def start_batch(self, batch_id: str, lines: list[tuple[int, str | None, str, dict | None, dict | None]],
                    model: str | None) -> bool:
        """Store a validated batch's lines and move it to in_progress, in one transaction.

        ``lines``: (line_no, custom_id, state 'pending' or 'failed', request, error result).
        Re-running it (a restart during validation) replaces what a previous run left.
        """
        failed = sum(1 for line in lines if line[2] == "failed")
        with self.tx() as db:
            row = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["status"] != "validating":
                return False
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
            db.executemany(
                "INSERT INTO batch_lines (batch_id, line_no, custom_id, state, request, result) VALUES (?, ?, ?, ?, ?, ?)",
                [(batch_id, n, cid, state, json.dumps(req) if req is not None else None,
                  json.dumps(res) if res is not None else None) for n, cid, state, req, res in lines])
            db.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ?, completed = 0, "
                       "failed = ?, model = ? WHERE id = ?", (now(), len(lines), failed, model, batch_id))
        return True

    def delete_batch(self, batch_id: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
            db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        self.scrub()

    def ended_before(self, at: int) -> list[Any]:
        return self._all("SELECT * FROM batches WHERE ended_at IS NOT NULL AND ended_at <= ?", (at,))

    # ------------------------------------------------------------------ lines

    def count_lines(self, batch_id: str, states: Iterable[str]) -> int:
        s = tuple(states)
        row = self._one(f"SELECT COUNT(*) AS n FROM batch_lines WHERE batch_id = ? AND state IN "
                        f"({','.join('?' * len(s))})", (batch_id, *s))
        return int(row["n"]) if row else 0

    def lines_in(self, batch_id: str, states: Iterable[str], limit: int | None = None) -> list[LineRow]:
        s = tuple(states)
        sql = (f"SELECT batch_id, line_no, custom_id, state, request, sent_at FROM batch_lines "
               f"WHERE batch_id = ? AND state IN ({','.join('?' * len(s))}) ORDER BY line_no")
        args: list[Any] = [batch_id, *s]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [LineRow(r["batch_id"], r["line_no"], r["custom_id"], r["state"],
                        json.loads(r["request"]) if r["request"] else None, r["sent_at"])
                for r in self._all(sql, args)]

    def get_line(self, batch_id: str, line_no: int) -> LineRow | None:
        rows = self._all("SELECT batch_id, line_no, custom_id, state, request, sent_at FROM batch_lines "
                         "WHERE batch_id = ? AND line_no = ?", (batch_id, line_no))
        if not rows:
            return None
        r = rows[0]
        return LineRow(r["batch_id"], r["line_no"], r["custom_id"], r["state"],
                       json.loads(r["request"]) if r["request"] else None, r["sent_at"])

    def mark_publishing(self, batch_id: str, line_nos: list[int]) -> None:
        with self.tx() as db:
            db.executemany("UPDATE batch_lines SET state = 'publishing' WHERE batch_id = ? AND line_no = ? "
                           "AND state = 'pending'", [(batch_id, n) for n in line_nos])

    def mark_queued(self, batch_id: str, line_nos: list[int]) -> None:
        """After the broker's confirms; a result that already arrived is left alone."""
        with self.tx() as db:
            db.executemany("UPDATE batch_lines SET state = 'queued', sent_at = ? WHERE batch_id = ? AND "
                           "line_no = ? AND state = 'publishing'", [(time.time(), batch_id, n) for n in line_nos])

    def back_to_pending(self, batch_id: str, line_nos: Iterable[int], from_states: Iterable[str] = IN_FLIGHT) -> int:
        s = tuple(from_states)
        n = 0
        for line_no in line_nos:
            n += self._db.execute(
                f"UPDATE batch_lines SET state = 'pending', sent_at = NULL WHERE batch_id = ? AND line_no = ? "
                f"AND state IN ({','.join('?' * len(s))})", (batch_id, line_no, *s)).rowcount
        return n

    def claim_batches(self, replica: str, lease: float) -> tuple[list[Any], int]:
        """The active batches this replica drives for the next ``lease`` seconds: those it holds
        (renewed), and those nobody holds or whose holder let its lease run out (it died, or
        hangs). Taking a batch over, it sends again the lines the last holder left
        ``publishing`` (they may or may not have reached the broker). Returns (batches, lines
        sent again).

        Its own leases are renewed row by row, waiting for a result commit that holds a row for
        a moment; others' are taken with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so replicas
        claiming at once never wait on each other nor deadlock with result commits."""
        active = f"status IN ({','.join('?' * len(ACTIVE))})"
        at = time.time()
        for row in self._all(f"SELECT id FROM batches WHERE leased_by = ? AND {active}", (replica, *ACTIVE)):
            self._db.execute("UPDATE batches SET lease_until = ? WHERE id = ? AND leased_by = ?",
                             (at + lease, row["id"], replica))
        reset = 0
        with self.tx() as db:
            free = db.execute(
                f"SELECT id FROM batches WHERE {active} AND (leased_by IS NULL OR (leased_by <> ? AND "
                f"lease_until < ?)) ORDER BY seq{' FOR UPDATE SKIP LOCKED' if self.db.postgres else ''}",
                (*ACTIVE, replica, at)).fetchall()
            for row in free:
                reset += db.execute("UPDATE batch_lines SET state = 'pending' WHERE batch_id = ? AND "
                                    "state = 'publishing'", (row["id"],)).rowcount
            db.executemany("UPDATE batches SET leased_by = ?, lease_until = ? WHERE id = ?",
                           [(replica, at + lease, row["id"]) for row in free])
        return self._all(f"SELECT * FROM batches WHERE leased_by = ? AND {active} ORDER BY seq",
                         (replica, *ACTIVE)), reset

    def release_batches(self, replica: str) -> int:
        """On a clean stop: the batches this replica drove are free for another at once."""
        return self._db.execute("UPDATE batches SET leased_by = NULL, lease_until = NULL WHERE leased_by = ?",
                                (replica,)).rowcount

    def stale_queued(self, batch_id: str, older_than: float) -> list[int]:
        return [r["line_no"] for r in self._all(
            "SELECT line_no FROM batch_lines WHERE batch_id = ? AND state = 'queued' AND sent_at < ?",
            (batch_id, older_than))]

    def record_result(self, batch_id: str, line_no: int, ok: bool, result: dict[str, Any],
                      usage: tuple[int, int] = (0, 0)) -> bool:
        """Write a line's result once: False if it already had one (a duplicate) or is gone."""
        text = json.dumps(result)
        with self.tx() as db:
            # The batch row first, as end_batch does: two replicas' commits wait in turn, never in a cycle.
            db.execute("SELECT id FROM batches WHERE id = ?" + self.db.for_update, (batch_id,))
            cur = db.execute(
                "UPDATE batch_lines SET state = ?, result = ?, request = NULL WHERE batch_id = ? AND line_no = ? "
                "AND state IN ('pending', 'publishing', 'queued')",
                ("done" if ok else "failed", text, batch_id, line_no))
            if cur.rowcount != 1:
                return False
            db.execute(f"UPDATE batches SET {'completed' if ok else 'failed'} = "
                       f"{'completed' if ok else 'failed'} + 1, prompt_tokens = prompt_tokens + ?, "
                       f"completion_tokens = completion_tokens + ?, result_bytes = result_bytes + ? WHERE id = ?",
                       (*usage, len(text.encode()) + 1, batch_id))
        return True

    def fail_pending(self, batch_id: str, result: Callable[[int, str | None], dict[str, Any]]) -> int:
        """Give every line not yet sent a failed result (``result(line_no, custom_id)``), at once."""
        with self.tx():
            lines = self.lines_in(batch_id, ("pending",))
            return sum(self.record_result(batch_id, line.line_no, False, result(line.line_no, line.custom_id))
                       for line in lines)

    def cancel_open_lines(self, batch_id: str, line_no: int | None = None) -> int:
        """Lines without a result (all of the batch's, or one) will never run: drop their requests."""
        one = (line_no,) if line_no is not None else ()
        with self.tx() as db:
            return db.execute(f"UPDATE batch_lines SET state = 'cancelled', request = NULL WHERE batch_id = ? AND "
                              f"state IN ({','.join('?' * len(OPEN))}){' AND line_no = ?' if one else ''}",
                              (batch_id, *OPEN, *one)).rowcount

    def end_batch(self, batch_id: str, status: str, outputs: list[tuple[str, str, int, int]],
                  fields: dict[str, Any]) -> bool:
        """Finish an active batch in one transaction: register its output files (id, filename,
        bytes, expires_at), move it to the terminal ``status`` with ``fields``, and forget its lines
        (their prompts and results now live only in the files). False if it was no longer active."""
        stamp = now()
        with self.tx() as db:
            row = db.execute("SELECT owner, status, finalizing_at FROM batches WHERE id = ?" + self.db.for_update,
                             (batch_id,)).fetchone()
            if row is None or row["status"] not in ACTIVE:
                return False
            for file_id, filename, size, expires_at in outputs:
                self.add_file(file_id, row["owner"], filename, "batch_output", size, expires_at, conn=db)
            sets = {**fields, "status": status, f"{status}_at": stamp, "ended_at": stamp}
            if status == "completed":
                sets["finalizing_at"] = row["finalizing_at"] or stamp
            db.execute(f"UPDATE batches SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                       (*sets.values(), batch_id))
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
        self.scrub()
        return True

    def results(self, batch_id: str, state: str) -> Iterator[tuple[int, str | None, str | None]]:
        """(line_no, custom_id, result JSON) of lines in one state, in input order."""
        rows = self._db.execute("SELECT line_no, custom_id, result FROM batch_lines WHERE batch_id = ? AND "
                                "state = ? ORDER BY line_no", (batch_id, state)).fetchall()
        for r in rows:
            yield r["line_no"], r["custom_id"], r["result"]
