"""The 7-class label space and the one label normaliser.

Classes (paper §5, contempt removed everywhere)::

    anger, disgust, fear, happiness, neutral, sadness, surprise

:func:`normalize_label` maps free text written by a model, a dataset or a
user to one of those names, to :data:`EXCLUDED` for classes the protocol
drops (contempt), or to ``None`` when the text is not a single known label.
Rules: lower-case; strip surrounding whitespace, quotes, brackets and
punctuation; collapse inner whitespace; then look the text up in
:data:`SYNONYMS`. Accepted forms per class:

=========  ===============================================================
anger      anger, angry, anger/angry, rage, furious, annoyed
disgust    disgust, disgusted, disgusting, disgusted face
fear       fear, fearful, afraid, scared, frightened, terrified
happiness  happiness, happy, joy, joyful, smile, smiling
neutral    neutral, calm, neutrality, no emotion, expressionless
sadness    sadness, sad, sorrow, unhappy, unhappiness
surprise   surprise, surprised, surprising, astonished, shocked, amazed
excluded   contempt, contemptuous
=========  ===============================================================

A string naming two labels ("happiness or sadness") is *not* a label:
:func:`normalize_label` returns ``None`` and :func:`find_labels` lists both.
"""

from __future__ import annotations

import re

LABELS: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")
EXCLUDED = "excluded"

_FORMS: dict[str, tuple[str, ...]] = {
    "anger": ("anger", "angry", "rage", "furious", "annoyed", "anger/angry"),
    "disgust": ("disgust", "disgusted", "disgusting", "disgusted face"),
    "fear": ("fear", "fearful", "afraid", "scared", "frightened", "terrified"),
    "happiness": ("happiness", "happy", "joy", "joyful", "smile", "smiling"),
    "neutral": ("neutral", "calm", "neutrality", "no emotion", "expressionless"),
    "sadness": ("sadness", "sad", "sorrow", "unhappy", "unhappiness"),
    "surprise": ("surprise", "surprised", "surprising", "astonished", "shocked", "amazed"),
    EXCLUDED: ("contempt", "contemptuous"),
}

SYNONYMS: dict[str, str] = {form: label for label, forms in _FORMS.items() for form in forms}

_STRIP = " \t\r\n\"'`.,;:!?()[]{}<>*_-"
_TOKEN = re.compile(r"[a-z]+")


def normalize_label(text: object) -> str | None:
    """Map ``text`` to one of :data:`LABELS`, :data:`EXCLUDED`, or ``None``.

    Integers or other non-strings return ``None`` (dataset codes are mapped by
    the dataset readers, not here).
    """
    if not isinstance(text, str):
        return None
    t = " ".join(text.lower().strip(_STRIP).split())
    if not t:
        return None
    return SYNONYMS.get(t)


def find_labels(text: str) -> list[str]:
    """All distinct labels (incl. :data:`EXCLUDED`) named anywhere in ``text``, in order of appearance."""
    if not isinstance(text, str):
        return []
    low = text.lower()
    tokens = _TOKEN.findall(low)
    found: list[str] = []
    i = 0
    while i < len(tokens):
        two = f"{tokens[i]} {tokens[i + 1]}" if i + 1 < len(tokens) else None
        if two is not None and two in SYNONYMS:
            lab = SYNONYMS[two]
            i += 2
        elif tokens[i] in SYNONYMS:
            lab = SYNONYMS[tokens[i]]
            i += 1
        else:
            i += 1
            continue
        if lab not in found:
            found.append(lab)
    return found


def label_index(label: str) -> int:
    """Index of a canonical label in :data:`LABELS` (raises ``ValueError`` otherwise)."""
    return LABELS.index(label)
