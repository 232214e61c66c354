"""The gateway's only way into the cluster: one SSH connection with a local port forward.

    tunnel = BrokerTunnel.from_settings(settings)
    host, port = await tunnel.start()   # 127.0.0.1:<ephemeral>, stable for the tunnel's life
    ... AMQP to host:port ...  tunnel.state ("connecting" | "up" | "down"), tunnel.last_error
    await tunnel.close()

* The local listener is the tunnel's own socket, bound once: it keeps its port across SSH
  reconnects, so the gateway's robust AMQP connection reconnects to the same address. While the
  SSH connection is down, accepted clients are closed at once (the AMQP client retries).
* Each accepted client becomes one ``direct-tcpip`` channel to the broker over the single SSH
  connection; nothing else is ever requested (no session, no shell, no agent, no X11), so a
  legitimate gateway never trips the circuit breaker.
* The login node's host key is pinned: only keys in the known_hosts file are accepted, a
  different key fails the connection (never trust on first use). No ~/.ssh/config, no agent.
* Keepalives detect a dead path; reconnection uses exponential backoff with jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from pathlib import Path

import asyncssh
from prometheus_client import Counter, Gauge

log = logging.getLogger("chatai.gateway.tunnel")

STATES = ("connecting", "up", "down")

TUNNEL_UP = Gauge("chatai_tunnel_up", "1 while the SSH tunnel to the cluster is up")
TUNNEL_STATE = Gauge("chatai_tunnel_state", "1 for the SSH tunnel's current state", ["state"])
TUNNEL_CONNECT_ATTEMPTS = Counter("chatai_tunnel_connect_attempts", "SSH connection attempts to the login node")
TUNNEL_CONNECT_FAILURES = Counter("chatai_tunnel_connect_failures", "Failed SSH connection attempts", ["reason"])
TUNNEL_DISCONNECTS = Counter("chatai_tunnel_disconnects", "SSH tunnel connections lost after being up")
TUNNEL_FORWARDS = Counter("chatai_tunnel_forwarded_connections", "Local connections forwarded to the broker")
TUNNEL_FORWARD_FAILURES = Counter("chatai_tunnel_forward_failures",
                                  "Local connections refused: tunnel down or forward refused")
TUNNEL_ACTIVE_FORWARDS = Gauge("chatai_tunnel_active_forwards", "Forwarded connections open now")


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
                 keepalive: float = 15.0, keepalive_count_max: int = 3, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, backoff_initial: float = 0.5, backoff_max: float = 10.0,
                 connect_timeout: float = 20.0) -> None:
        if not known_hosts_path:
            raise ValueError("the tunnel needs a known_hosts file with the login node's pinned host key")
        if not key_path:
            raise ValueError("the tunnel needs the gateway's private key (CHATAI_GATEWAY_TUNNEL_KEY)")
        self.host, self.port, self.user = host, port, user
        self.key_path, self.known_hosts_path = Path(key_path), Path(known_hosts_path)
        self.remote_host, self.remote_port = remote_host, remote_port
        self.keepalive, self.keepalive_count_max = keepalive, keepalive_count_max
        self.listen_host, self.listen_port = listen_host, listen_port
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.connect_timeout = connect_timeout
        self.last_error: str | None = None
        self.connects = 0  # successful SSH connections so far
        self._state = "down"
        self._conn: asyncssh.SSHClientConnection | None = None
        self._server: asyncio.base_events.Server | None = None
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
                   keepalive=settings.tunnel_keepalive)

    # -- public ------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def local_address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("tunnel not started")
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> tuple[str, int]:
        """Bind the local end and start connecting in the background; returns (host, port)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._handle_client, self.listen_host, self.listen_port)
            self._task = asyncio.create_task(self._run(), name="chatai-tunnel")
        return self.local_address

    async def wait_up(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._server is not None:
            self._server.close()
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
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
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

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random."""
        ceiling = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _sleep(self, delay: float) -> None:
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            self.host, self.port, username=self.user,
            client_factory=lambda: _Client(self),
            client_keys=[str(self.key_path)], known_hosts=str(self.known_hosts_path),
            config=[], agent_path=None, agent_forwarding=False, preferred_auth="publickey",
            password=None, gss_host=None, keepalive_interval=self.keepalive,
            keepalive_count_max=self.keepalive_count_max, login_timeout=self.connect_timeout,
            connect_timeout=self.connect_timeout,
        )

    async def _run(self) -> None:
        attempt = 0
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
                delay = self._backoff(attempt)
                attempt += 1
                log.warning("SSH tunnel to %s:%s failed (%s); retrying in %.1f s", self.host, self.port,
                            self.last_error, delay)
                await self._sleep(delay)
                continue
            self._conn, self._lost_reason = conn, None
            self.connects += 1
            self.last_error = None
            self._set_state("up")
            log.info("SSH tunnel up: %s@%s:%s -> %s:%s on %s:%s", self.user, self.host, self.port,
                     self.remote_host, self.remote_port, *self.local_address)
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
                attempt = 0  # it was healthy for a while: start again from a short delay
            delay = self._backoff(attempt)
            attempt += 1
            log.warning("SSH tunnel lost (%s); reconnecting in %.1f s", self.last_error, delay)
            await self._sleep(delay)
        self._set_state("down")

    async def _handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._pipes.add(task)
        try:
            conn = self._conn
            if conn is None or self._state != "up":
                TUNNEL_FORWARD_FAILURES.inc()
                return
            try:
                ch_reader, ch_writer = await conn.open_connection(self.remote_host, self.remote_port)
            except (asyncssh.Error, OSError) as exc:
                TUNNEL_FORWARD_FAILURES.inc()
                self.last_error = f"forward to {self.remote_host}:{self.remote_port} refused: {exc}"
                log.warning("%s", self.last_error)
                return
            TUNNEL_FORWARDS.inc()
            TUNNEL_ACTIVE_FORWARDS.inc()
            try:
                # AMQP never half-closes: when either direction ends, both are closed.
                pipes = [asyncio.ensure_future(self._pipe(reader, ch_writer)),
                         asyncio.ensure_future(self._pipe(ch_reader, writer))]
                try:
                    await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for p in pipes:
                        p.cancel()
                    await asyncio.gather(*pipes, return_exceptions=True)
            finally:
                TUNNEL_ACTIVE_FORWARDS.dec()
                ch_writer.close()
        except asyncio.CancelledError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._pipes.discard(task)

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
