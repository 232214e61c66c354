"""Names derived from a batch: its lines' request ids and its output files' ids.

Both are deterministic: the same line always has the same request id (so a redelivery or a
re-publish is recognised), and finalizing twice (a restart mid-finalize) rewrites the same files.
"""

from __future__ import annotations

import re


def request_id(batch_id: str, line_no: int) -> str:
    return f"{batch_id}.{line_no}"


# ASCII only (str.isdigit() accepts "²", which int() refuses) and bounded, so a line number
# always fits SQLite's integers. Batch ids are "batch_" + 24 hex digits (routes.create_batch).
_REQUEST_ID = re.compile(r"(batch_[0-9a-f]{1,64})\.([1-9][0-9]{0,8})", re.ASCII)


def parse_request_id(rid: str) -> tuple[str, int] | None:
    """(batch id, line number) of a batch line's request id; None for anything else."""
    m = _REQUEST_ID.fullmatch(rid)
    return (m.group(1), int(m.group(2))) if m else None


def output_file_ids(batch_id: str) -> tuple[str, str]:
    suffix = batch_id.removeprefix("batch_")
    return f"file-{suffix}-output", f"file-{suffix}-errors"
