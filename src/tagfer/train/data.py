"""Training data: TAGSample JSONL or the data exporter's HF export → TRL rows.

Sources accepted by :func:`iter_records` (``train_data`` / ``val_data`` in the config):

* a TAGSample JSONL file (:class:`tagfer.core.records.TAGSample`, one per line);
* the data exporter's Hugging Face export — a ``save_to_disk`` folder, or a folder /
  file of JSONL or Parquet — with columns ``prompt`` / ``completion`` (chat messages or
  text), ``images`` (paths, ``{"path", "bytes"}`` dicts or PIL images), ``label``,
  ``au_boxes``, ``aus``, ``source`` (``id`` / ``split`` optional);
* ``builtin:tiny`` — :func:`builtin_tiny`, a few generated samples on the two shipped
  sample faces (smoke runs only: the traces are templates, the labels illustrative).

Everything is normalised to one flat record — a :class:`~tagfer.core.records.TAGSample`'s Arrow
row (:meth:`~tagfer.core.records.TAGSample.to_arrow_row`, schema :func:`tagfer.core.records.sample_schema`,
columns :data:`RECORD_COLUMNS`) — written once to an Arrow dataset (memory-mapped: constant memory over 300k samples), and turned into TRL
rows on the fly by a dataset transform, which loads the image (:func:`tagfer.core.imageio.load_image`)
and resizes it (:func:`tagfer.models.vlm.resize_for_model`, longer side 224). The prompt is the
unified TAG prompt (:func:`tagfer.models.prompts.tag_prompt`), the same words as evaluation.

TRL rows::

    SFT : {"prompt": [system, user(image + text)], "completion": [assistant], "images": [PIL]}
    GRPO: {"prompt": [system, user(image + text)], "images": [PIL],
           "label": str, "au_boxes": [[x1, y1, x2, y2], ...], "aus": [int], "trace_aus": [int], "source": str}

``aus`` are the AUs the detector activated for the image; ``trace_aus`` the AUs the sample's trace names
(:func:`trace_aus`): the two reference sets of the F1 reward (``au_f1_reference``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from tagfer.core.jsonl import read_jsonl
from tagfer.core.labels import LABELS
from tagfer.core.records import SAMPLE_COLUMNS, TAGSample, sample_schema, trl_completion
from tagfer.core.samples import sample_face_path
from tagfer.traces.trace import format_box, parse_trace, strip_bboxes

__all__ = [
    "RECORD_COLUMNS",
    "BUILTIN_PREFIX",
    "builtin_tiny",
    "iter_records",
    "record_from_sample",
    "record_from_export",
    "filter_records",
    "build_record_dataset",
    "RowMaker",
    "trace_aus",
    "load_train_val",
]

BUILTIN_PREFIX = "builtin:"
#: columns of a flat training record: the sample's Arrow row (:data:`tagfer.core.records.SAMPLE_COLUMNS`).
RECORD_COLUMNS = SAMPLE_COLUMNS


# ---------------------------------------------------------------------------------------------
# the builtin smoke dataset


def builtin_tiny(out_dir: str | Path) -> Path:
    """Write 8 TAGSamples (JSONL + images) on the shipped sample faces; returns the JSONL path.

    Four views (as is, mirrored, tight crop, greyscale) of the astronaut and of Grace
    Hopper, each with a short templated trace in TAG grammar and canvas AU boxes; two
    samples have no AU box (``au_boxes: []``) so the R_AU skip path is exercised.
    Deterministic; rewritten only when missing.
    """
    from PIL import Image, ImageOps  # lazy (start-up time): PIL

    out = Path(out_dir)
    path = out / "samples.jsonl"
    if path.is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    regions = {  # canvas boxes for a face filling the canvas (coarse, like the paper's regions)
        "mouth": (12, [150, 300, 360, 420]),
        "eyes": (6, [110, 180, 400, 260]),
        "brows": (4, [120, 120, 390, 190]),
    }
    views = ("plain", "mirror", "crop", "grey")
    labels = {"astronaut": ("happiness", "happiness", "surprise", "neutral"),
              "grace_hopper": ("neutral", "happiness", "sadness", "neutral")}
    samples = []
    for face in ("astronaut", "grace_hopper"):
        base = Image.open(sample_face_path(face)).convert("RGB")
        for v, view in enumerate(views):
            img = base
            if view == "mirror":
                img = ImageOps.mirror(base)
            elif view == "crop":
                w, h = base.size
                img = base.crop((w // 6, h // 8, w - w // 6, h - h // 4))
            elif view == "grey":
                img = ImageOps.grayscale(base).convert("RGB")
            img.thumbnail((256, 256))
            fname = f"{face}_{view}.png"
            img.save(out / fname)
            label = labels[face][v]
            assert label in LABELS
            picks = ["mouth", "eyes"] if v % 2 == 0 else ["brows", "mouth"]
            boxes = []
            for r in picks:
                au, box = regions[r]
                box = list(box)
                if view == "mirror":
                    box = [511 - box[2], box[1], 511 - box[0], box[3]]
                boxes.append((r, au, box))
            steps = " ".join(f"The {r} region, AU{au}, <bbox>{format_box(b)}</bbox>, looks {label}-like." for r, au, b in boxes)
            completion = f"<think>A {view} view of the face. {steps} So: {label}.</think><answer>{label}</answer>"
            no_boxes = view == "grey"
            samples.append(TAGSample(
                id=f"builtin/{face}_{view}", source="builtin" if v < 2 else "builtin2", image=fname, label=label,
                completion=completion, au_boxes=[] if no_boxes else [b for _, _, b in boxes],
                aus=[] if no_boxes else [au for _, au, _ in boxes], teacher="template", split="train",
                meta={"note": "generated smoke sample; label illustrative"},
            ))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(s.to_json()) + "\n" for s in samples), encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# reading and normalising


def record_from_sample(s: TAGSample, root: Path | None = None) -> dict[str, Any]:
    """The flat training record of a :class:`TAGSample`: its Arrow row, relative image paths resolved under ``root``."""
    return s.with_image_root(root).to_arrow_row()


def record_from_export(row: dict[str, Any], root: Path | None = None, index: int = 0) -> dict[str, Any]:
    """The flat training record of one row of an HF export (:meth:`TAGSample.from_trl_row`)."""
    return TAGSample.from_trl_row(row, root, index).to_arrow_row()


def _is_tagsample(row: dict[str, Any]) -> bool:
    return isinstance(row.get("completion"), str) and isinstance(row.get("image"), str) and "prompt" not in row


def _iter_hf(path: Path) -> Iterator[dict[str, Any]]:
    import datasets  # lazy (start-up time): datasets, pyarrow

    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                          or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        files = [path] if path.is_file() else sorted(
            [*path.glob("*.parquet"), *path.glob("**/*.parquet")] or [*path.glob("*.jsonl"), *path.glob("*.json")]
        )
        files = list(dict.fromkeys(files))
        if not files:
            raise FileNotFoundError(f"no JSONL/Parquet data files in {path}")
        kind = "parquet" if files[0].suffix == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    yield from _undecoded_images(ds)


def _undecoded_images(ds):
    """``ds`` with Image columns left as ``{"bytes", "path"}`` (no decode / re-encode of 300k images)."""
    import datasets  # lazy (start-up time): datasets, pyarrow

    for col in ("images", "image"):
        feat = ds.features.get(col)
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.List, datasets.Sequence)) and isinstance(getattr(feat, "feature", None), datasets.Image):
            ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return ds


def iter_records(ref: str, image_root: str | Path | None = None, workdir: str | Path = ".") -> Iterator[dict[str, Any]]:
    """Stream flat training records from a data reference (see module docstring)."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name != "tiny":
            raise ValueError(f"unknown builtin dataset {ref!r}; available: builtin:tiny")
        ref = str(builtin_tiny(Path(workdir) / "builtin_tiny"))
    path = Path(ref).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    root = Path(image_root) if image_root else (path.parent if path.is_file() else path)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        first = next(read_jsonl(path), None)
        if first is None:
            raise ValueError(f"{path}: no records")
        if _is_tagsample(first):
            for rec in read_jsonl(path):
                yield record_from_sample(TAGSample.from_json(rec), root)
            return
    for i, row in enumerate(_iter_hf(path)):
        yield record_from_export(dict(row), root, i)


def filter_records(
    records: Iterable[dict[str, Any]], sources: Sequence[str] = (), split: str = "", max_samples: int | None = None,
    no_bbox: bool = False,
) -> Iterator[dict[str, Any]]:
    """Keep records of ``sources`` (all when empty) and ``split``; optionally strip boxes (Table 3 ablation)."""
    keep = {s.lower() for s in sources}
    n = 0
    for r in records:
        if keep and r["source"].lower() not in keep:
            continue
        if split and r["split"] and r["split"] != split:
            continue
        if max_samples is not None and n >= max_samples:
            return
        if no_bbox:
            r = {**r, "completion": strip_bboxes(r["completion"])}
        n += 1
        yield r


def _fingerprint(ref: str, extra: Any) -> str:
    h = hashlib.sha256(repr(extra).encode())
    p = Path(ref)
    if ref and p.exists():
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(ref.encode())
    return h.hexdigest()[:16]


def _gen(records_fn: Callable[[], Iterable[dict[str, Any]]], fingerprint: str) -> Iterator[dict[str, Any]]:
    yield from records_fn()


def build_record_dataset(records_fn: Callable[[], Iterable[dict[str, Any]]], cache_dir: str | Path, fingerprint: str):
    """An Arrow ``datasets.Dataset`` of flat records (streamed to disk, memory-mapped)."""
    import datasets  # lazy (start-up time): datasets, pyarrow

    features = datasets.Features.from_arrow_schema(sample_schema())
    ds = datasets.Dataset.from_generator(
        _gen, gen_kwargs={"records_fn": records_fn, "fingerprint": fingerprint}, features=features,
        cache_dir=str(cache_dir),
    )
    if len(ds) == 0:
        raise ValueError("no training samples left after filtering (check sources / split)")
    return ds


def trace_aus(completion: str) -> list[int]:
    """The AU numbers a sample's trace (its SFT target) names, in order of first mention: the reference set
    of the F1 reward with ``au_f1_reference: trace``."""
    return list(dict.fromkeys(parse_trace(completion).au_mentions))


class RowMaker:
    """Dataset transform: flat records → TRL rows (image loaded and resized on the fly).

    Pickles (module-level class), so dataloader workers can use it.
    """

    #: resized images kept per path: GRPO reads each prompt row K times in a row.
    cache_size = 64

    def __init__(self, stage: str, system: str, user: str, image_side: int = 224):
        if stage not in ("sft", "grpo"):
            raise ValueError(f"stage must be sft or grpo, got {stage!r}")
        self.stage, self.system, self.user, self.image_side = stage, system, user, image_side
        self._cache: dict[str, Any] = {}

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}

    def prompt(self) -> list[dict[str, Any]]:
        from tagfer.models.vlm import build_chat  # lazy (start-up time): PIL

        return build_chat(self.user, self.system, with_image=True)

    def image(self, path: str, data: bytes | None, sample_id: str = ""):
        if not data and path in self._cache:
            return self._cache[path].copy()
        img = self._load(path, data, sample_id)
        if not data:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[path] = img
            return img.copy()
        return img

    def _load(self, path: str, data: bytes | None, sample_id: str = ""):
        from PIL import Image  # lazy (start-up time): PIL

        from tagfer.core.imageio import ImageError, load_image  # lazy (start-up time): PIL
        from tagfer.models.vlm import ImagePolicy  # lazy (start-up time): PIL

        try:
            loaded = load_image(data if data else path)
        except ImageError as e:
            raise ImageError(e.kind, f"sample {sample_id!r}: {e}") from e
        return ImagePolicy(self.image_side).apply(Image.fromarray(loaded.rgb))

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(batch["id"])
        images = [[self.image(batch["image"][i], batch["image_bytes"][i], batch["id"][i])] for i in range(n)]
        out: dict[str, list[Any]] = {"prompt": [self.prompt() for _ in range(n)], "images": images}
        if self.stage == "sft":
            out["completion"] = [trl_completion(c) for c in batch["completion"]]
        else:
            out["label"] = list(batch["label"])
            out["au_boxes"] = [[list(b) for b in boxes] for boxes in batch["au_boxes"]]
            out["aus"] = [list(a) for a in batch["aus"]]
            out["trace_aus"] = [trace_aus(c) for c in batch["completion"]]
            out["source"] = list(batch["source"])
            out["id"] = list(batch["id"])
        return out


def load_train_val(cfg, workdir: str | Path | None = None):
    """``(train_raw, val_raw)`` Arrow datasets of flat records for a training config (:mod:`tagfer.train.config`).

    ``val_raw`` is ``None`` when there is no validation data. Use
    ``ds.with_transform(RowMaker(...))`` to get TRL rows.
    """
    d = cfg
    work = Path(workdir or cfg.output_dir)
    cache = work / "data_cache"

    def make(ref: str, split: str):
        extra = (ref, list(d.sources), split, d.max_samples, d.no_bbox, d.image_root)

        def records():
            return filter_records(iter_records(ref, d.image_root, work), d.sources, split, d.max_samples, d.no_bbox)

        return build_record_dataset(records, cache, _fingerprint(ref if not ref.startswith(BUILTIN_PREFIX) else "", extra))

    train = make(d.train_data, d.split)
    val = None
    if d.val_data:
        val = make(d.val_data, "")
    elif d.val_size > 0:
        if d.val_size >= len(train):
            raise ValueError(f"val_size={d.val_size} leaves no training samples (only {len(train)})")
        parts = train.train_test_split(test_size=d.val_size, seed=cfg.seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    return train, val
