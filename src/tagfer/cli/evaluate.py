"""``tagfer eval | score | report | judge`` and ``tagfer study serve | export``: evaluation with the paper's protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Optional

from rich.table import Table
import typer

from tagfer.cli._app import TYPER, app, console, out_console, say
from tagfer.cli.progress import JobProgress
from tagfer.cli import _serving

study_app = typer.Typer(help="Human A/B preference study (web app on localhost).", **TYPER)
app.add_typer(study_app, name="study")


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(code)


@app.command("eval", short_help="Predict a test set (the paper's protocol).")
def eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="hf:PATH | openai:URL[,URL] | vllm:PATH (a bare path = hf) | facs[:DETECTOR] (offline FACS engine baseline)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Source spec, e.g. rafdb:/data/RAF-DB, ferplus:/data/FERPlus, affectnet:/data/AffectNet."),
    out: Path = typer.Option(..., "--out", "-o", help="Predictions JSON Lines (appended to; resumable)."),
    split: str = typer.Option("test", "--split", help="train | val | test."),
    baseline: bool = typer.Option(False, "--baseline", help="Baseline decoding (paper: top-p 0.9 sampling) instead of TAG's greedy decoding."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Override the temperature (TAG 0, baseline 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Override top-p (baseline 0.9)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Most tokens generated per answer (paper: 512)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (where the backend supports it)."),
    max_boxes: Optional[int] = typer.Option(None, "--max-boxes", min=0, help="Most <bbox> per answer, enforced at inference (default: 3 for TAG as in the paper, none with --baseline)."),
    box_request: Optional[str] = typer.Option(None, "--box-request", help="openai: also ask the server to hold the box limit while decoding: structured_outputs (vLLM >= 0.10.2) | guided_regex (older vLLM). Replies are repaired either way."),
    system_prompt: Optional[Path] = typer.Option(None, "--system-prompt", help="File replacing the unified TAG system prompt."),
    user_prompt: Optional[Path] = typer.Option(None, "--user-prompt", help="File replacing the TAG user prompt."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name stored in the records (default: the spec)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="hf: images per generate call; vllm: chunk size."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="openai: requests in flight (default 512 total, 128 per endpoint)."),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="openai: the model name sent (default: the server's first model)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="openai: environment variable holding the API key (default OPENAI_API_KEY)."),
    max_retries: Optional[int] = typer.Option(None, "--request-retries", min=0, help="openai: transport retries per request (429/5xx/timeouts/drops)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.1, help="openai: seconds per attempt."),
    device: str = typer.Option("auto", "--device", help="hf: auto | cpu | cuda[:N]."),
    image_format: str = typer.Option("png", "--image-format", help="openai: image encoding sent, png | jpeg (jpeg costs ~2.5x less CPU per request)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Predict at most N new images."),
    lenient: bool = typer.Option(False, "--lenient", help="Accept a bare label when a response has no <answer> span."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Re-run images whose earlier record is an error."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over: overwrite --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Predict a test set with one model under the paper's protocol (7 classes, unified TAG prompt).

    Exit code 1 when some items failed (they are recorded; re-run with --retry-errors), 2 on bad arguments.
    """
    from tagfer.data.sources import canonical_split, parse_source_spec  # lazy (start-up time): PIL
    from tagfer.evaluation.eval import BOX_REQUESTS, eval_source, generation_defaults  # lazy (start-up time): PIL
    from tagfer.models.backends import BackendUnavailable, make_backend, parse_spec  # lazy (start-up time): PIL
    from tagfer.models.prompts import tag_prompt  # lazy: keeps `tagfer --help` fast

    try:
        split = canonical_split(split)
        kind_ds, ds_path, _ = parse_source_spec(dataset)
        if not Path(ds_path).exists():
            _fail(f"dataset path {ds_path} does not exist")
        prompt = tag_prompt(system_prompt, user_prompt)
        parse_spec(model)  # a bad or unknown spec is a usage error before anything is loaded
        if box_request is not None and box_request not in BOX_REQUESTS:
            raise ValueError(f"--box-request must be one of {', '.join(BOX_REQUESTS)}, got {box_request!r}")
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        _fail(str(e))
    gen = generation_defaults(baseline, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, max_boxes=max_boxes,
                              box_request=box_request)
    try:  # the registry: every option goes to every kind; a kind ignores those it has no use for
        backend = make_backend(
            model, batch_size=batch_size, device=device, concurrency=concurrency, served_model=served_model,
            api_key=os.environ.get(api_key_env, "") if api_key_env else None, max_retries=max_retries, timeout_s=timeout,
            image_format=image_format,
        )
        getattr(backend, "warm", lambda: None)()  # e.g. the facs engine's detector: fail fast
    except Exception as e:  # missing weights, vLLM not installed, bad URL ...
        _fail(f"cannot build backend {model!r}: {type(e).__name__}: {e}")
    console.print(f"eval {name or model} on {dataset} ({split}); decoding: {decoding_text(gen)}", highlight=False)
    with JobProgress("predicting", enabled=progress, unit="images") as bar:
        acc = {"n": 0, "ok": 0}

        def tick(p) -> None:
            acc["n"] += 1
            acc["ok"] += int(p.pred == p.label)
            bar.note(f"acc {100 * acc['ok'] / acc['n']:.1f}%")

        try:
            summary = eval_source(
                dataset, backend, out, split=split, model=name or model, gen=gen, prompt=prompt,
                resume=not no_resume, retry_errors=retry_errors, lenient=lenient, limit=limit, on_record=tick, on_event=bar,
            )
        finally:
            backend.close()
    say(summary.render(out, noun="image"))
    out_console.print(f"{summary.metric('dataset_size')} images in the split; {summary.throughput:.2f} predictions/s",
                      highlight=False)
    if summary.any_failed:
        raise typer.Exit(1)


def decoding_text(gen: dict) -> str:
    """The decoding settings in words: ``greedy, at most 512 new tokens, at most 3 boxes, seed 0``."""
    t, top_p = gen.get("temperature", 0.0), gen.get("top_p", 1.0)
    parts = ["greedy" if not t else f"sampling at temperature {t:g}" + (f", top-p {top_p:g}" if top_p < 1 else "")]
    parts.append(f"at most {gen.get('max_new_tokens')} new tokens")
    mb = gen.get("max_boxes")
    parts.append("no box limit" if mb is None else f"at most {mb} boxes")
    if gen.get("box_request"):
        parts.append(f"box limit asked of the server ({gen['box_request']})")
    if t:
        parts.append(f"seed {gen.get('seed', 0)}")
    return ", ".join(parts)


def _detector_truth(preds: Path, spec_text: str, cache: Path, dataset: Optional[str], au_threshold: float, progress: bool, label: str):
    from tagfer.au.aus import AUConfig  # lazy: keeps `tagfer --help` fast
    from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL
    from tagfer.evaluation.eval import au_truth  # lazy (start-up time): PIL

    from tagfer.core.jobs import Progress, resume_from  # lazy: keeps `tagfer --help` fast
    from tagfer.core.jsonl import read_jsonl  # lazy: keeps `tagfer --help` fast

    spec = DetectorSpec(kind=spec_text, config=AUConfig(threshold=au_threshold))
    cached = resume_from(cache, "id").done
    total = len({str(r.get("id")) for r in read_jsonl(preds)} - cached)
    with JobProgress(f"AU boxes ({label}: {spec_text})", enabled=progress, total=total, unit="images") as bar:
        return au_truth(preds, spec, cache, dataset=dataset,
                        on_record=lambda r: bar(Progress(r.get("id"), (r.get("error") or {}).get("kind") if r.get("error") else None)))


@app.command("score", short_help='Metrics of predictions, with 95% CIs.')
def score_cmd(
    preds: Path = typer.Argument(..., help="Predictions JSONL written by `tagfer eval`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Score JSON (input of `tagfer report`); default PREDS with .scores.json."),
    detector: Optional[str] = typer.Option(None, "--detector", help="AU detector of training for AU IoU: mediapipe | openface:CSV | table:CSV."),
    au: Optional[Path] = typer.Option(None, "--au", help="Precomputed `tagfer au` JSONL of the test images (instead of --detector)."),
    cross_detector: Optional[str] = typer.Option(None, "--cross-detector", help="Independent detector for cross-detector AU IoU, e.g. openface:/path/openface.csv."),
    cross_au: Optional[Path] = typer.Option(None, "--cross-au", help="Precomputed AU JSONL of the independent detector."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Source spec to re-read images stored as bytes (FERPlus CSV) for the detectors."),
    au_threshold: float = typer.Option(0.3, "--au-threshold", min=0.0, max=1.0, help="AU activation threshold of the detectors."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name shown in reports (default: the model)."),
    train_set: Optional[str] = typer.Option(None, "--train-set", help="Dataset the model was trained on (rows of the cross-dataset table)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Free-form variant tag (ablations)."),
    png: Optional[Path] = typer.Option(None, "--png", help="Confusion-matrix PNG (default: next to --out)."),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    matching: str = typer.Option("paper", "--matching", help="AU IoU box matching: paper (Eq. 3-4) | one_to_one."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Accuracy, per-class recall, macro-F1, confusion matrix, format validity, boxes per answer, AU IoU, cross-detector AU IoU (bootstrap 95% CIs)."""
    from tagfer.evaluation.eval import au_geometries, load_au_jsonl, score_file  # lazy (start-up time): PIL
    from tagfer.evaluation.metrics import Bootstrap  # lazy: keeps `tagfer --help` fast

    if not preds.is_file():
        _fail(f"{preds} not found")
    if out is None:
        out = preds.with_name(preds.name.removesuffix(".jsonl") + ".scores.json")
    if matching not in ("paper", "one_to_one"):
        _fail("--matching must be paper or one_to_one")
    au_map = cross_map = None
    au_source = cross_source = None
    au_geo = cross_geo = None
    try:
        if au is not None:
            au_map, au_source, au_geo = load_au_jsonl(au), str(au), au_geometries(au)
        elif detector:
            cache = out.with_name(f"{preds.stem}.au-{_slug(detector)}.jsonl")
            au_map, au_source = _detector_truth(preds, detector, cache, dataset, au_threshold, progress, "detector"), detector
            au_geo = au_geometries(cache)
        if cross_au is not None:
            cross_map, cross_source, cross_geo = load_au_jsonl(cross_au), str(cross_au), au_geometries(cross_au)
        elif cross_detector:
            cache = out.with_name(f"{preds.stem}.au-{_slug(cross_detector)}.jsonl")
            cross_map, cross_source = _detector_truth(preds, cross_detector, cache, dataset, au_threshold, progress, "cross"), cross_detector
            cross_geo = au_geometries(cache)
        png = png or out.with_suffix(".confusion.png")
        s = score_file(
            preds, out, au=au_map, cross_au=cross_map, au_source=au_source, cross_source=cross_source, name=name,
            train_set=train_set, variant=variant, png=png, bootstrap=Bootstrap(n_boot=n_boot, seed=seed), matching=matching,
            au_geometry=au_geo, cross_geometry=cross_geo,
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(str(e))
    _print_scores(s)
    out_console.print(f"scores → {out}; confusion matrix → {png}")


def _slug(spec: str) -> str:
    import hashlib  # lazy: keeps `tagfer --help` fast

    kind = spec.split(":", 1)[0]
    return kind if ":" not in spec else f"{kind}-{hashlib.blake2b(spec.encode(), digest_size=3).hexdigest()}"


def counts_text(d: Any) -> str:
    """``{"parse": 2, "http_500": 1}`` → ``http_500 1, parse 2``; empty → ``none``."""
    if not d:
        return "none"
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))


def scores_text(scores: Any) -> str:
    """A judge's mean rubric scores in words: ``accuracy 4.2, grounding 3.9`` (``–`` for no valid score)."""
    if not isinstance(scores, dict) or not scores:
        return "–"
    return ", ".join(f"{k} {'–' if v is None else f'{v:.2f}'}" for k, v in scores.items())


def box_limit_text(limit: Any) -> str:
    """The score file's ``box_limit`` in words (a number, a count per mode, or none)."""
    if not limit:
        return "none"
    if isinstance(limit, dict):
        return ", ".join(f"{k} {v}" for k, v in limit.items())
    return str(limit)


def geometry_text(geo: Any) -> str:
    """``{"openface-landmarks": 3000, "mediapipe-regions": 68}`` → ``openface-landmarks 3000, mediapipe-regions 68``."""
    from tagfer.evaluation.report import geometry_label  # lazy: keeps `tagfer --help` fast

    return geometry_label(geo)


def _print_scores(s: dict) -> None:
    def fmt(b):
        if not b or b.get("value") is None:
            return "–"
        ci = b.get("ci")
        return f"{100 * b['value']:.2f}" + (f"  [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    t = Table(title=f"{s['run']['name']} on {s['run']['dataset']} ({s['run']['split']}), n={s['n']}")
    t.add_column("metric")
    t.add_column("% [95% CI]")
    rows = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("format_validity_paper", "format validity (paper's R_fmt rules)"),
            ("format_validity_strict", "format validity (strict grammar)"), ("au_iou", "AU IoU"), ("cross_au_iou", "cross-detector AU IoU"))
    for key, label in rows:
        t.add_row(label, fmt(s.get(key) or (s.get("format_validity") if key == "format_validity_strict" else None)))
    for c, v in s["per_class"].items():
        t.add_row(f"recall {c} (n={v['support']})", "–" if v["recall"] is None else f"{100 * v['recall']:.2f}")
    out_console.print(t)
    hist = s.get("boxes_histogram") or {}
    boxes = ", ".join(f"{k} box{'es' if str(k) != '1' else ''} in {v}" for k, v in sorted(hist.items(), key=lambda kv: (len(str(kv[0])), str(kv[0]))))
    errors = ", ".join(f"{k} {v}" for k, v in sorted((s.get("errors") or {}).items())) or "none"
    out_console.print(f"boxes per answer: {boxes or 'no answer'}; box limit: {box_limit_text(s.get('box_limit'))}; errors: {errors}",
                      highlight=False)
    run = s.get("run") or {}
    for label, key in (("AU IoU", "au_geometry"), ("cross-detector AU IoU", "cross_geometry")):
        if run.get(key):
            out_console.print(f"{label} boxes from: {geometry_text(run[key])}")


@app.command("report", short_help='Paper-style tables from score files.')
def report_cmd(
    runs: List[Path] = typer.Argument(..., help="Score JSON files written by `tagfer score`."),
    out: Path = typer.Option(..., "--out", "-o", help="Markdown report; CSV tables are written next to it."),
    tables: str = typer.Option("main,ablation,cross,details", "--tables", help="Comma-separated: main (Table 1), ablation (Tables 2-4), cross (Table 5), details."),
    title: str = typer.Option("TAG evaluation report", "--title"),
    csv_dir: Optional[Path] = typer.Option(None, "--csv-dir", help="Directory for the CSV tables (default: next to --out)."),
    metric: str = typer.Option("accuracy", "--metric", help="Metric of the main table: accuracy | macro_f1 | au_iou | cross_au_iou | format_validity_paper | format_validity_strict."),
) -> None:
    """Paper-style tables (models × datasets with average, ablation rows, cross-dataset matrix), best bold, second underlined."""
    from tagfer.evaluation.report import load_scores, write_report  # lazy: keeps `tagfer --help` fast

    missing = [str(r) for r in runs if not r.is_file()]
    if missing:
        _fail(f"score file(s) not found: {', '.join(missing)}")
    try:
        md, csvs = write_report(load_scores(runs), out, [t.strip() for t in tables.split(",") if t.strip()], title, csv_dir, metric)
    except (ValueError, json.JSONDecodeError) as e:
        _fail(str(e))
    say(md)  # Markdown as written: no rich markup, no line broken at the terminal width
    say(f"report → {out}; CSV: {', '.join(str(p) for p in csvs)}", err=True)


@app.command("judge", short_help='LLM-as-judge A/B comparison.')
def judge_cmd(
    judge: str = typer.Option(..., "--judge", help="Judge model: openai:URL[,URL] (any OpenAI-compatible VLM server) | hf:PATH | vllm:PATH."),
    out: Path = typer.Option(..., "--out", "-o", help="Judgments JSONL (one line per pair × seed; resumable)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs JSONL (from `tagfer study pairs`)."),
    preds_a: Optional[Path] = typer.Option(None, "--a", help="Predictions of system A (instead of --pairs)."),
    preds_b: Optional[Path] = typer.Option(None, "--b", help="Predictions of system B (instead of --pairs)."),
    name_a: Optional[str] = typer.Option(None, "--name-a"),
    name_b: Optional[str] = typer.Option(None, "--name-b"),
    n: int = typer.Option(100, "--n", min=1, help="Pairs sampled from --a/--b (paper: 100)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Judgments per pair with different seeds (paper: 3)."),
    seed: int = typer.Option(0, "--seed", help="First seed (order randomisation and sampling)."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", min=16, help="Judge reply budget (a reasoning judge needs room before its JSON)."),
    max_retries: int = typer.Option(2, "--max-retries", min=0, help="Re-asks after a malformed reply or failed request."),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="openai: model name sent to the server."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="openai: environment variable holding the API key (default OPENAI_API_KEY)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="openai: requests in flight."),
    system_prompt: Optional[Path] = typer.Option(None, "--system-prompt", help="File replacing the judge system prompt."),
    user_prompt: Optional[Path] = typer.Option(None, "--user-prompt", help="File replacing the judge user template ($task_prompt, $response_a, $response_b, $label)."),
    summary: Optional[Path] = typer.Option(None, "--summary", help="Aggregate JSON (default: <out>.summary.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """LLM-as-judge A/B: anonymised, order randomised per pair and seed, 1-5 rubric scores + overall A/B/tie.

    Exit code 1 when some judgments failed (malformed replies after the retries, failed requests), 2 on bad arguments.
    """
    # lazy (start-up time): multiprocessing, importlib
    from tagfer.evaluation.judge import aggregate, judge_prompt, make_pairs, read_pairs, run_judge
    from tagfer.models.backends import BackendUnavailable, make_backend, parse_spec  # lazy (start-up time): PIL

    try:
        if pairs is not None:
            plist = read_pairs(pairs)
        elif preds_a is not None and preds_b is not None:
            plist = make_pairs(preds_a, preds_b, n=n, seed=seed, name_a=name_a, name_b=name_b)
        else:
            _fail("give --pairs, or both --a and --b")
        prompt = judge_prompt(system_prompt, user_prompt)
        parse_spec(judge)
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        _fail(str(e))
    if not plist:
        _fail("no pairs to judge (no image answered by both systems?)")
    try:
        backend = make_backend(judge, served_model=served_model, concurrency=concurrency,
                               api_key=os.environ.get(api_key_env, "") if api_key_env else None)
    except Exception as e:
        _fail(f"cannot build judge backend {judge!r}: {type(e).__name__}: {e}")
    from tagfer.core.jobs import Progress  # lazy: keeps `tagfer --help` fast

    with JobProgress("judging", enabled=progress, total=len(plist) * repeats, unit="judgments") as bar:
        try:
            recs = run_judge(plist, backend, out, repeats=repeats, seed=seed, prompt=prompt, max_retries=max_retries,
                             gen={"temperature": temperature, "max_new_tokens": max_new_tokens}, judge_name=judge,
                             on_record=lambda r: bar(Progress(r.get("key"), None if r.get("ok", True) else "failed")))
        finally:
            backend.close()
    keys = {f"{p.id}#{seed + r}" for p in plist for r in range(repeats)}
    agg = aggregate([r for r in recs if r["key"] in keys], names={"a": plist[0].a.get("name", "a"), "b": plist[0].b.get("name", "b")})
    summary = summary or out.with_suffix(".summary.json")
    summary.write_text(json.dumps(agg, indent=2), encoding="utf-8")
    p, o = agg["preference_pct"], agg["order_effect"]
    f = lambda v: "–" if v is None else f"{v:.1f}%"  # noqa: E731
    out_console.print(
        f"{agg['n_pairs']} pairs, {agg['n_valid']}/{agg['n_judgments']} valid judgments (failures: {counts_text(agg['failures'])})\n"
        f"preference: {agg['systems']['a']} {f(p['a'])}, {agg['systems']['b']} {f(p['b'])}, tie {f(p['tie'])}\n"
        f"mean scores (1-5): {agg['systems']['a']}: {scores_text(agg['mean_scores']['a'])}; "
        f"{agg['systems']['b']}: {scores_text(agg['mean_scores']['b'])}\n"
        f"order effect: first shown wins {f(o['first_shown_wins_pct'])}, second {f(o['second_shown_wins_pct'])} of {o['decisive']} decisive\n"
        f"summary → {summary}", highlight=False,
    )
    failed = agg["n_judgments"] - agg["n_valid"]
    if failed:  # as eval and au: exit 1 while failed judgments remain in OUT
        console.print(f"[yellow]{failed} judgment(s) failed[/yellow] (recorded in {out} with their error; "
                      "remove those lines to ask again)")
        raise typer.Exit(1)


@study_app.command("pairs", short_help='Sample response pairs of two systems.')
def study_pairs_cmd(
    preds_a: Path = typer.Option(..., "--a", help="Predictions of system A (e.g. TAG)."),
    preds_b: Path = typer.Option(..., "--b", help="Predictions of system B (e.g. a baseline)."),
    out: Path = typer.Option(..., "--out", "-o", help="Pairs JSONL (input of `tagfer judge --pairs` and `tagfer study serve`)."),
    n: int = typer.Option(100, "--n", min=1, help="Pairs sampled (paper: 100 per set)."),
    seed: int = typer.Option(0, "--seed"),
    name_a: Optional[str] = typer.Option(None, "--name-a"),
    name_b: Optional[str] = typer.Option(None, "--name-b"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Source spec to export images stored as bytes (FERPlus CSV)."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Where to write those images (default: <out>_images/)."),
) -> None:
    """Sample pairs of responses (same image, two systems) for the judge and the human study."""
    from tagfer.evaluation.judge import make_pairs, write_pairs  # lazy (start-up time): multiprocessing, importlib

    for p in (preds_a, preds_b):
        if not p.is_file():
            _fail(f"{p} not found")
    pairs = make_pairs(preds_a, preds_b, n=n, seed=seed, name_a=name_a, name_b=name_b, dataset=dataset,
                       image_dir=image_dir or out.with_name(out.stem + "_images"))
    if not pairs:
        _fail("no image was answered by both systems")
    write_pairs(pairs, out)
    out_console.print(f"{len(pairs)} pairs → {out}")
    if len(pairs) < n:
        console.print(f"[yellow]note:[/yellow] {n} pairs asked for, but only {len(pairs)} image(s) have an answer "
                      "(no error) from both systems" + ("" if dataset else
                      "; images stored as bytes are skipped without --dataset"), highlight=False)


@study_app.command("serve", short_help='Serve the A/B study page.')
def study_serve_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="Pairs JSONL (from `tagfer study pairs`)."),
    db: Path = typer.Option(..., "--db", help="SQLite database of the votes (created; resumable)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (keep it local: no accounts, no TLS)."),
    port: int = typer.Option(8765, "--port"),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-evaluator pair order and response order."),
    allowed_host: List[str] = typer.Option([], "--allowed-host", metavar="HOST", help="Also serve requests with this Host name (repeatable; "
                                           "localhost, 127.0.0.1, [::1] and --host always are; '*' turns the check off)."),
    allowed_origin: List[str] = typer.Option([], "--allowed-origin", metavar="ORIGIN", help="Also accept votes posted by pages "
                                             "of this origin, http://host:port (repeatable; the page's own origin always is)."),
    max_evaluators: Optional[int] = typer.Option(None, "--max-evaluators", min=1, help="Most evaluator names in the study "
                                                 "(default: the study app's limit)."),
    registrations_per_client: int = typer.Option(5, "--registrations-per-client", min=1, help="New evaluator names one client "
                                                 "address may register per 10 minutes."),
    max_connections: int = _serving.MAX_CONNECTIONS, header_timeout: float = _serving.HEADER_TIMEOUT,
    keep_alive: float = _serving.KEEP_ALIVE, max_header_kb: int = _serving.MAX_HEADER_KB,
) -> None:
    """Serve the A/B study page: evaluators enter a name, then choose A / B / tie for each pair."""
    from tagfer.core.serving import run as run_server  # lazy (start-up time): uvicorn
    from tagfer.core.trusted_hosts import allowed_hosts, bind_note  # lazy: keeps `tagfer --help` fast
    from tagfer.evaluation.judge import read_pairs  # lazy (start-up time): multiprocessing, importlib
    from tagfer.evaluation.study.app import create_app  # lazy (start-up time): multiprocessing, importlib

    try:
        plist = read_pairs(pairs)
        hosts = allowed_hosts(host, allowed_host)
        conn_limits = _serving.server_limits(max_connections, header_timeout, keep_alive, max_header_kb)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if not plist:
        _fail(f"{pairs} holds no pairs")
    missing = [p.image for p in plist if not Path(p.image).is_file()]
    if missing:
        console.print(f"[yellow]warning:[/yellow] {len(missing)} image(s) not found, e.g. {missing[0]}")
    console.print(f"study of {len(plist)} pairs on http://{host}:{port}  (votes → {db})")
    if note := bind_note(host, allowed_host):
        console.print(f"[yellow]note:[/yellow] {note}")
    limits = {"max_evaluators": max_evaluators} if max_evaluators is not None else {}
    try:
        app_ = create_app(plist, db, seed=seed, allowed_hosts=hosts, allowed_origins=list(allowed_origin),
                          registrations_per_client=registrations_per_client, **limits)
    except ValueError as e:  # a malformed origin
        _fail(str(e))
    run_server(app_, host, port, conn_limits)


@study_app.command("export", short_help='Aggregate the votes: preferences, agreement.')
def study_export_cmd(
    db: Path = typer.Option(..., "--db", help="The study's SQLite database."),
    out: Path = typer.Option(..., "--out", "-o", help="Aggregate JSON."),
) -> None:
    """Preference percentages averaged over evaluators, pairwise agreement and Fleiss' kappa."""
    from tagfer.evaluation.study.db import export  # lazy (start-up time): multiprocessing, importlib

    try:
        agg = export(db, out)
    except FileNotFoundError as e:
        _fail(str(e))
    p, a = agg["preference_pct"], agg["agreement"]
    f = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    out_console.print(
        f"{agg['n_evaluators']} evaluator(s), {agg['n_votes']} votes on {agg['n_pairs']} pairs\n"
        f"preference: {agg['systems']['a']} {f(p['a'])}%, {agg['systems']['b']} {f(p['b'])}%, tie {f(p['tie'])}%\n"
        f"agreement: pairwise {f(a['pairwise_percent'])}%, Fleiss' kappa {f(a['fleiss_kappa'], 3)} ({a['n_pairs_all_rated']} pairs rated by all)\n"
        f"→ {out}"
    )
