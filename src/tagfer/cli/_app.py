"""The one typer application every ``tagfer`` command registers on, the shared consoles, the global
options (``--version``, ``--verbose``: :func:`quiet_libraries`), and the precedence rule of commands
with a config file (:func:`layered_config`).

Conventions every command follows (tested in tests/test_cli.py and tests/test_docs_walk.py):
``-o/--out`` is always the file or folder the command writes; one flag name per concept
(:data:`FLAGS`); help is plain click text, readable at 80 columns and when piped; people get
sentences, machines get ``--json``; long jobs draw one progress bar (:mod:`tagfer.cli.progress`);
library noise (warnings, download bars, log lines) is hidden unless ``--verbose``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, NoReturn, Optional

import typer
from rich.console import Console

#: typer's settings of every (sub)command group: plain click help (rich panels cut option names at 80 columns).
TYPER = dict(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})

app = typer.Typer(help="TAG: Action-Unit-grounded facial expression recognition.", **TYPER)
console = Console(stderr=True)  # progress, warnings, errors
out_console = Console()  # results (tables, panels)


def say(text: str, *, err: bool = False) -> None:
    """Print plain text as written: no rich markup or highlighting, and no line broken at the
    terminal width (``tagfer report … > x.md``, long paths), on stdout or (``err``) stderr."""
    (console if err else out_console).print(text, markup=False, highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        from tagfer import __version__  # lazy: keeps `tagfer --help` fast

        out_console.print(f"tagfer {__version__}", highlight=False)
        raise typer.Exit()


_SEEN_WARNINGS: set[str] = set()
#: Modules whose warnings are library noise (shown with --verbose).
_LIBRARIES = (r"(transformers|torch|torchvision|trl|peft|accelerate|datasets|huggingface_hub|tokenizers|safetensors|PIL|"
              r"mediapipe|google|absl|tensorflow|ai_edge_litert|numpy|scipy|pyarrow|pandas|matplotlib|httpx|httpcore|"
              r"uvicorn|starlette|fastapi|pydantic|av|skimage|sklearn|yaml)(\.|$)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """A warning as one line, ``warning: <message>``, once per message (no source line, no repeats)."""
    text = str(message).strip()
    if text in _SEEN_WARNINGS:
        return
    _SEEN_WARNINGS.add(text)
    console.print(f"[yellow]warning:[/yellow] {text}", highlight=False, markup=True)


def quiet_libraries(verbose: bool = False) -> None:
    """Quiet by default: library warnings (FutureWarning, DeprecationWarning, their UserWarnings),
    Hugging Face download/map progress bars and transformers' info logs are hidden; tagfer's own
    warnings are printed once each as ``warning: …``. ``verbose`` lets everything through
    (and MediaPipe's C++ log lines, ``TAGFER_VERBOSE``)."""
    warnings.showwarning = _show_warning
    if verbose:
        os.environ["TAGFER_VERBOSE"] = "1"
        warnings.simplefilter("default")
        return
    warnings.simplefilter("default")  # a warning tagfer raises (even through generated code) is shown ...
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ResourceWarning, ImportWarning):
        warnings.filterwarnings("ignore", category=category)  # ... but no library deprecation notice
    warnings.filterwarnings("ignore", module=_LIBRARIES)  # ... nor any warning of the libraries tagfer drives
    warnings.filterwarnings("default", module=r"tagfer(\.|$)")  # tagfer's own, whatever their category
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "datasets" in sys.modules:  # already imported: its switch is read at import
        sys.modules["datasets"].disable_progress_bars()


def default_threads() -> int:
    """Torch/OpenMP threads when ``OMP_NUM_THREADS`` is unset: half the CPUs this process may use,
    at most 4. Measured (README, "Command-line conventions"): on a 2-core machine the tiny SFT
    preset ran 2–3× slower with 2 threads than with 1; tagfer's models on a CPU are small, and
    the other half of the cores is left to image decoding and detector workers."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(4, n // 2))


def set_threads() -> None:
    """Pick a sane torch/OpenMP thread count when the user did not (``OMP_NUM_THREADS`` unset)."""
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(default_threads())
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@app.callback()
def _main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library warnings, download bars and log lines."),
) -> None:
    """TAG: Action-Unit-grounded facial expression recognition. `tagfer COMMAND --help` for each command."""
    quiet_libraries(verbose)
    set_threads()


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
