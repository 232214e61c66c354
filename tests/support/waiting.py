"""Waiting for a condition in tests: the same poll as production code (``broker_config.timing``),
failing with a message that says what never happened."""

from __future__ import annotations

from broker_config.timing import await_until as wait_until
from broker_config.timing import wait_until as wait_until_sync

__all__ = ["wait_until", "wait_until_sync"]
