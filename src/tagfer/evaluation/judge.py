"""LLM-as-judge A/B comparison of two systems' explanations (paper §5, preference study).

Pairs
    A :class:`Pair` holds one image and the responses of two systems, ``a`` and ``b``
    (e.g. TAG and a baseline), for the same image. :func:`make_pairs` joins two
    prediction files by id and samples ``n`` pairs (paper: 100 per set) with a seed.
    The same pairs file feeds the human study (:mod:`tagfer.evaluation.study`).

Judging
    For every pair and each of ``repeats`` seeds (paper: 3) the judge model sees, as
    in the paper, the original prompt the two systems answered (``$task_prompt``: the
    pair's ``prompt`` when it has one, else the unified TAG prompt every model is
    evaluated with), the image and the two responses *anonymised* (shown only as "A" and "B") in an order
    drawn at random per (pair, seed) — so the order effect can be measured. It answers
    strict JSON: three 1–5 rubric scores per response (visual faithfulness, anatomical
    precision, logical coherence) and ``overall`` A/B/tie (prompt templates
    ``judge_system`` / ``judge_user``, overridable). The ground-truth label is *not*
    shown (*choice*: the rubric rates the reasoning; ``$label`` is available to a custom
    template). The judge may reason before its JSON, so its reply budget is
    :data:`JUDGE_MAX_NEW_TOKENS` (1024) by default, configurable (``gen``,
    ``tagfer judge --max-new-tokens``); a truncated reply is a recorded failure.

Robustness
    :func:`parse_judgment` accepts the JSON object anywhere in the reply (code fences,
    preambles) but checks it strictly: both responses, the three criteria as integers
    1–5 (integral floats and digit strings are accepted), ``overall`` in A/B/tie. A reply
    that fails, or a failed request, is retried up to ``max_retries`` times with another
    sampling seed; then it is recorded as a failure (``kind``: ``no_json``,
    ``bad_json``, ``invalid_scores``, ``invalid_overall``, or the request's error kind)
    and left out of the aggregate.

Aggregate (:func:`aggregate`)
    Per pair, the share of its valid repeats won by ``a``, by ``b`` and tied; the
    preference percentages are the means of those shares over pairs (each pair weighs
    the same whatever its number of valid repeats). Mean rubric scores per system and
    criterion over all valid judgments. Order effect: among valid non-tie verdicts, the
    share won by the response shown first vs. second (an unbiased judge is near 50/50).

Judgment record (one JSON line per pair × seed, resumable by ``key``)::

    {"key": "<pair id>#<seed>", "pair_id": str, "seed": int, "shown": ["a", "b"],
     "ok": bool, "winner": "a" | "b" | "tie" | null, "winner_shown": "A" | "B" | "tie" | null,
     "scores": {"a": {criterion: int}, "b": {...}} | null, "reason": str | null,
     "raw": str | null, "attempts": int, "error": {"kind", "message"} | null, "judge": str}
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from tagfer.core.jobs import resume_from
from tagfer.core.jsonl import JsonlWriter, read_jsonl
from tagfer.data.teacher import json_objects
from tagfer.models.prompts import load_prompt, render, tag_prompt

__all__ = [
    "CRITERIA",
    "Pair",
    "make_pairs",
    "read_pairs",
    "write_pairs",
    "shown_order",
    "JudgeParseError",
    "parse_judgment",
    "judge_prompt",
    "default_task_prompt",
    "task_prompt_text",
    "JUDGE_MAX_NEW_TOKENS",
    "run_judge",
    "aggregate",
]

CRITERIA = ("visual_faithfulness", "anatomical_precision", "logical_coherence")
JUDGE_MAX_NEW_TOKENS = 1024  # room for a reasoning judge to finish its JSON
SYSTEMS = ("a", "b")


@dataclass
class Pair:
    """Two systems' responses on one image. JSON::

    {"id": str, "image": str (path), "label": str | null (truth, never shown),
     "a": {"name": str, "text": str}, "b": {"name": str, "text": str},
     "prompt": str | null}     # the prompt both systems answered (null: the unified TAG prompt)

    :func:`make_pairs` takes ``prompt`` from the prediction records (``tagfer eval`` stores each
    record's prompt key and the prompt text once per run). When the two systems answered
    different prompts, ``prompt`` is null and each side carries its own (``a["prompt"]``,
    ``b["prompt"]``); the judge is then shown both, in the order the responses are shown.
    """

    id: str
    image: str
    a: dict[str, str]
    b: dict[str, str]
    label: str | None = None
    prompt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Pair":
        for k in ("id", "image", "a", "b"):
            if k not in d:
                raise ValueError(f"pair record lacks {k!r}")
        for k in ("a", "b"):
            if not isinstance(d[k], dict) or not isinstance(d[k].get("text"), str):
                raise ValueError(f"pair {d['id']}: system {k} must be an object with a name and a text")
        prompt = d.get("prompt")
        return cls(id=str(d["id"]), image=str(d["image"]), a=dict(d["a"]), b=dict(d["b"]), label=d.get("label"),
                   prompt=prompt if isinstance(prompt, str) else None)


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    return [Pair.from_json(r) for r in read_jsonl(path)]


def write_pairs(pairs: Iterable[Pair], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
    return p


def make_pairs(
    preds_a: str | os.PathLike,
    preds_b: str | os.PathLike,
    n: int | None = 100,
    seed: int = 0,
    name_a: str | None = None,
    name_b: str | None = None,
    dataset: str | None = None,
    image_dir: str | os.PathLike | None = None,
) -> list[Pair]:
    """Pairs of responses for the images both prediction files answered (no error), ``n`` sampled with ``seed``.

    Images stored as bytes (FER2013-style CSV) have no path: with ``dataset`` (source
    spec) and ``image_dir`` they are written there as PNG files; otherwise they are skipped.
    """
    prompts: dict[str, dict[str, str | None]] = {}

    def load(path):
        out = {}
        for r in read_jsonl(path):
            key, text = r.get("prompt"), r.get("prompt_text")
            if isinstance(key, str) and isinstance(text, dict) and isinstance(text.get("user"), str):
                prompts.setdefault(key, {"system": text.get("system"), "user": text["user"]})
            if r.get("error") is None and isinstance(r.get("output"), str):
                out[str(r["id"])] = r
        return out

    ra, rb = load(preds_a), load(preds_b)

    def prompt_of(rec: dict[str, Any]) -> str | None:
        text = prompts.get(rec.get("prompt")) if isinstance(rec.get("prompt"), str) else None
        return task_prompt_text(text["system"], text["user"]) if text else None

    na = name_a or next((r.get("model") for r in ra.values()), None) or "a"
    nb = name_b or next((r.get("model") for r in rb.values()), None) or "b"
    common = sorted(set(ra) & set(rb))
    need_bytes = [i for i in common if not (ra[i].get("image") or rb[i].get("image"))]
    written: dict[str, str] = {}
    if need_bytes and dataset and image_dir:
        from tagfer.data.sources import open_source  # lazy (start-up time): PIL

        d = Path(image_dir)
        d.mkdir(parents=True, exist_ok=True)
        want = set(need_bytes)
        for split in sorted({ra[i].get("split", "test") for i in need_bytes}):
            for src in open_source(dataset, split=split):
                if src.id in want and src.image_bytes is not None:
                    p = d / (re.sub(r"[^A-Za-z0-9_.-]+", "_", src.id) + ".png")
                    p.write_bytes(src.image_bytes)
                    written[src.id] = str(p)
    usable = [i for i in common if ra[i].get("image") or rb[i].get("image") or i in written]
    if n is not None and n < len(usable):
        usable = sorted(random.Random(seed).sample(usable, n))
    pairs = []
    for i in usable:
        pa, pb = prompt_of(ra[i]), prompt_of(rb[i])
        a = {"name": str(na), "text": ra[i]["output"]}
        b = {"name": str(nb), "text": rb[i]["output"]}
        if pa is not None and pb is not None and pa != pb:  # the systems answered different prompts: keep each
            a["prompt"], b["prompt"] = pa, pb
        pairs.append(Pair(id=i, image=ra[i].get("image") or rb[i].get("image") or written[i], a=a, b=b,
                          label=ra[i].get("label"), prompt=pa if pa == pb or pb is None else pb if pa is None else None))
    return pairs


def shown_order(pair_id: str, seed: int) -> tuple[str, str]:
    """The order in which systems a/b are shown as "A"/"B" for this pair and seed (deterministic)."""
    return ("a", "b") if random.Random(f"{seed}:{pair_id}").random() < 0.5 else ("b", "a")


# ------------------------------------------------------------------------------------ parsing
class JudgeParseError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _score(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        x = v
    elif isinstance(v, float) and v.is_integer():
        x = int(v)
    elif isinstance(v, str) and v.strip().isdigit():
        x = int(v.strip())
    else:
        return None
    return x if 1 <= x <= 5 else None


def _check(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise JudgeParseError("bad_json", "the reply's JSON is not an object")
    keys = {str(k).strip().upper(): v for k, v in obj.items()}
    scores: dict[str, dict[str, int]] = {}
    for slot in ("A", "B"):
        block = keys.get(slot)
        if not isinstance(block, dict):
            raise JudgeParseError("invalid_scores", f"no score object for response {slot}")
        crit = {str(k).strip().lower().replace(" ", "_"): v for k, v in block.items()}
        out = {}
        for c in CRITERIA:
            s = _score(crit.get(c))
            if s is None:
                raise JudgeParseError("invalid_scores", f"response {slot}: {c} must be an integer 1-5, got {crit.get(c)!r}")
            out[c] = s
        scores[slot] = out
    overall = keys.get("OVERALL")
    ov = str(overall).strip().strip(".").lower() if isinstance(overall, str) else None
    mapping = {"a": "A", "b": "B", "tie": "tie", "response a": "A", "response b": "B", "explanation a": "A", "explanation b": "B"}
    if ov not in mapping:
        raise JudgeParseError("invalid_overall", f"overall must be A, B or tie, got {overall!r}")
    reason = keys.get("REASON")
    return {"scores": scores, "overall": mapping[ov], "reason": reason if isinstance(reason, str) else None}


def parse_judgment(text: str | None) -> dict[str, Any]:
    """Strictly validated judgment ``{"scores": {"A": {...}, "B": {...}}, "overall": "A"|"B"|"tie", "reason"}``.

    Raises :class:`JudgeParseError` (``kind`` as in the module docstring).
    """
    if not isinstance(text, str) or "{" not in text:
        raise JudgeParseError("no_json", "the reply holds no JSON object")
    first_error: JudgeParseError | None = None
    found = False
    for obj in json_objects(text):  # the one extractor, shared with the teacher
        found = True
        try:
            return _check(obj)
        except JudgeParseError as e:
            first_error = first_error or e
    if not found:
        raise JudgeParseError("bad_json", "the reply's JSON cannot be decoded (truncated or malformed)")
    assert first_error is not None
    raise first_error


# ------------------------------------------------------------------------------------ running
def judge_prompt(system: str | Path | None = None, user: str | Path | None = None) -> tuple[str, str]:
    """The (system, user template) pair of the judge; each overridable by a file."""
    return load_prompt("judge_system", system), load_prompt("judge_user", user)


def task_prompt_text(system: str | None, user: str) -> str:
    """A model's prompt as the judge reads it: the system text, a blank line, the user text."""
    return f"{system}\n\n{user}" if system else user


def default_task_prompt() -> str:
    """The unified TAG prompt (system, then user text) that every evaluated model answers."""
    system, user = tag_prompt()
    return task_prompt_text(system, user)


def _render(user_tpl: str, pair: Pair, order: tuple[str, str], task_prompt: str = "") -> str:
    first, second = (getattr(pair, order[0]), getattr(pair, order[1]))
    shown = pair.prompt
    if shown is None and isinstance(first.get("prompt"), str) and isinstance(second.get("prompt"), str):
        shown = f"Response A answered:\n{first['prompt']}\n\nResponse B answered:\n{second['prompt']}"
    return render(
        user_tpl, response_a=first["text"], response_b=second["text"], label=pair.label or "",
        task_prompt=shown or task_prompt,
    )


def _record(pair: Pair, seed: int, order: tuple[str, str], judge: str) -> dict[str, Any]:
    return {
        "key": f"{pair.id}#{seed}", "pair_id": pair.id, "seed": seed, "shown": list(order), "ok": False, "winner": None,
        "winner_shown": None, "scores": None, "reason": None, "raw": None, "attempts": 0, "error": None, "judge": judge,
    }


def _apply(rec: dict[str, Any], text: str | None, error: dict[str, Any] | None) -> None:
    rec["attempts"] += 1
    rec["raw"] = text
    if error is not None:
        rec["error"] = {"kind": str(error.get("kind", "request_failed")), "message": str(error.get("message", ""))[:300]}
        return
    try:
        j = parse_judgment(text)
    except JudgeParseError as e:
        rec["error"] = {"kind": e.kind, "message": e.message}
        return
    order = rec["shown"]
    slot_to_sys = {"A": order[0], "B": order[1]}
    rec.update(
        ok=True, error=None, reason=j["reason"], winner_shown=j["overall"],
        winner="tie" if j["overall"] == "tie" else slot_to_sys[j["overall"]],
        scores={slot_to_sys[s]: v for s, v in j["scores"].items()},
    )


def run_judge(
    pairs: Sequence[Pair],
    backend: Any,
    out: str | os.PathLike,
    *,
    repeats: int = 3,
    seed: int = 0,
    gen: dict[str, Any] | None = None,
    prompt: tuple[str, str] | None = None,
    max_retries: int = 2,
    judge_name: str = "",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    task_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Judge every pair ``repeats`` times (seeds ``seed .. seed+repeats-1``); resumable JSONL in ``out``.

    ``gen``: decoding settings (*choice*: temperature 0.7, so that repeats differ; top-p 1.0,
    :data:`JUDGE_MAX_NEW_TOKENS` new tokens); the repeat's seed is sent as the sampling seed,
    retries use other seeds. ``task_prompt``: the original prompt shown to the judge for
    pairs without their own (default: :func:`default_task_prompt`).
    Returns every judgment record now in ``out`` (old and new).
    """
    from tagfer.models.backends import GenerationConfig, GenRequest  # lazy (start-up time): PIL

    system, user_tpl = prompt or judge_prompt()
    task = default_task_prompt() if task_prompt is None else task_prompt
    g = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": JUDGE_MAX_NEW_TOKENS, **(gen or {})}
    done = resume_from(out, "key")  # the one resume set-up; a failed judgment stays recorded
    todo: list[tuple[Pair, int]] = [(p, seed + r) for p in pairs for r in range(repeats) if f"{p.id}#{seed + r}" not in done]
    recs = {f"{p.id}#{s}": _record(p, s, shown_order(p.id, s), judge_name) for p, s in todo}
    by_key = {f"{p.id}#{s}": p for p, s in todo}
    with JsonlWriter(out) as writer:
        keys = list(recs)
        for attempt in range(max_retries + 1):
            if not keys:
                break

            def requests() -> Iterator[Any]:
                for k in keys:
                    rec, pair = recs[k], by_key[k]
                    yield GenRequest(id=k, user=_render(user_tpl, pair, tuple(rec["shown"]), task), image=pair.image, system=system)

            failed = []
            cfg = GenerationConfig(temperature=g["temperature"], top_p=g["top_p"], max_new_tokens=g["max_new_tokens"])
            for res in _generate_seeded(backend, requests(), cfg, recs, attempt):
                rec = recs[res.id]
                _apply(rec, res.text, res.error)
                if rec["ok"] or attempt == max_retries:
                    writer.write(rec)
                    if on_record:
                        on_record(rec)
                else:
                    failed.append(res.id)
            keys = failed
    return list(read_jsonl(out))


def _generate_seeded(backend: Any, requests: Iterable[Any], cfg: Any, recs: dict[str, dict[str, Any]], attempt: int) -> Iterator[Any]:
    """Run ``requests`` grouped by seed (the backend takes one GenerationConfig per call)."""
    groups: dict[int, list[Any]] = {}
    for req in requests:
        groups.setdefault(recs[req.id]["seed"] + 1000 * attempt, []).append(req)
    for s, reqs in groups.items():
        yield from backend.generate(reqs, replace(cfg, seed=s))


# ------------------------------------------------------------------------------------ aggregate
def aggregate(records: Iterable[dict[str, Any]], names: dict[str, str] | None = None) -> dict[str, Any]:
    """Preference percentages, mean rubric scores and the order effect (module docstring)."""
    recs = list(records)
    ok = [r for r in recs if r.get("ok")]
    per_pair: dict[str, list[str]] = {}
    for r in ok:
        per_pair.setdefault(r["pair_id"], []).append(r["winner"])
    shares = {"a": 0.0, "b": 0.0, "tie": 0.0}
    for votes in per_pair.values():
        for v in ("a", "b", "tie"):
            shares[v] += votes.count(v) / len(votes)
    npairs = len(per_pair)
    pref = {k: (100.0 * v / npairs if npairs else None) for k, v in shares.items()}
    means: dict[str, dict[str, float | None]] = {}
    for sysk in SYSTEMS:
        means[sysk] = {}
        for c in CRITERIA:
            vals = [r["scores"][sysk][c] for r in ok]
            means[sysk][c] = sum(vals) / len(vals) if vals else None
        allv = [v for v in means[sysk].values() if v is not None]
        means[sysk]["mean"] = sum(allv) / len(allv) if allv else None
    decisive = [r for r in ok if r["winner_shown"] in ("A", "B")]
    first = sum(1 for r in decisive if r["winner_shown"] == "A")
    failures: dict[str, int] = {}
    for r in recs:
        if not r.get("ok"):
            k = (r.get("error") or {}).get("kind", "unknown")
            failures[k] = failures.get(k, 0) + 1
    majority = {"a": 0, "b": 0, "tie": 0}
    for votes in per_pair.values():
        counts = {v: votes.count(v) for v in ("a", "b", "tie")}
        top = [v for v, c in counts.items() if c == max(counts.values())]
        majority[top[0] if len(top) == 1 else "tie"] += 1
    return {
        "systems": names or {},
        "n_pairs": npairs,
        "n_judgments": len(recs),
        "n_valid": len(ok),
        "failures": failures,
        "preference_pct": pref,
        "majority_pairs": majority,
        "mean_scores": means,
        "order_effect": {
            "decisive": len(decisive),
            "first_shown_wins_pct": 100.0 * first / len(decisive) if decisive else None,
            "second_shown_wins_pct": 100.0 * (len(decisive) - first) / len(decisive) if decisive else None,
            "ties": len(ok) - len(decisive),
        },
        "seeds": sorted({r["seed"] for r in recs}),
    }
