"""The batch dispatcher: feeds batch lines to the model queues and collects their results.

One task in the gateway process drives every batch through its lifecycle (validating ->
in_progress -> finalizing -> completed, or cancelling -> cancelled, or expired / failed),
reading and writing only SQLite, so a restart resumes from whatever was committed.

Sending: each line becomes a persistent, low-priority GenerateRequest (reply_to = this
deployment's durable results queue, see ``BatchSettings.results_queue``; no deadline; stream
false) whose request id is ``<batch id>.<line number>``: the same line always has the same
id, so a redelivery or a re-publish is recognised. At most ``max_in_flight`` lines of a batch
are out at once; interactive requests, at a higher priority, overtake whatever a batch has
queued.

Receiving: results are consumed with manual acks; a message is acked only after its result
is committed, and a result is written only if its line has none yet (see ``BatchStore``), so
each custom_id is answered exactly once.

The re-publish rule (see docs/batches.md):
- a line is marked ``publishing`` before its publish and ``queued`` after the broker confirms
  it. A confirmed message lives in a durable queue until a worker acks it, and a worker acks
  only after the result is confirmed on the durable results queue: a ``queued`` line's result
  is therefore never lost, and the line is NOT sent again on restart (no duplicate work);
- a line still ``publishing`` at start-up may or may not have reached the broker: it is sent
  again. At most ``max_in_flight`` lines per batch can be in that state; a duplicate that does
  run costs GPU time only, its second result is dropped;
- a ``queued`` line without a result after ``republish_after`` (the broker lost it, an operator
  purged the queue) is sent again, under the same rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import sqlite3
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter

from broker_config import topology as t
from broker_config.messages import Delta, Error, Final, GenerateRequest, Started, decode_frame
from gateway.batches.config import BatchSettings
from gateway.batches.files import FileStore
from gateway.batches.store import ACTIVE, IN_FLIGHT, OPEN, BatchStore, now
from gateway.batches.validation import (
    BatchFileError,
    api_error_line,
    error_line,
    parse_file,
    response_line,
)
from gateway.broker import GatewayBroker
from gateway.errors import APIError
from gateway.formatting import ResponseBuilder
from gateway.metrics import MALFORMED_FRAMES, model_label

log = logging.getLogger("chatai.gateway.batches")

BATCH_LINES_SENT = Counter("chatai_batch_lines_published_total", "Batch lines put on a model queue (re-sends too)",
                           ["model"])
BATCH_RESULTS = Counter("chatai_batch_results_total",
                        "Batch results received, by outcome (completed, failed, duplicate = dropped)", ["outcome"])

_NOT_RUN = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "expired": ("batch_expired", "The batch expired before this request ran."),
}


def request_id(batch_id: str, line_no: int) -> str:
    return f"{batch_id}.{line_no}"


# ASCII only (str.isdigit() accepts "²", which int() refuses) and bounded, so a line number
# always fits SQLite's integers. Batch ids are "batch_" + 24 hex digits (routes.create_batch).
_REQUEST_ID = re.compile(r"(batch_[0-9a-f]{1,64})\.([1-9][0-9]{0,8})", re.ASCII)


def parse_request_id(rid: str) -> tuple[str, int] | None:
    """(batch id, line number) of a batch line's request id; None for anything else."""
    m = _REQUEST_ID.fullmatch(rid)
    return (m.group(1), int(m.group(2))) if m else None


async def _settle(ack) -> None:
    """Ack or nack; a channel that closed meanwhile makes the broker redeliver, which is fine."""
    try:
        await ack
    except Exception as exc:  # noqa: BLE001
        log.debug("could not settle a result message: %s", type(exc).__name__)


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """Deterministic, so finalizing twice (a restart mid-finalize) rewrites the same files."""
    suffix = batch_id.removeprefix("batch_")
    return f"file-{suffix}-output", f"file-{suffix}-errors"


class Dispatcher:
    def __init__(self, broker: GatewayBroker, store: BatchStore, files: FileStore, settings: BatchSettings) -> None:
        self.broker = broker
        self.store = store
        self.files = files
        self.settings = settings
        self._wake = asyncio.Event()
        self._cancel_deadlines: dict[str, float] = {}
        self._backoff_until = 0.0
        self._tasks: list[asyncio.Task] = []
        self._results_channel: Any = None
        self._results: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._stopping = False
        self.duplicates = 0  # results dropped because their line already had one (tests, metrics)
        self._database_id = store.deployment_id()  # names this database's results queue

    @property
    def results_queue(self) -> str:
        """This database's durable results queue, under the deployment's broker namespace."""
        return self.settings.results_queue or self.broker.batch_results_queue(self._database_id)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        reset = self.store.reset_publishing()
        if reset:
            log.info("re-sending %d batch lines whose publish was not confirmed before a restart", reset)
        self._tasks = [
            asyncio.create_task(self._run(), name="batch-dispatcher"),
            asyncio.create_task(self._consume(), name="batch-results"),
            asyncio.create_task(self._write_results(), name="batch-results-writer"),
        ]

    async def stop(self) -> None:
        """Stop taking results first (unacked ones go back to the queue), then the loop."""
        self._stopping = True
        if self._results_channel is not None:
            try:
                await self._results_channel.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch dispatcher step failed; retrying")
                await asyncio.sleep(1.0)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.tick)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _consume(self) -> None:
        while True:
            try:
                self._results_channel = await self.broker.consume_batch_results(
                    self._on_result, self.settings.results_prefetch, self.results_queue)
                return  # the robust connection restores the consumer after a reconnect
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot consume batch results yet (%s); retrying", type(exc).__name__)
                await asyncio.sleep(2.0)

    # ------------------------------------------------------------------ the state machine

    async def tick(self) -> None:
        for batch in self.store.batches_in(ACTIVE):
            try:
                await self._step(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one batch's trouble never stops the others
                log.error("batch %s: %s step failed (%s)", batch["id"], batch["status"], type(exc).__name__)
                if batch["status"] == "validating":
                    self._fail(batch["id"], "validation_error",
                               "The input file could not be validated; check that it is JSONL in OpenAI's batch "
                               "format.")

    def _fail(self, bid: str, code: str, message: str, line: int | None = None) -> None:
        errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}
        self.store.set_status(bid, "failed", only_from=("validating",), errors=json.dumps(errors))
        log.info("batch %s failed validation: %s", bid, code)

    async def _step(self, batch: Any) -> None:
        """Move one batch on by one step of its lifecycle."""
        status = batch["status"]
        if status == "validating":
            await self._validate(batch)
        elif status == "in_progress":
            if batch["expires_at"] and now() >= batch["expires_at"]:
                await self._send_cancels(batch["id"], "batch expired")
                await asyncio.to_thread(self._finalize, batch["id"], "expired")
            else:
                await self._feed(batch["id"])
        elif status == "cancelling":
            await self._cancelling(batch["id"])
        elif status == "finalizing":
            await asyncio.to_thread(self._finalize, batch["id"], "completed")

    async def _validate(self, batch: Any) -> None:
        bid = batch["id"]
        try:
            parsed = await asyncio.to_thread(parse_file, self.files.path(batch["input_file_id"]),
                                             batch["endpoint"], self.settings.max_lines,
                                             self.settings.max_line_bytes)
        except BatchFileError as exc:
            self._fail(bid, exc.code, exc.message, exc.line)
            return
        if await asyncio.to_thread(self.store.start_batch, bid, parsed.lines, parsed.model):
            bad = sum(1 for line in parsed.lines if line[2] == "failed")
            log.info("batch %s in progress: %d requests, %d invalid", bid, len(parsed.lines), bad)

    async def _feed(self, bid: str) -> None:
        stale = self.store.stale_queued(bid, time.time() - self.settings.republish_after)
        if stale:
            log.warning("batch %s: %d lines without a result after %.0f s are sent again", bid, len(stale),
                        self.settings.republish_after)
            self.store.back_to_pending(bid, stale, ("queued",))
        if self.store.count_lines(bid, OPEN) == 0:
            if self.store.set_status(bid, "finalizing", only_from=("in_progress",)):  # not if just cancelled
                await asyncio.to_thread(self._finalize, bid, "completed")
            return
        if not self.broker.connected or time.monotonic() < self._backoff_until:
            return
        free = self.settings.max_in_flight - self.store.count_lines(bid, IN_FLIGHT)
        if free <= 0:
            return
        lines = self.store.lines_in(bid, ("pending",), free)
        await asyncio.to_thread(self.store.mark_publishing, bid, [line.line_no for line in lines])
        confirmed: list[int] = []
        try:
            await self._publish(bid, lines, confirmed)
        finally:
            # One transaction for the chunk; a crash before it leaves the lines 'publishing', and
            # the restart rule sends them again (their duplicates are dropped).
            if confirmed:
                await asyncio.to_thread(self.store.mark_queued, bid, confirmed)

    async def _publish(self, bid: str, lines: list, confirmed: list[int]) -> None:
        for i, line in enumerate(lines):
            assert line.request is not None
            rid = request_id(bid, line.line_no)
            req = GenerateRequest(request_id=rid, reply_to=self.results_queue, stream=False, deadline=None,
                                  batch_id=bid, **line.request)
            try:
                await self.broker.publish_request(req, priority=t.BATCH_PRIORITY, ttl=None, persistent=True)
            except APIError as exc:
                if exc.status == 404:  # no queue for this model: the line fails, the batch goes on
                    await asyncio.to_thread(self.store.record_result, bid, line.line_no, False,
                                            api_error_line(line.custom_id, rid, exc))
                    continue
                # Queue full (429) or broker away (503): these lines wait and go out later.
                self.store.back_to_pending(bid, [x.line_no for x in lines[i:]], ("publishing",))
                self._backoff_until = time.monotonic() + 2.0
                log.info("batch %s: publishing paused (%s)", bid, exc.code)
                return
            confirmed.append(line.line_no)
            BATCH_LINES_SENT.labels(model_label(req.model)).inc()

    async def _send_cancels(self, bid: str, reason: str) -> None:
        """Ask workers to drop or abort this batch's lines that are out (best effort)."""
        for line in self.store.lines_in(bid, IN_FLIGHT):
            await self.broker.cancel(request_id(bid, line.line_no), reason)

    async def _cancelling(self, bid: str) -> None:
        if bid not in self._cancel_deadlines:
            await self._send_cancels(bid, "batch cancelled")
            self._cancel_deadlines[bid] = time.monotonic() + self.settings.cancel_grace
        # Aborted lines report back (finish_reason abort); queued ones are dropped silently by the
        # workers: wait for the first, give up on the rest after the grace period.
        if self.store.count_lines(bid, IN_FLIGHT) == 0 or time.monotonic() >= self._cancel_deadlines[bid]:
            self._cancel_deadlines.pop(bid, None)
            await asyncio.to_thread(self._finalize, bid, "cancelled")

    def _finalize(self, bid: str, status: str) -> None:
        """Write the output and error files, end the batch, drop its lines: one transaction."""
        batch = self.store.get_batch(bid)
        if batch is None:
            return
        not_run = _NOT_RUN.get(status)
        with self.store.tx() as db:
            db.execute("UPDATE batch_lines SET state = 'cancelled', request = NULL WHERE batch_id = ? "
                       "AND state IN ('pending', 'publishing', 'queued')", (bid,))
        out_id, err_id = output_file_ids(bid)
        out_rows = [(n, r) for n, _, r in self.store.results(bid, "done") if r]
        err_rows = [(n, r) for n, _, r in self.store.results(bid, "failed") if r]
        if not_run is not None:
            code, message = not_run
            err_rows += [(n, json.dumps(error_line(cid, code, message, n)))
                         for n, cid, _ in self.store.results(bid, "cancelled")]
        err_rows.sort()
        ttl = batch["output_ttl"] or self.settings.output_file_ttl
        fields: dict[str, Any] = {"output_file_id": None, "error_file_id": None}
        written: list[tuple[str, str, int]] = []
        for file_id, rows, name in ((out_id, out_rows, "output"), (err_id, err_rows, "errors")):
            if rows:
                size = self.files.write_lines(file_id, (r for _, r in rows))
                written.append((file_id, f"{bid}_{name}.jsonl", size))
                fields["output_file_id" if name == "output" else "error_file_id"] = file_id
        stamp = now()
        with self.store.tx() as db:
            row = db.execute("SELECT status FROM batches WHERE id = ?", (bid,)).fetchone()
            if row is None or row["status"] not in ACTIVE:
                return
            for file_id, filename, size in written:
                self.store.add_file(file_id, batch["owner"], filename, "batch_output", size, int(stamp + ttl),
                                    conn=db)
            sets = {**fields, "status": status, f"{status}_at": stamp, "ended_at": stamp}
            if status == "completed":
                sets["finalizing_at"] = batch["finalizing_at"] or stamp
            db.execute(f"UPDATE batches SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                       (*sets.values(), bid))
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (bid,))
        self.store.scrub()  # the prompts and results of its lines now live only in its files
        log.info("batch %s %s: %d results, %d errors", bid, status, len(out_rows), len(err_rows))

    # ------------------------------------------------------------------ results

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # not acked: the broker hands it to the next gateway run
        self._results.put_nowait(message)

    async def _write_results(self) -> None:
        """Group commit: whatever results arrived meanwhile go in one transaction, in a thread.

        SQLite's fsync then never blocks the event loop that serves interactive streams, and a
        busy batch costs one commit per group instead of one per line. Acks follow the commit.
        """
        while True:
            messages = [await self._results.get()]
            while not self._results.empty() and len(messages) < self.settings.results_prefetch:
                messages.append(self._results.get_nowait())
            try:
                await asyncio.to_thread(self.handle_results, [m.body for m in messages])
            except Exception:
                # Not committed: leave them to the broker (redelivered), never ack a lost result.
                log.exception("could not record %d batch results; they will be redelivered", len(messages))
                await asyncio.sleep(1.0)
                for m in messages:
                    await _settle(m.nack(requeue=True))
                continue
            for m in messages:
                await _settle(m.ack())
            self._wake.set()

    def handle_results(self, bodies: list[bytes]) -> None:
        """Commit a group of results in one transaction, each frame in a savepoint of its own.

        A frame that cannot be handled (malformed, or naming a line that cannot exist) is
        rolled back alone, counted and dropped: it is acked with the others and never holds up
        the group. Only a database failure sends the whole group back to the broker.
        """
        with self.store.tx() as db:
            for body in bodies:
                db.execute("SAVEPOINT frame")
                try:
                    self.handle_result(body)
                except sqlite3.Error:
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever the frame did, it goes alone
                    db.execute("ROLLBACK TO frame")
                    self._malformed(type(exc).__name__)
                db.execute("RELEASE frame")

    def _malformed(self, why: str) -> None:
        """Count and log (never the content: it may be a prompt or a completion)."""
        MALFORMED_FRAMES.labels("batch_results").inc()
        log.warning("dropped a malformed batch result frame (%s)", why)

    def handle_result(self, body: bytes) -> None:
        """Commit one reply frame from the results queue (a no-op for anything but a new result)."""
        try:
            frame = decode_frame(body)
        except ValueError:
            self._malformed("not a frame")
            return
        if isinstance(frame, (Started, Delta)):
            return
        where = parse_request_id(frame.request_id)
        if where is None:
            self._malformed("not a batch line's request id")
            return
        bid, line_no = where
        line = self.store.get_line(bid, line_no)
        if line is None or line.state not in OPEN:
            self._count(False, "duplicate")
            return
        rid = frame.request_id
        if isinstance(frame, Final):
            if any(c.finish_reason == "abort" for c in frame.choices):
                batch = self.store.get_batch(bid)
                if batch is not None and batch["status"] == "in_progress":
                    self.store.back_to_pending(bid, [line_no])  # aborted but still wanted: run it again
                else:
                    with self.store.tx() as db:
                        db.execute("UPDATE batch_lines SET state = 'cancelled', request = NULL WHERE batch_id = ? "
                                   "AND line_no = ? AND state IN ('pending', 'publishing', 'queued')", (bid, line_no))
                return
            assert line.request is not None
            builder = ResponseBuilder(line.request["kind"], secrets.token_hex(12), line.request["model"])
            result = response_line(line.custom_id, 200, rid, builder.completion(frame))
            usage = (frame.usage.prompt_tokens, frame.usage.completion_tokens)
            self._count(self.store.record_result(bid, line_no, True, result, usage), "completed")
        elif isinstance(frame, Error):
            exc = APIError(frame.status, frame.message, code=frame.code)
            self._count(self.store.record_result(bid, line_no, False, api_error_line(line.custom_id, rid, exc)),
                        "failed")

    def _count(self, recorded: bool, outcome: str) -> None:
        if not recorded:
            self.duplicates += 1
        BATCH_RESULTS.labels(outcome if recorded else "duplicate").inc()
