"""The one typer application every ``tagfer`` command registers on, the shared consoles, and the
precedence rule of commands with a config file (:func:`layered_config`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, NoReturn

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TAG: Action-Unit-grounded facial expression recognition.")
console = Console(stderr=True)  # progress, warnings, errors
out_console = Console()  # results


def usage_error(message: str) -> NoReturn:
    """Print ``message`` and exit 2 (bad arguments or a bad config file)."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def layered_config(config_file: Path | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The values of a command that takes ``--config``: explicit flag > config file > dataclass default.

    ``config_file``: a JSON object of config fields (or None). ``flags``: field name → the
    value of its option, where None means "not given on the command line" (such options are
    declared with default None, so the only defaults are the config dataclass's). The result
    holds the file's keys overridden by every flag that was given; a field in neither is left
    out, so the dataclass supplies its default. A missing or malformed file exits 2.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except OSError as e:
            usage_error(f"cannot read --config {config_file}: {e.strerror or e}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            usage_error(f"--config {config_file} is not valid JSON: {e}")
        if not isinstance(values, dict):
            usage_error(f"--config {config_file} must hold a JSON object of config fields, not {type(values).__name__}")
    values.update({k: v for k, v in flags.items() if v is not None})
    return values
