"""Tests for tagfer.core.labels: the 7-class label space and the one normaliser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagfer.core.labels import EXCLUDED, LABELS, SYNONYMS, find_labels, label_index, normalize_label

relaxed = settings(deadline=None)


def test_label_space():
    assert LABELS == ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
    assert "contempt" not in LABELS
    assert [label_index(lab) for lab in LABELS] == list(range(7))
    with pytest.raises(ValueError):
        label_index("contempt")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Happiness.", "happiness"),
        ("happy", "happiness"),
        (" ANGRY ", "anger"),
        ("calm", "neutral"),
        ("contempt", EXCLUDED),
        ("Contemptuous!", EXCLUDED),
        ("happiness or sadness", None),
        ("unknown", None),
        ("", None),
        ("   ", None),
        ("...", None),
        ('"Surprised"', "surprise"),
        ("**Fear**", "fear"),
        ("no   emotion", "neutral"),
        ("disgusted face", "disgust"),
        ("Sad\n", "sadness"),
        ("unhappy", "sadness"),
    ],
)
def test_normalize_label(text, expected):
    assert normalize_label(text) == expected


@pytest.mark.parametrize("value", [None, 3, 3.0, b"happy", ["happy"], {"label": "happy"}])
def test_normalize_label_non_strings(value):
    assert normalize_label(value) is None


@pytest.mark.parametrize("form, label", sorted(SYNONYMS.items()))
def test_every_synonym_survives_case_and_punctuation(form, label):
    assert normalize_label(form) == label
    assert normalize_label(f"  {form.upper()}. ") == label
    assert find_labels(form) == [label]


@relaxed
@given(st.text())
def test_normalize_label_is_total(text):
    out = normalize_label(text)
    assert out is None or out in LABELS or out == EXCLUDED
    if out is not None:
        assert normalize_label(out) == out  # canonical names map to themselves
        assert find_labels(text) == [out]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("happiness or sadness", ["happiness", "sadness"]),
        ("I think it is happy, definitely happy.", ["happiness"]),
        ("Not contempt but disgust", [EXCLUDED, "disgust"]),
        ("no emotion at all", ["neutral"]),
        ("the unhappy face", ["sadness"]),
        ("nothing here", []),
        ("", []),
    ],
)
def test_find_labels(text, expected):
    assert find_labels(text) == expected


def test_find_labels_non_string():
    assert find_labels(None) == []  # type: ignore[arg-type]
