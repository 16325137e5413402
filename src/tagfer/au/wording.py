"""The sentences both FACS trace writers share: AU regions and looks, the region-check sentence, phrase picking.

Used by the rules-only writer (:func:`tagfer.au.facs.explain`) and the grounded writer
(:func:`tagfer.au.grounded.explain_grounded`); each writer keeps its own impression and
conclusion sentences. Pure (no I/O). Phrasing varies with the input through a checksum of
the face's AU scores (:func:`face_seed`), so the same face always gets the same words.
"""

from __future__ import annotations

import zlib
from typing import Sequence

from tagfer.au.aus import AU_NAMES, AUDetection
from tagfer.traces.trace import format_box

__all__ = ["REGION", "LOOK", "CHECK", "CHECK_PLAIN", "ROLE_SUPPORT", "ROLE_ISOLATED", "ADJ",
           "pick", "face_seed", "check_text"]

# Per AU: the region as a reader would name it, and two appearance descriptions.
REGION: dict[int, str] = {
    1: "inner brows",
    2: "outer brows",
    4: "brows and the space between them",
    5: "upper eyelids",
    6: "cheeks under the eyes",
    7: "lower eyelids",
    9: "bridge and sides of the nose",
    10: "upper lip",
    12: "mouth corners",
    14: "mouth corners",
    15: "mouth corners",
    16: "lower lip",
    17: "chin",
    18: "lips",
    20: "mouth",
    22: "lips",
    23: "lips",
    24: "lips",
    25: "lips",
    26: "jaw and mouth opening",
    28: "lips",
    43: "eyes",
    45: "eyes",
}
LOOK: dict[int, tuple[str, str]] = {
    1: ("the inner ends of the brows are drawn upward, creasing the middle of the forehead",
        "the brows lift at their inner corners, giving them a slanted shape"),
    2: ("the outer parts of the brows arch upward",
        "the brows are raised toward the temples, stretching the lids above the eyes"),
    4: ("the brows are pulled down and together, with furrows between them",
        "the brows sit low and close, bunching the skin above the nose"),
    5: ("the upper lids are raised so that more of the eye white shows",
        "the eyes are opened wide, the upper lids pulled up"),
    6: ("the cheeks are lifted and bunch up beneath the eyes",
        "the skin under the eyes is pushed up, narrowing the eyes from below"),
    7: ("the lids are tightened and the lower lids drawn straight",
        "the eye openings are narrowed by tense lids"),
    9: ("the skin along the nose wrinkles and the nostrils lift",
        "the nose is scrunched, with creases across its bridge"),
    10: ("the upper lip is drawn upward, deepening the folds beside the nose",
         "the upper lip rises and the groove above it shortens"),
    12: ("the lip corners are pulled up and back toward the cheeks",
         "the corners of the mouth turn upward into a curve"),
    14: ("the lip corners tighten inward and small dimples form",
         "the corners of the mouth are tucked in, creating dimples"),
    15: ("the lip corners are pulled downward",
         "the corners of the mouth turn down, lowering the ends of the lips"),
    16: ("the lower lip is pulled down and slightly outward",
         "the lower lip drops, uncovering more of the lower teeth"),
    17: ("the chin boss pushes up and the lower lip is raised",
         "the chin wrinkles as it is pushed upward"),
    18: ("the lips are pushed forward into a pucker",
         "the mouth is rounded and protruding"),
    20: ("the lips are stretched sideways, flattening the mouth",
         "the mouth is pulled wide and flat toward the ears"),
    22: ("the lips funnel outward",
         "the lips are flared forward in a funnel shape"),
    23: ("the lips are tightened and their red margins narrow",
         "the lips look thin and firm"),
    24: ("the lips are pressed firmly together",
         "the mouth is closed with the lips pressed against each other"),
    25: ("the lips are parted",
         "there is a gap between the lips"),
    26: ("the jaw has dropped and the mouth hangs open",
         "the lower jaw is lowered, opening the mouth"),
    28: ("the lips are drawn in over the teeth",
         "the lips are sucked inward and nearly hidden"),
    43: ("the eyes are closed",
         "the eyelids are shut"),
    45: ("the eyelids are closed",
         "the eyes are shut in a blink"),
}
CHECK = (
    "Checking the {region}: {look}. This is AU{au} ({name}) <bbox>{box}</bbox>, detected at {score:.2f}.",
    "Looking at the {region}, {look}; that is AU{au} ({name}) <bbox>{box}</bbox> with confidence {score:.2f}.",
    "In the {region}, {look}, which marks AU{au} ({name}) <bbox>{box}</bbox>, scored {score:.2f}.",
)
CHECK_PLAIN = (
    "Checking the {region}: {look}. This is AU{au} ({name}) <bbox>{box}</bbox>.",
    "Looking at the {region}, {look}; that is AU{au} ({name}) <bbox>{box}</bbox>.",
    "In the {region}, {look}, which marks AU{au} ({name}) <bbox>{box}</bbox>.",
)
ROLE_SUPPORT = (
    "It is a core cue of {label}.",
    "This movement belongs to the {label} pattern.",
    "That fits {label}.",
)
ROLE_ISOLATED = (
    "It stands alone and forms no expression pattern.",
    "On its own this is not enough to signal an emotion.",
)
#: The adjective of each class ("the face looks {adj}").
ADJ = {"anger": "angry", "disgust": "disgusted", "fear": "fearful", "happiness": "happy", "neutral": "neutral",
        "sadness": "sad", "surprise": "surprised"}


def pick(options: Sequence[str], seed: int, k: int) -> str:
    """The phrase of ``options`` for the ``k``-th sentence of a face with checksum ``seed``."""
    return options[(seed + 7 * k) % len(options)]


def face_seed(dets: Sequence[AUDetection]) -> int:
    """A checksum of the face's AU scores (CRC-32): the same face always gets the same phrasing."""
    key = ";".join(f"{d.au}:{d.score:.3f}:{d.active:d}" for d in sorted(dets, key=lambda d: d.au))
    return zlib.crc32(key.encode("ascii"))


def check_text(d: AUDetection, seed: int, k: int, numbers: bool = True) -> str:
    """The ``k``-th region check on ``d``: region, appearance, AU name and its box (and score when
    ``numbers``); the writer appends the sentence on the AU's role."""
    looks = LOOK.get(d.au, (f"the area of AU{d.au} shows movement",) * 2)
    return pick(CHECK if numbers else CHECK_PLAIN, seed, k).format(
        region=REGION.get(d.au, "region"),
        look=pick(looks, seed, k + 1),
        au=d.au,
        name=AU_NAMES.get(d.au, f"AU{d.au}"),
        box=format_box(d.box),
        score=d.score,
    )
