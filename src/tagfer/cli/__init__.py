"""The ``tagfer`` command line (typer). Each command wraps a Python API function.

One module per area registers its commands on the shared :data:`app`:
``au`` (AU grounding), ``analyze`` (explanations, web page), ``data`` (building and
exporting TAG data), ``train`` (SFT / GRPO), ``evaluate`` (eval, score, report, judge, study).
Heavy libraries are imported inside the commands, so ``tagfer --help`` stays fast.
"""

from __future__ import annotations

from tagfer.cli._app import app, console, out_console
from tagfer.cli import au as _au  # noqa: F401  (registers commands)
from tagfer.cli import analyze as _analyze  # noqa: F401
from tagfer.cli import data as _data  # noqa: F401
from tagfer.cli import train as _train  # noqa: F401
from tagfer.cli import evaluate as _evaluate  # noqa: F401


def main() -> None:  # pragma: no cover
    app()


__all__ = ["app", "console", "out_console", "main"]
