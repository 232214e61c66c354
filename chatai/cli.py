"""The one console command, ``chatai``: each component contributes its own subcommands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="chatai",
    help="Private OpenAI-compatible LLM serving from a Slurm GPU cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold API keys and passwords
)


def _register() -> None:
    from broker_config.cli import app as broker_app
    from gateway.cli import keys_app, serve

    app.add_typer(broker_app, name="broker")
    app.add_typer(keys_app, name="keys")
    from gateway.batch_cli import app as batch_app

    app.add_typer(batch_app, name="batch")
    app.command("gateway")(serve)
    from circuit_breaker.cli import app as breaker_app

    app.add_typer(breaker_app, name="breaker")
    from slurm_jobs.cli import app as scale_app, autoscale

    app.add_typer(scale_app, name="scale")
    app.command("autoscale")(autoscale)

    from gpu_worker.cli import register as register_worker

    register_worker(app)


_register()
