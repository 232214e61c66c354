"""The SSH connection's TCP socket, acknowledging every read at once (Linux ``TCP_QUICKACK``).

Why: OpenSSH's sshd turns Nagle's algorithm off (``TCP_NODELAY``) only when a session starts,
and the tunnel account never starts one (a session would trip the circuit breaker). So on the
login node every small reply frame that follows another one still unacknowledged waits for
our ACK, and Linux delays ACKs by 40 ms or more: a first token, or a whole short answer,
arrived in one late burst. Acking every segment at once turns that wait into one round trip.
The kernel leaves quick-ack mode by itself, so it is re-armed after each read; that is one
``setsockopt`` per read, far below the cost of decrypting the data.

Used as asyncssh's ``tunnel`` connector: asyncssh then builds its connection on the socket
this module opens, with every option (host key pinning, keepalives) unchanged.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def quick_ack(sock: socket.socket | None) -> None:
    if sock is not None and TCP_QUICKACK is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        except OSError:
            pass


class _QuickAckProtocol(asyncio.Protocol):
    """Passes everything to the SSH connection; re-arms quick ACKs before each read is handled."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self._sock: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sock = transport.get_extra_info("socket")
        quick_ack(self._sock)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        quick_ack(self._sock)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class QuickAckDialer:
    """asyncssh's tunnel interface (``create_connection``), over a plain TCP connection."""

    async def create_connection(self, session_factory: Callable[[], Any], host: str, port: int) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        transport, wrapper = await loop.create_connection(lambda: _QuickAckProtocol(session_factory()), host, port)
        return transport, wrapper.inner

    def close(self) -> None:
        """Nothing to close: the connection belongs to the SSH session."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see ``close``)."""
