"""TAG reward as a verl custom reward function (does not import verl).

verl's reward managers call ``compute_score(data_source=..., solution_str=...,
ground_truth=..., extra_info=...)`` once per response, with ``ground_truth``
taken from ``reward_model.ground_truth`` of the parquet row and ``extra_info``
from its ``extra_info`` column; a dict result must hold ``"score"`` (the
scalar reward) and every other key is logged per sample. Configure::

    reward.custom_reward_function.path=pkg://tagfer.integrations.verl   # verl 0.9.1
    reward.custom_reward_function.name=compute_score
    # optional RewardConfig overrides, passed through as keyword arguments (not schema
    # keys, so only as Hydra command-line additions, never inside a merged YAML):
    +reward.custom_reward_function.reward_kwargs.matching=one_to_one

``ground_truth`` may be

* a label string (``"happiness"``): no AU boxes, so ``R_AU`` is skipped;
* a dict ``{"label": ..., "au_boxes": [[x1, y1, x2, y2], ...], "aus": [...], "trace_aus": [...]}``;
* that dict as a JSON string.

``au_boxes`` / ``aus`` / ``trace_aus`` missing from ``ground_truth`` are also looked up in
``extra_info``. The keyword ``f1_reference`` (``activated``, default, or ``trace``) picks the
reference set of the F1 variant: ``aus`` (every activated AU) or ``trace_aus`` (the AUs the
sample's trace names; see :mod:`tagfer.integrations.trl`). ``extra_info["reward_config"]`` (a dict, or JSON) overrides
:class:`~tagfer.traces.rewards.RewardConfig` fields for that sample, and so do the
keyword arguments (verl's ``reward_kwargs``); keyword arguments that are not
RewardConfig fields are ignored, unknown names in ``reward_config`` raise.

The returned dict always has the same keys, all floats (verl stacks them per
key): ``score`` (Eq. 5 total, a skipped ``R_AU`` adding 0), ``r_au`` (0.0
when skipped), ``au_scored`` (1.0 if ``R_AU`` was computed, else 0.0),
``r_ans``, ``acc`` (= ``r_ans``), ``r_fmt``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

from tagfer.traces.rewards import DEFAULT_CONFIG, RewardConfig, reward_breakdown

__all__ = ["compute_score", "read_ground_truth"]

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(RewardConfig))
_SPECIAL_NAME = re.compile(r"[A-Za-z0-9_]+")


def _strip_trailing_special(text: str) -> str:
    """Drop chat special tokens left at the end when a response was decoded
    without ``skip_special_tokens`` (``<|im_end|>``, ``<|endoftext|>``)."""
    # Works on an end index and slices once: a reply of a million "<|x|>" stays linear.
    end = len(text.rstrip())
    while text.endswith("|>", 0, end):
        i = text.rfind("<|", 0, end)
        if i < 0 or not _SPECIAL_NAME.fullmatch(text, i + 2, end - 2):
            break
        end = i
        while end and text[end - 1].isspace():
            end -= 1
    return text[:end]


def _maybe_json(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        if text.lstrip().startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"ground_truth looks like JSON but does not parse: {e}") from e
    return value


def read_ground_truth(ground_truth: Any, extra_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Normalise verl's ``ground_truth`` (+ ``extra_info`` fallbacks) to ``{"label", "au_boxes", "aus", "trace_aus"}``."""
    gt = _maybe_json(ground_truth)
    if isinstance(gt, str):
        out: dict[str, Any] = {"label": gt, "au_boxes": None, "aus": None, "trace_aus": None}
    elif isinstance(gt, Mapping):
        if "label" not in gt:
            raise ValueError(f"ground_truth dict needs a 'label' key, got keys {sorted(gt)}")
        out = {"label": gt["label"], "au_boxes": gt.get("au_boxes"), "aus": gt.get("aus"), "trace_aus": gt.get("trace_aus")}
    else:
        raise ValueError(f"ground_truth must be a label, a dict or a JSON object, got {type(ground_truth).__name__}")
    if isinstance(extra_info, Mapping):
        for key in ("au_boxes", "aus", "trace_aus"):
            if out[key] is None and extra_info.get(key) is not None:
                out[key] = extra_info[key]
    return out


def _config(extra_info: Any, kwargs: Mapping[str, Any]) -> RewardConfig:
    overrides = {k: v for k, v in kwargs.items() if k in _CONFIG_FIELDS}
    if isinstance(extra_info, Mapping) and extra_info.get("reward_config") is not None:
        per_sample = _maybe_json(extra_info["reward_config"])
        if not isinstance(per_sample, Mapping):
            raise ValueError("extra_info['reward_config'] must be a dict or a JSON object")
        overrides.update(per_sample)
    return DEFAULT_CONFIG.replace(overrides) if overrides else DEFAULT_CONFIG


def compute_score(
    data_source: Any = None,
    solution_str: Any = "",
    ground_truth: Any = None,
    extra_info: Any = None,
    f1_reference: str = "activated",
    **kwargs: Any,
) -> dict[str, float]:
    """verl custom reward: TAG's ``R = R_AU + R_ans + R_fmt`` (Eq. 5) and its parts."""
    if f1_reference not in ("activated", "trace"):
        raise ValueError(f"f1_reference must be 'activated' or 'trace', got {f1_reference!r}")
    truth = read_ground_truth(ground_truth, extra_info if isinstance(extra_info, Mapping) else None)
    cfg = _config(extra_info, kwargs)
    aus = truth["aus"]
    if cfg.au_reward == "f1" and f1_reference == "trace":
        if truth["trace_aus"] is None:
            raise ValueError("f1_reference=trace needs the trace's AUs: a 'trace_aus' list in ground_truth or extra_info")
        aus = truth["trace_aus"]
    text = solution_str
    if isinstance(text, str):
        text = _strip_trailing_special(text)
    b = reward_breakdown(text, truth["label"], truth["au_boxes"], cfg, aus)
    return {
        "score": float(b.total),
        "r_au": float(b.r_au) if b.r_au is not None else 0.0,
        "au_scored": 0.0 if b.r_au is None else 1.0,
        "r_ans": float(b.r_ans),
        "acc": float(b.r_ans),
        "r_fmt": float(b.r_fmt),
    }
