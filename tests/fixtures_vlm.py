"""Session fixtures for the model tests: one tiny random Qwen2.5-VL built per session (imported by conftest.py).

transformers is imported once per session, here, and only by tests that ask for these fixtures.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """Folder of a tiny random Qwen2.5-VL (model, tokenizer, image processor)."""
    from tagfer.models.tiny import build_tiny_qwen25vl

    return build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny_qwen25vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_dir):
    """The tiny model loaded through :func:`tagfer.models.vlm.load_vlm` (CPU, fp32). Do not train it in place."""
    from tagfer.models.vlm import load_vlm

    return load_vlm(str(tiny_vlm_dir), device="cpu")
