"""vLLM's prefix-cache figures, counted for the heartbeat.

vLLM's engine counts, at each scheduling step, the prompt tokens it looked up in its prefix cache
and those it found there (``SchedulerStats.prefix_cache_stats``); its stat loggers are where
those counts surface in-process. The worker gives the engine one more stat logger that only adds
them up, so every heartbeat can carry them and the gateways show a hit rate per model. The
engine runs with its own loggers off (``disable_log_stats``); a custom logger turns its stats
collection on without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PrefixCacheCount:
    """Prompt tokens looked up in the prefix cache, and found there, since the engine started."""

    queries: int = 0
    hits: int = 0

    def add(self, queries: int, hits: int) -> None:
        self.queries += queries
        self.hits += hits


def stat_logger(count: PrefixCacheCount) -> Any:
    """A vLLM stat logger class (a per-engine factory) adding the engine's counts to ``count``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PrefixCacheLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                stats = scheduler_stats.prefix_cache_stats
                count.add(stats.queries, stats.hits)

        def log_engine_initialized(self) -> None:
            pass

    return PrefixCacheLogger
