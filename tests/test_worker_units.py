"""Worker pieces that need neither broker nor engine: settings, Slurm job end, cancel memory."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from datetime import datetime

import pytest

from gpu_worker import slurm
from broker_config.messages import Heartbeat
from gpu_worker.consumer import RecentlyCancelled
from gpu_worker.heartbeat import Heartbeater
from gpu_worker.lifecycle import StopSignal, watch_idle, watch_job_end
from gpu_worker.settings import WorkerSettings
from support.waiting import wait_until


def test_broker_password_never_in_settings_repr(monkeypatch):
    monkeypatch.setenv("CHATAI_WORKER_BROKER_URL", "amqp://worker:s3cret-pw@h:5672/chatai")
    s = WorkerSettings(model="/models/m")
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in str(s.model_dump())
    assert s.broker_url.get_secret_value().endswith("@h:5672/chatai")
    assert s.served_model_name == "m"  # default: the folder name


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("CHATAI_WORKER_MAX_NUM_SEQS", "4")
    assert WorkerSettings().max_num_seqs == 4
    assert WorkerSettings(max_num_seqs=9).max_num_seqs == 9


def test_worker_id_names_the_slurm_array_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert "-1200_3-" in WorkerSettings().worker_id
    assert slurm.job_id() == "1200_3"


def test_parse_end_time():
    assert slurm.parse_end_time("2026-11-25T09:10:00\n") == datetime(2026, 11, 25, 9, 10).timestamp()
    assert slurm.parse_end_time("JobId=5 EndTime=2026-11-25T09:10:00 Deadline=N/A") is not None
    assert slurm.parse_end_time("Unknown") is None
    assert slurm.parse_end_time("N/A") is None


@pytest.fixture
def fake_squeue(tmp_path, monkeypatch):
    """A stand-in ``squeue`` on PATH that prints the end time written to a file."""
    end_file = tmp_path / "end"
    script = tmp_path / "squeue"
    script.write_text(f"#!/bin/sh\ncat {end_file}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return end_file


async def test_job_end_time_from_squeue(fake_squeue):
    fake_squeue.write_text(datetime.fromtimestamp(time.time() + 3600).strftime("%Y-%m-%dT%H:%M:%S\n"))
    end = await slurm.job_end_time()
    assert end is not None and abs(end - (time.time() + 3600)) < 2


async def test_stops_taking_work_before_the_job_ends(fake_squeue):
    fake_squeue.write_text(datetime.fromtimestamp(time.time() + 3600).strftime("%Y-%m-%dT%H:%M:%S\n"))
    stop, seen = StopSignal(), []
    task = asyncio.create_task(watch_job_end(stop, keep=60, poll=0.2, on_end_time=seen.append))
    await asyncio.sleep(0.5)
    assert not stop.event.is_set() and seen  # an hour left: keep serving
    # The job's limit is moved (e.g. scontrol update): 30 s left, less than grace + margin.
    fake_squeue.write_text(datetime.fromtimestamp(time.time() + 30).strftime("%Y-%m-%dT%H:%M:%S\n"))
    await asyncio.wait_for(stop.event.wait(), timeout=5)
    assert "slurm job ends" in stop.reason
    await task


async def test_idle_watch_waits_for_in_flight_work():
    stop = StopSignal()
    busy = [1]
    task = asyncio.create_task(watch_idle(stop, 0.3, lambda: busy[0], lambda: time.monotonic() - 10))
    await asyncio.sleep(0.5)
    assert not stop.event.is_set()  # long idle clock, but something is in flight
    busy[0] = 0
    await asyncio.wait_for(stop.event.wait(), timeout=3)
    assert stop.reason.startswith("idle")
    await task


class _Beats:
    """An exchange that keeps what is published to it."""

    def __init__(self) -> None:
        self.sent: list[Heartbeat] = []

    async def publish(self, message, routing_key: str, mandatory: bool) -> None:
        self.sent.append(Heartbeat.model_validate_json(message.body))


async def test_heartbeats_follow_load_changes_debounced_then_say_stopped():
    beats, busy = _Beats(), [0]
    hb = Heartbeater(beats, worker_id="w", model="m", capacity=4, interval=30, in_flight=lambda: busy[0],
                     debounce=0.05)
    await hb.send()
    hb.start()
    await asyncio.sleep(0.15)
    assert len(beats.sent) == 1  # nothing changed: no beat before the interval
    for n in (1, 2, 3):  # a burst of changes: one beat, with the latest load
        busy[0] = n
        hb.in_flight_changed()
    await wait_until(lambda: len(beats.sent) == 2, what="the beat after the burst", every=0.01)
    await asyncio.sleep(0.1)
    assert [b.in_flight for b in beats.sent] == [0, 3]
    await asyncio.wait_for(hb.send_stopped(), timeout=2)
    hb.in_flight_changed()
    await asyncio.sleep(0.1)
    assert [b.state for b in beats.sent] == ["starting", "starting", "stopped"]  # and nothing after it


def test_recently_cancelled_forgets_after_ttl():
    rc = RecentlyCancelled(ttl=0.05)
    rc.add("a")
    assert "a" in rc and "b" not in rc
    time.sleep(0.06)
    assert "a" not in rc


def test_tiny_model_is_reproducible_and_has_a_chat_template(tmp_path):
    import hashlib

    from transformers import AutoTokenizer

    from chatai.devstack.tiny_model import make_tiny_model

    a, b = make_tiny_model(tmp_path / "a", seed=5), make_tiny_model(tmp_path / "b", seed=5)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    assert (a / "model.safetensors").stat().st_size < 3_000_000
    tok = AutoTokenizer.from_pretrained(a)
    assert 1000 <= len(tok) <= 2000
    text = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith(tok.bos_token) and text.endswith("<|assistant|>\n") and "Hi!" in text
    assert tok.decode(tok.encode("héllo wörld ☃", add_special_tokens=False)) == "héllo wörld ☃"  # byte-level
