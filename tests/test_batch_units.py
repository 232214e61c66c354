"""Batch parts that need no broker: line validation, the SQLite store's exactly-once rule, the
handling of result frames (duplicates, aborts, errors), finalizing and the expiry sweep.

The end-to-end behaviour with RabbitMQ and a vLLM worker is in ``test_batches.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker_config.messages import Error, Final, Started, Usage
from gateway.batches.collector import ResultCollector
from gateway.batches.config import BatchSettings
from gateway.batches.dispatcher import Dispatcher
from gateway.batches.ids import output_file_ids, parse_request_id, request_id
from gateway.batches.files import FileStore
from gateway.batches.service import BatchService
from gateway.batches.store import BatchStore
from gateway.batches.validation import BatchFileError, parse_file

CHAT = "/v1/chat/completions"


def _line(cid, body=None, url=CHAT, **extra):
    item = {"custom_id": cid, "method": "POST", "url": url,
            "body": body if body is not None else {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 4}}
    item.update(extra)
    return json.dumps(item)


def _reason(result: dict) -> str:
    if result.get("error"):
        return result["error"]["message"]
    return result["response"]["body"]["error"]["message"]


def test_each_bad_line_becomes_an_error_with_its_custom_id_and_reason(tmp_path: Path):
    lines = [
        _line("ok-1"),
        "{not json",
        json.dumps({"method": "POST", "url": CHAT, "body": {}}),
        _line("ok-1"),  # duplicate custom_id
        _line("wrong-url", url="/v1/embeddings"),
        _line("bad-body", body={"messages": []}),
        _line("bad-n", body={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 99}),
        _line("remote-image", body={"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}]}]}),
        _line("streamed", body={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": True}),
        "",
        "[1, 2]",
        _line("ok-2"),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    parsed = parse_file(path, CHAT, max_lines=100)
    by_line = {n: (cid, state, req, res) for n, cid, state, req, res in parsed.lines}
    assert len(parsed.lines) == 11  # the blank line is not a request
    assert [n for n, (_, s, _, _) in by_line.items() if s == "pending"] == [1, 12]
    expected = {2: (None, "invalid_json"), 3: (None, "missing_custom_id"), 4: ("ok-1", "duplicate_custom_id"),
                5: ("wrong-url", "invalid_url"), 6: ("bad-body", None), 7: ("bad-n", None),
                8: ("remote-image", "unsupported_parameter"), 9: ("streamed", None), 11: (None, "invalid_request")}
    for n, (cid, code) in expected.items():
        got_cid, state, req, res = by_line[n]
        assert state == "failed" and req is None, n
        assert got_cid == cid and res["custom_id"] == cid, n
        assert _reason(res), n
        if res["error"]:
            assert res["error"]["code"] == code and res["error"]["line"] == n
        else:
            assert res["response"]["status_code"] == 400
            if code:
                assert res["response"]["body"]["error"]["code"] == code
    assert "'n'" in _reason(by_line[7][3]) and "data: URL" in _reason(by_line[8][3])
    req = by_line[1][2]  # the body as sent: vLLM's layer on the worker reads it
    assert req == {"model": "tiny", "endpoint": CHAT, "body": json.loads(_line("ok-1"))["body"]}
    assert parsed.model == "tiny"


def test_a_file_that_cannot_be_a_batch_fails_whole(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(BatchFileError) as exc:
        parse_file(empty, CHAT, 10)
    assert exc.value.code == "empty_file"
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BatchFileError) as exc:
        parse_file(binary, CHAT, 10)
    assert exc.value.code == "invalid_file_format"
    many = tmp_path / "many.jsonl"
    many.write_text("\n".join(_line(f"c{i}") for i in range(4)))
    with pytest.raises(BatchFileError) as exc:
        parse_file(many, CHAT, 3)
    assert exc.value.code == "too_many_requests"


def test_lines_are_parsed_with_limits(tmp_path: Path):
    """Deep nesting and overlong lines become error lines; the lines around them still run."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([_line("a").encode(), b"[" * 50_000, b'{"x": "' + b"y" * 200_000 + b'"}',
                                  b"{" * 10 + b"]", _line("b").encode(), b""]))
    parsed = parse_file(path, CHAT, max_lines=10, max_line_bytes=100_000)
    states = [(n, cid, state) for n, cid, state, _, _ in parsed.lines]
    assert states == [(1, "a", "pending"), (2, None, "failed"), (3, None, "failed"), (4, None, "failed"),
                      (5, "b", "pending")]
    errors = {n: err["error"] for n, _, _, _, err in parsed.lines if err}
    assert errors[2]["code"] == "invalid_json" and "nested too deeply" in errors[2]["message"]
    assert errors[3]["code"] == "line_too_long"
    assert errors[4] == {"code": "invalid_json", "message": "Line 4 is not valid JSON.", "line": 4}


def test_request_ids_are_parsed_strictly():
    bid = "batch_" + "ab" * 12
    assert parse_request_id(request_id(bid, 7)) == (bid, 7)
    for bad in ("batch_x.\u00b2", f"{bid}.{'9' * 30}", f"{bid}.0", f"{bid}.-1", f"{bid}. 1", "batch_.1",
                f"{bid}.\u0661", "req-123", f"{bid}.1\n"):
        assert parse_request_id(bad) is None, bad


def test_completions_endpoint_lines(tmp_path: Path):
    path = tmp_path / "in.jsonl"
    path.write_text(_line("a", url="/v1/completions", body={"model": "tiny", "prompt": "Once", "max_tokens": 3})
                    + "\n" + _line("b", url="/v1/completions", body={"model": "tiny", "prompt": ["x", [1]]}))
    parsed = parse_file(path, "/v1/completions", 10)
    (_, _, s1, r1, _), (_, _, s2, r2, _) = parsed.lines
    assert s1 == "pending" and r1["body"]["prompt"] == "Once" and r1["endpoint"] == "/v1/completions"
    assert s2 == "pending" and r2["body"]["prompt"] == ["x", [1]]  # vLLM decides what a prompt may be


@pytest.fixture
def service(tmp_path: Path, database_url: str) -> BatchService:
    """The batch service on each engine (SQLite; PostgreSQL in the slow tier)."""
    settings = BatchSettings(files_dir=tmp_path / "files", results_queue="chatai.gw.gateway.test.batch-results")
    store = BatchStore(database_url)
    files = FileStore(settings.files_dir)
    svc = BatchService(settings, store, files, Dispatcher(None, store, files, settings))  # type: ignore[arg-type]
    yield svc
    store.close()


def _started_batch(svc: BatchService, n: int = 3) -> str:
    bid = "batch_" + "a" * 24
    svc.store.create_batch(bid, "key_1", CHAT, "file-x", "24h", 2**31, None, None)
    lines = [(i, f"c{i}", "pending", {"model": "tiny", "endpoint": CHAT, "body": {"model": "tiny", "messages": []}}, None)
             for i in range(1, n + 1)]
    assert svc.store.start_batch(bid, lines, "tiny")
    return bid


def _final(bid: str, line: int, aborted: bool = False, text: str = "hello", body: str | None = None) -> bytes:
    body = body or json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
    return Final(request_id=request_id(bid, line), attempt=1, seq=1, body=body, aborted=aborted,
                 usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)).encode()


def test_each_line_is_recorded_once_however_often_its_result_arrives(service: BatchService):
    bid = _started_batch(service)
    d = service.dispatcher.collector
    assert parse_request_id(request_id(bid, 2)) == (bid, 2)
    d.handle_result(Started(request_id=request_id(bid, 1), worker_id="w").encode())  # ignored
    for _ in range(3):  # the broker redelivers; a re-published copy also answers
        d.handle_result(_final(bid, 1))
    d.handle_result(_final(bid, 1, text="other"))
    d.handle_result(Error(request_id=request_id(bid, 2), status=400, code="context_length_exceeded",
                          message="too long").encode())
    d.handle_result(Error(request_id=request_id(bid, 2), status=500, message="late duplicate").encode())
    d.handle_result(b"garbage")
    d.handle_result(_final("batch_" + "b" * 24, 1))  # a batch this gateway does not know
    b = service.store.get_batch(bid)
    assert (b["total"], b["completed"], b["failed"]) == (3, 1, 1)
    assert b["prompt_tokens"] == 5 and b["completion_tokens"] == 2
    assert d.duplicates == 5
    results = {cid: json.loads(r) for _, cid, r in service.store.results(bid, "done")}
    assert list(results) == ["c1"]
    assert results["c1"]["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    assert results["c1"]["response"]["request_id"] == request_id(bid, 1)
    errors = [json.loads(r) for _, _, r in service.store.results(bid, "failed")]
    assert errors[0]["custom_id"] == "c2" and errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_results_commit_as_a_group_and_a_bad_frame_is_dropped_alone(service: BatchService):
    bid = _started_batch(service, n=4)
    d = service.dispatcher.collector
    d.handle_results([_final(bid, 1), _final(bid, 1), _final(bid, 2)])
    assert service.store.get_batch(bid)["completed"] == 2 and d.duplicates == 1
    # Line 4's frame is broken (its body is not JSON): its result cannot be built.
    d.handle_results([_final(bid, 3), _final(bid, 4, body="{not json"), _final(bid + "\u00b2", 1),
                      _final(bid, 10 ** 30)])
    assert service.store.get_line(bid, 3).state == "done"  # the group's good frame still commits
    assert service.store.get_line(bid, 4).state == "pending"  # the bad one was rolled back alone
    assert service.store.get_batch(bid)["completed"] == 3


def test_an_aborted_line_runs_again_unless_the_batch_is_cancelled(service: BatchService):
    bid = _started_batch(service)
    d = service.dispatcher.collector
    service.store.mark_publishing(bid, [1, 2])
    service.store.mark_queued(bid, [1])
    service.store.mark_queued(bid, [2])
    d.handle_result(_final(bid, 1, aborted=True))
    assert service.store.get_line(bid, 1).state == "pending"
    service.store.set_status(bid, "cancelling", only_from=("in_progress",))
    d.handle_result(_final(bid, 2, aborted=True))
    assert service.store.get_line(bid, 2).state == "cancelled"


async def test_finalize_writes_files_in_line_order_and_forgets_the_lines(service: BatchService):
    bid = _started_batch(service, n=4)
    d = service.dispatcher.collector
    d.handle_result(_final(bid, 3))
    d.handle_result(_final(bid, 1))
    d.handle_result(Error(request_id=request_id(bid, 2), status=400, message="refused").encode())
    service.store.set_status(bid, "cancelling", only_from=("in_progress",))
    service.dispatcher.feeder.finalize(bid, "cancelled")
    b = service.store.get_batch(bid)
    assert b["status"] == "cancelled" and b["cancelled_at"] and b["ended_at"]
    out_id, err_id = output_file_ids(bid)
    assert (b["output_file_id"], b["error_file_id"]) == (out_id, err_id)
    out = [json.loads(x) for x in service.files.path(out_id).read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["c1", "c3"]
    errs = [json.loads(x) for x in service.files.path(err_id).read_text().splitlines()]
    assert [e["custom_id"] for e in errs] == ["c2", "c4"]
    assert errs[1]["error"]["code"] == "batch_cancelled"
    assert service.store.get_file(out_id, "key_1")["purpose"] == "batch_output"
    assert service.store.count_lines(bid, ("pending", "done", "failed", "cancelled")) == 0
    service.dispatcher.feeder.finalize(bid, "cancelled")  # a second finalize (restart) changes nothing
    assert service.store.get_batch(bid)["cancelled_at"] == b["cancelled_at"]


def test_restart_rule_resends_unconfirmed_lines_only(service: BatchService):
    bid = _started_batch(service, n=3)
    store = service.store
    assert [b["id"] for b in store.claim_batches("replica-a", lease=60)[0]] == [bid]
    store.mark_publishing(bid, [1, 2])
    store.mark_queued(bid, [1])  # confirmed: the broker owns it
    assert store.claim_batches("replica-b", lease=60) == ([], 0)  # a's lease runs: b leaves the batch alone
    assert store.claim_batches("replica-a", lease=60)[1] == 0  # a renewing its lease sends nothing again
    store.claim_batches("replica-a", lease=-1)  # a stops renewing (it died): its lease runs out
    taken, resent = store.claim_batches("replica-b", lease=60)
    assert [b["id"] for b in taken] == [bid] and taken[0]["leased_by"] == "replica-b"
    assert resent == 1  # line 2's confirm was never seen: b sends it again
    assert store.claim_batches("replica-a", lease=60) == ([], 0)  # a came back: b holds the batch now
    assert store.release_batches("replica-b") == 1  # b stops cleanly: a takes over at once
    assert [b["id"] for b in store.claim_batches("replica-a", lease=60)[0]] == [bid]
    states = [service.store.get_line(bid, n).state for n in (1, 2, 3)]
    assert states == ["queued", "pending", "pending"]
    assert service.store.stale_queued(bid, older_than=0) == []
    import time

    assert service.store.stale_queued(bid, older_than=time.time() + 1) == [1]


def test_expired_files_and_old_batches_are_swept(service: BatchService):
    service.store.add_file("file-old", "key_1", "a.jsonl", "batch", 3, expires_at=1)
    service.files.path("file-old").write_text("abc")
    service.store.add_file("file-new", "key_1", "b.jsonl", "batch", 3, expires_at=2**31)
    service.files.path("file-new").write_text("abc")
    bid = _started_batch(service)
    service.store.set_status(bid, "cancelled")
    service.settings.batch_retention = -10  # anything ended is past retention
    assert service.sweep() == (1, 1)
    assert not service.files.path("file-old").exists() and service.store.get_file("file-old") is None
    assert service.files.path("file-new").exists()
    assert service.store.get_batch(bid) is None


async def test_a_batch_past_its_window_expires_with_its_results_kept(service: BatchService):
    bid = "batch_" + "c" * 24
    service.store.create_batch(bid, "key_1", CHAT, "file-x", "24h", expires_at=1, metadata=None, output_ttl=None)
    lines = [(i, f"c{i}", "pending", {"model": "tiny", "endpoint": CHAT, "body": {"model": "tiny", "messages": []}}, None)
             for i in (1, 2)]
    assert service.store.start_batch(bid, lines, "tiny")
    service.dispatcher.collector.handle_result(_final(bid, 1))
    await service.dispatcher.feeder.tick()
    b = service.store.get_batch(bid)
    assert b["status"] == "expired" and b["expired_at"]
    out = [json.loads(x) for x in service.files.path(b["output_file_id"]).read_text().splitlines()]
    errs = [json.loads(x) for x in service.files.path(b["error_file_id"]).read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["c1"]
    assert [(e["custom_id"], e["error"]["code"]) for e in errs] == [("c2", "batch_expired")]


def test_cancelling_open_lines_leaves_results_alone(service: BatchService):
    bid = _started_batch(service, n=3)
    service.dispatcher.collector.handle_result(_final(bid, 1))
    assert service.store.cancel_open_lines(bid, line_no=2) == 1
    assert [service.store.get_line(bid, n).state for n in (1, 2, 3)] == ["done", "cancelled", "pending"]
    assert service.store.get_line(bid, 2).request is None  # the prompt is not kept for a line that never runs
    assert service.store.cancel_open_lines(bid) == 1  # only line 3 was still open
    assert service.store.get_line(bid, 3).state == "cancelled"


def test_ending_a_batch_happens_once(service: BatchService):
    bid = _started_batch(service, n=1)
    out = ("file-x-output", "x.jsonl", 10, 2**31)
    assert service.store.end_batch(bid, "completed", [out], {"output_file_id": "file-x-output"})
    b = service.store.get_batch(bid)
    assert (b["status"], b["output_file_id"]) == ("completed", "file-x-output")
    assert b["completed_at"] and b["finalizing_at"] and b["ended_at"]
    assert service.store.get_file("file-x-output", "key_1")["purpose"] == "batch_output"
    assert service.store.get_line(bid, 1) is None
    assert not service.store.end_batch(bid, "cancelled", [], {})  # already ended: nothing changes
    assert service.store.get_batch(bid)["status"] == "completed"


def test_a_failing_part_of_a_transaction_rolls_back_alone(service: BatchService):
    bid = _started_batch(service, n=2)
    with service.store.tx():
        with pytest.raises(ValueError):
            with service.store.part():
                service.store.cancel_open_lines(bid, line_no=1)
                raise ValueError("this part goes")
        with service.store.part():
            service.store.cancel_open_lines(bid, line_no=2)
    assert [service.store.get_line(bid, n).state for n in (1, 2)] == ["pending", "cancelled"]


def test_two_replicas_committing_the_same_results_at_once_record_each_once(service: BatchService, database_url: str):
    """Two collectors with their own connections (two replicas consuming the shared results
    queue) commit overlapping groups at the same moment: each line is recorded once."""
    import threading

    bid = _started_batch(service, n=40)
    other = BatchStore(database_url)  # the second replica's store
    try:
        mine = service.dispatcher.collector
        theirs = ResultCollector(other, service.settings, on_committed=lambda: None)
        bodies = [_final(bid, n) for n in range(1, 41)]
        start = threading.Barrier(2)

        def commit(collector: ResultCollector, group: list[bytes]) -> None:
            start.wait()
            collector.handle_results(group)

        threads = [threading.Thread(target=commit, args=(mine, bodies)),
                   threading.Thread(target=commit, args=(theirs, bodies[::-1]))]  # the other order too
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        b = service.store.get_batch(bid)
        assert (b["completed"], b["failed"]) == (40, 0)
        assert b["prompt_tokens"] == 5 * 40  # each result's usage counted once
        assert mine.duplicates + theirs.duplicates == 40
    finally:
        other.close()
