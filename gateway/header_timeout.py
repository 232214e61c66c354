"""A deadline for a request's head: slow or silent clients (slowloris) are disconnected.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a connection that
never sends a byte, or sends its request line and headers a byte at a time, is held for ever
(measured: 200 such connections stayed open for 150-300 s and more). Each holds a socket and a
protocol object; enough of them exhaust file descriptors. This wraps uvicorn's own HTTP protocol
(httptools, or h11 where httptools is missing): from the moment a connection opens, or a new
request begins on a kept-alive one, the client has ``timeout`` seconds to finish the head; then
the connection is closed. Bodies are not timed here: the request guard caps their size, and
handlers that wait on a body (uploads) see the disconnect.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol


class _HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def _between_requests(self) -> bool:
        """No request whose head arrived is being served (uvicorn's ``cycle`` is made with the head)."""
        cycle = getattr(self, "cycle", None)
        return cycle is None or cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # a new request began (or the first one goes on): its head is timed
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # the head is complete: the request is the app's now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


_PREFIX = "HeaderDeadline_"  # + the deadline in milliseconds
_MADE: dict[str, type[asyncio.Protocol]] = {}


def http_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a deadline of ``header_timeout`` seconds for each head
    (for ``uvicorn.run(http=...)``).

    One class per deadline, found by name in this module (``__getattr__``), so uvicorn's worker
    processes (``chatai gateway --replicas``, spawned) can unpickle it from their settings."""
    name = f"{_PREFIX}{round(header_timeout * 1000)}"
    if name not in _MADE:
        cls = type(name, (_HeaderDeadline,), {"header_timeout": header_timeout, "__module__": __name__})
        cls.__qualname__ = name
        _MADE[name] = cls
    return _MADE[name]


def __getattr__(name: str) -> type[asyncio.Protocol]:
    if name.startswith(_PREFIX) and name.removeprefix(_PREFIX).isdigit():
        return http_protocol(int(name.removeprefix(_PREFIX)) / 1000)
    raise AttributeError(name)
