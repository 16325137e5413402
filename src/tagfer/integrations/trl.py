"""TAG rewards as TRL ``GRPOTrainer`` reward functions (does not import trl).

TRL (1.16) calls every reward function as
``f(prompts=..., completions=..., completion_ids=..., **columns)`` where each
extra dataset column arrives as a list aligned with ``completions`` (plus a
few trainer objects such as ``trainer_state``, ignored here). A function
returns one ``float`` per completion, or ``None`` to leave it out (TRL turns
``None`` into NaN and its nan-aware sums give it no weight).

Dataset columns read:

* ``label`` (str) — ground-truth expression, for ``r_ans``;
* ``au_boxes`` (list of ``[x1, y1, x2, y2]`` canvas boxes, may be empty) —
  for ``r_au`` (IoU form); no box → ``None`` (skipped, Eq. 3–4);
* ``aus`` (list of AU numbers: every AU the detector activated) — for ``r_au_f1`` (Table 4 variant)
  with ``f1_reference="activated"`` (default);
* ``trace_aus`` (the AUs the sample's trace names, :func:`tagfer.train.data.trace_aus`) — for
  ``r_au_f1`` with ``f1_reference="trace"``.

The F1 variant's reference set is a reading of the paper ("F1 against the sample's annotated
AUs"): ``"activated"`` takes every activated AU of the image (what the words say: the detector
annotates the image), ``"trace"`` only the AUs the teacher chose for the trace (at most 3, from
the top-3 candidate pool). With 5–6 activated AUs per image and a trace naming 3, ``"activated"``
caps F1 near 2·3/(3+6) ≈ 0.67 and rewards naming more AUs; ``"trace"`` can reach 1.

Usage::

    from trl import GRPOConfig, GRPOTrainer
    from tagfer.traces.rewards import RewardConfig
    from tagfer.integrations.trl import make_reward_funcs, reward_weights

    cfg = RewardConfig(matching="paper")
    args = GRPOConfig(..., beta=0.04, loss_type="grpo", reward_weights=reward_weights(cfg))
    trainer = GRPOTrainer(model=..., args=args, reward_funcs=make_reward_funcs(cfg), train_dataset=ds)

Each callable is a module-level class instance carrying a ``__name__``, so it
pickles and TRL logs it as ``rewards/r_au/mean`` etc. The ready-made ones are
``r_au_reward``, ``r_au_f1_reward``, ``r_ans_reward``, ``r_fmt_reward`` and ``tag_reward``:
named apart from the functions :func:`tagfer.r_au`, :func:`tagfer.r_ans`… that they call. The parses of the last
batch are kept, keyed on its *content* (the completion texts, compared by
value, plus canvas and max_boxes): the three reward functions of one step
cost one parse per completion, and a list that was mutated or rebuilt between
calls is parsed afresh, never answered from a stale cache.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from tagfer.traces.rewards import DEFAULT_CONFIG, RewardConfig, r_ans as _r_ans, r_au_batch, r_au_f1 as _r_au_f1
from tagfer.traces.rewards import r_fmt as _r_fmt, score_batch
from tagfer.traces.trace import ParsedTrace, parse_trace

__all__ = [
    "TAGReward",
    "F1_COLUMNS",
    "completion_text",
    "make_reward_funcs",
    "reward_weights",
    "r_au_reward",
    "r_au_f1_reward",
    "r_ans_reward",
    "r_fmt_reward",
    "tag_reward",
]

Component = Literal["r_au", "r_ans", "r_fmt", "total"]
F1Reference = Literal["activated", "trace"]
#: dataset column holding the F1 reference set of each reading.
F1_COLUMNS: dict[str, str] = {"activated": "aus", "trace": "trace_aus"}


def _content_text(content: Any) -> Any:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return content


def completion_text(completion: Any) -> Any:
    """The text of one TRL completion.

    Accepts a plain string, one message ``{"role": ..., "content": ...}``, or a
    conversational list of messages (the assistant messages' contents are
    joined). ``content`` may be a string or a list of parts
    ``{"type": "text", "text": ...}``. Anything else is returned unchanged and
    scores as malformed (``not_text``).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        texts = [
            _content_text(m.get("content"))
            for m in completion
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        ]
        return "".join(t for t in texts if isinstance(t, str))
    return completion


_NOT_TEXT = object()  # cache key of a completion that is not text (it parses as not_text)


def _text_key(text: Any) -> Any:
    """An immutable value standing for what ``parse_trace(text)`` reads (compared with ``==``)."""
    if isinstance(text, (str, bytes, ParsedTrace)):
        return text
    if isinstance(text, bytearray):
        return bytes(text)
    return _NOT_TEXT


# ((canvas, max_boxes), completion texts, parsed traces) of the last call.
_LAST_PARSE: tuple[tuple[int, int], list[Any], list[ParsedTrace]] = ((0, 0), [], [])


def _parse_completions(completions: Sequence[Any] | None, cfg: RewardConfig) -> list[ParsedTrace]:
    """Parse every completion; reuses the last call's parses when the texts are equal (by value)."""
    global _LAST_PARSE
    key = (cfg.canvas, cfg.max_boxes)
    texts = [_text_key(completion_text(c)) for c in completions or ()]
    last_key, last_texts, parsed = _LAST_PARSE
    # list == compares element by element, identical string objects in O(1) each
    if last_key == key and last_texts == texts:
        return parsed
    parsed = [parse_trace(t, cfg.canvas, cfg.max_boxes) if t is not _NOT_TEXT else parse_trace(None) for t in texts]
    _LAST_PARSE = (key, texts, parsed)
    return parsed


def _column(kwargs: dict[str, Any], name: str, n: int, component: str) -> Sequence[Any]:
    if name not in kwargs or kwargs[name] is None:
        raise ValueError(f"{component} needs the dataset column {name!r} (got columns {sorted(kwargs)})")
    col = kwargs[name]
    if len(col) != n:
        raise ValueError(f"column {name!r} has {len(col)} rows for {n} completions")
    return col


class TAGReward:
    """One TAG reward component (or the weighted total) as a TRL reward function."""

    def __init__(self, component: Component = "total", cfg: RewardConfig = DEFAULT_CONFIG, name: str | None = None,
                 f1_reference: F1Reference = "activated"):
        if component not in ("r_au", "r_ans", "r_fmt", "total"):
            raise ValueError(f"component must be r_au, r_ans, r_fmt or total, got {component!r}")
        if f1_reference not in F1_COLUMNS:
            raise ValueError(f"f1_reference must be 'activated' or 'trace', got {f1_reference!r}")
        self.component = component
        self.cfg = cfg
        self.f1_reference = f1_reference
        if name is None:
            if component == "r_au" and cfg.au_reward == "f1":
                name = "r_au_f1"
            elif component == "total":
                name = "tag_reward"
            else:
                name = component
        self.__name__ = name

    def __repr__(self) -> str:
        return f"TAGReward({self.component!r}, name={self.__name__!r}, cfg={self.cfg!r}, f1_reference={self.f1_reference!r})"

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        cfg = self.cfg
        parsed = _parse_completions(completions, cfg)
        n = len(parsed)
        name = self.__name__
        if self.component == "r_fmt":
            return [_r_fmt(p, cfg) for p in parsed]
        if self.component == "r_ans":
            labels = _column(kwargs, "label", n, name)
            return [_r_ans(p, lab, cfg) for p, lab in zip(parsed, labels)]
        if self.component == "r_au":
            if cfg.au_reward == "f1":
                aus = _column(kwargs, F1_COLUMNS[self.f1_reference], n, name)
                return [_r_au_f1(p, a, cfg) for p, a in zip(parsed, aus)]
            boxes = _column(kwargs, "au_boxes", n, name)
            return r_au_batch(parsed, boxes, cfg.matching, cfg.canvas, cfg.au_count)
        labels = _column(kwargs, "label", n, name)
        if cfg.au_reward == "f1":
            out = score_batch(parsed, labels, None, cfg, _column(kwargs, F1_COLUMNS[self.f1_reference], n, name))
        else:
            out = score_batch(parsed, labels, _column(kwargs, "au_boxes", n, name), cfg)
        return [b.total for b in out]


def make_reward_funcs(cfg: RewardConfig = DEFAULT_CONFIG, f1_reference: F1Reference = "activated") -> list[TAGReward]:
    """``[r_au, r_ans, r_fmt]`` for ``GRPOTrainer(reward_funcs=...)``; pair with :func:`reward_weights`.

    With ``cfg.au_reward == "f1"`` the first one is the F1 variant (reads ``aus``, or ``trace_aus`` with
    ``f1_reference="trace"``).
    """
    return [TAGReward(c, cfg, f1_reference=f1_reference) for c in ("r_au", "r_ans", "r_fmt")]


def reward_weights(cfg: RewardConfig = DEFAULT_CONFIG) -> list[float]:
    """``GRPOConfig.reward_weights`` matching :func:`make_reward_funcs` (so TRL's sum is Eq. 5)."""
    return [cfg.w_au, cfg.w_ans, cfg.w_fmt]


r_au_reward = TAGReward("r_au")
r_au_f1_reward = TAGReward("r_au", RewardConfig(au_reward="f1"))
r_ans_reward = TAGReward("r_ans")
r_fmt_reward = TAGReward("r_fmt")
tag_reward = TAGReward("total")
