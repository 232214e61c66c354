"""Connecting to the broker, the same way on both sides."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractRobustConnection


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def connect(url: str, name: str, heartbeat: int = 30, reconnect_interval: float = 2.0,
                  timeout: float = 15.0) -> AbstractRobustConnection:
    """A robust connection: aio-pika re-opens it, its channels, queues and consumers after a drop."""
    return await aio_pika.connect_robust(url, client_properties={"connection_name": name}, heartbeat=heartbeat,
                                         reconnect_interval=reconnect_interval, timeout=timeout)
