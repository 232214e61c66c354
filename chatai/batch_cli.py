"""``chatai batch``: submit prompt files to a gateway and fetch the results, from any laptop.

It is a client of the gateway's OpenAI-compatible Files and Batches API, built on the official
``openai`` SDK (``client.files``, ``client.batches``; no broker, no cluster access), with the API
key from ``--api-key`` or ``CHATAI_API_KEY`` and the address from ``--base-url`` or
``CHATAI_BASE_URL``. Input is OpenAI batch JSONL, or plain prompts one a
line, which become chat requests for ``--model``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import openai
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from broker_config.terminal import print_rows
from broker_config.timing import wait_until
from gateway.batches.states import TERMINAL

app = typer.Typer(help="Batch jobs: submit prompt files, watch progress, download results.", no_args_is_help=True)
err = Console(stderr=True)

BaseUrl = Annotated[Optional[str], typer.Option("--base-url", envvar="CHATAI_BASE_URL",
                                                help="Gateway URL, e.g. https://llm.example.org (env CHATAI_BASE_URL).")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="CHATAI_API_KEY", show_default=False,
                                               help="API key (env CHATAI_API_KEY).")]


T = TypeVar("T")


class Gateway:
    """An OpenAI SDK client of /v1/files and /v1/batches; errors become a clear message and exit 1."""

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float = 60.0) -> None:
        if not api_key:
            err.print("[red]No API key: pass --api-key or set CHATAI_API_KEY.[/]")
            raise typer.Exit(2)
        base = (base_url or "http://127.0.0.1:8000").rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.client = openai.OpenAI(base_url=base, api_key=api_key, timeout=timeout)

    def call(self, action: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run one SDK call; a failure is printed in one line (method, path, status, the
        gateway's message) and ends the command with exit 1."""
        try:
            return action(*args, **kw)
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            message = body.get("message") or exc.response.text[:300]
            err.print(f"[red]{exc.request.method} {exc.request.url.path} failed ({exc.status_code}): {message}[/]")
        except openai.APIConnectionError as exc:
            err.print(f"[red]Cannot reach the gateway at {self.client.base_url}: {type(exc.__cause__ or exc).__name__}[/]")
        raise typer.Exit(1)

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.call(self.client.batches.retrieve, batch_id).to_dict()

    def download(self, file_id: str, dest: Path) -> int:
        data = self.call(self.client.files.content, file_id).content
        dest.write_bytes(data)
        return data.count(b"\n")


def to_batch_lines(text: str, model: str | None, max_tokens: int | None,
                   temperature: float | None) -> tuple[list[str], str]:
    """The upload and its endpoint: JSONL passes through; plain prompts become chat requests.

    A file is taken as OpenAI batch JSONL when its first non-blank line is a JSON object with a
    custom_id; every line then goes as is (the gateway reports bad ones in the error file).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise typer.BadParameter("the input file has no lines")
    try:
        first = json.loads(lines[0])
    except ValueError:
        first = None
    if isinstance(first, dict) and "custom_id" in first:
        return lines, str(first.get("url") or "/v1/chat/completions")
    if not model:
        raise typer.BadParameter("plain prompts need --model (the model to run them on)")
    out = []
    width = len(str(len(lines)))
    for n, prompt in enumerate(lines, start=1):
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        out.append(json.dumps({"custom_id": f"prompt-{n:0{width}d}", "method": "POST",
                               "url": "/v1/chat/completions", "body": body}))
    return out, "/v1/chat/completions"


def _counts(b: dict[str, Any]) -> tuple[int, int, int]:
    c = b.get("request_counts") or {}
    return c.get("completed", 0), c.get("failed", 0), c.get("total", 0)


PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is no terminal


def wait(gw: Gateway, batch_id: str, poll: float = 1.0, quiet: bool = False,
         every: float = PROGRESS_EVERY) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar on stderr; without a terminal (a log, a
    pipe, CI), a line every ``every`` seconds and at each change of status instead."""
    if not err.is_terminal:
        return _wait_lines(gw, batch_id, poll, quiet, every)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=quiet, transient=False) as progress:
        task = progress.add_task("validating", total=None, failed=0)

        def ended() -> dict[str, Any] | None:
            b = gw.batch(batch_id)
            done, failed, total = _counts(b)
            progress.update(task, description=b["status"], completed=done + failed, total=total or None,
                            failed=failed)
            return b if b["status"] in TERMINAL else None

        return wait_until(ended, timeout=None, what="the batch to end", every=poll)


def _wait_lines(gw: Gateway, batch_id: str, poll: float, quiet: bool, every: float) -> dict[str, Any]:
    start = time.monotonic()
    last = {"at": float("-inf"), "status": None}

    def ended() -> dict[str, Any] | None:
        b = gw.batch(batch_id)
        now = time.monotonic()
        if not quiet and (b["status"] != last["status"] or now - last["at"] >= every):
            done, failed, total = _counts(b)
            err.print(f"{batch_id}: {b['status']} {done + failed}/{total} done, {failed} failed "
                      f"({now - start:.0f} s)", soft_wrap=True, markup=False, highlight=False)
            last.update(at=now, status=b["status"])
        return b if b["status"] in TERMINAL else None

    return wait_until(ended, timeout=None, what="the batch to end", every=poll)


def write_results(gw: Gateway, b: dict[str, Any], out: Path) -> None:
    if b.get("output_file_id"):
        n = gw.download(b["output_file_id"], out)
        err.print(f"{n} results written to {out}")
    else:
        err.print("no results to write")
    if b.get("error_file_id"):
        errors = out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")
        n = gw.download(b["error_file_id"], errors)
        err.print(f"[yellow]{n} failed requests written to {errors}[/]")


def _summary(b: dict[str, Any]) -> str:
    done, failed, total = _counts(b)
    return f"{b['id']}  {b['status']}  {done}/{total} completed, {failed} failed"


@app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="OpenAI batch JSONL, or one prompt a line.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model for plain prompts.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write results here (implies --wait).")] = None,
    wait_: Annotated[bool, typer.Option("--wait", help="Wait for the batch, showing progress, then write results.")] = False,
    max_tokens: Annotated[Optional[int], typer.Option(help="max_tokens for plain prompts.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="temperature for plain prompts.")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 1.0,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Upload FILE, start a batch, and (with --wait or -o) wait for it and write the results."""
    lines, endpoint = to_batch_lines(file.read_text(encoding="utf-8"), model, max_tokens, temperature)
    gw = Gateway(base_url, api_key)
    data = ("\n".join(lines) + "\n").encode()
    name = file.name if file.suffix == ".jsonl" else file.name + ".jsonl"
    uploaded = gw.call(gw.client.files.create, file=(name, data, "application/jsonl"), purpose="batch")
    b = gw.call(gw.client.batches.create, input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                completion_window="24h").to_dict()
    typer.echo(b["id"])
    if not (wait_ or output):
        err.print(f"submitted {len(lines)} requests; follow with: chatai batch status {b['id']}")
        return
    b = wait(gw, b["id"], poll)
    err.print(_summary(b))
    write_results(gw, b, output or file.with_name(file.stem + ".results.jsonl"))
    if b["status"] != "completed":
        raise typer.Exit(1)


@app.command("status")
def status(batch_id: str, watch: Annotated[bool, typer.Option("--wait", help="Follow until it ends.")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print the batch object.")] = False,
           base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Show a batch's status and counts."""
    gw = Gateway(base_url, api_key)
    b = wait(gw, batch_id) if watch else gw.batch(batch_id)
    typer.echo(json.dumps(b, indent=2) if as_json else _summary(b))


@app.command("list")
def list_(limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
          base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """List your batches, newest first."""
    gw = Gateway(base_url, api_key)
    rows = []
    for b in (b.to_dict() for b in gw.call(gw.client.batches.list, limit=limit).data):
        done, failed, total = _counts(b)
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(b["created_at"]))
        rows.append([b["id"], b["status"], str(done), str(failed), str(total), created])
    print_rows(Console(), ["id", "status", "completed", "failed", "total", "created"], rows,
               right=("completed", "failed", "total"))


@app.command("cancel")
def cancel(batch_id: str, base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Cancel a batch: nothing new starts; finished results stay downloadable."""
    gw = Gateway(base_url, api_key)
    typer.echo(_summary(gw.call(gw.client.batches.cancel, batch_id).to_dict()))


@app.command("download")
def download(batch_id: str,
             output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Results file.")] = None,
             base_url: BaseUrl = None, api_key: ApiKey = None) -> None:
    """Write a finished batch's results (and its errors next to them)."""
    gw = Gateway(base_url, api_key)
    b = gw.batch(batch_id)
    if b["status"] not in TERMINAL:
        err.print(f"[yellow]{_summary(b)}: not finished yet[/]")
        raise typer.Exit(1)
    write_results(gw, b, output or Path(f"{batch_id}.results.jsonl"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
