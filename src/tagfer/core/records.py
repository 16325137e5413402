"""The training sample: one record (:class:`TAGSample`), one Arrow schema, the conversions at the edges.

Every place that stores or ships a sample goes through this module::

    accepted*.jsonl line  --TAGSample.from_json / to_json-------------->  TAGSample
    TAGSample             --to_arrow_row / from_arrow_row (sample_schema)->  Arrow row: the trainer's
                                                                          record cache (tagfer.train.data)
    TAGSample             --to_trl_row / from_trl_row (trl_schema)------>  TRL conversational row: the
                                                                          HF export (tagfer.data.export)

The trainer's rows (a chat prompt, PIL images) are made from Arrow rows on the fly by
:class:`tagfer.train.data.RowMaker`; LLaMA-Factory and verl rows are write-only formats of
:mod:`tagfer.data.export`.

Box dtype: AU boxes and AU numbers are **int32** in every Arrow table (:data:`BOX_DTYPE`).
Canvas coordinates lie in ``[0, canvas)`` (512 by default) and AU numbers are < 100, so int32
is exact, half the size of int64, and is datasets' ``Value("int32")``. Exports written before
this choice hold int64 boxes; readers convert every value with ``int``, so both load.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

__all__ = [
    "TAGSample", "BOX_DTYPE", "SAMPLE_COLUMNS", "TRL_COLUMNS", "sample_schema", "trl_schema",
    "trl_prompt", "trl_completion",
]

#: Arrow / datasets dtype of box coordinates and AU numbers (see the module docstring).
BOX_DTYPE = "int32"
#: columns of a sample's Arrow row (:meth:`TAGSample.to_arrow_row`), in schema order.
SAMPLE_COLUMNS = ("id", "source", "image", "image_bytes", "label", "completion", "au_boxes", "aus", "teacher",
                  "split", "meta")
#: columns of the HF/TRL export row (:meth:`TAGSample.to_trl_row`), in schema order.
TRL_COLUMNS = ("id", "prompt", "completion", "images", "label", "au_boxes", "aus", "source", "split", "teacher",
               "meta")
_REQUIRED = ("id", "source", "image", "label", "completion")
_JSON_FIELDS = ("id", "source", "image", "label", "completion", "au_boxes", "aus", "teacher", "split", "meta")


@dataclass
class TAGSample:
    """One AU-grounded SFT / GRPO sample.

    Schema (one JSON object per line of a build's ``accepted*.jsonl``):
      id          str   unique, ``"<source>/<dataset id>"``
      source      str   dataset name: rafdb | ferplus | affectnet | generic | ...
      image       str   path of the image file (absolute, or relative to the data folder)
      label       str   ground-truth label, one of :data:`tagfer.core.labels.LABELS`
      completion  str   target trace in TAG grammar: ``<think>… <bbox>[x1, y1, x2, y2]</bbox> …</think><answer>label</answer>``
      au_boxes    list[list[int]]  canvas boxes of the detector's activated AUs (R_AU targets; [] = skip R_AU)
      aus         list[int]        activated AU numbers (targets of the F1 variant of R_AU)
      teacher     str   who wrote the trace: a model name, or ``"facs"`` for the offline engine
      split       str   train | val | test ("" when a read export does not say)
      meta        dict  free-form JSON provenance (retries, eliminations, candidate labels, ...)

    Only ``id``, ``source``, ``image``, ``label`` and ``completion`` are required in JSON; the
    others default as above and unknown keys are ignored. ``image_bytes`` (not part of the JSON
    schema) holds the encoded image of a sample read from an export that embeds its images and
    has no file for them; such a sample has an Arrow row but no JSON line.
    """

    id: str
    source: str
    image: str
    label: str
    completion: str
    au_boxes: list[list[int]] = field(default_factory=list)
    aus: list[int] = field(default_factory=list)
    teacher: str = ""
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)
    image_bytes: bytes | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- JSON (accepted*.jsonl)
    def to_json(self) -> dict[str, Any]:
        """The JSON object of one JSONL line (shallow: no deep copy, the build's hot path)."""
        if self.image_bytes is not None:
            raise ValueError(f"sample {self.id!r} holds its image as bytes; write it to a file before JSONL")
        return {name: getattr(self, name) for name in _JSON_FIELDS}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TAGSample":
        """A sample from a JSON object (any line a build ever wrote); a missing required field is a ValueError."""
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"TAGSample record lacks field(s): {', '.join(sorted(missing))}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"TAGSample {d['id']!r}: meta must be a JSON object, got {type(meta).__name__}")
        return cls(
            id=str(d["id"]), source=str(d["source"]), image=str(d["image"]), label=str(d["label"]),
            completion=str(d["completion"]), au_boxes=_boxes(d.get("au_boxes")), aus=_ints(d.get("aus")),
            teacher=str(d.get("teacher") or ""), split=str(d["split"]) if d.get("split") is not None else "train",
            meta=meta,
        )

    # ----------------------------------------------------------------- Arrow (the trainer's record cache)
    def to_arrow_row(self) -> dict[str, Any]:
        """The sample as a row of :func:`sample_schema` (``meta`` as JSON text)."""
        return {
            "id": self.id, "source": self.source, "image": self.image, "image_bytes": self.image_bytes,
            "label": self.label, "completion": self.completion, "au_boxes": _boxes(self.au_boxes),
            "aus": _ints(self.aus), "teacher": self.teacher, "split": self.split, "meta": _meta_text(self.meta),
        }

    @classmethod
    def from_arrow_row(cls, row: Mapping[str, Any]) -> "TAGSample":
        """Inverse of :meth:`to_arrow_row`."""
        data = row.get("image_bytes")
        return cls(
            id=str(row["id"]), source=str(row["source"]), image=str(row.get("image") or ""), label=str(row["label"]),
            completion=str(row["completion"]), au_boxes=_boxes(row.get("au_boxes")), aus=_ints(row.get("aus")),
            teacher=str(row.get("teacher") or ""), split=str(row.get("split") or ""),
            meta=_meta_dict(row.get("meta")), image_bytes=bytes(data) if data is not None else None,
        )

    # ----------------------------------------------------------------- TRL rows (the HF export)
    def to_trl_row(self, system: str, user: str, completion: str | None = None) -> dict[str, Any]:
        """A row of :func:`trl_schema`: TRL's conversational prompt-completion format plus the reward columns.

        ``completion`` replaces the target (the no-bbox ablation)."""
        return {
            "id": self.id, "prompt": trl_prompt(system, user),
            "completion": trl_completion(self.completion if completion is None else completion),
            "images": [self.image], "label": self.label, "au_boxes": _boxes(self.au_boxes), "aus": _ints(self.aus),
            "source": self.source, "split": self.split, "teacher": self.teacher, "meta": _meta_text(self.meta),
        }

    @classmethod
    def from_trl_row(cls, row: Mapping[str, Any], root: str | os.PathLike | None = None, index: int = 0) -> "TAGSample":
        """A sample from a row of an HF/TRL export: tagfer's (:meth:`to_trl_row`, old or new) or any with
        ``completion`` (messages, parts or text), ``label`` and ``images``/``image`` (paths, ``{"path",
        "bytes"}`` dicts, bytes or PIL images); relative paths are joined to ``root``. ``id`` defaults to
        ``"<source>/<index>"``, ``split`` to ``""``. The export's prompt is not read (tagfer's is fixed)."""
        if "completion" not in row or "label" not in row:
            raise ValueError(f"export row lacks 'completion'/'label' (columns: {sorted(row)})")
        path, data = _image_ref(row.get("images", row.get("image")), root)
        source = str(row.get("source") or "")
        return cls(
            id=str(row.get("id") or f"{source or 'export'}/{index}"), source=source, image=path,
            label=str(row["label"]), completion=_text_of(row["completion"]), au_boxes=_boxes(row.get("au_boxes")),
            aus=_ints(row.get("aus")), teacher=str(row.get("teacher") or ""), split=str(row.get("split") or ""),
            meta=_meta_dict(row.get("meta")), image_bytes=data,
        )

    # ----------------------------------------------------------------- paths
    def with_image_root(self, root: str | os.PathLike | None) -> "TAGSample":
        """The sample with a relative ``image`` made absolute under ``root`` (unchanged without a root or a path)."""
        image = _join(self.image, root)
        return self if image == self.image else replace(self, image=image)


# --------------------------------------------------------------------------- schemas
def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa  # lazy (start-up time): pyarrow

    box = getattr(pa, BOX_DTYPE)()
    return {
        "id": pa.string(), "source": pa.string(), "image": pa.string(), "image_bytes": pa.binary(),
        "label": pa.string(), "completion": pa.string(), "au_boxes": pa.list_(pa.list_(box)), "aus": pa.list_(box),
        "teacher": pa.string(), "split": pa.string(), "meta": pa.string(),
    }


def sample_schema():
    """The Arrow schema of :meth:`TAGSample.to_arrow_row` (the trainer's record cache)."""
    import pyarrow as pa  # lazy (start-up time): pyarrow

    types = _arrow_types()
    return pa.schema([(c, types[c]) for c in SAMPLE_COLUMNS])


def trl_schema():
    """The Arrow schema of :meth:`TAGSample.to_trl_row` (``hf/*.parquet`` of an export): the sample's
    column types, with ``completion`` as messages and ``images`` for ``image``."""
    import pyarrow as pa  # lazy (start-up time): pyarrow

    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    messages = pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))]))
    types = {**_arrow_types(), "prompt": messages, "completion": messages, "images": pa.list_(pa.string())}
    return pa.schema([(c, types[c]) for c in TRL_COLUMNS])


# --------------------------------------------------------------------------- messages
def _parts(text: str, image: bool = False) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image", "text": None}] if image else []
    parts.append({"type": "text", "text": text})
    return parts


def trl_prompt(system: str, user: str) -> list[dict[str, Any]]:
    """``[system, user]`` messages of a TRL row; the user turn's image part is a placeholder for ``images[0]``."""
    return [{"role": "system", "content": _parts(system)}, {"role": "user", "content": _parts(user, image=True)}]


def trl_completion(text: str) -> list[dict[str, Any]]:
    """The ``[assistant]`` completion messages of a TRL row."""
    return [{"role": "assistant", "content": _parts(text)}]


# --------------------------------------------------------------------------- value normalisers
def _boxes(value: Any) -> list[list[int]]:
    return [[int(v) for v in b] for b in value or []]


def _ints(value: Any) -> list[int]:
    return [int(a) for a in value or []]


def _meta_text(meta: Mapping[str, Any]) -> str:
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"))


def _meta_dict(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"meta must be a JSON object, got {type(value).__name__}")
    return value


def _text_of(value: Any) -> str:
    """Assistant text of an export ``completion`` (string, message, or list of messages/parts)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _text_of(value.get("content", value.get("text", "")))
    if isinstance(value, (list, tuple)):
        texts = []
        for part in value:
            if isinstance(part, dict) and "role" in part:
                if part["role"] == "assistant":
                    texts.append(_text_of(part.get("content")))
            elif isinstance(part, dict):
                if part.get("type", "text") == "text":
                    texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
        return "".join(texts)
    return str(value)


def _join(path: str, root: str | os.PathLike | None) -> str:
    """``path`` made absolute under ``root`` when it is relative (unchanged without a root)."""
    return os.path.abspath(os.path.join(root, path)) if path and root is not None and not os.path.isabs(path) else path


def _image_ref(value: Any, root: str | os.PathLike | None) -> tuple[str, bytes | None]:
    """(path, bytes) of one image reference: a path, a ``{"path", "bytes"}`` dict, bytes or a PIL image.

    Bytes are kept only when there is no existing file to read instead."""
    if isinstance(value, (list, tuple)):
        if not value:
            return "", None
        value = value[0]
    if value is None:
        return "", None
    if isinstance(value, (bytes, bytearray)):
        return "", bytes(value)
    if isinstance(value, dict):
        path = value.get("path") or value.get("image") or ""
        path = _join(path, root) if isinstance(path, str) else path
        if value.get("bytes") and not (isinstance(path, str) and path and os.path.isfile(path)):
            return str(path or ""), bytes(value["bytes"])  # embedded only: keep the bytes
        value = path
    if hasattr(value, "save") and hasattr(value, "size"):  # PIL image
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="PNG")
        return "", buf.getvalue()
    return _join(str(value), root), None
