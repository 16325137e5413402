"""The training sample record shared by data building, export, training and evaluation.

On disk: JSON Lines, one :class:`TAGSample` per line (``TAGSample.to_json``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TAGSample:
    """One AU-grounded SFT / GRPO sample.

    Schema (JSON object):
      id          str   unique, ``"<source>/<dataset id>"``
      source      str   dataset name: rafdb | ferplus | affectnet | generic | ...
      image       str   path of the image file (absolute, or relative to the data folder)
      label       str   ground-truth label, one of :data:`tagfer.labels.LABELS`
      completion  str   target trace in TAG grammar: ``<think>… <bbox>[x1, y1, x2, y2]</bbox> …</think><answer>label</answer>``
      au_boxes    list[list[int]]  canvas boxes of the detector's activated AUs (R_AU targets; [] = skip R_AU)
      aus         list[int]        activated AU numbers (targets of the F1 variant of R_AU)
      teacher     str   who wrote the trace: a model name, or ``"facs"`` for the offline engine
      split       str   train | val | test
      meta        dict  free-form provenance (retries, eliminations, candidate labels, ...)
    """

    id: str
    source: str
    image: str
    label: str
    completion: str
    au_boxes: list[list[int]] = field(default_factory=list)
    aus: list[int] = field(default_factory=list)
    teacher: str = ""
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TAGSample":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        missing = {"id", "source", "image", "label", "completion"} - known.keys()
        if missing:
            raise ValueError(f"TAGSample record lacks field(s): {', '.join(sorted(missing))}")
        known["au_boxes"] = [[int(v) for v in b] for b in known.get("au_boxes") or []]
        known["aus"] = [int(a) for a in known.get("aus") or []]
        return cls(**known)
