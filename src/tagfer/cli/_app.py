"""The one typer application every ``tagfer`` command registers on, and the shared consoles."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TAG: Action-Unit-grounded facial expression recognition.")
console = Console(stderr=True)  # progress, warnings, errors
out_console = Console()  # results
