"""Exports of a build (``accepted*.jsonl``) for the training frameworks, in one streaming pass.

Layout written under ``OUT`` (``formats`` selects the groups)::

    llamafactory/tag_sft.json          LLaMA-Factory ShareGPT (messages + images + system)
    llamafactory/tag_sft_nobbox.json   the no-bbox ablation (Table 3): coordinates removed by tagfer.traces.trace.strip_bboxes
                                       (``nobbox_mode="empty-tags"``, the paper: empty <bbox></bbox> tags stay;
                                       ``"text-only"``: the tags go too)
    llamafactory/tag_sft_<source>.json one per source
    llamafactory/dataset_info.json     registers every file above
    hf/tag_sft.parquet                 TRL conversational prompt-completion rows
    hf/tag_sft_nobbox.parquet          the no-bbox ablation
    hf/by_source/<source>.parquet      per-dataset subsets (per-dataset GRPO, paper App. C.1)
    hf/dataset/                        datasets.Dataset.save_to_disk of hf/tag_sft.parquet
    verl/train.parquet                 verl RL rows, all sources
    verl/<source>.parquet              verl RL rows per source (the paper runs RL per dataset)
    export_summary.json                the job's summary (tagfer.core.jobs.JobResult: metrics
                                       export/files = rows per file) and the image policy

Conventions
-----------
* Prompts are the unified TAG prompt (:func:`tagfer.models.prompts.tag_prompt`):
  system + user text, the same words the model sees at evaluation.
* LLaMA-Factory rules: ``formatting: sharegpt``, ``columns``
  ``{messages, images, system}``, ``tags`` role/content/user/assistant; the
  messages alternate user/assistant starting with user; the user turn holds
  exactly one ``<image>`` token, matching the one entry of ``images``.
* HF/TRL rows (:meth:`tagfer.core.records.TAGSample.to_trl_row`, schema
  :func:`tagfer.core.records.trl_schema`): ``prompt`` = [system, user] and ``completion`` = [assistant]
  messages whose ``content`` is a list of parts ``{"type": "text"|"image",
  "text": str|null}`` (TRL's conversational VLM format; the image part is a
  placeholder for ``images[0]``); plus ``images`` (list of paths), ``id``,
  ``label``, ``au_boxes``, ``aus`` (int32), ``source``, ``split``, ``teacher``,
  ``meta`` (JSON text): every field of the sample, so ``tagfer train`` reads
  an export back to the same samples (:meth:`~tagfer.core.records.TAGSample.from_trl_row`).
* verl rows: ``data_source`` (``tag/<source>``), ``prompt`` (chat messages,
  ``<image>`` in the user content), ``images`` (``[{"bytes", "min_pixels",
  "max_pixels"}]`` — the bytes of the exported image file, JPEG (q95) by default or PNG
  with ``image_format="png"`` (the original file's bytes with ``ImagePolicy(side=0)``),
  which verl opens with PIL whatever the format, plus the policy's per-image bounds —
  or, with ``embed_images=False``, ``[path]`` plain strings; never a null
  ``bytes``), ``ability`` ("facial_expression"),
  ``reward_model`` ``{"style": "rule", "ground_truth": JSON text
  {"label", "au_boxes", "aus"}}`` (read by
  :func:`tagfer.integrations.verl.read_ground_truth`), ``extra_info``
  ``{"index", "id", "split", "label", "source"}``.
* Image paths are absolute (relative sample paths are resolved against the
  build folder).
* Images follow :class:`tagfer.models.vlm.ImagePolicy` (longer side 224, the size tagfer's
  own training and evaluation use): each is resized once into ``OUT/images/`` and
  every format points to (or embeds) that file, so LLaMA-Factory, verl and stock TRL
  give a sample the same image tokens as tagfer. ``image_policy=ImagePolicy(side=0)``
  keeps the original files. The policy is recorded in ``export_summary.json``
  (``image_policy``: side, min/max pixels, format); ``tagfer train export-llamafactory`` and
  ``export-verl`` refuse a training config whose policy differs from it
  (:func:`check_export_policy`), so a YAML never states pixel bounds the images do not have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import hashlib
from pathlib import Path
import shutil
from typing import Any, Callable, Iterable, Iterator

from tagfer.core.jobs import Event, JobRecorder, JobResult
from tagfer.core.jsonl import read_jsonl
from tagfer.core.records import TAGSample, trl_schema
from tagfer.models.prompts import tag_prompt
from tagfer.traces.trace import strip_bboxes

#: what the no-bbox ablation keeps of each box: its empty tags (the paper) or the text around it only
NOBBOX_MODES = ("empty-tags", "text-only")

__all__ = ["FORMATS", "IMAGE_FORMATS", "iter_samples", "export", "export_policy", "check_export_policy", "sharegpt_row", "trl_row", "verl_row", "DATASET_NAME"]

FORMATS = ("llamafactory", "hf", "verl")
IMAGE_FORMATS = ("jpeg", "png")
SUMMARY_NAME = "export_summary.json"
DATASET_NAME = "tag_sft"
_BATCH = 1000


def accepted_files(build_dir: str | os.PathLike) -> list[Path]:
    """``accepted.jsonl`` and every shard's ``accepted-*-of-*.jsonl`` in ``build_dir`` (or the file itself)."""
    p = Path(build_dir)
    if p.is_file():
        return [p]
    files = sorted(p.glob("accepted*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no accepted*.jsonl in {p}: run `tagfer build` first")
    return files


def iter_samples(build_dir: str | os.PathLike) -> Iterator[TAGSample]:
    """Every accepted sample once (first occurrence of an id wins), image paths made absolute."""
    seen: set[str] = set()
    for f in accepted_files(build_dir):
        base = f.parent
        for rec in read_jsonl(f):
            s = TAGSample.from_json(rec)
            if s.id in seen:
                continue
            seen.add(s.id)
            yield s.with_image_root(base)


# --------------------------------------------------------------------------- rows
def _nobbox_completion(completion: str, mode: str) -> str:
    """The no-bbox ablation's completion: ``"empty-tags"`` (paper) keeps empty ``<bbox></bbox>`` tags, ``"text-only"`` deletes them."""
    if mode not in NOBBOX_MODES:
        raise ValueError(f"nobbox_mode must be one of {NOBBOX_MODES}, got {mode!r}")
    return strip_bboxes(completion, keep_tags=mode == "empty-tags")


def sharegpt_row(s: TAGSample, system: str, user: str, nobbox: bool = False, nobbox_mode: str = "empty-tags") -> dict[str, Any]:
    completion = _nobbox_completion(s.completion, nobbox_mode) if nobbox else s.completion
    return {
        "messages": [{"role": "user", "content": "<image>" + user}, {"role": "assistant", "content": completion}],
        "images": [s.image],
        "system": system,
    }


def trl_row(s: TAGSample, system: str, user: str, nobbox: bool = False, nobbox_mode: str = "empty-tags") -> dict[str, Any]:
    """The HF/TRL row (:meth:`tagfer.core.records.TAGSample.to_trl_row`), optionally of the no-bbox ablation."""
    return s.to_trl_row(system, user, _nobbox_completion(s.completion, nobbox_mode) if nobbox else None)


def verl_row(s: TAGSample, system: str, user: str, index: int, embed_images: bool = True,
             bounds: tuple[int, int] | None = None) -> dict[str, Any]:
    """verl row; the image as ``{"bytes", "min_pixels", "max_pixels"}`` (``bounds``: the processor's pixel
    limits, default the image policy's) or, without embedding, as a plain path string."""
    lo, hi = bounds or _image_policy().bounds
    image: Any = {"bytes": Path(s.image).read_bytes(), "min_pixels": lo, "max_pixels": hi} if embed_images else s.image
    gt = {"label": s.label, "au_boxes": [list(map(int, b)) for b in s.au_boxes], "aus": [int(a) for a in s.aus]}
    return {
        "data_source": f"tag/{s.source}",
        "prompt": [{"role": "system", "content": system}, {"role": "user", "content": "<image>" + user}],
        "images": [image],
        "ability": "facial_expression",
        "reward_model": {"style": "rule", "ground_truth": json.dumps(gt, separators=(",", ":"))},
        "extra_info": {"index": index, "id": s.id, "split": s.split, "label": s.label, "source": s.source},
    }


def export_policy(export_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The image policy an export was written with (``image_policy`` of its ``export_summary.json``:
    ``side``, ``min_pixels``, ``max_pixels``, ``format``), or None when the folder holds no summary."""
    p = Path(export_dir) / SUMMARY_NAME
    if not p.is_file():
        return None
    pol = json.loads(p.read_text()).get("image_policy")
    return pol if isinstance(pol, dict) else None


def check_export_policy(export_dir: str | os.PathLike, policy: Any) -> dict[str, Any] | None:
    """Refuse (``ValueError`` saying how to fix it) a training config whose image policy
    (:class:`tagfer.models.vlm.ImagePolicy`: side and pixel bounds) differs from the one the export in
    ``export_dir`` was written with: a LLaMA-Factory or verl config must not state pixel bounds
    for images of another size. Returns the export's policy (None: no export there yet, nothing
    to compare)."""
    recorded = export_policy(export_dir)
    if recorded is None:
        return None
    lo, hi = policy.bounds
    want = {"side": int(policy.side), "min_pixels": lo, "max_pixels": hi}
    have = {k: recorded.get(k) for k in want}
    if have != want:
        def words(d: dict[str, Any]) -> str:
            return f"image side {d['side']} (min_pixels {d['min_pixels']}, max_pixels {d['max_pixels']})"

        raise ValueError(
            f"{export_dir} was exported with {words(have)} but the training config asks for {words(want)}; "
            f"export again with `tagfer export … --image-side {want['side']}`, or set the config's image_side to "
            f"{have['side']} (and leave min_pixels/max_pixels unset) so that it matches the export")
    return recorded


def _image_policy():
    from tagfer.models.vlm import ImagePolicy  # lazy (start-up time): PIL

    return ImagePolicy()


def _policy_image(s: TAGSample, policy: Any, out_dir: Path, created: list[Path] | None = None,
                  image_format: str = "jpeg") -> TAGSample:
    """``s`` pointing to its image resized by ``policy`` (written once to ``out_dir``; unchanged when side is 0).

    ``jpeg`` (quality 95, default) keeps a 300k-sample export small (~15-20 KB per 224 px face, vs
    ~70 KB as PNG); the size, hence the image tokens, is exact either way; ``png`` is lossless."""
    from PIL import Image  # lazy (start-up time): PIL

    if policy.side <= 0 or not s.image:
        return s
    key = hashlib.sha1(f"{s.image}|{policy.side}".encode()).hexdigest()[:12]
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be jpeg or png, got {image_format!r}")
    dest = out_dir / f"{_safe(s.id)[-80:]}_{key}.{'jpg' if image_format == 'jpeg' else 'png'}"
    if not dest.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        with Image.open(s.image) as im:
            img = policy.apply(im)
        tmp = dest.with_name(dest.name + ".tmp")
        img.save(tmp, format="JPEG", quality=95) if image_format == "jpeg" else img.save(tmp, format="PNG")
        os.replace(tmp, dest)
        if created is not None:
            created.append(dest)
    return dataclasses.replace(s, image=str(dest.resolve()))


# --------------------------------------------------------------------------- writers
class _JsonArrayWriter:
    """Streams a JSON array to disk (LLaMA-Factory reads .json arrays)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8")
        self._f.write("[\n")
        self.n = 0

    def write(self, obj: dict[str, Any]) -> None:
        if self.n:
            self._f.write(",\n")
        self._f.write(json.dumps(obj, ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self._f.write("\n]\n")
        self._f.close()
        os.replace(self._f.name, self.path)

    def abort(self) -> None:
        self._f.close()
        Path(self._f.name).unlink(missing_ok=True)


def _schemas(embed_images: bool = True):
    """(HF/TRL schema — the one in :mod:`tagfer.core.records` —, verl schema)."""
    import pyarrow as pa  # lazy (start-up time): pyarrow

    verl = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("min_pixels", pa.int64()), ("max_pixels", pa.int64())]))
             if embed_images else pa.list_(pa.string())),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct([("index", pa.int64()), ("id", pa.string()), ("split", pa.string()), ("label", pa.string()), ("source", pa.string())]),
            ),
        ]
    )
    return trl_schema(), verl


class _ParquetWriter:
    """Batches rows into a pyarrow ParquetWriter (constant memory), atomic rename on close."""

    def __init__(self, path: Path, schema):
        import pyarrow.parquet as pq  # lazy (start-up time): pyarrow

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.schema = schema
        self._w = pq.ParquetWriter(str(self.tmp), schema)
        self._rows: list[dict[str, Any]] = []
        self.n = 0

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.n += 1
        if len(self._rows) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa  # lazy (start-up time): pyarrow

        if self._rows:
            self._w.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._w.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._w.close()
        self.tmp.unlink(missing_ok=True)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "unknown"


def export(
    build_dir: str | os.PathLike,
    out: str | os.PathLike,
    formats: Iterable[str] = FORMATS,
    *,
    system_prompt: str | os.PathLike | None = None,
    user_prompt: str | os.PathLike | None = None,
    embed_images: bool = True,
    nobbox: bool = True,
    nobbox_mode: str = "empty-tags",
    per_source: bool = True,
    samples: Iterable[TAGSample] | None = None,
    image_policy: Any = None,
    image_format: str = "jpeg",
    on_event: Callable[[Event], None] | None = None,
) -> JobResult:
    """Write the exports of ``build_dir`` (see module docstring) under ``out``; streams the samples once.

    ``system_prompt``/``user_prompt``: override files of the TAG prompt.
    ``samples`` replaces reading ``build_dir``. ``nobbox_mode``: ``"empty-tags"``
    (default, the paper: empty ``<bbox></bbox>`` tags stay) or ``"text-only"``
    (the tags are deleted too). ``image_policy``: a :class:`tagfer.models.vlm.ImagePolicy`
    (default: longer side 224), applied once per image into ``OUT/images/`` as ``image_format``
    (``jpeg`` q95 or lossless ``png``; ``side=0`` keeps the original files, recorded as format
    ``"original"``). The policy goes into ``export_summary.json`` (:func:`export_policy`).
    Returns the run's :class:`tagfer.core.jobs.JobResult` (job
    ``export``; metrics ``export/samples``, ``export/files`` (file → rows), ``export/by_source``);
    ``on_event`` gets the job events (the total is counted from ``build_dir`` first).
    """
    if nobbox_mode not in NOBBOX_MODES:
        raise ValueError(f"nobbox_mode must be one of {NOBBOX_MODES}, got {nobbox_mode!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    fmts = set(formats)
    if "all" in fmts:
        fmts = set(FORMATS)
    unknown = fmts - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export format(s) {sorted(unknown)}; choose from {FORMATS} or all")
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    system, user = tag_prompt(system_prompt, user_prompt)
    hf_schema, verl_schema = _schemas(embed_images)
    policy = image_policy or _image_policy()
    created_images: list[Path] = []
    writers: dict[str, Any] = {}

    def w(key: str, make) -> Any:
        if key not in writers:
            writers[key] = make()
        return writers[key]

    job = JobRecorder("export", on_event)
    summary = job.result
    files: dict[str, int] = {}
    by_source: dict[str, int] = {}
    summary.set_metric("files", files)
    summary.set_metric("by_source", by_source)
    job.start(sum(1 for _ in iter_samples(build_dir)) if samples is None else
              len(samples) if isinstance(samples, (list, tuple)) else None)
    src_iter = samples if samples is not None else iter_samples(build_dir)
    ok = False
    try:
        for idx, s in enumerate(src_iter):
            s = _policy_image(s, policy, o / "images", created_images, image_format)
            by_source[s.source] = by_source.get(s.source, 0) + 1
            src = _safe(s.source)
            if "llamafactory" in fmts:
                lf = o / "llamafactory"
                row = sharegpt_row(s, system, user)
                w("lf", lambda: _JsonArrayWriter(lf / f"{DATASET_NAME}.json")).write(row)
                if per_source:
                    w(f"lf:{src}", lambda: _JsonArrayWriter(lf / f"{DATASET_NAME}_{src}.json")).write(row)
                if nobbox:
                    w("lf:nobbox", lambda: _JsonArrayWriter(lf / f"{DATASET_NAME}_nobbox.json")).write(sharegpt_row(s, system, user, nobbox=True, nobbox_mode=nobbox_mode))
            if "hf" in fmts:
                hf = o / "hf"
                row = trl_row(s, system, user)
                w("hf", lambda: _ParquetWriter(hf / f"{DATASET_NAME}.parquet", hf_schema)).write(row)
                if per_source:
                    w(f"hf:{src}", lambda: _ParquetWriter(hf / "by_source" / f"{src}.parquet", hf_schema)).write(row)
                if nobbox:
                    w("hf:nobbox", lambda: _ParquetWriter(hf / f"{DATASET_NAME}_nobbox.parquet", hf_schema)).write(trl_row(s, system, user, nobbox=True, nobbox_mode=nobbox_mode))
            if "verl" in fmts:
                vd = o / "verl"
                row = verl_row(s, system, user, idx, embed_images, policy.bounds)
                w("verl", lambda: _ParquetWriter(vd / "train.parquet", verl_schema)).write(row)
                if per_source:
                    w(f"verl:{src}", lambda: _ParquetWriter(vd / f"{src}.parquet", verl_schema)).write(row)
            job.item(s.id)
        ok = True
    finally:
        for wr in writers.values():
            if ok:
                wr.close()
            else:  # an error mid-way: leave no half-written file behind (outputs are replaced atomically)
                wr.abort()
        if not ok:  # nor the resized images of this run
            for img in created_images:
                img.unlink(missing_ok=True)
            if (o / "images").is_dir() and not any((o / "images").iterdir()):
                (o / "images").rmdir()
    for key, wr in writers.items():
        files[str(wr.path.relative_to(o))] = wr.n
    if "llamafactory" in fmts and ok:
        info = {}
        for key, wr in writers.items():
            if key.startswith("lf"):
                name = wr.path.stem
                info[name] = {
                    "file_name": wr.path.name,
                    "formatting": "sharegpt",
                    "columns": {"messages": "messages", "images": "images", "system": "system"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
                }
        (o / "llamafactory").mkdir(parents=True, exist_ok=True)
        (o / "llamafactory" / "dataset_info.json").write_text(json.dumps(info, indent=2))
    if "hf" in fmts and "hf" in writers:
        import datasets  # lazy (start-up time): datasets, pyarrow

        ds = datasets.Dataset.from_parquet(str(writers["hf"].path), cache_dir=str(o / "hf" / ".cache"))
        ds.save_to_disk(str(o / "hf" / "dataset"))
        del ds

        shutil.rmtree(o / "hf" / ".cache", ignore_errors=True)
        files["hf/dataset"] = files.get(f"hf/{DATASET_NAME}.parquet", 0)
    summary.set_metric("samples", summary.processed)
    job.finish()
    lo, hi = policy.bounds
    (o / SUMMARY_NAME).write_text(json.dumps(
        {**summary.to_json(), "image_policy": {"side": policy.side, "min_pixels": lo, "max_pixels": hi,
                                               "format": image_format if policy.side > 0 else "original"}}, indent=2))
    return summary
