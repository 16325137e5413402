"""``tagfer build``, ``tagfer export``, ``tagfer stats``: building TAG data (Algorithm 1) and shipping it to trainers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from tagfer.cli._app import app, console, out_console


@app.command("build")
def build_cmd(
    source: List[str] = typer.Option(..., "--source", "-s", help="Dataset spec, repeatable: rafdb:DIR, ferplus:DIR, affectnet:DIR, generic:CSV_OR_DIR (options after '?', e.g. ferplus:DIR?vote=majority)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (accepted.jsonl, rejected.jsonl, images/); re-running resumes."),
    endpoint: List[str] = typer.Option(["http://127.0.0.1:8000/v1"], "--endpoint", "-e", help="OpenAI-compatible base URL, repeatable (one per GPU server)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name sent to the server (default: the server's first model)."),
    teacher: str = typer.Option("openai", "--teacher", help="openai (the endpoints) | hf:PATH (in-process transformers) | facs (offline FACS engine)."),
    split: str = typer.Option("train", "--split", help="Split to build from (the paper: train only)."),
    shard: str = typer.Option("0/1", "--shard", help="i/N: process only this shard of the ids (hash of the id); N machines, one each."),
    concurrency: int = typer.Option(512, "--concurrency", "-c", min=1, help="Total concurrent requests (paper: 512)."),
    per_endpoint: int = typer.Option(128, "--per-endpoint", min=1, help="Concurrent requests per endpoint (paper: 128 per GPU)."),
    timeout: float = typer.Option(300.0, "--timeout", min=0.1, help="Seconds per request attempt."),
    request_retries: int = typer.Option(5, "--request-retries", min=0, help="Transport retries per request (429/5xx/timeouts/drops)."),
    top_k: int = typer.Option(3, "--top-k", min=0, help="AUs in the teacher's AU list (paper: 3)."),
    quality: bool = typer.Option(True, "--quality/--no-quality", help="Stage I image-quality judge."),
    max_format_retries: int = typer.Option(2, "--max-format-retries", min=0, help="Re-asks per round after an invalid reply."),
    max_eliminations: int = typer.Option(6, "--max-eliminations", min=0, help="Wrong labels eliminated before giving up (6 = until exhausted)."),
    last_candidate: str = typer.Option("ask", "--last-candidate", help="ask (paper: keep asking with one label left) | stop (reject instead)."),
    no_au: str = typer.Option("noau", "--no-au", help="Images without activated AU: noau (no-AU prompt) | skip (reject)."),
    detector: str = typer.Option("mediapipe", "--detector", help="AU detector: mediapipe | openface:CSV_OR_DIR | table:LONG_CSV."),
    au_workers: int = typer.Option(2, "--au-workers", min=1, help="Threads running the AU detector."),
    image_side: int = typer.Option(224, "--image-side", min=28, help="Longer image side sent to the teacher (paper: 224)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=16, help="Max new tokens per teacher reply."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Temperature of the first try."),
    retry_temperature: float = typer.Option(0.7, "--retry-temperature", min=0.0, help="Temperature of retries and elimination rounds."),
    prompt_dir: Optional[Path] = typer.Option(None, "--prompt-dir", help="Folder with your own teacher_quality/trace/candidates/trace_noau.txt (missing ones: packaged)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Stop after this many new items (trial runs)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="JSON file of BuildConfig fields (command-line options win)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live status line."),
    format_retry: Optional[str] = typer.Option(None, "--format-retry", help="Format retries: repeat (default, the paper: the same request again) | feedback (problems appended, --retry-temperature)."),
    min_tags: Optional[int] = typer.Option(None, "--min-tags", min=0, help="Fewest AU tags a trace must hold when it has an AU list (default 0: the paper lets the teacher select none)."),
    au_threshold: Optional[float] = typer.Option(None, "--au-threshold", min=0.0, max=1.0, help="Activation threshold: AUs scoring at least this are activated (B_AU, R_AU targets). Default: tagfer.aus.AUConfig."),
    au_candidate_threshold: Optional[float] = typer.Option(None, "--au-candidate-threshold", min=0.0, max=1.0, help="Confidence an activated AU needs to enter the teacher's top-K AU list. Default: tagfer.aus.AUConfig."),
) -> None:
    """Build TAG data: quality filter → AU-grounded traces → validation → label elimination (paper Algorithm 1)."""
    from tagfer.build import BuildConfig, run_build

    fields = json.loads(config_file.read_text()) if config_file else {}
    prompts = {}
    if prompt_dir:
        for key in ("quality", "trace", "candidates", "trace_noau"):
            p = prompt_dir / f"teacher_{key}.txt"
            if p.is_file():
                prompts[f"prompt_{key}"] = str(p)
    fields.update(
        sources=list(source), out=str(out), endpoints=list(endpoint), model=model, teacher=teacher, split=split, shard=shard,
        concurrency=concurrency, per_endpoint=per_endpoint, timeout_s=timeout, request_retries=request_retries, top_k=top_k,
        quality=quality, max_format_retries=max_format_retries, max_eliminations=max_eliminations, last_candidate=last_candidate,
        no_au=no_au, detector=detector, au_workers=au_workers, image_side=image_side, max_tokens=max_tokens,
        temperature=temperature, retry_temperature=retry_temperature, limit=limit, **prompts,
    )
    # options left unset keep the BuildConfig defaults (or the --config file's values)
    fields.update({k: v for k, v in (("format_retry", format_retry), ("min_tags", min_tags), ("au_threshold", au_threshold),
                                     ("au_candidate_threshold", au_candidate_threshold)) if v is not None})
    try:
        cfg = BuildConfig(**fields)
    except (TypeError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    from tagfer.errors import ItemError

    try:
        summary = run_build(cfg, progress=progress, console=console)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    except ItemError as e:  # e.g. the teacher server cannot be reached to discover the model name
        console.print(f"[red]error:[/red] {e.kind}: {e.message}")
        raise typer.Exit(2)
    s = summary.to_json()
    out_console.print(
        f"accepted {s['accepted']}  rejected {s['rejected']}  (this run: {s['processed']} items, {s['already_done']} already done, "
        f"{s['excluded']} excluded, {s['other_shard']} in other shards; {s['requests']} requests, {s['requests_per_s']} req/s)"
    )
    if s["reasons"]:
        out_console.print("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])))


@app.command("export")
def export_cmd(
    build_dir: Path = typer.Argument(..., help="A build folder (accepted*.jsonl) or one accepted JSONL file."),
    to: Path = typer.Option(..., "--to", help="Output folder."),
    fmt: List[str] = typer.Option(["all"], "--format", "-f", help="all | llamafactory | hf | verl (repeatable)."),
    embed_images: bool = typer.Option(True, "--embed-images/--no-embed-images", help="verl: embed image bytes in the parquet."),
    nobbox: bool = typer.Option(True, "--nobbox/--no-nobbox", help="Also write the no-bbox ablation variant."),
    nobbox_mode: Optional[str] = typer.Option(None, "--nobbox-mode", help="content (default, the paper: coordinates removed, empty <bbox></bbox> kept) | element (the tags removed too)."),
    per_source: bool = typer.Option(True, "--per-source/--no-per-source", help="Also write per-dataset subsets."),
    system_prompt: Optional[Path] = typer.Option(None, "--system-prompt", help="Override file of the TAG system prompt."),
    user_prompt: Optional[Path] = typer.Option(None, "--user-prompt", help="Override file of the TAG user prompt."),
) -> None:
    """Write LLaMA-Factory ShareGPT + dataset_info.json, HF datasets/parquet (TRL) and verl parquet from a build."""
    from tagfer.export import export

    try:
        extra = {"nobbox_mode": nobbox_mode} if nobbox_mode is not None else {}
        s = export(build_dir, to, fmt, embed_images=embed_images, nobbox=nobbox, per_source=per_source, system_prompt=system_prompt, user_prompt=user_prompt, **extra)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    out_console.print(f"{s.samples} samples exported to {to}")
    for name, n in s.files.items():
        out_console.print(f"  {name}: {n}")


@app.command("stats")
def stats_cmd(
    build_dir: Path = typer.Argument(..., help="A build folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where stats.json and the PNGs go (default: BUILD_DIR/stats)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder for trace lengths (default: whitespace words)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG figures."),
) -> None:
    """Counts by source and class, acceptance/retry/elimination rates, AU statistics, trace lengths (JSON + PNG)."""
    from tagfer.stats import write_stats

    try:
        s = write_stats(build_dir, out, tokenizer, plots)
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2)
    out_console.print(
        f"accepted {s['accepted']} / processed {s['processed']} (acceptance {s['acceptance_rate']:.1%}); "
        f"activated AUs/image {s['aus_per_image']['mean']} (none: {s['activation']['no_activated_rate']:.1%}); "
        f"no-candidate rate {s['candidate_pool']['no_candidate_rate']:.1%} "
        f"(of which activated: {s['activation']['no_candidate_but_activated_rate']:.1%}); "
        f"traces with 3 regions {s['aus_used_per_trace']['exactly_3_rate']:.1%}; "
        f"trace length mean {s['trace_tokens']['mean']} / max {s['trace_tokens']['max']} {s['trace_tokens']['tokenizer']} tokens"
    )
    out_console.print(f"written to {out or Path(build_dir) / 'stats'}")
