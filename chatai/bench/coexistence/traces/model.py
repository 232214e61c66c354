"""What every trace reader produces: one record per job that ran, and the trace's capacity.

Times are seconds on the trace's own clock (SWF: since the log's start; sacct: Unix time);
only differences matter to the replay. ``width`` is the job's size in the trace's unit
(processors for SWF, GPUs or else nodes for sacct), ``capacity`` the machine's size in that unit.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TraceFormatError(ValueError):
    """A line the reader cannot use: says which file, which line and why."""

    def __init__(self, source: str, line_no: int, reason: str, line: str = "") -> None:
        shown = f": {line.strip()[:120]!r}" if line else ""
        super().__init__(f"{source}:{line_no}: {reason}{shown}")
        self.source, self.line_no, self.reason = source, line_no, reason


class TraceRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: str
    submit: float
    start: float  # when it really started in the trace (SWF without wait times: the submit)
    run_s: float = Field(gt=0)
    requested_s: float = Field(gt=0)  # its time limit; readers fill a missing one by a documented rule
    width: int = Field(gt=0)
    state: str = ""
    partition: str = ""

    @property
    def end(self) -> float:
        return self.start + self.run_s


class Trace(BaseModel):
    """The jobs that ran, and why others were left out (reason -> count), for the report."""

    source: str
    format: str
    unit: str  # "processors", "GPUs" or "nodes"
    capacity: int = Field(gt=0)
    records: list[TraceRecord]
    skipped: dict[str, int] = Field(default_factory=dict)

    @property
    def first_submit(self) -> float:
        return min((r.submit for r in self.records), default=0.0)
