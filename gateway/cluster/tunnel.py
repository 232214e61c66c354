"""The gateway's only way into the cluster: one SSH connection, one channel per AMQP connection.

    tunnel = BrokerTunnel.from_settings(settings)
    await tunnel.start()                 # connects (and reconnects) in the background
    amqp = await connect(url, name, transport=tunnel.transport())
    ... tunnel.state ("connecting" | "up" | "down"), tunnel.last_error
    await tunnel.close()

* There is no listening socket. Each AMQP connection the gateway opens (the first one and every
  reconnect of its robust connection) asks ``transport()`` for a byte stream, which becomes one
  ``direct-tcpip`` channel to the broker over the single SSH connection, spliced to an unnamed
  in-process socket pair. No other process on the VM can reach the broker through the gateway:
  there is no port or path to connect to (a local TCP forward would be open to every local
  user, and the broker would see those connections as coming from its own host).
* While the SSH connection is down, opening a stream fails at once (the AMQP client retries).
* Nothing but ``direct-tcpip`` channels is ever requested (no session, no shell, no agent, no
  X11, no remote forward), so a legitimate gateway never trips the circuit breaker.
* The login node's host key is pinned: only keys in the known_hosts file are accepted, a
  different key fails the connection (never trust on first use). No ~/.ssh/config, no agent.
* Keepalives detect a dead path; reconnection uses exponential backoff with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

import asyncssh
from aiormq import TransportFactory
from aiormq.exceptions import AMQPConnectionError

from broker_config.timing import Backoff, first_of, pause
from gateway.metrics import (
    TUNNEL_ACTIVE_FORWARDS,
    TUNNEL_CONNECT_ATTEMPTS,
    TUNNEL_CONNECT_FAILURES,
    TUNNEL_DISCONNECTS,
    TUNNEL_FORWARD_FAILURES,
    TUNNEL_FORWARDS,
    TUNNEL_STATE,
    TUNNEL_UP,
)

from gateway.cluster.quickack import QuickAckDialer

log = logging.getLogger("chatai.gateway.cluster.tunnel")

STATES = ("connecting", "up", "down")

def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return "host_key"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "auth"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError):
        return "network"
    return "other"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verifiable (not the pinned key): {exc}"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "permission denied: key refused (circuit breaker tripped, or the key is not installed)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Client(asyncssh.SSHClient):
    def __init__(self, tunnel: "BrokerTunnel") -> None:
        self._tunnel = tunnel

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel._lost_reason = _describe(exc) if exc else "connection closed by the login node"


class BrokerTunnel:
    def __init__(self, host: str, user: str, key_path: Path | str, known_hosts_path: Path | str,
                 remote_host: str = "127.0.0.1", remote_port: int = 5672, port: int = 22,
                 keepalive: float = 15.0, keepalive_count_max: int = 3, backoff_initial: float = 0.5, backoff_max: float = 10.0,
                 connect_timeout: float = 20.0) -> None:
        if not known_hosts_path:
            raise ValueError("the tunnel needs a known_hosts file with the login node's pinned host key")
        if not key_path:
            raise ValueError("the tunnel needs the gateway's private key (CHATAI_GATEWAY_TUNNEL_KEY)")
        self.host, self.port, self.user = host, port, user
        self.key_path, self.known_hosts_path = Path(key_path), Path(known_hosts_path)
        self.remote_host, self.remote_port = remote_host, remote_port
        self.keepalive, self.keepalive_count_max = keepalive, keepalive_count_max
        self._backoff = Backoff(backoff_initial, backoff_max, jitter=True)
        self.connect_timeout = connect_timeout
        self._started = False
        self.last_error: str | None = None
        self.connects = 0  # successful SSH connections so far
        self._state = "down"
        self._conn: asyncssh.SSHClientConnection | None = None
        self._task: asyncio.Task | None = None
        self._pipes: set[asyncio.Task] = set()
        self._closing = False
        self._wake = asyncio.Event()
        self._up = asyncio.Event()
        self._lost_reason: str | None = None
        self._set_state("down")

    @classmethod
    def from_settings(cls, settings) -> "BrokerTunnel":
        if not settings.tunnel_host:
            raise ValueError("no tunnel host configured (CHATAI_GATEWAY_TUNNEL_HOST)")
        return cls(host=settings.tunnel_host, port=settings.tunnel_port, user=settings.tunnel_user,
                   key_path=settings.tunnel_key, known_hosts_path=settings.tunnel_known_hosts,
                   remote_host=settings.tunnel_remote_host, remote_port=settings.tunnel_remote_port,
                   keepalive=settings.tunnel_keepalive, backoff_initial=settings.tunnel_backoff_initial,
                   backoff_max=settings.tunnel_backoff_max)

    # -- public ------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    async def start(self) -> None:
        """Start connecting (and reconnecting) in the background."""
        if not self._started:
            self._started = True
            self._task = asyncio.create_task(self._run(), name="chatai-tunnel")

    def transport(self) -> TransportFactory:
        """For ``broker_config.connection.connect``: AMQP connections through this tunnel."""
        return _TunnelTransport(self)

    async def wait_up(self, timeout: float) -> bool:
        return bool(await first_of(self._up.wait(), timeout=timeout))

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._conn is not None:
            self._conn.close()
        for t in list(self._pipes):
            t.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)
        self._set_state("down")

    # -- internals ---------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        self._state = state
        TUNNEL_UP.set(1 if state == "up" else 0)
        for s in STATES:
            TUNNEL_STATE.labels(s).set(1 if s == state else 0)
        if state == "up":
            self._up.set()
        else:
            self._up.clear()

    async def _sleep(self, delay: float) -> None:
        self._wake.clear()
        await pause(delay, self._wake)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            self.host, self.port, username=self.user,
            client_factory=lambda: _Client(self),
            client_keys=[str(self.key_path)], known_hosts=str(self.known_hosts_path),
            config=[], agent_path=None, agent_forwarding=False, preferred_auth="publickey",
            password=None, gss_host=None, keepalive_interval=self.keepalive,
            keepalive_count_max=self.keepalive_count_max, login_timeout=self.connect_timeout,
            connect_timeout=self.connect_timeout,
            tunnel=QuickAckDialer(),  # a plain TCP socket that acks at once: see gateway.cluster.quickack
        )

    async def _run(self) -> None:
        while not self._closing:
            self._set_state("connecting")
            TUNNEL_CONNECT_ATTEMPTS.inc()
            try:
                conn = await self._connect()
            except Exception as exc:  # every failure is retried; the reason is shown in /health
                if self._closing:
                    break
                TUNNEL_CONNECT_FAILURES.labels(_reason(exc)).inc()
                self.last_error = _describe(exc)
                self._set_state("down")
                delay = self._backoff.next()
                log.warning("SSH tunnel to %s:%s failed (%s); retrying in %.1f s", self.host, self.port,
                            self.last_error, delay)
                await self._sleep(delay)
                continue
            self._conn, self._lost_reason = conn, None
            self.connects += 1
            self.last_error = None
            self._set_state("up")
            log.info("SSH tunnel up: %s@%s:%s -> %s:%s", self.user, self.host, self.port,
                     self.remote_host, self.remote_port)
            since = time.monotonic()
            with contextlib.suppress(Exception):
                await conn.wait_closed()
            self._conn = None
            if self._closing:
                break
            TUNNEL_DISCONNECTS.inc()
            self.last_error = self._lost_reason or "connection closed"
            self._set_state("down")
            if time.monotonic() - since > 60:
                self._backoff.reset()  # it was healthy for a while: start again from a short delay
            delay = self._backoff.next()
            log.warning("SSH tunnel lost (%s); reconnecting in %.1f s", self.last_error, delay)
            await self._sleep(delay)
        self._set_state("down")

    async def open_stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to the broker: one direct-tcpip channel, spliced to an unnamed socket
        pair inside this process. Raises AMQPConnectionError while the tunnel is down."""
        conn = self._conn
        if conn is None or self._state != "up":
            TUNNEL_FORWARD_FAILURES.inc()
            raise AMQPConnectionError(f"SSH tunnel {self._state}: {self.last_error or 'not connected yet'}")
        try:
            ch_reader, ch_writer = await conn.open_connection(self.remote_host, self.remote_port)
        except (asyncssh.Error, OSError) as exc:
            TUNNEL_FORWARD_FAILURES.inc()
            self.last_error = f"forward to {self.remote_host}:{self.remote_port} refused: {exc}"
            log.warning("%s", self.last_error)
            raise AMQPConnectionError(self.last_error) from None
        ours, theirs = socket.socketpair()
        try:
            reader, writer = await asyncio.open_connection(sock=theirs)
            sp_reader, sp_writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            ch_writer.close()
            raise
        task = asyncio.create_task(self._splice(sp_reader, sp_writer, ch_reader, ch_writer), name="chatai-tunnel-pipe")
        self._pipes.add(task)
        task.add_done_callback(self._pipes.discard)
        return reader, writer

    async def _splice(self, reader, writer, ch_reader, ch_writer) -> None:
        TUNNEL_FORWARDS.inc()
        TUNNEL_ACTIVE_FORWARDS.inc()
        try:
            # AMQP never half-closes: when either direction ends, both are closed.
            await first_of(self._pipe(reader, ch_writer), self._pipe(ch_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            TUNNEL_ACTIVE_FORWARDS.dec()
            for w in (ch_writer, writer):
                with contextlib.suppress(Exception):
                    w.close()

    @staticmethod
    async def _pipe(src, dst) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncssh.Error, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


class _TunnelTransport(TransportFactory):
    """aiormq's hook for opening a connection's byte stream: through the tunnel, never TCP."""

    def __init__(self, tunnel: BrokerTunnel) -> None:
        self._tunnel = tunnel

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self._tunnel.open_stream()
