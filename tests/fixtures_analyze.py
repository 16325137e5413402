"""Session fixtures for the analyze tests (imported by conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def facs_analyzer(mp_detector):
    """The default analyzer (facs engine, face frame) on the session's MediaPipe detector."""
    from tagfer.explainer.analyze import Analyzer

    return Analyzer(detector=mp_detector)


@pytest.fixture(scope="session")
def astronaut_analysis(facs_analyzer, astronaut_path):
    (a,) = facs_analyzer.analyze_image(astronaut_path)
    return a


@pytest.fixture(scope="session")
def grace_analysis(facs_analyzer, grace_path):
    (a,) = facs_analyzer.analyze_image(grace_path)
    return a
