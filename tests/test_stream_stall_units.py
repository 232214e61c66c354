"""A streamed response whose client takes no bytes is given up after the send timeout
(``gateway/routes/completions.py: LeasedStream``), in memory: the body (and so the generation)
is closed, the key's concurrency slot released. End to end, with a real socket, vLLM worker and
broker: ``tests/faults/test_slow_clients.py``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.cluster.generation import Outcome
from gateway.routes.inference import LeasedStream


class _Lease:
    released: int | None = None

    def release(self, tokens: int) -> None:
        self.released = tokens


async def test_a_send_that_waits_past_the_timeout_ends_the_stream_and_closes_the_body():
    closed = asyncio.Event()

    async def body():
        try:
            while True:
                yield b"data: {}\n\n"
        finally:
            closed.set()

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the client's buffers are full: this send never ends

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client never hangs up either
        return {}

    gen = SimpleNamespace(request=SimpleNamespace(model="tiny", request_id="r1"), outcome=Outcome(streamed_tokens=7))
    lease = _Lease()
    response = LeasedStream(body(), media_type="text/event-stream", gen=gen, lease=lease, send_timeout=0.05)
    await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 30)
    assert closed.is_set() and lease.released == 7 and response.stalled
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_a_client_that_reads_slowly_but_steadily_is_never_given_up():
    """The timeout is per send, not per stream: 40 sends that each wait a twentieth of it (the
    client takes bytes, slowly) add up to twice the timeout, and the stream goes out whole."""
    chunks = 40

    async def body():
        for i in range(chunks):
            yield f"data: {i}\n\n".encode()

    sent: list[dict] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            await asyncio.sleep(0.05)  # the socket buffers are full until the client reads a little
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {}

    gen = SimpleNamespace(request=SimpleNamespace(model="tiny", request_id="r2"), outcome=Outcome(streamed_tokens=40))
    lease = _Lease()
    response = LeasedStream(body(), media_type="text/event-stream", gen=gen, lease=lease, send_timeout=1.0)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 60)
    assert asyncio.get_running_loop().time() - started >= 2 * response.send_timeout  # longer than one timeout
    assert not response.stalled and lease.released == 40
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert payload == b"".join(f"data: {i}\n\n".encode() for i in range(chunks))
