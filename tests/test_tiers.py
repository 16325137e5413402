"""The test tiers (tests/tiers.py): what the fast tier skips, and what it refuses."""

from __future__ import annotations

from hypothesis import settings

import tiers

FILES = {
    # a module marked as a whole is not even imported when its mark is excluded
    "test_heavy": "import pytest\nimport not_installed_heavy_lib\npytestmark = pytest.mark.model\n\ndef test_h():\n    pass\n",
    # a test using a model fixture is marked through the fixture
    "test_fixture": "import pytest\n\n@pytest.fixture\ndef tiny_vlm():\n    return 1\n\ndef test_f(tiny_vlm):\n    assert tiny_vlm\n\ndef test_light():\n    pass\n",
    # an unmarked test importing a model library
    "test_sneaky": "def test_s():\n    import fake_model_lib  # noqa: F401\n",
}


LEAN = ("-p", "tiers", "-p", "no:hypothesispytest", "-p", "no:anyio", "-p", "no:cacheprovider")  # only the plugin under test


def test_fast_tier_selection_and_guard(pytester, monkeypatch):
    pytester.makepyfile(**FILES)
    pytester.makepyfile(fake_model_lib="X = 1\n")
    pytester.syspathinsert()
    monkeypatch.setitem(tiers._HEAVY, "fake_model_lib", "model")
    fast = pytester.runpytest_inprocess(*LEAN, "-m", "not slow and not model and not browser")
    fast.assert_outcomes(passed=1, failed=1, deselected=1)  # test_light passes; test_f deselected; test_heavy never imported
    fast.stdout.fnmatch_lines(["*test_sneaky.py::test_s imported fake_model_lib: mark it @pytest.mark.model*"])
    # the full run imports everything (here: the heavy module's missing import is an error) and runs every test
    full = pytester.runpytest_inprocess(*LEAN, "--continue-on-collection-errors")
    full.assert_outcomes(passed=3, errors=1)


def test_fast_tier_runs_a_quarter_of_the_examples(pytester):
    """The fast tier loads the hypothesis profile ``fast`` (25 examples, not 100) and ``examples(n)``
    scales a test's own count with it; the full run keeps both, and the outer run's profile is restored."""
    pytester.makepyfile(test_counts="from hypothesis import settings\nfrom tiers import examples\n\n"
                        "def test_c():\n    print('COUNTS', examples(400), examples(20), settings.default.max_examples)\n")
    outer = settings.get_current_profile_name()
    fast = pytester.runpytest_inprocess(*LEAN, "-s", "-m", "not slow and not model and not browser")
    fast.stdout.fnmatch_lines(["*COUNTS 100 10 25*"])
    assert settings.get_current_profile_name() == outer
    settings.load_profile("default")  # as in a fresh `make test` process (this one may be the fast tier)
    try:
        full = pytester.runpytest_inprocess(*LEAN, "-s")
    finally:
        settings.load_profile(outer)
    full.stdout.fnmatch_lines(["*COUNTS 400 20 100*"])
