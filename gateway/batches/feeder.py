"""The batch feeder: drives every batch through its lifecycle and sends its lines out.

validating -> in_progress -> finalizing -> completed, or cancelling -> cancelled, or expired /
failed; each step reads and writes only the database (``BatchStore``), so a restart resumes from
whatever was committed. The results come back through ``ResultCollector``.

Sending: each line becomes a persistent, low-priority ApiRequest (reply_to = this
deployment's durable results queue; no deadline; stream false) whose request id is
``<batch id>.<line number>``. At most ``max_in_flight`` lines of a batch are out at once;
interactive requests, at a higher priority, overtake whatever a batch has queued.

The re-publish rule (see docs/batches.md):
- a line is marked ``publishing`` before its publish and ``queued`` after the broker confirms
  it. A confirmed message lives in a durable queue until a worker acks it, and a worker acks
  only after the result is confirmed on the durable results queue: a ``queued`` line's result
  is therefore never lost, and the line is NOT sent again on restart (no duplicate work);
- a line still ``publishing`` when its batch changes hands (a restart, a replica that died: see
  ``BatchStore.claim_batches``) may or may not have reached the broker: it is sent again. At
  most ``max_in_flight`` lines per batch can be in that state; a duplicate that does run costs
  GPU time only, its second result is dropped;
- a ``queued`` line without a result after ``republish_after`` (the broker lost it, an operator
  purged the queue) is sent again, under the same rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from broker_config import topology as t
from broker_config.messages import ApiRequest
from broker_config.timing import Backoff
from gateway.batches.config import BatchSettings
from gateway.batches.files import FileStore
from gateway.batches.ids import output_file_ids, request_id
from gateway.batches.states import IN_FLIGHT, OPEN
from gateway.batches.store import BatchStore, LineRow, now
from gateway.batches.validation import BatchFileError, api_error_line, error_line, parse_file
from gateway.cluster.broker_port import BrokerPort
from gateway.cluster.errors import ModelNotFound, TryLater
from gateway.limits import Limits
from gateway.metrics import BATCH_LINES_SENT, model_label
from gateway.schemas import RequestCaps

log = logging.getLogger("chatai.gateway.batches")

_NOT_RUN = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "expired": ("batch_expired", "The batch expired before this request ran."),
}


class KeyBudget(Protocol):
    """What the feeder asks of the per-key limits (``GatewayContext``)."""

    def limits(self, key_id: str) -> Limits: ...

    def over_rate(self, key_id: str) -> bool: ...

    def caps(self) -> RequestCaps: ...


class Feeder:
    def __init__(self, broker: BrokerPort, store: BatchStore, files: FileStore, settings: BatchSettings,
                 results_queue: str, queue_for: Callable[[str], str] = lambda model: model,
                 keys: KeyBudget | None = None, replica: str = "gateway") -> None:
        self.broker = broker
        self.keys = keys  # the owners' limits: lines wait while a key is over them
        self.queue_for = queue_for  # a LoRA adapter's lines go to its base model's queue
        self.store = store
        self.files = files
        self.settings = settings
        self.results_queue = results_queue  # where workers send this database's results
        self.replica = replica  # this process's name on the batches' leases
        self._cancel_deadlines: dict[str, float] = {}
        self._pause = Backoff.fixed(2.0)  # after the cluster pushed back (queue full, broker away)
        self._paused_until = 0.0

    async def tick(self) -> None:
        """Move every active batch this replica holds on by one step (claiming free ones and those
        whose holder's lease ran out); one batch's trouble never stops the others."""
        batches, resent = await asyncio.to_thread(self.store.claim_batches, self.replica, self.settings.lease)
        if resent:
            log.info("re-sending %d batch lines whose publish was not confirmed by their last holder", resent)
        for batch in batches:
            try:
                await self._step(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
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
        status = batch["status"]
        if status == "validating":
            await self._validate(batch)
        elif status == "in_progress":
            if batch["expires_at"] and now() >= batch["expires_at"]:
                await self._send_cancels(batch["id"], "batch expired")
                await asyncio.to_thread(self.finalize, batch["id"], "expired")
            else:
                await self._feed(batch["id"], batch["owner"])
        elif status == "cancelling":
            await self._cancelling(batch["id"])
        elif status == "finalizing":
            await asyncio.to_thread(self.finalize, batch["id"], "completed")

    async def _validate(self, batch: Any) -> None:
        bid = batch["id"]
        try:
            parsed = await asyncio.to_thread(parse_file, self.files.path(batch["input_file_id"]),
                                             batch["endpoint"], self.settings.max_lines,
                                             self.settings.max_line_bytes,
                                             self.keys.caps() if self.keys is not None else None)
        except BatchFileError as exc:
            self._fail(bid, exc.code, exc.message, exc.line)
            return
        if await asyncio.to_thread(self.store.start_batch, bid, parsed.lines, parsed.model):
            bad = sum(1 for line in parsed.lines if line[2] == "failed")
            log.info("batch %s in progress: %d requests, %d invalid", bid, len(parsed.lines), bad)

    def _held(self, bid: str, owner: str) -> bool:
        """Whether the owner's limits hold this batch's lines back now. Over the storage quota
        (uploads, outputs and results collected so far), the lines not yet sent fail: the output
        is bounded by the quota plus what was in flight. Over rpm or tpm, they wait."""
        if self.keys is None:
            return False
        cap = self.keys.limits(owner).upload_bytes
        if cap and self.store.stored_bytes(owner) >= cap:
            message = (f"The API key's storage limit of {cap} bytes was reached (uploads and batch outputs); "
                       "this request was not run. Delete files, then run the remaining requests again.")
            failed = self.store.fail_pending(bid, lambda n, cid: error_line(cid, "storage_quota_exceeded", message, n))
            if failed:
                log.info("batch %s: storage quota reached, %d lines not run", bid, failed)
            return True
        return self.keys.over_rate(owner)

    async def _feed(self, bid: str, owner: str) -> None:
        stale = self.store.stale_queued(bid, time.time() - self.settings.republish_after)
        if stale:
            log.warning("batch %s: %d lines without a result after %.0f s are sent again", bid, len(stale),
                        self.settings.republish_after)
            self.store.back_to_pending(bid, stale, ("queued",))
        if self.store.count_lines(bid, OPEN) == 0:
            if self.store.set_status(bid, "finalizing", only_from=("in_progress",)):  # not if just cancelled
                await asyncio.to_thread(self.finalize, bid, "completed")
            return
        if not self.broker.connected or time.monotonic() < self._paused_until or self._held(bid, owner):
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

    async def _publish(self, bid: str, lines: list[LineRow], confirmed: list[int]) -> None:
        for i, line in enumerate(lines):
            assert line.request is not None
            rid = request_id(bid, line.line_no)
            req = ApiRequest(request_id=rid, reply_to=self.results_queue, stream=False, deadline=None,
                             batch_id=bid, model=self.queue_for(line.request["model"]),
                             endpoint=line.request["endpoint"], body=line.request["body"])
            try:
                await self.broker.publish_request(req, priority=t.BATCH_PRIORITY, ttl=None, persistent=True)
            except ModelNotFound as exc:  # no queue for this model: the line fails, the batch goes on
                await asyncio.to_thread(self.store.record_result, bid, line.line_no, False,
                                        api_error_line(line.custom_id, rid, exc))
                continue
            except TryLater as exc:  # queue full, broker away or overloaded: these lines go out later
                self.store.back_to_pending(bid, [x.line_no for x in lines[i:]], ("publishing",))
                self._paused_until = time.monotonic() + self._pause.next()
                log.info("batch %s: publishing paused (%s)", bid, type(exc).__name__)
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
            await asyncio.to_thread(self.finalize, bid, "cancelled")

    def finalize(self, bid: str, status: str) -> None:
        """Write the output and error files, then end the batch and drop its lines (one transaction)."""
        batch = self.store.get_batch(bid)
        if batch is None:
            return
        self.store.cancel_open_lines(bid)
        out_id, err_id = output_file_ids(bid)
        out_rows = [(n, r) for n, _, r in self.store.results(bid, "done") if r]
        err_rows = [(n, r) for n, _, r in self.store.results(bid, "failed") if r]
        not_run = _NOT_RUN.get(status)
        if not_run is not None:
            code, message = not_run
            err_rows += [(n, json.dumps(error_line(cid, code, message, n)))
                         for n, cid, _ in self.store.results(bid, "cancelled")]
        err_rows.sort()
        expires_at = int(now() + (batch["output_ttl"] or self.settings.output_file_ttl))
        fields: dict[str, Any] = {"output_file_id": None, "error_file_id": None}
        outputs: list[tuple[str, str, int, int]] = []
        for file_id, rows, name in ((out_id, out_rows, "output"), (err_id, err_rows, "errors")):
            if rows:
                size = self.files.write_lines(file_id, (r for _, r in rows))
                outputs.append((file_id, f"{bid}_{name}.jsonl", size, expires_at))
                fields["output_file_id" if name == "output" else "error_file_id"] = file_id
        if self.store.end_batch(bid, status, outputs, fields):
            log.info("batch %s %s: %d results, %d errors", bid, status, len(out_rows), len(err_rows))
