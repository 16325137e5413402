"""Session fixtures for the evaluate tests (imported by conftest.py).

``tag_answer(label, boxes)`` builds a well-formed TAG response; ``eval_server`` is one
scripted OpenAI-compatible server (``tests/fakeserver.py``) shared by the evaluate tests
(call ``srv.reset(script)`` per test); ``openface_csv_for`` writes an OpenFace-style CSV
(image column + AUxx_r/AUxx_c) for a list of images, for the cross-detector IoU.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

SMILE_BOXES = ([150, 300, 360, 420], [120, 180, 230, 240], [280, 180, 390, 240])


def tag_answer(label: str = "happiness", boxes=SMILE_BOXES) -> str:
    steps = " ".join(f"Region {i}: AU12 <bbox>[{b[0]}, {b[1]}, {b[2]}, {b[3]}]</bbox> looks raised." for i, b in enumerate(boxes))
    return f"<think>The face looks relaxed overall. {steps} Together this suggests {label}.</think>\n<answer>{label}</answer>"


@pytest.fixture(scope="session")
def eval_server(fake_openai):
    return fake_openai(None)


def write_openface_csv(path: Path, images: list[str], aus: dict[int, float]) -> Path:
    cols = ["input", "face", "success"] + [f"AU{a:02d}_r" for a in sorted(aus)] + [f"AU{a:02d}_c" for a in sorted(aus)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for im in images:
            w.writerow([im, 0, 1] + [aus[a] for a in sorted(aus)] + [1 if aus[a] >= 1.0 else 0 for a in sorted(aus)])
    return path


@pytest.fixture(scope="session")
def openface_csv_for():
    return write_openface_csv
