"""The tunnel's TCP dialer: a transparent pass-through that keeps the socket in quick-ack mode.

Its effect on latency (no 40 ms delayed-ACK stalls behind sshd's Nagle) is measured by
``chatai bench``, not timed here; these tests hold that it passes every event through unchanged
and that the socket option is set, on real loopback TCP connections.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from gateway.cluster.quickack import TCP_QUICKACK, QuickAckDialer


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.quickack_at_start: int | None = None
        self.quickack_on_data: list[int] = []
        self.drop_quickack = False  # act as the kernel does when it leaves quick-ack mode
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if TCP_QUICKACK is not None:
            self.quickack_at_start = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK)
            if self.drop_quickack:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if TCP_QUICKACK is not None:
            sock = self.transport.get_extra_info("socket")
            self.quickack_on_data.append(sock.getsockopt(socket.IPPROTO_TCP, TCP_QUICKACK))
            if self.drop_quickack:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 0)

    def eof_received(self):
        self.eof.set()
        return True  # keep the transport open: the dialer must pass the answer back

    def connection_lost(self, exc) -> None:
        self.lost.set()


async def _echo_server():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1024)
        writer.write(data.upper())
        await writer.drain()
        writer.write_eof()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_the_dialer_passes_data_eof_and_close_through_to_the_ssh_protocol() -> None:
    async def main() -> None:
        server, port = await _echo_server()
        async with server:
            recorder = Recorder()
            transport, protocol = await QuickAckDialer().create_connection(lambda: recorder, "127.0.0.1", port)
            assert protocol is recorder  # asyncssh gets its own connection object back
            transport.write(b"hello")
            await asyncio.wait_for(recorder.eof.wait(), 10)
            assert bytes(recorder.data) == b"HELLO"
            transport.close()
            await asyncio.wait_for(recorder.lost.wait(), 10)

    asyncio.run(main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_QUICKACK is a Linux socket option")
def test_quick_ack_mode_is_rearmed_before_every_read_reaches_the_ssh_protocol() -> None:
    async def main() -> None:
        server, port = await _echo_server()
        async with server:
            recorder = Recorder()
            recorder.drop_quickack = True
            transport, _ = await QuickAckDialer().create_connection(lambda: recorder, "127.0.0.1", port)
            transport.write(b"hello")
            await asyncio.wait_for(recorder.eof.wait(), 10)
            transport.close()
            await asyncio.wait_for(recorder.lost.wait(), 10)
            assert recorder.quickack_at_start == 1
            assert recorder.quickack_on_data and set(recorder.quickack_on_data) == {1}

    asyncio.run(main())
