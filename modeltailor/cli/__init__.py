"""The ``modeltailor`` command line: one typer app, one module per command family."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="modeltailor",
    help="Search per-layer compression policies for a model on a target device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help shows JSON examples verbatim ("[null, 8]" is not markup)
)


def _register() -> None:
    # Each command family lives in its own module and registers itself on ``app``.
    from modeltailor.cli import compress, demo, device_agent, family, latency, search, service_cmds  # noqa: F401


def main() -> None:
    """Console-script entry point."""
    import warnings

    # torch's export internals emit deprecation chatter that users cannot act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _register()
    app()
