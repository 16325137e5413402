"""Commands of this area register on tagfer.cli._app.app (being written)."""

from tagfer.cli._app import app, console, out_console  # noqa: F401
