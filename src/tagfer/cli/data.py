"""``tagfer build``, ``tagfer export``, ``tagfer stats``: building TAG data (Algorithm 1) and shipping it to trainers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from tagfer.cli._app import app, console, layered_config, out_console, usage_error

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


class BuildStatus:
    """The live one-line status of ``tagfer build`` (rich), folded from the build's ``on_result`` events:
    items done, accepted, rejected, format retries, eliminations, teacher requests and their rate."""

    def __init__(self, console: Any, enabled: bool = True):
        self.console, self.enabled = console, enabled
        self.accepted = self.rejected = self.retries = self.eliminations = self.requests = 0
        self.t0 = time.monotonic()
        self._live: Any = None

    def update(self, kind: str, record: dict[str, Any]) -> None:
        """One written line (``kind``: accepted | rejected); counts come from its record."""
        info = record.get("meta", record) if kind == "accepted" else record
        self.accepted += kind == "accepted"
        self.rejected += kind != "accepted"
        self.retries += int(info.get("retries") or 0)
        self.eliminations += int(info.get("eliminations") or 0)
        self.requests += int(info.get("requests") or 0)

    def line(self) -> str:
        dt = max(1e-9, time.monotonic() - self.t0)
        return (f"done {self.accepted + self.rejected}  accepted {self.accepted}  rejected {self.rejected}  "
                f"retries {self.retries}  eliminations {self.eliminations}  requests {self.requests}  {self.requests / dt:.1f} req/s")

    def __rich__(self) -> Any:
        from rich.text import Text  # lazy: keeps `tagfer --help` fast

        return Text(self.line())

    def __enter__(self) -> "BuildStatus":
        if self.enabled:
            from rich.live import Live  # lazy: keeps `tagfer --help` fast

            self._live = Live(self, console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
            if not self.console.is_terminal:  # rich leaves the last frame unterminated off a terminal
                self.console.line()


# Options of `tagfer build` default to None ("not given"): the only defaults are BuildConfig's (docs/data.md),
# and layered_config() applies explicit flag > --config file > default.
@app.command("build")
def build_cmd(
    source: Optional[List[str]] = typer.Option(None, "--source", "-s", help="Dataset spec, repeatable: rafdb:DIR, ferplus:DIR, affectnet:DIR, generic:CSV_OR_DIR (options after '?', e.g. ferplus:DIR?vote=majority). Required here or in --config."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (accepted.jsonl, rejected.jsonl, images/); re-running resumes. Required here or in --config."),
    endpoint: Optional[List[str]] = typer.Option(None, "--endpoint", "-e", help="OpenAI-compatible base URL, repeatable (one per GPU server; default http://127.0.0.1:8000/v1)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name sent to the server (default: the server's first model)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="openai (the endpoints, default) | openai:URL[,URL] | hf:PATH (in-process transformers) | vllm:PATH | facs (offline FACS engine)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to build from (default train, as the paper)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: process only this shard of the ids (hash of the id); N machines, one each (default 0/1)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", min=1, help="Total concurrent requests (paper: 512)."),
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
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=16, help="Max new tokens per teacher reply (default 1024)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Temperature of the first try (default 0)."),
    retry_temperature: Optional[float] = typer.Option(None, "--retry-temperature", min=0.0, help="Temperature of every format retry and elimination round (default 0.7; the first request uses --temperature)."),
    prompt_dir: Optional[Path] = typer.Option(None, "--prompt-dir", help="Folder with your own teacher_quality/trace/candidates/trace_noau.txt (missing ones: packaged)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Stop after this many new items (trial runs)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="JSON object of BuildConfig fields (docs/data.md); an option given on the command line wins over the file, the file over the defaults."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live status line."),
    format_retry: Optional[str] = typer.Option(None, "--format-retry", help="Format retries: repeat (default, the paper: the same inputs again) | feedback (problems appended); both sampled at --retry-temperature."),
    min_tags: Optional[int] = typer.Option(None, "--min-tags", min=0, help="Fewest AU tags a trace must hold when it has an AU list (default 0; the paper lets the teacher select none)."),
    au_threshold: Optional[float] = typer.Option(None, "--au-threshold", min=0.0, max=1.0, help="Activation threshold: AUs scoring at least this are activated (B_AU, R_AU targets). Default: tagfer.au.aus.AUConfig."),
    au_candidate_threshold: Optional[float] = typer.Option(None, "--au-candidate-threshold", min=0.0, max=1.0, help="Confidence an activated AU needs to enter the teacher's top-K AU list. Default: tagfer.au.aus.AUConfig."),
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
        usage_error("no dataset: give --source (or \"sources\" in --config)")
    if not fields.get("out"):
        usage_error("no output folder: give --out (or \"out\" in --config)")
    try:
        cfg = BuildConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        usage_error(f"bad build config: {e}")
    try:
        with BuildStatus(console, enabled=progress) as status:
            summary = run_build(cfg, on_result=status.update)
    except (FileNotFoundError, ValueError) as e:
        usage_error(str(e))
    except ItemError as e:  # e.g. the teacher server cannot be reached to discover the model name
        usage_error(f"{e.kind}: {e.message}")
    s = summary.to_json()
    out_console.print(
        f"accepted {s['accepted']}  rejected {s['rejected']}  (this run: {s['processed']} items, {s['already_done']} already done, "
        f"{s['excluded']} excluded, {s['other_shard']} in other shards; {s['requests']} requests, {s['requests_per_s']} req/s)"
    )
    if s["reasons"]:
        out_console.print("rejections: " + ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])))
    if summary.exit_code:
        console.print(
            f"[yellow]{summary.failed} item(s) could not be processed[/yellow] (teacher/transport errors or internal failures, "
            f"recorded as retryable in {cfg.out}): run the same command again to retry them"
        )
        raise typer.Exit(1)


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
    image_side: int = typer.Option(224, "--image-side", min=0, help="Longer image side of every exported image (paper: 224; 0 keeps the originals). The training config's image_side must match (export-llamafactory / export-verl check)."),
    image_format: str = typer.Option("jpeg", "--image-format", help="jpeg (q95, small) | png (lossless): the files every format points to or embeds."),
) -> None:
    """Write LLaMA-Factory ShareGPT + dataset_info.json, HF datasets/parquet (TRL) and verl parquet from a build."""
    from tagfer.data.export import export  # lazy: keeps `tagfer --help` fast
    from tagfer.models.vlm import ImagePolicy  # lazy (start-up time): PIL

    try:
        extra = {"nobbox_mode": nobbox_mode} if nobbox_mode is not None else {}
        s = export(build_dir, to, fmt, embed_images=embed_images, nobbox=nobbox, per_source=per_source, system_prompt=system_prompt, user_prompt=user_prompt,
                   image_policy=ImagePolicy(side=image_side), image_format=image_format, **extra)
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
    from tagfer.data.stats import write_stats  # lazy: keeps `tagfer --help` fast

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
