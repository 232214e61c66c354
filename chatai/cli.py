"""The one console command, ``chatai``: each component contributes its own subcommands."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

STACK_COMMANDS = ("scale", "autoscale", "breaker", "status", "batch")  # they use a running `chatai dev` stack
HELP_FLAGS = ("--help", "-h")


def hoist_stack_option(args: list[str]) -> list[str]:
    """``--stack DIR`` anywhere before ``--`` moves to the front, where the ``chatai`` callback
    takes it: ``chatai status --stack DIR`` and ``chatai --stack DIR status`` mean the same
    (the breaker and batch commands have no option of their own for it)."""
    out: list[str] = []
    value: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg == "--stack" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith("--stack="):
            value, i = arg.split("=", 1)[1], i + 1
            continue
        out.append(arg)
        i += 1
    return out if value is None else ["--stack", value, *out]


class ChataiGroup(TyperGroup):
    """The root command: takes ``--stack`` from anywhere and notes a request for help (which
    must neither look for stacks nor print which one it uses)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
        args = hoist_stack_option(list(args))
        ctx.meta["chatai.help"] = any(a in HELP_FLAGS for a in args[: args.index("--") if "--" in args else None])
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=ChataiGroup,
    name="chatai",
    help="Private OpenAI-compatible LLM serving from a Slurm GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    # Plain (click) help for every command: rich's help tables cut option names with "…" at 80
    # columns (`--release-pendi…`), click's layout wraps the descriptions instead.
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,  # locals can hold API keys and passwords
)


def _register() -> None:
    from broker_config.cli import app as broker_app
    from gateway.cli import keys_app, serve

    app.add_typer(broker_app, name="broker")
    app.add_typer(keys_app, name="keys")
    from chatai.batch_cli import app as batch_app

    app.add_typer(batch_app, name="batch")
    app.command("gateway")(serve)
    from circuit_breaker.cli import app as breaker_app

    app.add_typer(breaker_app, name="breaker")
    from slurm_jobs.cli import app as scale_app, autoscale

    app.add_typer(scale_app, name="scale")
    app.command("autoscale")(autoscale)

    from chatai.bench.cli import app as bench_app

    app.add_typer(bench_app, name="bench")
    from gpu_worker.cli import register as register_worker

    register_worker(app)


@app.callback()
def main(
    ctx: typer.Context,
    stack: Annotated[Optional[str], typer.Option(
        "--stack", metavar="DIR", help="The `chatai dev` stack (its --state-dir) that scale, autoscale, breaker, "
        "status and batch use when several run (env CHATAI_STACK; 'none': none). May follow the command too.")] = None,
) -> None:
    """Private OpenAI-compatible LLM serving from a Slurm GPU cluster."""
    if ctx.invoked_subcommand not in STACK_COMMANDS or ctx.meta.get("chatai.help"):
        return
    from chatai.discovery import StackChoiceError, apply_defaults

    # A running `chatai dev` stack's broker, breaker and Slurm (for batch: its URL and key)
    # become these commands' defaults.
    try:
        apply_defaults(ctx.invoked_subcommand, stack, quiet=ctx.invoked_subcommand == "status",
                       client=ctx.invoked_subcommand == "batch")
    except StackChoiceError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    gateway_url: Annotated[Optional[str], typer.Option(envvar="CHATAI_STATUS_GATEWAY_URL",
                                                       help="Gateway base URL for its /health (default: the running chatai dev stack's).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Also show this model.")] = None,
    listen: Annotated[float, typer.Option(help="Most seconds to listen for worker heartbeats.")] = 6.0,
) -> None:
    """Breaker, tunnel, broker queues, workers and Slurm jobs in one view; each part that cannot
    be reached says so in one line. Finds a running `chatai dev` stack by itself."""
    from chatai.status import collect, render

    data = collect(gateway_url=gateway_url, models=list(model or []), listen=listen)
    if as_json:
        import json

        typer.echo(json.dumps(data, indent=2))
    else:
        render(data)


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Gateway port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Deprecated: a key on the command line is visible to every local user (ps). Use CHATAI_DEV_API_KEY or --api-key-file.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File whose first line is the API key to accept (created if new). Default: env CHATAI_DEV_API_KEY, else a generated key.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where logs, keys, the tiny model and stack.json go.")] = Path(".chatai-dev"),
    model: Annotated[Optional[Path], typer.Option(help="Model directory (default: the tiny test model).")] = None,
    served_model_name: Annotated[str, typer.Option(help="Name clients use for the model.")] = "tiny",
    broker: Annotated[str, typer.Option(help="private (a RabbitMQ node of this stack's own), or a shared broker's amqp://HOST:PORT, "
                                        "where the stack creates a vhost and users of its own and removes them on stop.")] = "private",
    broker_node: Annotated[Optional[str], typer.Option(help="rabbitmqctl node name of the shared --broker (default: rabbitmqctl's).")] = None,
    slurm_cpus: Annotated[int, typer.Option(help="CPUs the --slurm node declares (more than the machine has is fine: "
                                            "each worker asks for one).")] = 8,
    demo: Annotated[bool, typer.Option(help="Stream one answer through the stack once it serves.")] = True,
    slurm: Annotated[bool, typer.Option("--slurm", help="Start the worker through a private single-node Slurm (sbatch array).")] = False,
    tunnel: Annotated[Optional[bool], typer.Option("--tunnel/--no-tunnel", help="Reach the broker through a local sshd with the circuit breaker (default: when sshd can run here).")] = None,
    worker_args: Annotated[str, typer.Option(help="More `chatai worker` options for the worker, shell-quoted, e.g. "
                                             "'--tool-call-parser llama3_json --enable-auto-tool-choice' for a "
                                             "--model of that family (docs/worker.md). Default for the tiny "
                                             "model: its Hermes-style tool calling.")] = "",
    gateway_replicas: Annotated[int, typer.Option(min=1, help="Gateway processes on the one port, sharing keys, "
                                                  "limits and batches through a private PostgreSQL (needs Debian's "
                                                  "postgresql package; docs/deploy.md).")] = 1,
) -> None:
    """Run the whole stack on this machine: broker, worker, gateway. Stops on Ctrl-C or SIGTERM.

    The API key to accept comes from CHATAI_DEV_API_KEY or --api-key-file (never the command line,
    which every local user can read); without one, a key is generated and written to stack.json.
    """
    from chatai.devstack.broker_names import BrokerTarget
    from chatai.devstack.stack import DevError, DevStack, resolve_api_key, run

    try:
        BrokerTarget.parse(broker)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--broker") from None
    try:
        api_key = resolve_api_key(flag=api_key, file=api_key_file)
    except DevError as exc:
        raise typer.BadParameter(str(exc)) from None
    if not worker_args and model is None:
        worker_args = TINY_MODEL_WORKER_ARGS
    stack = DevStack(state_dir=state_dir.resolve(), port=port, api_key=api_key, model=model,
                     served_model_name=served_model_name, broker=broker, broker_node=broker_node, tunnel=tunnel,
                     slurm=slurm, slurm_cpus=slurm_cpus, worker_args=shlex.split(worker_args),
                     gateway_replicas=gateway_replicas)
    raise typer.Exit(run(stack, demo=demo))


# The tiny model's chat template writes Hermes-style tool calls (chatai/devstack/tiny_model.py).
TINY_MODEL_WORKER_ARGS = "--tool-call-parser hermes --enable-auto-tool-choice"


@app.command("make-tiny-model")
def make_tiny_model_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Weights seed: same seed, same model.")] = 0,
) -> None:
    """Write a tiny random Llama with a real tokenizer and chat template (tests, demo)."""
    from chatai.devstack.tiny_model import make_tiny_model

    typer.echo(str(make_tiny_model(directory, seed=seed)))


_register()

if __name__ == "__main__":
    app()
