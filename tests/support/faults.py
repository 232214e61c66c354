"""Faults the fault suite (tests/faults/) injects into real processes, and what it asserts with.

Every fault waits on the broker's own account of it (its alarm list, its status) rather than
on a sleep, and every ``with`` block undoes its fault even when the test fails, so the
session's broker is left as it was found.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator

import openai

ALARM_KINDS = ("disk", "memory")


def _eval(admin, expr: str) -> str:
    return admin._run("eval", expr).strip()


def alarms(admin) -> set[str]:
    """The node's active resource alarms: a subset of {"disk", "memory"}."""
    text = _eval(admin, "rabbit_alarm:get_alarms().")
    return {kind for kind in ALARM_KINDS if f"resource_limit,{kind}" in text.replace(" ", "")}


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """Poll ``pred`` until it returns something truthy (sync twin of support.waiting.wait_until)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def resource_alarm(admin, kind: str) -> Iterator[None]:
    """Raise a real disk or memory alarm on the node; clear it on the way out.

    Disk: a free-space limit far above the free space. Memory: a watermark of a few bytes.
    Both are what an operator's node does when it runs low; publishers are blocked.
    """
    if kind == "disk":
        before = _eval(admin, "rabbit_disk_monitor:get_disk_free_limit().")
        raise_args, clear_args = ("set_disk_free_limit", "10000GB"), ("set_disk_free_limit", before)
    elif kind == "memory":
        before = _eval(admin, "vm_memory_monitor:get_vm_memory_high_watermark().")
        clear = ("set_vm_memory_high_watermark", before) if not before.startswith("{") else \
            ("set_vm_memory_high_watermark", "absolute", before.strip("{}").split(",")[1])
        raise_args, clear_args = ("set_vm_memory_high_watermark", "0.000001"), clear
    else:
        raise ValueError(kind)
    admin._run(*raise_args)
    try:
        wait_for(lambda: kind in alarms(admin), 60, f"the broker's {kind} alarm")
        yield
    finally:
        admin._run(*clear_args)
        wait_for(lambda: kind not in alarms(admin), 60, f"the broker's {kind} alarm to clear")


def error_code(exc: openai.APIStatusError) -> str | None:
    body = exc.body if isinstance(exc.body, dict) else {}
    return (body.get("error", body) or {}).get("code") if isinstance(body, dict) else None


def batch_lines(model: str, n: int, prefix: str, max_tokens: int = 4) -> bytes:
    """An OpenAI batch input file of ``n`` chat lines, custom ids ``<prefix>-<i>``."""
    rows = [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": f"Fault line {i}: say something."}]}}
            for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def submit_batch(client: openai.OpenAI, model: str, n: int, prefix: str):
    f = client.files.create(file=("faults.jsonl", batch_lines(model, n, prefix)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


def finished_batch(client: openai.OpenAI, batch_id: str, timeout: float = 300.0):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in
                    ("completed", "failed", "expired", "cancelled") and b, timeout, f"batch {batch_id} to end")


def assert_batch_exactly_once(client: openai.OpenAI, batch, n: int, prefix: str) -> None:
    """Completed, every custom id answered once with a 200, nothing failed."""
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (n, 0), batch.request_counts
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines() if line]
    ids = [o["custom_id"] for o in out]
    assert len(ids) == len(set(ids)), "a custom_id was answered more than once"
    assert set(ids) == {f"{prefix}-{i}" for i in range(n)}
    assert all(o["response"]["status_code"] == 200 for o in out)
