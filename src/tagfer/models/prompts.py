"""Prompt templates: packaged text files a user can override with their own file.

Templates live in ``tagfer/models/prompts/*.txt``. Placeholders use ``$name`` (``string.Template``)
so that JSON examples with braces need no escaping. The TAG inference prompt (one
system + one user message, the paper's "unified CoT prompt") is used by training,
evaluation and ``tagfer analyze`` alike, so a model sees the same words at every stage.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template


def prompt_names() -> list[str]:
    """Names of every packaged template (TAG inference, teacher stages, LLM judge)."""
    return sorted(p.name[:-4] for p in resources.files("tagfer.models").joinpath("prompts").iterdir() if p.name.endswith(".txt"))


def prompt_path(name: str) -> Path:
    """Path of the packaged template ``name`` (without ``.txt``)."""
    return Path(str(resources.files("tagfer.models") / "prompts" / f"{name}.txt"))


def load_prompt(name: str, override: str | Path | None = None) -> str:
    """Text of template ``name``; ``override`` (a file path) replaces the packaged one."""
    path = Path(override) if override else prompt_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"prompt template not found: {path}")
    return path.read_text(encoding="utf-8").strip()


def render(template: str, **fields: object) -> str:
    """Fill ``$name`` placeholders; a missing field raises ``KeyError`` naming it."""
    return Template(template).substitute({k: str(v) for k, v in fields.items()})


def tag_prompt(system: str | Path | None = None, user: str | Path | None = None) -> tuple[str, str]:
    """The (system, user) text pair of the unified TAG prompt, each overridable by a file."""
    return load_prompt("tag_system", system), load_prompt("tag_user", user)
