"""``tagfer train …``: SFT, GRPO, merging, LLaMA-Factory / verl export, training plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tagfer.cli._app import TYPER, app, console, out_console, say

train_app = typer.Typer(help="Train TAG: SFT with LoRA, GRPO with the AU-grounded reward.", **TYPER)
app.add_typer(train_app, name="train")

_CONFIG = typer.Option(..., "--config", "-c", help="Preset name (see `tagfer train presets`) or YAML file.")
#: commands that take TRL-style `--field value` overrides after the config
_OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
_OVERRIDES_HELP = ("Any field can follow as a TRL-style flag (`--learning_rate 1e-5 --sources rafdb ferplus`); "
                   "they win over the YAML. `tagfer train fields sft|grpo` lists every field.")


def _load(config: str, args: list[str], stage: str | None = None, prog: str = "tagfer train"):
    from tagfer.train.config import parse_config  # lazy (start-up time): trl, transformers

    from tagfer.train.presets import ConfigError  # lazy (start-up time): yaml

    try:
        return parse_config(config, args, stage=stage, prog=prog)
    except ConfigError as e:
        console.print(f"[red]config error[/] {e}", markup=True, highlight=False)
        raise typer.Exit(2)


def _run(fn, *args, **kwargs):
    from tagfer.models.vlm import ModelNotAvailable  # lazy (start-up time): PIL

    try:
        return fn(*args, **kwargs)
    except ModelNotAvailable as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(3)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error[/] {e}")
        raise typer.Exit(2)


def best_text(best) -> str:
    """The best checkpoint's validation in words: `` (step 3: accuracy 0.50, au_iou 0.31, fmt_rate 1.00, score 0.62 on 2 samples)``."""
    if not isinstance(best, dict) or not best:
        return ""
    parts = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in best.items() if k not in ("step", "n", "note")]
    where = f"step {best['step']}: " if "step" in best else ""
    n = f" on {best['n']} samples" if "n" in best else ""
    note = best.get("note")
    return f"  ({where}{', '.join(parts)}{n})" if parts else f"  ({where}{note})" if note else ""


@train_app.command("presets")
def presets() -> None:
    """List the packaged presets."""
    from tagfer.train.presets import list_presets, load_raw  # lazy (start-up time): yaml

    for name in list_presets():
        raw = load_raw(name)
        out_console.print(f"{name:16s} stage={raw.get('stage', 'sft'):5s} output_dir={raw.get('output_dir', '')}")


@train_app.command("fields", short_help="List a stage's config fields.")
def fields(stage: str = typer.Argument(..., help="sft | grpo")) -> None:
    """Every field of the stage's config (TRL's and TAG's) with its help and tagfer's default."""
    from tagfer.train.config import CONFIG_CLASSES, TagParser  # lazy (start-up time): trl, transformers

    if stage not in CONFIG_CLASSES:
        console.print(f"[red]error[/] stage must be sft or grpo, got {stage!r}")
        raise typer.Exit(2)
    out_console.print(TagParser(CONFIG_CLASSES[stage], prog=f"tagfer train {stage} -c CONFIG").format_help(),
                      markup=False, highlight=False)


@train_app.command("show", context_settings=_OVERRIDES, epilog=_OVERRIDES_HELP, short_help='Print the resolved config as YAML.')
def show(ctx: typer.Context, config: str = _CONFIG) -> None:
    """Print the resolved config (after extends and overrides) as YAML: the fields that differ from the defaults."""
    from tagfer.train.config import dump_config  # lazy (start-up time): trl, transformers

    out_console.print(dump_config(_load(config, ctx.args)), markup=False, highlight=False)


@train_app.command("sft", context_settings=_OVERRIDES, epilog=_OVERRIDES_HELP)
def sft(ctx: typer.Context, config: str = _CONFIG) -> None:
    """Supervised fine-tuning (stage 1). Resumes from the last checkpoint in output_dir."""
    from tagfer.train.sft import run_sft  # lazy (start-up time): trl, transformers

    cfg = _load(config, ctx.args, "sft", "tagfer train sft")
    console.print(f"SFT → {cfg.output_dir} (model {cfg.model_name_or_path}, data {cfg.train_data})")
    res = _run(run_sft, cfg)
    say(f"final adapter: {res.final_dir}\nbest adapter:  {res.best_dir}{best_text(res.best)}\nlog: {res.log_path}")


@train_app.command("grpo", context_settings=_OVERRIDES, epilog=_OVERRIDES_HELP)
def grpo(ctx: typer.Context, config: str = _CONFIG) -> None:
    """GRPO with R_AU + R_ans + R_fmt (stage 2). Resumes from the last checkpoint in output_dir."""
    from tagfer.train.grpo import run_grpo  # lazy (start-up time): trl, transformers

    cfg = _load(config, ctx.args, "grpo", "tagfer train grpo")
    console.print(f"GRPO → {cfg.output_dir} (model {cfg.model_name_or_path}, adapter {cfg.adapter} "
                  f"[{cfg.adapter_mode}], sources {cfg.sources or 'all'})")
    res = _run(run_grpo, cfg)
    say(f"final adapter: {res.final_dir}\nlog: {res.log_path}")


@train_app.command("merge", short_help='Merge an adapter into its base model.')
def merge(
    adapter: Path = typer.Argument(..., help="LoRA adapter folder (e.g. runs/sft/best)."),
    out: Path = typer.Option(..., "--out", "-o", help="Standalone model folder to write."),
    base: Optional[str] = typer.Option(None, help="Base model (default: recorded in the adapter)."),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float16 | float32"),
) -> None:
    """Merge an adapter into its base and save a standalone model + processor folder."""
    from tagfer.train.merge import merge_adapter  # lazy (start-up time): yaml

    res = _run(merge_adapter, adapter, out, base, dtype)
    out_console.print(f"merged model: {res}")


@train_app.command("export-llamafactory", context_settings=_OVERRIDES, epilog=_OVERRIDES_HELP, short_help='Write a LLaMA-Factory SFT YAML.')
def export_llamafactory(
    ctx: typer.Context, config: str = _CONFIG,
    out: Path = typer.Option(..., "--out", "-o", help="YAML file to write."),
    dataset: Optional[str] = typer.Option(None, "--dataset-name", help="Dataset name in the exporter's dataset_info.json (default from the preset)."),
    export_dir: str = typer.Option("tag_export", help="Output folder of `tagfer export` (holds llamafactory/dataset_info.json)."),
    deepspeed: Optional[str] = typer.Option(None, help="zero2 | zero3 (shipped JSON files) or a DeepSpeed JSON path."),
) -> None:
    """Write a LLaMA-Factory SFT YAML equivalent to the preset."""
    from tagfer.train.interop import default_export_names, llamafactory_config, write_yaml  # lazy (start-up time): yaml

    cfg = _load(config, ctx.args)
    names = default_export_names(cfg, export_dir)
    dataset = dataset or names["llamafactory_dataset"]
    dataset_dir = names["llamafactory_dir"]
    p = write_yaml(llamafactory_config(cfg, dataset, dataset_dir, deepspeed), out,
                   f"# LLaMA-Factory SFT config from tagfer preset {config}; run: llamafactory-cli train {out}")
    out_console.print(f"wrote {p}")


@train_app.command("export-verl", context_settings=_OVERRIDES, epilog=_OVERRIDES_HELP, short_help='Write a verl GRPO config + launch script.')
def export_verl(
    ctx: typer.Context, config: str = _CONFIG,
    out: Path = typer.Option(..., "--out", "-o", help="YAML file to write (a .sh launch script is written beside it)."),
    train_files: Optional[str] = typer.Option(None, help="verl parquet (default: the exporter's verl/<source>.parquet)."),
    val_files: Optional[str] = typer.Option(None),
    gpus: int = typer.Option(4, help="GPUs per node."),
    nnodes: int = typer.Option(1),
    export_dir: str = typer.Option("tag_export", help="Output folder of `tagfer export` (for the default data path)."),
) -> None:
    """Write a verl GRPO config (+ launch script) whose reward is tagfer.integrations.verl.compute_score."""
    from tagfer.train.interop import default_export_names, write_verl_files  # lazy (start-up time): yaml

    cfg = _load(config, ctx.args)
    train_files = train_files or default_export_names(cfg, export_dir)["verl_train"]
    p, sh = write_verl_files(cfg, out, train_files, val_files, gpus, nnodes, name=config)
    out_console.print(f"wrote {p} and {sh}")


@train_app.command("plot", short_help='Plot the training dynamics (Figure 5).')
def plot(
    log: Path = typer.Argument(..., help="train_log.jsonl of a run."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Image file (default: LOG's folder/training_dynamics.png)."),
    smooth: int = typer.Option(1, help="Moving-average window."),
) -> None:
    """Plot the training dynamics (paper Figure 5) from a JSONL log."""
    from tagfer.train.plots import plot_training  # lazy (start-up time): yaml

    if not log.is_file():
        console.print(f"[red]error[/] no such log: {log}")
        raise typer.Exit(2)
    res = _run(plot_training, log, out or log.parent / "training_dynamics.png", smooth)
    out_console.print(f"wrote {res}")
