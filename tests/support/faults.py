"""Faults the fault suite (tests/faults/) injects into real processes, and what it asserts with.

Every fault waits on the broker's own account of it (its alarm list, its status) rather than
on a sleep, and every ``with`` block undoes its fault even when the test fails, so the
session's broker is left as it was found.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


def batch_lines(model: str, n: int, prefix: str, max_tokens: int = 4, **extra) -> bytes:
    """An OpenAI batch input file of ``n`` chat lines, custom ids ``<prefix>-<i>``."""
    rows = [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": f"Fault line {i}: say something."}], **extra}}
            for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def submit_batch(client: openai.OpenAI, model: str, n: int, prefix: str, **line):
    f = client.files.create(file=("faults.jsonl", batch_lines(model, n, prefix, **line)), purpose="batch")
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


@contextlib.contextmanager
def broker_app_stopped(admin) -> Iterator[None]:
    """``rabbitmqctl stop_app`` (every connection is closed, the node stays up), then
    ``start_app`` on the way out: a broker restart as an operator does it."""
    admin._run("stop_app")
    try:
        yield
    finally:
        admin._run("start_app")


@dataclass
class Outcome:
    """How one request through the SDK ended."""

    kind: str  # ok | cut (error event after tokens) | refused (HTTP error) | hang | broken
    status: int | None = None
    code: str | None = None
    chunks: int = 0
    after: float = 0.0  # time.monotonic() when it ended
    first_token: float | None = None  # time.monotonic() of its first token (streams)
    detail: str | None = None  # what broke, for a broken one

    def in_flight_at(self, moment: float) -> bool:
        """A stream that had tokens before ``moment`` and ended after it."""
        return self.first_token is not None and self.first_token < moment < self.after


def one_request(client: openai.OpenAI, stream: bool, on_first_token: Callable[[], None] | None = None,
                **body) -> Outcome:
    chunks, first = 0, None
    try:
        if stream:
            for chunk in client.chat.completions.create(stream=True, **body):
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    if chunks == 1:
                        first = time.monotonic()
                        if on_first_token is not None:
                            on_first_token()
        else:
            client.chat.completions.create(**body)
            chunks = 1
        return Outcome("ok", 200, chunks=chunks, after=time.monotonic(), first_token=first)
    except openai.APIStatusError as exc:
        return Outcome("refused", exc.status_code, error_code(exc), chunks, time.monotonic(), first)
    except openai.APITimeoutError:
        return Outcome("hang", chunks=chunks, after=time.monotonic(), first_token=first)
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        return Outcome("broken", chunks=chunks, after=time.monotonic(), first_token=first,
                       detail=f"{'stream' if stream else 'whole'}: {type(cause).__name__}: {cause}")
    except openai.APIError as exc:  # an error event inside a started stream
        return Outcome("cut", code=error_code(exc), chunks=chunks, after=time.monotonic(), first_token=first)


class Traffic:
    """Clients sending requests back to back in threads until stopped, every outcome kept."""

    def __init__(self, client: openai.OpenAI, *, streams: int, whole: int, **body) -> None:
        self.client, self.body = client, body
        self.outcomes: list[Outcome] = []
        self.streaming = 0  # streams that have had tokens and not ended yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(s,), daemon=True)
                         for s in [True] * streams + [False] * whole]

    def _loop(self, stream: bool) -> None:
        while not self._stop.is_set():
            started = threading.Event()
            outcome = one_request(self.client, stream, on_first_token=lambda: self._count(started, +1), **self.body)
            if started.is_set():
                self._count(started, -1)
            self.outcomes.append(outcome)
            if outcome.kind != "ok":
                self._stop.wait(0.2)  # pace retries while the service is away

    def _count(self, started: threading.Event, step: int) -> None:
        with self._lock:
            self.streaming += step
        started.set()

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in self._threads), "a client never finished"

    def count(self, kind: str) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind)

    def summary(self) -> str:
        kinds = ("ok", "cut", "refused", "hang", "broken")
        broken = [o.detail for o in self.outcomes if o.kind == "broken"]
        return (", ".join(f"{k} {self.count(k)}" for k in kinds) + f" of {len(self.outcomes)}"
                + (f" (broken: {'; '.join(map(str, broken))})" if broken else ""))


@contextlib.contextmanager
def sshd_down(sshd) -> Iterator[None]:
    """The login node's sshd dies with every session of the tunnel account (SIGKILL), and is
    started again, same configuration and host key, on the way out."""
    import pwd
    import socket
    import subprocess

    from circuit_breaker import hook

    argv = list(sshd.process.args)
    sshd.process.kill()
    sshd.process.wait(10)
    hook.end_sessions(pwd.getpwnam(sshd.user).pw_uid)
    try:
        yield
    finally:
        sshd.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

        def listening() -> bool:
            try:
                with socket.create_connection((sshd.host, sshd.port), timeout=1) as s:
                    return s.recv(64).startswith(b"SSH-")
            except OSError:
                return False

        wait_for(listening, 30, "sshd to listen again")


@contextlib.contextmanager
def sshd_paused(sshd) -> Iterator[None]:
    """sshd's listener is stopped (SIGSTOP) and continued on the way out: it stays up, holding
    its socket, but answers no new connection meanwhile. Cut a session inside this, and the
    outage lasts until the test has looked at it, however quickly the gateway retries."""
    import signal

    os.kill(sshd.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(sshd.process.pid, signal.SIGCONT)


def tunnel_session_processes(sshd, gateway_pid: int) -> list:
    """The sshd processes that serve the gateway's SSH connection (the privileged monitor and
    the session process), found by that connection's ports: the gateway's source port on one
    side, sshd's listening port on the other. Never the listener itself."""
    import psutil

    gateway = psutil.Process(gateway_pid)
    ports = {c.laddr.port for p in (gateway, *gateway.children(recursive=True))
             for c in p.net_connections("tcp")
             if c.raddr and c.raddr.port == sshd.port and c.status == psutil.CONN_ESTABLISHED}
    assert len(ports) == 1, f"the gateway should hold one SSH connection, not {len(ports)}"
    found = []
    for proc in psutil.Process(sshd.process.pid).children(recursive=True):
        try:
            if any(c.laddr and c.laddr.port == sshd.port and c.raddr and c.raddr.port in ports
                   for c in proc.net_connections("tcp")):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    assert found, f"no sshd process serves the gateway's connection from port {ports}"
    return found


def cut_tunnel_session(sshd, gateway_pid: int) -> list[int]:
    """SIGKILL the sshd processes of the gateway's SSH connection; sshd's listener stays up.
    Returns the pids killed, once they are gone."""
    import psutil

    procs = tunnel_session_processes(sshd, gateway_pid)
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    def gone(proc) -> bool:  # a zombie is gone too: a paused listener reaps nothing
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in procs), 10, f"sshd session processes {procs} to die of SIGKILL",
             every=0.05)
    assert sshd.process.poll() is None, "the cut took sshd's listener with it"
    return [p.pid for p in procs]


def metric(base_url: str, name: str) -> float:
    """One unlabelled sample (or the sum over labels) from a gateway's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=5).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def gateway_serving(state_dir, broker_url: str, model: str, *, env: dict[str, str],
                    direct: bool = True) -> contextlib.AbstractContextManager:
    """``support.gateway.gateway_serving`` with per-key rate limits off unless the test sets them:
    fault tests drive traffic through outages (where refusals come back at once and a loop sends
    many), not a client under limits."""
    from support.gateway import gateway_serving as serving

    return serving(state_dir, broker_url, model, direct=direct,
                   env={"CHATAI_GATEWAY_LIMIT_RPM": "0", "CHATAI_GATEWAY_LIMIT_TPM": "0", **env})
