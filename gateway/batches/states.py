"""The states of a batch and of its lines, named once for the store, the feeder and ``chatai batch``.

A batch is ``ACTIVE`` until it reaches one of the ``TERMINAL`` states. A line is ``OPEN`` until
it has a result (``done`` / ``failed``) or is ``cancelled``; ``IN_FLIGHT`` lines are out on the
broker (see ``gateway/batches/store.py`` for what each line state means).
"""

from __future__ import annotations

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("failed", "completed", "expired", "cancelled")
IN_FLIGHT = ("publishing", "queued")
OPEN = ("pending", "publishing", "queued")
