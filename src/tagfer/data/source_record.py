"""What a dataset reader yields: :class:`SourceRecord`, its counters :class:`SourceStats`, split names.

Every reader (:mod:`tagfer.data.readers`, or one a user registers with
:data:`tagfer.data.sources.READERS`) streams :class:`SourceRecord` objects and counts each
one with :func:`_emit`, which also applies the exclusion rule: a record whose label is
:data:`tagfer.core.labels.EXCLUDED` is counted under its reason and skipped unless
``include_excluded=True``.

Split names are canonical (``train``, ``val``, ``test``); :func:`canonical_split` maps the
aliases (``training`` → train; ``valid``/``validation``/``publictest`` → val;
``privatetest`` → test). Which official split each dataset's name means is in
:mod:`tagfer.data.readers`. All names here are importable from :mod:`tagfer.data.sources` too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tagfer.core.imageio import load_image
from tagfer.core.labels import EXCLUDED

__all__ = ["SourceRecord", "SourceStats", "SPLIT_ALIASES", "canonical_split"]


@dataclass
class SourceRecord:
    """One labelled face image of a dataset.

    Schema (``to_json``; image bytes are never serialised)::

      id              str   unique, ``"<source>/<dataset id>"`` (e.g. ``rafdb/train_00001``)
      source          str   rafdb | ferplus | affectnet | generic (or a user-chosen name)
      split           str   train | val | test
      image_path      str | null   absolute path of the image file
      image_bytes     bytes | null encoded image (FER2013 CSV pixels → PNG); excluded from JSON
      original_label  str | int    the dataset's raw label value
      label           str   one of LABELS, or "excluded"
      meta            dict  reader-specific extras (face box, votes, exclusion reason, ...)
    """

    id: str
    source: str
    split: str
    original_label: Any
    label: str
    image_path: str | None = None
    image_bytes: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def excluded(self) -> bool:
        return self.label == EXCLUDED

    @property
    def image(self) -> str | bytes:
        """What :func:`tagfer.core.imageio.load_image` takes: the path, else the bytes."""
        if self.image_path is not None:
            return self.image_path
        if self.image_bytes is not None:
            return self.image_bytes
        raise ValueError(f"{self.id}: record has neither image_path nor image_bytes")

    def load(self, max_side: int = 2048):
        """The decoded image (:class:`tagfer.core.imageio.LoadedImage`); raises ``ImageError``."""
        return load_image(self.image, max_side=max_side)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "split": self.split,
            "image_path": self.image_path,
            "original_label": self.original_label,
            "label": self.label,
            "meta": self.meta,
        }


@dataclass
class SourceStats:
    """Counters a reader updates while streaming (pass one in, read it after).

    ``seen``: annotation rows of the requested split; ``yielded``: records
    produced; ``excluded``: reason → count; ``labels``: label → count of
    usable records.
    """

    seen: int = 0
    yielded: int = 0
    excluded: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)

    @property
    def n_excluded(self) -> int:
        return sum(self.excluded.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "yielded": self.yielded,
            "excluded": dict(self.excluded),
            "n_excluded": self.n_excluded,
            "labels": dict(self.labels),
        }


#: Every accepted split name → its canonical name (train, val, test).
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "publictest": "val",
    "test": "test",
    "privatetest": "test",
}


def canonical_split(split: str) -> str:
    """``"Training"`` → ``"train"`` etc. (:data:`SPLIT_ALIASES`); unknown names raise ``ValueError``."""
    s = SPLIT_ALIASES.get(str(split).strip().lower())
    if s is None:
        raise ValueError(f"unknown split {split!r}: use train, val or test")
    return s


def _emit(rec: SourceRecord, stats: SourceStats | None, include_excluded: bool, reason: str | None = None) -> SourceRecord | None:
    """Count ``rec`` and decide whether the reader yields it."""
    if stats is not None:
        stats.seen += 1
    if rec.label == EXCLUDED:
        reason = reason or rec.meta.get("excluded_reason") or "excluded"
        rec.meta["excluded_reason"] = reason
        if stats is not None:
            stats.excluded[reason] += 1
        if not include_excluded:
            return None
    elif stats is not None:
        stats.labels[rec.label] += 1
    if stats is not None:
        stats.yielded += 1
    return rec
