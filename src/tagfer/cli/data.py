"""``tagfer build``, ``tagfer export``, ``tagfer stats``: building TAG data (Algorithm 1) and shipping it to trainers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from tagfer.cli._app import app, console, layered_config, out_console, say, usage_error
from tagfer.cli.progress import JobProgress

#: The ``tagfer build`` options that set the teacher's client (``BuildConfig.client``): option → ClientConfig field.
CLIENT_FLAGS = {
    "endpoint": "endpoints",
    "model": "model",
    "concurrency": "total_concurrency",
    "per_endpoint": "per_endpoint_concurrency",
    "timeout": "timeout_s",
    "request_retries": "max_retries",
    "image_side": "image_side",
}


class BuildNote:
    """The live text after ``tagfer build``'s progress bar, folded from the build's ``on_result`` events:
    accepted, rejected, and (for a served teacher) requests and format retries."""

    def __init__(self, bar: JobProgress):
        self.bar = bar
        self.accepted = self.rejected = self.retries = self.requests = 0

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        info = record.get("meta", record) if kind == "accepted" else record
        self.accepted += kind == "accepted"
        self.rejected += kind != "accepted"
        self.retries += int(info.get("retries") or 0)
        self.requests += int(info.get("requests") or 0)
        self.bar.note(self.text())

    def text(self) -> str:
        t = f"accepted {self.accepted}, rejected {self.rejected}"
        if self.requests:  # an offline teacher sends no request
            t += f"; {self.requests} requests, {self.retries} format retries"
        return t


# Options of `tagfer build` default to None ("not given"): the only defaults are BuildConfig's (docs/data.md),
# and layered_config() applies explicit flag > --config file > default.
@app.command("build", short_help='Build TAG data (paper Algorithm 1).')
def build_cmd(
    source: Optional[List[str]] = typer.Option(None, "--dataset", "-d", metavar="SPEC", help="Dataset spec, repeatable: rafdb:DIR, ferplus:DIR, affectnet:DIR, generic:CSV_OR_DIR (options after '?', e.g. ferplus:DIR?vote=majority). Required here or in --config."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (accepted.jsonl, rejected.jsonl, images/); re-running resumes. Required here or in --config."),
    endpoint: Optional[List[str]] = typer.Option(None, "--endpoint", "-e", metavar="URL", help="OpenAI-compatible base URL, repeatable (one per GPU server; default http://127.0.0.1:8000/v1)."),
    model: Optional[str] = typer.Option(None, "--served-model", help="Model name sent to the server (default: the server's first model)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="openai (the endpoints, default) | openai:URL[,URL] | hf:PATH (in-process transformers) | vllm:PATH | facs (offline FACS engine)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to build from (default train, as the paper)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: process only this shard of the ids (hash of the id); N machines, one each (default 0/1)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="Total concurrent requests (paper: 512)."),
    per_endpoint: Optional[int] = typer.Option(None, "--per-endpoint", min=1, help="Concurrent requests per endpoint (paper: 128 per GPU)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.1, help="Seconds per request attempt (ClientConfig.timeout_s)."),
    request_retries: Optional[int] = typer.Option(None, "--request-retries", min=0, help="Transport retries per request (429/5xx/timeouts/drops)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="AUs in the teacher's AU list (paper: 3)."),
    quality: Optional[bool] = typer.Option(None, "--quality/--no-quality", help="Stage I image-quality judge (default on)."),
    max_format_retries: Optional[int] = typer.Option(None, "--max-format-retries", min=0, help="Re-asks per round after an invalid reply (default 2)."),
    max_eliminations: Optional[int] = typer.Option(None, "--max-eliminations", min=0, help="Wrong labels eliminated before giving up (default 6 = until exhausted)."),
    last_candidate: Optional[str] = typer.Option(None, "--last-candidate", help="ask (default, the paper: keep asking with one label left) | stop (reject instead)."),
    no_au: Optional[str] = typer.Option(None, "--no-au", help="Images without activated AU: noau (default, no-AU prompt) | skip (reject)."),
    detector: Optional[str] = typer.Option(None, "--detector", help="AU detector: mediapipe (default) | openface:CSV_OR_DIR | table:LONG_CSV."),
    au_workers: Optional[int] = typer.Option(None, "--au-workers", min=1, help="Threads running the AU detector (default 2)."),
    image_side: Optional[int] = typer.Option(None, "--image-side", min=28, help="Longer image side sent to the teacher (paper: 224)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=16, help="Max new tokens per teacher reply (default 1024)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Temperature of the first try (default 0)."),
    retry_temperature: Optional[float] = typer.Option(None, "--retry-temperature", min=0.0, help="Temperature of every format retry and elimination round (default 0.7; the first request uses --temperature)."),
    prompt_dir: Optional[Path] = typer.Option(None, "--prompt-dir", help="Folder with your own teacher_quality/trace/candidates/trace_noau.txt (missing ones: packaged)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Stop after this many new items (trial runs)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="JSON object of BuildConfig fields (docs/data.md); an option given on the command line wins over the file, the file over the defaults."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live status line."),
    format_retry: Optional[str] = typer.Option(None, "--format-retry", help="Format retries: repeat (default, the paper: the same inputs again) | feedback (problems appended); both sampled at --retry-temperature."),
    min_tags: Optional[int] = typer.Option(None, "--min-tags", min=0, help="Fewest AU tags a trace must hold when it has an AU list (default 0; the paper lets the teacher select none)."),
    au_threshold: Optional[float] = typer.Option(None, "--au-threshold", min=0.0, max=1.0, help="Activation threshold: AUs scoring at least this are activated (B_AU, R_AU targets). Default: tagfer.au.aus.AUConfig."),
    au_candidate_threshold: Optional[float] = typer.Option(None, "--candidate-threshold", min=0.0, max=1.0, help="Confidence an activated AU needs to enter the teacher's top-K AU list. Default: tagfer.au.aus.AUConfig."),
) -> None:
    """Build TAG data: quality filter → AU-grounded traces → validation → label elimination (paper Algorithm 1).

    Exit code 0 when every item was built or rejected by validation, 1 when some items could not be
    processed (teacher/transport errors, internal failures: recorded as retryable, re-run to retry them),
    2 on bad options or config, or when the build cannot start.
    """
    from tagfer.core.errors import ItemError  # lazy: keeps `tagfer --help` fast
    from tagfer.data.build import BuildConfig, run_build  # lazy (start-up time): httpx, PIL

    prompts = {}
    if prompt_dir:
        for key in ("quality", "trace", "candidates", "trace_noau"):
            p = prompt_dir / f"teacher_{key}.txt"
            if p.is_file():
                prompts[f"prompt_{key}"] = str(p)
    fields = layered_config(config_file, dict(
        sources=list(source) if source else None, out=str(out) if out is not None else None,
        teacher=teacher, split=split, shard=shard, top_k=top_k, quality=quality, max_format_retries=max_format_retries,
        max_eliminations=max_eliminations, last_candidate=last_candidate, no_au=no_au, detector=detector, au_workers=au_workers,
        max_tokens=max_tokens, temperature=temperature, retry_temperature=retry_temperature, limit=limit, format_retry=format_retry, min_tags=min_tags,
        au_threshold=au_threshold, au_candidate_threshold=au_candidate_threshold, **prompts,
    ))
    given = {field: value for field, value in zip(CLIENT_FLAGS.values(), (
        list(endpoint) if endpoint else None, model, concurrency, per_endpoint, timeout, request_retries, image_side)) if value is not None}
    if given:  # a client flag wins over the same field of the file's "client"
        client = fields.get("client") or {}
        fields["client"] = {**client, **given} if isinstance(client, dict) else client  # a bad "client" is reported below
    if not fields.get("sources"):
        usage_error("no dataset: give --dataset (or \"sources\" in --config)")
    if not fields.get("out"):
        usage_error("no output folder: give --out (or \"out\" in --config)")
    try:
        cfg = BuildConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        usage_error(f"bad build config: {e}")
    try:
        with JobProgress("tagfer build", enabled=progress, unit="items") as bar:
            summary = run_build(cfg, on_result=BuildNote(bar), on_event=bar)
    except (FileNotFoundError, ValueError) as e:
        usage_error(str(e))
    except ItemError as e:  # e.g. the teacher server cannot be reached to discover the model name
        usage_error(f"{e.kind}: {e.message}")
    say(build_text(summary))
    if summary.exit_code():
        n = summary.failed + summary.failed_before
        console.print(
            f"[yellow]{n} item(s) could not be processed[/yellow] (teacher/transport errors or internal failures, "
            f"recorded as retryable in {cfg.out}): run the same command again to retry them"
        )
        raise typer.Exit(1)


def build_text(summary) -> str:
    """The people's summary of a build: outcome, this run's counts, rejection reasons; request figures
    only for a teacher that sends requests."""
    m = summary.metric
    lines = [f"accepted {m('accepted')}, rejected {m('rejected')} this run "
             f"({summary.processed} item(s) built, {summary.skipped} already done, {m('excluded')} excluded"
             + (f", {m('other_shard')} in other shards" if m("other_shard") else "") + f"; {summary.elapsed_s:.1f} s)"]
    if m("requests"):
        lines.append(f"teacher: {m('requests')} requests ({m('requests_per_s')}/s), {m('format_retries')} format retries, "
                     f"{m('eliminations')} label eliminations")
    reasons = m("reasons", {})
    if reasons:
        lines.append("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


@app.command("export", short_help='Export a build for LLaMA-Factory, TRL, verl.')
def export_cmd(
    build_dir: Path = typer.Argument(..., help="A build folder (accepted*.jsonl) or one accepted JSONL file."),
    to: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    fmt: List[str] = typer.Option(["all"], "--format", "-f", metavar="FORMAT", help="all | llamafactory | hf | verl (repeatable)."),
    embed_images: bool = typer.Option(True, "--embed-images/--no-embed-images", help="verl: embed image bytes in the parquet."),
    nobbox: bool = typer.Option(True, "--nobbox/--no-nobbox", help="Also write the no-bbox ablation variant."),
    nobbox_mode: Optional[str] = typer.Option(None, "--nobbox-mode", help="empty-tags (default, the paper: coordinates removed, empty <bbox></bbox> kept) | text-only (the tags removed too)."),
    per_source: bool = typer.Option(True, "--per-source/--no-per-source", help="Also write per-dataset subsets."),
    system_prompt: Optional[Path] = typer.Option(None, "--system-prompt", help="Override file of the TAG system prompt."),
    user_prompt: Optional[Path] = typer.Option(None, "--user-prompt", help="Override file of the TAG user prompt."),
    image_side: int = typer.Option(224, "--image-side", min=0, help="Longer image side of every exported image (paper: 224; 0 keeps the originals). The training config's image_side must match (export-llamafactory / export-verl check)."),
    image_format: str = typer.Option("jpeg", "--image-format", help="jpeg (q95, small) | png (lossless): the files every format points to or embeds."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Write LLaMA-Factory ShareGPT + dataset_info.json, HF datasets/parquet (TRL) and verl parquet from a build."""
    from tagfer.data.export import export  # lazy: keeps `tagfer --help` fast
    from tagfer.models.vlm import ImagePolicy  # lazy (start-up time): PIL

    try:
        extra = {"nobbox_mode": nobbox_mode} if nobbox_mode is not None else {}
        with JobProgress("tagfer export", enabled=progress, unit="samples") as bar:
            s = export(build_dir, to, fmt, embed_images=embed_images, nobbox=nobbox, per_source=per_source,
                       system_prompt=system_prompt, user_prompt=user_prompt, on_event=bar,
                       image_policy=ImagePolicy(side=image_side), image_format=image_format, **extra)
    except (FileNotFoundError, ValueError) as e:
        usage_error(str(e))
    say(f"{s.metric('samples')} samples exported to {to} in {s.elapsed_s:.1f} s")
    for name, n in s.metric("files", {}).items():
        say(f"  {name}: {n} rows")


@app.command("stats", short_help='Statistics of a build (JSON + PNG).')
def stats_cmd(
    build_dir: Path = typer.Argument(..., help="A build folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where stats.json and the PNGs go (default: BUILD_DIR/stats)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for trace lengths (default: whitespace words)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG figures."),
) -> None:
    """Counts by source and class, acceptance/retry/elimination rates, AU statistics, trace lengths (JSON + PNG)."""
    from tagfer.data.stats import write_stats  # lazy: keeps `tagfer --help` fast

    try:
        s = write_stats(build_dir, out, tokenizer, plots)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    act, pool = s["activation"], s["candidate_pool"]
    out_console.print(
        f"accepted {s['accepted']} of {s['processed']} processed ({s['acceptance_rate']:.1%})\n"
        f"activated AUs per image: {s['aus_per_image']['mean']} on average; {act['no_activated_rate']:.1%} of images have none\n"
        f"no AU list for the teacher (no confident candidate): {pool['no_candidate_rate']:.1%} of images; "
        f"{act['no_candidate_but_activated_rate']:.1%} of images have activated AUs but none confident enough\n"
        f"traces grounding exactly 3 regions: {s['aus_used_per_trace']['exactly_3_rate']:.1%}\n"
        f"trace length: mean {s['trace_tokens']['mean']}, max {s['trace_tokens']['max']} {s['trace_tokens']['tokenizer']} tokens",
        highlight=False,
    )
    out_console.print(f"written to {out or Path(build_dir) / 'stats'}")
