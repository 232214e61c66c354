"""Connecting to the broker, the same way on both sides."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aiormq import TransportFactory


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_url(url: str) -> str:
    """``url`` if it is an AMQP URL with a host; else ValueError with a message that never
    repeats the URL (a mistyped one may still hold a password). A malformed URL would otherwise
    make the robust connection retry forever."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("malformed broker URL: expected amqp://USER:PASSWORD@HOST:PORT/VHOST")
    return url.strip()


def user_of(url: str) -> str:
    """The broker user a URL logs in as: for a gateway, its deployment name."""
    return unquote(urlsplit(url).username or "")


class _ThroughTransport(aio_pika.RobustConnection):
    """A robust connection whose every (re)connect opens its byte stream with ``transport``."""

    def __init__(self, url: Any, *, transport: TransportFactory, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.kwargs["transport_factory"] = transport  # passed on to aiormq.Connection


async def connect(url: str, name: str, heartbeat: int = 30, reconnect_interval: float = 2.0,
                  timeout: float = 15.0, transport: TransportFactory | None = None) -> AbstractRobustConnection:
    """A robust connection: aio-pika re-opens it, its channels, queues and consumers after a drop.

    ``transport``: open the byte stream another way than TCP to the URL's host and port (the
    gateway's SSH tunnel, see gateway/cluster/tunnel.py); the URL then only gives credentials and vhost.
    """
    check_url(url)
    extra: dict[str, Any] = {}
    if transport is not None:
        extra["connection_class"] = functools.partial(_ThroughTransport, transport=transport)
    return await aio_pika.connect_robust(url, client_properties={"connection_name": name}, heartbeat=heartbeat,
                                         reconnect_interval=reconnect_interval, timeout=timeout, **extra)


async def publish(exchange: AbstractExchange, message: aio_pika.Message, routing_key: str, *,
                  mandatory: bool, timeout: float | None = None) -> Any:
    """``exchange.publish``, but the channel is free for the next publish once this one is queued.

    aio-pika's publish holds the channel's lock until the writer task has put the frames on the
    socket: two turns of the event loop per message. Publishes from many tasks at once (a
    gateway taking a burst of requests, a worker streaming to many clients) then queue behind
    that lock, one loop turn after another (what that cost, and this saves: docs/performance.md,
    "What changed"). Order is unchanged (aiormq's write queue is FIFO), the confirm is still
    awaited, and returns and nacks raise as before.
    """
    channel = await exchange.channel.get_underlay_channel()
    return await channel.basic_publish(message.body, exchange=exchange.name, routing_key=routing_key,
                                       properties=message.properties, mandatory=mandatory, timeout=timeout,
                                       wait=False)


@dataclass(frozen=True)
class QueueDepth:
    messages: int  # waiting, not yet delivered
    consumers: int


async def queue_depth(connection: AbstractRobustConnection, queue: str) -> QueueDepth | None:
    """Messages and consumers of a queue through a passive declare (no permission needed, nothing
    created), on a throwaway channel since a missing queue closes it with 404; None: no such queue."""
    from aiormq.exceptions import ChannelNotFoundEntity

    channel = await connection.channel()
    try:
        result = (await channel.declare_queue(queue, passive=True)).declaration_result
        return QueueDepth(result.message_count, result.consumer_count)
    except ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()
