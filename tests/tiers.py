"""The test tiers, a pytest plugin (registered by conftest.py): ``make test-fast`` runs
``-m "not slow and not model and not browser"``, ``make test`` runs everything.

A test is marked ``model`` when it uses a fixture that loads a transformers model
(:data:`MODEL_FIXTURES`, directly or through another fixture), ``browser`` when it uses one
that launches Chromium (:data:`BROWSER_FIXTURES`); any test can carry the marks itself, and a
whole module opts in with a module-level ``pytestmark = pytest.mark.model`` (or ``slow`` /
``browser``). A run whose ``-m`` excludes a mark does not even import the modules so marked
(their top-level imports, e.g. torch, never run), and fails a test that imports transformers
or Playwright without its mark.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

#: Fixtures that build or load a transformers model: a test using one (directly or through
#: another fixture) is marked ``model``.
MODEL_FIXTURES = frozenset({"tiny_vlm_dir", "tiny_vlm", "train_tiny_dir"})
#: Fixtures that launch Chromium: a test using one is marked ``browser``.
BROWSER_FIXTURES = frozenset({"browser"})
#: Modules a fast-tier test must not import (what ``model`` and ``browser`` tests need).
_HEAVY = {"transformers": "model", "playwright": "browser"}
_MODULE_MARK = re.compile(r"^pytestmark\s*=.*$", re.M)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "model: builds or loads a (tiny) transformers model; not in make test-fast")
    config.addinivalue_line("markers", "browser: drives Chromium through Playwright; not in make test-fast")


def _excluded_marks(config: pytest.Config) -> set[str]:
    """Marks the ``-m`` expression excludes outright (``not slow and not model`` → {slow, model})."""
    expr = config.getoption("markexpr", "") or ""
    return set(re.findall(r"\bnot\s+(\w+)", expr))


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing a test module whose module-level ``pytestmark`` names an excluded mark
    (so e.g. ``import torch`` at its top never runs in the fast tier)."""
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    excluded = _excluded_marks(config)
    if not excluded:
        return None
    m = _MODULE_MARK.search(collection_path.read_text(encoding="utf-8"))
    if m and excluded & set(re.findall(r"mark\.(\w+)", m.group(0))):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & MODEL_FIXTURES:
            item.add_marker(pytest.mark.model)
        if names & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


_BEFORE = pytest.StashKey[set]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_BEFORE] = set(sys.modules)  # before the fixtures are set up


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """In a run that excludes ``model``/``browser``, fail a test that imports their libraries
    (in its body or its fixtures) without the mark."""
    before = item.stash.get(_BEFORE, set(sys.modules))
    result = yield
    excluded = _excluded_marks(item.config)
    for mod, mark in _HEAVY.items():
        if mark in excluded and mod in sys.modules and mod not in before:
            pytest.fail(f"{item.nodeid} imported {mod}: mark it @pytest.mark.{mark} (or use a fixture of that tier)", pytrace=False)
    return result
