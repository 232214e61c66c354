"""The gateway's side of the broker: publish requests and cancellations, receive reply frames.

One robust AMQP connection per gateway process; one exclusive reply queue whose frames are
routed to the waiting request by id; one exclusive queue of worker heartbeats. The broker user
is the gateway deployment's identity: every queue it names lives under
``chatai.gw.<user>.``, and every request and cancellation carries ``user_id`` (which the broker
checks against the connection's user), so a worker honours a cancellation only from the
deployment that sent the request. Publishing uses
confirms and ``mandatory``, so an unknown model (no queue bound) and a full queue
(reject-publish) are known at once (``ModelNotFound`` / ``QueueFull``, which the API answers
404 / 429) instead of waiting. Nothing here speaks HTTP: failures are
``gateway.cluster.errors``, mapped to responses by ``gateway/errors.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError, PublishError
from aiormq import TransportFactory
from pamqp.commands import Basic

from broker_config import topology as t
from broker_config.connection import QueueDepth, connect, publish, queue_depth, redact, user_of
from broker_config.messages import (
    CONTENT_TYPE,
    SCALER_MESSAGE_TYPE,
    ApiRequest,
    Cancel,
    Heartbeat,
    ScalerHeartbeat,
    decode_frames_leniently,
)
from broker_config.timing import Backoff, retry_async
from gateway.cluster.broker_alarm import BlockedTracker
from gateway.cluster.broker_port import Subscription
from gateway.cluster.errors import ClusterUnavailable, ModelNotFound, QueueFull
from gateway.metrics import AFFINITY_ROUTES, BROKER_CONNECTED, MALFORMED_FRAMES, know_model, model_label
from gateway.cluster.registry import WorkerRegistry

log = logging.getLogger("chatai.gateway.cluster.broker")

# Cancellations that could not be published (no connection) are kept this long, at most this many,
# and sent when the connection returns: the worker may still be generating for a client that is gone.
UNSENT_CANCEL_TTL = 600.0
UNSENT_CANCEL_MAX = 10_000
# A passive declare answers in milliseconds; past this the broker is not reading (an alarm).
QUEUE_PROBE_TIMEOUT = 5.0


class GatewayBroker:
    def __init__(self, url: str, registry: WorkerRegistry, gateway_id: str | None = None,
                 reconnect_interval: float = 2.0, transport: TransportFactory | None = None) -> None:
        self._url = url
        self._transport = transport  # the SSH tunnel's; None: TCP to the URL's host and port
        self.registry = registry
        self.user = user_of(url)  # the deployment's broker user: names its namespace
        self.gateway_id = gateway_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.reply_queue_name = t.gateway_reply_queue(self.user, self.gateway_id)
        self._reconnect_interval = reconnect_interval
        self._subscriptions: dict[str, Subscription] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._requests: AbstractExchange | None = None
        self._control: AbstractExchange | None = None
        self._affinity: AbstractExchange | None = None
        self._connector: asyncio.Task | None = None
        self.ready = asyncio.Event()
        self.last_error: str | None = None
        self.alarm = BlockedTracker()  # the broker's memory/disk alarm, as this connection sees it
        self._unsent_cancels: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (reason, when)
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background: the API starts (and answers 503) while the cluster is away."""
        self._connector = asyncio.create_task(self._connect_loop(), name="broker-connect")

    async def _connect_loop(self) -> None:
        def failed(exc: Exception, delay: float) -> None:  # any failure means "retry later"
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("broker %s unreachable (%s); retrying in %.0f s", redact(self._url),
                        type(exc).__name__, delay)

        await retry_async(self._connect_once, Backoff(self._reconnect_interval, 30.0), on_failure=failed)
        self.last_error = None

    async def _connect_once(self) -> None:
        connection = await connect(self._url, name=f"chatai-gateway-{self.gateway_id}",
                                   reconnect_interval=self._reconnect_interval, transport=self._transport)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            replies = await channel.declare_queue(self.reply_queue_name, exclusive=True, auto_delete=True)
            await replies.bind(t.REPLIES_EXCHANGE, routing_key=self.reply_queue_name)
            await replies.consume(self._on_reply, no_ack=True)
            workers = await channel.declare_queue(t.gateway_workers_queue(self.user, self.gateway_id), exclusive=True,
                                                  auto_delete=True)
            await workers.bind(t.WORKERS_EXCHANGE)
            await workers.consume(self._on_heartbeat, no_ack=True)
            self._requests = await channel.get_exchange(t.REQUESTS_EXCHANGE, ensure=False)
            self._control = await channel.get_exchange(t.CONTROL_EXCHANGE, ensure=False)
            self._affinity = await channel.get_exchange(t.AFFINITY_EXCHANGE, ensure=False)
        except BaseException:
            await connection.close()
            raise
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self.alarm.watch(connection)
        self._connection, self._channel = connection, channel
        self.registry.listening()
        self._set_connected(True)
        log.info("connected to broker %s as gateway %s", redact(self._url), self.gateway_id)

    def _set_connected(self, up: bool) -> None:
        BROKER_CONNECTED.set(1 if up else 0)
        if up:
            self.ready.set()
        else:
            self.ready.clear()

    def _on_connection_lost(self, *_: object) -> None:
        self._set_connected(False)
        self.alarm.connection_lost()
        log.warning("lost the broker connection; reconnecting")
        # Frames for requests in flight went with the connection's exclusive reply queue, even
        # when it comes back within a second: end each of them now with a clear error, rather
        # than pass on a stream with a gap or wait for frames that will never come.
        for sub in list(self._subscriptions.values()):
            sub.connection_lost()

    def _on_reconnected(self, *_: object) -> None:
        if self._connection is not None:
            self.alarm.watch(self._connection)  # a new AMQP connection underneath
        self.registry.listening()  # a new heartbeat queue: what was missed meanwhile is unknown
        self._set_connected(True)
        log.info("broker connection restored")
        if self._unsent_cancels:
            task = asyncio.get_running_loop().create_task(self._send_unsent_cancels(), name="unsent-cancels")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    @property
    def connected(self) -> bool:
        conn = self._connection
        return bool(conn is not None and self.ready.is_set() and not conn.is_closed
                    and conn.transport is not None and not conn.transport.connection.is_closed)

    async def close(self) -> None:
        if self._connector:
            self._connector.cancel()
        if self._connection is not None:
            await self._connection.close()
        self._set_connected(False)

    # ------------------------------------------------------------------ receiving

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        frames, malformed = decode_frames_leniently(message.body)
        if malformed:
            MALFORMED_FRAMES.labels("replies").inc(malformed)
            log.warning("dropped %d malformed reply frame(s)", malformed)
        for frame in frames:
            sub = self._subscriptions.get(frame.request_id)
            if sub is not None:
                sub.frames.put_nowait(frame)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            if message.type == SCALER_MESSAGE_TYPE:  # an autoscaler's round, on the same exchange
                self.registry.update_scaler(ScalerHeartbeat.model_validate_json(message.body))
            else:
                self.registry.update(Heartbeat.model_validate_json(message.body))
        except ValueError:
            MALFORMED_FRAMES.labels("heartbeats").inc()
            log.warning("dropped a malformed heartbeat")

    # ------------------------------------------------------------------ sending

    def worker_alive(self, worker_id: str) -> bool:
        return self.registry.is_alive(worker_id)

    def subscribe(self, request_id: str) -> Subscription:
        sub = Subscription(request_id, lambda rid: self._subscriptions.pop(rid, None))
        self._subscriptions[request_id] = sub
        return sub

    async def publish_request(self, request: ApiRequest, *, priority: int, ttl: float | None,
                              persistent: bool = False, prefer: str | None = None) -> None:
        """Put a request on its model's queue; raises ModelNotFound / QueueFull / ClusterUnavailable
        at once when nothing was queued (ClusterOverloaded while a broker resource alarm blocks
        publishing).

        With ``prefer`` (prefix-cache affinity) it goes to that worker's affinity queue instead,
        still with the model's name as routing key (what the queue dead-letters keeps it, and
        reaches the model's queue). If the worker has no affinity queue (gone, or affinity off)
        the broker returns it and it goes to the model's queue now."""
        if not self.connected or self._requests is None or self._affinity is None:
            raise ClusterUnavailable()
        if prefer is not None:
            message = self._request_message(request, priority, ttl, persistent, {t.AFFINITY_HEADER: prefer})
            if await self._publish(self._affinity, message, request.model):
                AFFINITY_ROUTES.labels(model_label(request.model), "preferred").inc()
                return
            AFFINITY_ROUTES.labels(model_label(request.model), "returned").inc()
        if not await self._publish(self._requests, self._request_message(request, priority, ttl, persistent),
                                   request.model):
            raise ModelNotFound(request.model)
        know_model(request.model)  # routed: the model has a queue, so it is one of the definitions'

    def _request_message(self, request: ApiRequest, priority: int, ttl: float | None, persistent: bool,
                         headers: dict[str, str] | None = None) -> aio_pika.Message:
        return aio_pika.Message(
            body=request.encode(),
            content_type=CONTENT_TYPE,
            headers=headers,
            message_id=request.request_id,
            correlation_id=request.request_id,
            reply_to=request.reply_to,
            user_id=self.user,  # checked by the broker: workers know who owns the request
            priority=priority,
            expiration=ttl,
            timestamp=time.time(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )

    async def _publish(self, exchange: AbstractExchange, message: aio_pika.Message, routing_key: str) -> bool:
        """Publish with ``mandatory`` and wait for the confirm; False when the broker returned the
        message (no queue bound for it), QueueFull on a negative confirm."""
        try:
            await self.alarm.guard(publish(exchange, message, routing_key=routing_key, mandatory=True, timeout=10))
        except DeliveryError as exc:
            if isinstance(exc, PublishError) or isinstance(exc.frame, Basic.Return):  # unroutable
                return False
            raise QueueFull(routing_key) from None
        except (asyncio.TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
            raise ClusterUnavailable() from None
        return True

    @property
    def blocked(self) -> bool:
        """The broker blocks this connection (a resource alarm): it reads none of its frames."""
        return self.alarm.blocked

    async def queue_depth(self, model: str) -> QueueDepth | None:
        """Requests waiting in a model's queue and its consumers; None without a connection or
        queue, or when the broker does not answer in time (an alarm that began meanwhile)."""
        if not self.connected or self._connection is None:
            return None
        try:
            return await asyncio.wait_for(queue_depth(self._connection, t.model_queue(model)), QUEUE_PROBE_TIMEOUT)
        except (asyncio.TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
            return None

    def batch_results_queue(self, database_id: str) -> str:
        return t.gateway_batch_results_queue(self.user, database_id)

    async def consume_batch_results(self, callback: Callable[[AbstractIncomingMessage], object],
                                    prefetch: int, queue_name: str) -> AbstractChannel:
        """Consume a durable batch results queue, manual ack, on a channel of its own.

        The queue lives under this deployment's namespace (only its broker user may declare,
        bind, read or purge it) and is declared durable and bound here, one per gateway
        database, so two gateways on one broker never take each other's results. The robust
        connection restores the consumer after a reconnect; unacked results are redelivered.
        Returns the channel: closing it stops the deliveries (and returns what was not acked).
        """
        if not queue_name.startswith(t.gateway_namespace(self.user)):
            raise ValueError(f"batch results queue {queue_name!r} is not under this deployment's "
                             f"namespace {t.gateway_namespace(self.user)!r}")
        await self.ready.wait()
        if self._connection is None:
            raise RuntimeError("no broker connection")
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, durable=True, auto_delete=False, exclusive=False)
        await queue.bind(t.REPLIES_EXCHANGE, routing_key=queue_name)
        await queue.consume(callback, no_ack=False)
        return channel

    async def cancel(self, request_id: str, reason: str) -> None:
        """Tell every worker to abort this request (the client is gone, or the gateway gave up).

        Without a connection the cancellation is kept and sent when the connection returns:
        requests in flight when it dropped are ended here at once, but their workers go on
        generating (their own connections are fine) until told.
        """
        if not self.connected or self._control is None:
            self._keep_unsent(request_id, reason)
            return
        try:
            await self._control.publish(
                aio_pika.Message(body=Cancel(request_id=request_id, reason=reason).encode(),
                                 content_type=CONTENT_TYPE, user_id=self.user),
                routing_key="", mandatory=False, timeout=5)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not publish a cancellation (%s); kept for the next connection", type(exc).__name__)
            self._keep_unsent(request_id, reason)

    def _keep_unsent(self, request_id: str, reason: str) -> None:
        self._unsent_cancels[request_id] = (reason, time.monotonic())
        self._unsent_cancels.move_to_end(request_id)
        while len(self._unsent_cancels) > UNSENT_CANCEL_MAX:
            self._unsent_cancels.popitem(last=False)

    async def _send_unsent_cancels(self) -> None:
        now = time.monotonic()
        pending = [(rid, reason) for rid, (reason, at) in self._unsent_cancels.items() if now - at < UNSENT_CANCEL_TTL]
        self._unsent_cancels.clear()
        for request_id, reason in pending:
            await self.cancel(request_id, reason)
        log.info("sent %d cancellation(s) held while the broker connection was down", len(pending))
