"""What can go wrong between the gateway and the cluster, in the cluster's own terms.

The broker adapter (``gateway/cluster/broker.py``) and a request's life on the broker
(``gateway/cluster/generation.py``) raise these; they know nothing of HTTP. ``gateway/errors.py`` is the
one place that turns them into OpenAI error responses (status, type, code), so the batch
dispatcher can decide on the kind of failure (``except ModelNotFound``) and the API answers
every kind the same way on every endpoint. The messages are written for the API client.
"""

from __future__ import annotations

from collections.abc import Iterable


class ClusterError(Exception):
    """Base of every failure on the broker path."""

    retry_after: float | None = None  # seconds after which the same request may work (retry-after)
    should_retry: bool | None = None  # False: an automatic retry would only wait again (x-should-retry)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(ClusterError):
    """No queue is bound for this model name: the broker returned the message."""

    def __init__(self, model: str, known: Iterable[str] = ()) -> None:
        names = sorted(known)
        listed = ""
        if names:  # what the client may have meant: a typo is the usual cause
            more = f" and {len(names) - 20} more (GET /v1/models)" if len(names) > 20 else ""
            listed = f" Models on this service: {', '.join(names[:20])}{more}."
        super().__init__(f"The model '{model}' does not exist on this service.{listed}")
        self.model = model


class TryLater(ClusterError):
    """Nothing was queued, and the same request may succeed later (back-pressure)."""


class QueueFull(TryLater):
    """The model's queue is at its maximum length (reject-publish: a negative confirm)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The queue of model '{model}' is full; retry later.")
        self.model = model


class ClusterUnavailable(TryLater):
    """No broker connection: tunnel or broker down, or the circuit breaker tripped."""

    def __init__(self) -> None:
        super().__init__(
            "The service is paused: the gateway has no connection to the cluster (the circuit breaker "
            "may be tripped, or the tunnel or broker is down). Try again later.")


class ClusterOverloaded(TryLater):
    """The broker refuses publishers for now (a memory or disk alarm)."""

    def __init__(self, message: str = "The cluster is overloaded right now; try again later.") -> None:
        super().__init__(message)


class NoWorkerAvailable(ClusterError):
    """No worker started the request within the queue timeout (the message's TTL ran out), or,
    for a cold model, within its cold-start timeout."""

    def __init__(self, model: str, timeout: float, cold_start: bool = False) -> None:
        if cold_start:
            super().__init__(
                f"No worker of model '{model}' started within the cold-start timeout of {timeout:g} s (the model "
                "had no running worker; one was being started, but it did not come in time). Try again later.")
            self.retry_after, self.should_retry = 60, False  # a retry at once would wait as long again
        else:
            super().__init__(
                f"No worker picked up the request within {timeout:g} s: model '{model}' has no free worker right "
                "now (its workers are busy). Try again later.")
            self.retry_after = 10
        self.model, self.timeout = model, timeout


class ModelNotLoaded(ClusterError):
    """The model has no worker, and nothing will start one: no autoscaler runs for it and no
    worker is on its way. Said at once, instead of a wait that cannot end well."""

    retry_after = 60
    should_retry = False  # nothing changes by itself: an operator has to act

    def __init__(self, model: str) -> None:
        super().__init__(
            f"Model '{model}' has no running worker and nothing will start one: no autoscaler is running for "
            "it and no worker job is starting. Ask the service's operators to start a worker (chatai scale up) "
            "or to run the autoscaler (chatai autoscale), then try again.")
        self.model = model


class WorkerLost(ClusterError):
    """The worker died after tokens were streamed; the redelivery cannot rewind the stream."""

    def __init__(self) -> None:
        super().__init__("The worker serving this stream was lost after tokens were sent; the request was "
                         "restarted elsewhere but a stream cannot be rewound. Retry the request.")


class WorkerTimeout(ClusterError):
    """The worker went silent for longer than the stream idle timeout."""

    def __init__(self) -> None:
        super().__init__("The worker stopped sending tokens; the request was abandoned.")


class WorkerFailed(ClusterError):
    """The worker answered with an ``error`` frame; its status and code travel on the wire."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code
