"""Prefix-cache affinity: send a conversation's next turn to the worker that served its last one.

A chat resends its whole history each turn, and the worker that answered turn k still holds that
history's KV cache (vLLM's automatic prefix caching). The gateway recognises a follow-up turn by
a chain of hashes over its messages (turn k+1's messages begin with all of turn k's), or by the
client's own ``prompt_cache_key``; it remembers which worker started each turn and prefers that
worker for the next one if its last heartbeat says it is ready with room. Preferring is a hint:
the request goes to the worker's affinity queue, which spills to the model's shared queue after
the spill bound (``broker_config/topology.py``), so pull's guarantees hold (docs/architecture.md).

Privacy: only keyed hashes are kept (the key is random per gateway process, so a hash cannot be
checked against a guessed text), at most ``max_entries`` of them, each for ``ttl`` seconds after
its turn: about as long as a worker's cache could still hold the prefix (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker_config.messages import Heartbeat


MAX_WORKERS_TRACKED = 10_000


@dataclass(frozen=True)
class ConversationKeys:
    """The hashes of one request: ``lookup`` (longest prefix first) to find the worker of an
    earlier turn, ``remember`` to find this turn's worker from the next one."""

    lookup: tuple[bytes, ...] = ()
    remember: tuple[bytes, ...] = ()


class Hasher:
    """Keyed hashes (BLAKE2b, a random key per process) of conversation prefixes."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _h(self, *parts: bytes) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=16)
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()

    def keys(self, model: str, body: dict[str, Any]) -> ConversationKeys:
        """The conversation keys of a request body: ``prompt_cache_key`` when the client names
        the conversation itself; else the chain over chat ``messages`` or a Responses ``input``
        list; else (a completion's prompt) the OpenAI ``user`` field when sent."""
        scope = self._h(b"model", model.encode())
        explicit = body.get("prompt_cache_key")
        if isinstance(explicit, str) and explicit:
            key = self._h(scope, b"key", explicit.encode())
            return ConversationKeys((key,), (key,))
        items = body.get("messages")
        if items is None:
            items = body.get("input")
        if not isinstance(items, list) or not items:
            user = body.get("user")
            if isinstance(user, str) and user:
                key = self._h(scope, b"user", user.encode())
                return ConversationKeys((key,), (key,))
            return ConversationKeys()
        chain, h = [], scope
        for item in items:
            h = self._h(h, json.dumps(item, sort_keys=True, separators=(",", ":"), default=str).encode())
            chain.append(h)
        return ConversationKeys(tuple(reversed(chain)), (chain[-1],))


@dataclass
class ConversationMemory:
    """Hash -> the worker that started that turn; bounded in count (least recent go first) and
    in time (``ttl`` seconds after the turn)."""

    ttl: float = 600.0
    max_entries: int = 50_000
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[bytes, tuple[str, float]] = field(default_factory=OrderedDict)

    def remember(self, keys: Sequence[bytes], worker_id: str) -> None:
        until = self.clock() + self.ttl
        for key in keys:
            self._entries[key] = (worker_id, until)
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def recall(self, keys: Sequence[bytes]) -> str | None:
        """The worker of the longest remembered prefix, if its time has not run out."""
        self._expire()
        for key in keys:
            if (hit := self._entries.get(key)) is not None:
                return hit[0]
        return None

    def _expire(self) -> None:
        # Entries are in remember order and share one ttl: the expired ones are at the front.
        now = self.clock()
        while self._entries:
            key, (_, until) = next(iter(self._entries.items()))
            if until > now:
                return
            del self._entries[key]

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)


def preferred_worker(candidate: str | None, model: str, live: Sequence[Heartbeat],
                     freed_since_heartbeat: Callable[[str], bool] = lambda worker_id: False) -> str | None:
    """``candidate`` if its last heartbeat says it serves ``model``, takes affinity traffic and
    is ready with room (or full then, but this gateway has seen it finish a request since that
    heartbeat arrived: the next turn of a conversation comes right after its last answer, before
    the worker's next heartbeat); None otherwise (the request goes to the shared queue)."""
    if candidate is None:
        return None
    for hb in live:
        if hb.worker_id == candidate:
            usable = hb.model == model and hb.affinity and hb.state == "ready"
            return candidate if usable and (hb.has_room or freed_since_heartbeat(candidate)) else None
    return None


class Affinity:
    """The gateway's affinity: keys of a request, the worker to prefer, what to remember."""

    def __init__(self, enabled: bool, memory: ConversationMemory, live: Callable[[], Sequence[Heartbeat]],
                 heard_at: Callable[[str], float | None] = lambda worker_id: None, hasher: Hasher | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.memory = memory
        self._live = live
        self._heard_at = heard_at
        self._hasher = hasher or Hasher()
        self._clock = clock
        self._last_final: dict[str, float] = {}  # worker id -> when this gateway last saw it finish one

    def keys(self, model: str, body: dict[str, Any]) -> ConversationKeys:
        return self._hasher.keys(model, body) if self.enabled else ConversationKeys()

    def prefer(self, model: str, keys: ConversationKeys) -> str | None:
        if not keys.lookup:
            return None
        return preferred_worker(self.memory.recall(keys.lookup), model, self._live(), self._freed)

    def started(self, keys: ConversationKeys, worker_id: str) -> None:
        if keys.remember:
            self.memory.remember(keys.remember, worker_id)

    def finished(self, worker_id: str) -> None:
        """A request of this gateway ended on ``worker_id``: a slot there is free now."""
        if self.enabled:
            self._last_final[worker_id] = self._clock()
            if len(self._last_final) > MAX_WORKERS_TRACKED:  # workers come and go: a bound all the same
                self._last_final.clear()

    def _freed(self, worker_id: str) -> bool:
        heard, final = self._heard_at(worker_id), self._last_final.get(worker_id)
        return heard is not None and final is not None and final > heard
