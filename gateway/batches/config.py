"""Batch settings, from ``CHATAI_GATEWAY_BATCH_*`` variables.

They live apart from ``GatewaySettings`` so the batch feature can be tuned (and tested with
small limits) without touching the gateway's own settings; paths default to the gateway's
state directory, so one ``--state-dir`` still holds everything.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

DAY = 86_400.0


class BatchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATAI_GATEWAY_BATCH_", extra="ignore")

    db_path: Path | None = None  # None: the gateway database (CHATAI_GATEWAY_DATABASE_URL or its SQLite file)
    files_dir: Path | None = None  # None: state_dir/files

    # Where workers send batch results. None: a durable queue of this database's own,
    # ``chatai.gw.<broker user>.<database id>.batch-results`` (the id lives in the batch
    # database, so a restarted gateway finds its queue again, and gateways sharing a broker never
    # take each other's results). A name given here must be under ``chatai.gw.<broker user>.``.
    results_queue: str | None = None

    # Work: how many lines of one batch may sit in a model queue or on a worker at once. Small
    # enough that a batch never floods the queue (interactive requests overtake it anyway, by
    # priority) and that a cancel has little to chase; large enough to keep workers busy.
    max_in_flight: int = 32
    results_prefetch: int = 256  # unacked result messages the gateway holds at once
    republish_after: float = 6 * 3600.0  # a confirmed line with no result for this long is sent again
    cancel_grace: float = 5.0  # seconds a cancelling batch waits for aborted lines to report back
    # Replicas sharing one database: a batch is driven by one gateway process at a time, which
    # renews its lease every step; another takes the batch over once the lease has run out.
    lease: float = 15.0
    tick: float = 0.5  # dispatcher wake-up period when nothing else wakes it

    # Limits (OpenAI's: 50,000 requests and 200 MB per input file).
    max_lines: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    max_line_bytes: int = 4 * 1024 * 1024  # one request line, as the interactive body limit

    # Retention: batch files are kept only until deleted or expired (privacy).
    input_file_ttl: float = 30 * DAY  # uploaded files, unless expires_after says otherwise
    output_file_ttl: float = 30 * DAY  # output and error files
    batch_retention: float = 30 * DAY  # a finished batch's record, after it ended
    sweep_interval: float = 60.0

    def resolve_files(self, state_dir: Path) -> Path:
        return self.files_dir or state_dir / "files"
