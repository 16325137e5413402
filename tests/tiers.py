"""The test tiers, a pytest plugin (registered by conftest.py): ``make test-fast`` runs
``-m "not slow and not model and not browser"``, ``make test`` runs everything.

A test is marked ``model`` when it uses a fixture that loads a transformers model
(:data:`MODEL_FIXTURES`, directly or through another fixture), ``browser`` when it uses one
that launches Chromium (:data:`BROWSER_FIXTURES`); any test can carry the marks itself, and a
whole module opts in with a module-level ``pytestmark = pytest.mark.model`` (or ``slow`` /
``browser``). A run whose ``-m`` excludes a mark does not even import the modules so marked
(their top-level imports, e.g. torch, never run), and fails a test that imports transformers
or Playwright without its mark.

Property tests run fewer examples in a run that excludes ``slow`` (the fast tier): the
hypothesis profile ``fast`` (loaded there unless ``--hypothesis-profile`` names one) runs a
quarter of hypothesis' default, and a test that names its own count writes
``@settings(max_examples=examples(400))``, which scales it the same way (400 in ``make test``,
100 in ``make test-fast``). ``make test`` runs hypothesis' derandomized ``ci`` profile (the same
examples every run, so the gate does not flake); ``make test-stress`` runs every property test with
random seeds and 20× the examples (profile ``stress``) to search for new counterexamples.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

#: The fast tier's share of every property test's examples (``make test`` runs them all).
FAST_SHARE = 0.25
settings.register_profile("fast", max_examples=round(settings.get_profile("default").max_examples * FAST_SHARE))
#: ``make test-stress``: random seeds, ``TAGFER_STRESS`` (default 20) × every test's examples.
#: ``make test`` loads hypothesis' own ``ci`` profile (derandomized: the gate is reproducible).
settings.register_profile(
    "stress", max_examples=settings.get_profile("default").max_examples * int(os.environ.get("TAGFER_STRESS", "20")),
    deadline=None, suppress_health_check=list(HealthCheck), print_blob=True,
)

#: Fixtures that build or load a transformers model: a test using one (directly or through
#: another fixture) is marked ``model``.
MODEL_FIXTURES = frozenset({"tiny_vlm_dir", "tiny_vlm", "train_tiny_dir"})
#: Fixtures that launch Chromium: a test using one is marked ``browser``.
BROWSER_FIXTURES = frozenset({"browser"})
#: Modules a fast-tier test must not import (what ``model`` and ``browser`` tests need).
_HEAVY = {"transformers": "model", "playwright": "browser"}
_MODULE_MARK = re.compile(r"^pytestmark\s*=.*$", re.M)


def examples(n: int) -> int:
    """A property test's example count ``n``, scaled like the loaded profile's default (hypothesis'
    default 100): ``n`` in the full run, a quarter of it (at least 10) in the fast tier."""
    share = settings.default.max_examples / settings.get_profile("default").max_examples
    return n if share == 1 else max(10, round(n * share))


_PROFILE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if "slow" in _excluded_marks(config) and not config.getoption("hypothesis_profile", None):
        config.stash[_PROFILE] = settings.get_current_profile_name()
        settings.load_profile("fast")
    config.addinivalue_line("markers", "model: builds or loads a (tiny) transformers model; not in make test-fast")
    config.addinivalue_line("markers", "browser: drives Chromium through Playwright; not in make test-fast")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PROFILE in config.stash:  # the profile is process-wide: give back the one found (for in-process runs)
        settings.load_profile(config.stash[_PROFILE])


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
