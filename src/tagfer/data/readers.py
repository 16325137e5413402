"""The dataset readers: official FER layouts (RAF-DB, FERPlus, AffectNet, a generic CSV or
ImageFolder) → a stream of :class:`~tagfer.data.source_record.SourceRecord`.

Every reader is a generator: it reads its annotation files line by line and
never holds the dataset in memory (constant memory over AffectNet's ~290k
rows). Images are not opened here (paths are yielded as they are; a missing
image becomes a per-item failure downstream) except for FER2013-style CSV
pixels, which are decoded to PNG bytes one row at a time.

Splits
------
Canonical split names are ``train``, ``val`` and ``test``. Aliases accepted
everywhere (:func:`~tagfer.data.source_record.canonical_split`): ``training`` → train;
``valid``/``validation`` → val; ``publictest`` → val; ``privatetest`` → test.

==========  ==========================  ============================================
dataset     official split              canonical name
==========  ==========================  ============================================
RAF-DB      ``train_*`` names           train
RAF-DB      ``test_*`` names (3,068)    test
FERPlus     Training / FER2013Train     train
FERPlus     PublicTest / FER2013Valid   val
FERPlus     PrivateTest / FER2013Test   test  (the usual FERPlus test set; the
                                              paper reports 3,517 test images —
                                              the count after the vote policy
                                              below can differ slightly)
AffectNet   training.csv / train_set    train
AffectNet   validation.csv / val_set    test  (AffectNet has no public test set:
                                              its validation set, 4,000 images,
                                              3,500 after removing contempt, is
                                              the test set). ``val`` is an alias
                                              of ``test`` for AffectNet.
==========  ==========================  ============================================

Labels
------
``original_label`` keeps the dataset's raw value (RAF-DB 1–7, AffectNet
0–10, FERPlus the vote vector as a string, generic the raw text). ``label``
is one of :data:`tagfer.core.labels.LABELS`, or :data:`tagfer.core.labels.EXCLUDED`
for contempt and non-emotion codes. Excluded records are skipped unless
``include_excluded=True``, and always counted in :class:`SourceStats`
(``excluded`` by reason).

Each reader is registered under its kind (``rafdb``, ``ferplus``, ``affectnet``, ``generic``)
in :data:`tagfer.data.sources.READERS`, which opens a spec (``rafdb:/data/RAF-DB``); every
name here is importable from :mod:`tagfer.data.sources` too.

FERPlus vote policy (``vote=``)
    ``"plurality"`` (default): the class with the most votes among the ten
    columns. A tie for first place → excluded (``ferplus_tie``); a winner of
    ``unknown`` or ``NF`` (not a face) → excluded (``ferplus_unknown`` /
    ``ferplus_no_face``); ``contempt`` → excluded (``contempt``); rows whose
    image name is empty in ``fer2013new.csv`` (dropped by the FERPlus authors)
    → excluded (``ferplus_no_face``). ``"majority"``: the FERPlus authors'
    "majority" mode: single votes are discarded as outliers, then the winner
    needs more than half of the remaining votes, else excluded
    (``ferplus_no_majority``). ``ties="first"`` instead resolves a tie in
    favour of the first column in FERPlus order (neutral, happiness, surprise,
    sadness, anger, disgust, fear, contempt).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from tagfer.core.imageio import IMAGE_EXTENSIONS
from tagfer.core.labels import EXCLUDED, normalize_label
from tagfer.data.source_record import SPLIT_ALIASES, SourceRecord, SourceStats, _emit, canonical_split

__all__ = [
    "RAFDB_CODES",
    "AFFECTNET_CODES",
    "FERPLUS_COLUMNS",
    "read_rafdb",
    "read_ferplus",
    "read_affectnet",
    "read_generic",
    "ferplus_vote",
]


# --------------------------------------------------------------------------- RAF-DB
RAFDB_CODES: dict[int, str] = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral"}


def _rafdb_base(root: Path) -> Path:
    for cand in (root, root / "basic", root / "RAF-DB" / "basic"):
        if (cand / "EmoLabel" / "list_patition_label.txt").is_file():
            return cand
    raise FileNotFoundError(f"RAF-DB: no EmoLabel/list_patition_label.txt under {root} (or {root}/basic)")


def read_rafdb(
    root: str | os.PathLike,
    split: str = "train",
    *,
    variant: str = "auto",
    stats: SourceStats | None = None,
    include_excluded: bool = False,
    source: str = "rafdb",
) -> Iterator[SourceRecord]:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (``train_00001.jpg 5``).

    ``variant``: ``"aligned"`` (``Image/aligned/<stem>_aligned.jpg``),
    ``"original"`` (``Image/original/<name>``) or ``"auto"`` (aligned when that
    folder exists). ``root`` may be the ``basic`` folder or its parent. Labels
    1–7 = surprise, fear, disgust, happiness, sadness, anger, neutral.
    """
    split = canonical_split(split)
    if split == "val":
        raise ValueError("RAF-DB has no validation split: use train or test")
    base = _rafdb_base(Path(root).expanduser().resolve())
    if variant == "auto":
        variant = "aligned" if (base / "Image" / "aligned").is_dir() else "original"
    if variant not in ("aligned", "original"):
        raise ValueError(f"RAF-DB variant must be aligned, original or auto, got {variant!r}")
    img_dir = str(base / "Image" / variant)  # joined with os.path: pathlib interns every part (memory grows with 300k names)
    prefix = f"{split}_"
    with open(base / "EmoLabel" / "list_patition_label.txt", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2 or not parts[0].startswith(prefix):
                continue
            name, code = parts[0], parts[1]
            stem = name.rsplit(".", 1)[0]
            try:
                label = RAFDB_CODES[int(code)]
                reason = None
            except (ValueError, KeyError):
                label, reason = EXCLUDED, "unknown_code"
            path = os.path.join(img_dir, f"{stem}_aligned.jpg" if variant == "aligned" else name)
            rec = SourceRecord(f"{source}/{stem}", source, split, int(code) if code.isdigit() else code, label, path, meta={"variant": variant})
            out = _emit(rec, stats, include_excluded, reason)
            if out is not None:
                yield out


# --------------------------------------------------------------------------- FERPlus
FERPLUS_COLUMNS: tuple[str, ...] = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
_FER_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
_FER_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}


def ferplus_vote(votes: list[float], vote: str = "plurality", ties: str = "exclude") -> tuple[str, str | None]:
    """(label, exclusion reason or None) from the 10 FERPlus vote counts (policy: module docstring)."""
    if len(votes) != len(FERPLUS_COLUMNS):
        return EXCLUDED, "ferplus_bad_votes"
    v = [float(x) for x in votes]
    if vote == "majority":
        v = [x if x > 1 else 0.0 for x in v]  # single votes are outliers
        total = sum(v)
        top = max(v)
        if total <= 0 or top <= 0.5 * total:
            return EXCLUDED, "ferplus_no_majority"
        winners = [i for i, x in enumerate(v) if x == top]
    elif vote == "plurality":
        top = max(v)
        if top <= 0:
            return EXCLUDED, "ferplus_no_votes"
        winners = [i for i, x in enumerate(v) if x == top]
    else:
        raise ValueError(f"vote must be plurality or majority, got {vote!r}")
    if len(winners) > 1:
        if ties != "first":
            return EXCLUDED, "ferplus_tie"
    col = FERPLUS_COLUMNS[winners[0]]
    if col == "unknown":
        return EXCLUDED, "ferplus_unknown"
    if col == "NF":
        return EXCLUDED, "ferplus_no_face"
    lab = normalize_label(col)
    if lab == EXCLUDED:
        return EXCLUDED, "contempt"
    return lab, None  # type: ignore[return-value]


def _pixels_to_png(pixels: str, side: int = 48) -> bytes:
    arr = np.array(pixels.split(), dtype=np.uint8)
    if arr.size != side * side:
        raise ValueError(f"expected {side * side} pixels, got {arr.size}")
    buf = io.BytesIO()
    Image.fromarray(arr.reshape(side, side), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _find_file(root: Path, name: str) -> Path | None:
    for cand in (root / name, root / "fer2013" / name, root / "data" / name, root.parent / name, root.parent / "fer2013" / name):
        if cand.is_file():
            return cand
    return None


def read_ferplus(
    root: str | os.PathLike,
    split: str = "train",
    *,
    vote: str = "plurality",
    ties: str = "exclude",
    stats: SourceStats | None = None,
    include_excluded: bool = False,
    source: str = "ferplus",
) -> Iterator[SourceRecord]:
    """FERPlus, in either layout.

    CSV layout: ``fer2013.csv`` (``emotion,pixels,Usage``) and ``fer2013new.csv``
    (``Usage,Image name,<10 vote columns>``), row-aligned; both are streamed in
    lockstep and each 48×48 pixel string becomes PNG bytes. Looked up in
    ``root``, ``root/fer2013``, ``root/data`` and the parent folder.

    Folder layout (written by the FERPlus authors' ``generate_training_data.py``):
    ``FER2013Train|FER2013Valid|FER2013Test/label.csv`` rows
    ``fer0000000.png,(0, 0, 48, 48),<10 vote counts>`` next to the PNG files.
    """
    split = canonical_split(split)
    r = Path(root).expanduser().resolve()
    folder = r / _FER_FOLDERS[split]
    if not folder.is_dir() and (r / "data" / _FER_FOLDERS[split]).is_dir():
        folder = r / "data" / _FER_FOLDERS[split]
    new_csv = _find_file(r, "fer2013new.csv")
    if new_csv is not None:
        old_csv = _find_file(r, "fer2013.csv")
        if old_csv is None:
            raise FileNotFoundError(f"FERPlus: found {new_csv} but no fer2013.csv (the pixels) near {r}")
        yield from _ferplus_csv(old_csv, new_csv, split, vote, ties, stats, include_excluded, source)
    elif (folder / "label.csv").is_file():
        yield from _ferplus_folder(folder, split, vote, ties, stats, include_excluded, source)
    else:
        raise FileNotFoundError(f"FERPlus: neither fer2013new.csv nor {_FER_FOLDERS[split]}/label.csv under {r}")


def _ferplus_csv(old_csv: Path, new_csv: Path, split: str, vote: str, ties: str, stats, include_excluded: bool, source: str) -> Iterator[SourceRecord]:
    with open(old_csv, newline="", encoding="utf-8") as fo, open(new_csv, newline="", encoding="utf-8") as fn:
        ro, rn = csv.reader(fo), csv.reader(fn)
        ho, hn = next(ro, None), next(rn, None)
        if ho is None or hn is None:
            return
        ho = [h.strip() for h in ho]
        hn = [h.strip() for h in hn]
        try:
            i_pix, i_use = ho.index("pixels"), ho.index("Usage")
            i_name = hn.index("Image name")
            i_votes = [hn.index(c) for c in FERPLUS_COLUMNS]
        except ValueError as e:
            raise ValueError(f"FERPlus: unexpected CSV header ({e}); expected fer2013.csv 'emotion,pixels,Usage' and fer2013new.csv 'Usage,Image name,neutral,...,NF'") from e
        i_use_new = hn.index("Usage") if "Usage" in hn else None
        for row_no, (ro_row, rn_row) in enumerate(zip(ro, rn)):
            if not ro_row or not rn_row:
                continue
            usage = ro_row[i_use].strip()
            if i_use_new is not None and rn_row[i_use_new].strip() and rn_row[i_use_new].strip() != usage:
                raise ValueError(f"FERPlus: row {row_no + 2} Usage differs between fer2013.csv ({usage}) and fer2013new.csv ({rn_row[i_use_new]}); the files are not aligned")
            if _FER_USAGE.get(usage) != split:
                continue
            name = rn_row[i_name].strip()
            votes = [float(rn_row[i] or 0) for i in i_votes]
            rid = name.rsplit(".", 1)[0] if name else f"row{row_no:05d}"
            if not name:
                label, reason = EXCLUDED, "ferplus_no_face"
            else:
                label, reason = ferplus_vote(votes, vote, ties)
            meta = {"votes": dict(zip(FERPLUS_COLUMNS, votes)), "row": row_no, "usage": usage, "fer2013_emotion": ro_row[0]}
            rec = SourceRecord(f"{source}/{rid}", source, split, ",".join(str(int(v)) for v in votes), label, None, None, meta)
            if label == EXCLUDED and not include_excluded:
                _emit(rec, stats, include_excluded, reason)
                continue  # no need to decode the pixels
            try:
                rec.image_bytes = _pixels_to_png(ro_row[i_pix])
            except ValueError as e:
                rec.label, reason = EXCLUDED, "bad_pixels"
                rec.meta["error"] = str(e)
            out = _emit(rec, stats, include_excluded, reason)
            if out is not None:
                yield out


def _ferplus_folder(folder: Path, split: str, vote: str, ties: str, stats, include_excluded: bool, source: str) -> Iterator[SourceRecord]:
    folder_s = str(folder)
    with open(folder / "label.csv", newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip() or row[0].strip().lower() in ("image name", "image"):
                continue
            name = row[0].strip()
            # the face box "(0, 0, 48, 48)" contains commas: the votes are the last 10 fields
            vals = row[-len(FERPLUS_COLUMNS):]
            try:
                votes = [float(v) for v in vals]
                label, reason = ferplus_vote(votes, vote, ties)
            except ValueError:
                votes, label, reason = [], EXCLUDED, "ferplus_bad_votes"
            rec = SourceRecord(
                f"{source}/{name.rsplit('.', 1)[0]}", source, split, ",".join(str(int(v)) for v in votes), label, os.path.join(folder_s, name),
                meta={"votes": dict(zip(FERPLUS_COLUMNS, votes))},
            )
            out = _emit(rec, stats, include_excluded, reason)
            if out is not None:
                yield out


# --------------------------------------------------------------------------- AffectNet
AFFECTNET_CODES: dict[int, str] = {
    0: "neutral",
    1: "happiness",
    2: "sadness",
    3: "surprise",
    4: "fear",
    5: "disgust",
    6: "anger",
    7: EXCLUDED,  # contempt
    8: EXCLUDED,  # none
    9: EXCLUDED,  # uncertain
    10: EXCLUDED,  # no-face
}
_AFFECTNET_REASONS = {7: "contempt", 8: "affectnet_none", 9: "affectnet_uncertain", 10: "affectnet_no_face"}


def _affectnet_label(code: Any) -> tuple[str, str | None, Any]:
    try:
        c = int(float(str(code).strip()))
    except ValueError:
        return EXCLUDED, "unknown_code", code
    if c not in AFFECTNET_CODES:
        return EXCLUDED, "unknown_code", c
    return AFFECTNET_CODES[c], _AFFECTNET_REASONS.get(c), c


def read_affectnet(
    root: str | os.PathLike,
    split: str = "train",
    *,
    stats: SourceStats | None = None,
    include_excluded: bool = False,
    source: str = "affectnet",
) -> Iterator[SourceRecord]:
    """AffectNet, in either layout (``split`` val is the same as test, see module docstring).

    CSV layout: ``training.csv`` / ``validation.csv`` (columns
    ``subDirectory_filePath, face_x, face_y, face_width, face_height,
    facial_landmarks, expression, valence, arousal``), found in ``root`` or
    ``root/Manually_Annotated_file_lists``; images under
    ``root/Manually_Annotated_Images/<subDirectory_filePath>`` (or
    ``Manually_Annotated/Manually_Annotated_Images``).

    Folder layout: ``train_set|val_set/images/<n>.jpg`` with
    ``annotations/<n>_exp.npy`` (a 0-d array holding the code).
    Codes 0–6 map to the seven classes; 7 contempt, 8 none, 9 uncertain and
    10 no-face are excluded.
    """
    split = canonical_split(split)
    csv_split = "train" if split == "train" else "test"
    r = Path(root).expanduser().resolve()
    name = "training.csv" if csv_split == "train" else "validation.csv"
    csv_path = next((p for p in (r / name, r / "Manually_Annotated_file_lists" / name, r / "Manually_Annotated" / name) if p.is_file()), None)
    set_dir = next((p for p in (r / f"{'train' if csv_split == 'train' else 'val'}_set",) if (p / "annotations").is_dir()), None)
    if csv_path is not None:
        img_root = next(
            (p for p in (r / "Manually_Annotated_Images", r / "Manually_Annotated" / "Manually_Annotated_Images", csv_path.parent / "Manually_Annotated_Images") if p.is_dir()),
            r / "Manually_Annotated_Images",
        )
        yield from _affectnet_csv(csv_path, img_root, split, stats, include_excluded, source)
    elif set_dir is not None:
        yield from _affectnet_folder(set_dir, split, stats, include_excluded, source)
    else:
        raise FileNotFoundError(f"AffectNet: neither {name} nor {'train' if csv_split == 'train' else 'val'}_set/annotations under {r}")


def _affectnet_csv(csv_path: Path, img_root: Path, split: str, stats, include_excluded: bool, source: str) -> Iterator[SourceRecord]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        try:
            i_path, i_exp = header.index("subDirectory_filePath"), header.index("expression")
        except ValueError as e:
            raise ValueError(f"AffectNet: {csv_path} lacks column {e}; expected subDirectory_filePath,...,expression,...") from e
        root_s = str(img_root)
        i_box = [header.index(c) if c in header else None for c in ("face_x", "face_y", "face_width", "face_height")]
        i_val = header.index("valence") if "valence" in header else None
        i_aro = header.index("arousal") if "arousal" in header else None
        for row in reader:
            if len(row) <= max(i_path, i_exp):
                continue
            rel = row[i_path].strip()
            label, reason, code = _affectnet_label(row[i_exp])
            meta: dict[str, Any] = {}
            if all(i is not None for i in i_box):
                try:
                    meta["face_box"] = [int(float(row[i])) for i in i_box]  # type: ignore[index]
                except ValueError:
                    pass
            for key, i in (("valence", i_val), ("arousal", i_aro)):
                if i is not None and i < len(row):
                    try:
                        meta[key] = float(row[i])
                    except ValueError:
                        pass
            rid = rel.rsplit(".", 1)[0] if "." in rel else rel
            rec = SourceRecord(f"{source}/{rid}", source, split, code, label, os.path.join(root_s, rel), meta=meta)
            out = _emit(rec, stats, include_excluded, reason)
            if out is not None:
                yield out


def _read_npy_scalar(path: Path) -> Any:
    a = np.load(path, allow_pickle=False)
    return a.item() if a.ndim == 0 else a.reshape(-1)[0].item()


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def _affectnet_folder(set_dir: Path, split: str, stats, include_excluded: bool, source: str) -> Iterator[SourceRecord]:
    ann = str(set_dir / "annotations")
    img_dir = str(set_dir / "images")
    # The annotation names of one split are sorted (natural order) for a deterministic
    # stream: one short string per image, the only per-split list any reader holds.
    names = sorted((e.name for e in os.scandir(ann) if e.name.endswith("_exp.npy")), key=_natural_key)
    join, exists = os.path.join, os.path.exists
    for n in names:
        stem = n[: -len("_exp.npy")]
        try:
            label, reason, code = _affectnet_label(_read_npy_scalar(join(ann, n)))
        except Exception:  # unreadable annotation: a recorded exclusion, not a crash
            label, reason, code = EXCLUDED, "bad_annotation", None
        img = next((join(img_dir, stem + ext) for ext in (".jpg", ".png", ".jpeg") if exists(join(img_dir, stem + ext))), join(img_dir, stem + ".jpg"))
        meta: dict[str, Any] = {}
        for key in ("val", "aro"):
            p = join(ann, f"{stem}_{key}.npy")
            if exists(p):
                try:
                    meta["valence" if key == "val" else "arousal"] = float(_read_npy_scalar(p))
                except Exception:
                    pass
        rec = SourceRecord(f"{source}/{set_dir.name}/{stem}", source, split, code, label, img, meta=meta)
        out = _emit(rec, stats, include_excluded, reason)
        if out is not None:
            yield out


# --------------------------------------------------------------------------- generic
def read_generic(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    stats: SourceStats | None = None,
    include_excluded: bool = False,
    source: str = "generic",
) -> Iterator[SourceRecord]:
    """A CSV ``path,label`` (optional columns ``id``, ``split``) or an ImageFolder.

    CSV: header required; relative paths are resolved against the CSV's folder;
    with a ``split`` column, only rows of ``split`` are read (rows with an empty
    split count as ``split`` or train). ImageFolder: ``path/<label>/**/image``
    (or ``path/<split>/<label>/...`` when that sub-folder exists); folder names
    are normalised with :func:`tagfer.core.labels.normalize_label` (``happy`` →
    happiness); unknown names and contempt are excluded and counted.
    """
    p = Path(path).expanduser().resolve()
    want = canonical_split(split) if split else None
    if p.is_file():
        yield from _generic_csv(p, want, stats, include_excluded, source)
    elif p.is_dir():
        base = p / split if split and (p / split).is_dir() else p
        if want and base == p:
            for alias, canon in SPLIT_ALIASES.items():
                if canon == want and (p / alias).is_dir():
                    base = p / alias
                    break
        yield from _generic_folder(base, want or "train", stats, include_excluded, source)
    else:
        raise FileNotFoundError(f"generic source: no such file or folder: {p}")


def _generic_label(raw: str) -> tuple[str, str | None]:
    lab = normalize_label(raw)
    if lab is None:
        return EXCLUDED, "unknown_label"
    if lab == EXCLUDED:
        return EXCLUDED, "contempt"
    return lab, None


def _generic_csv(p: Path, want: str | None, stats, include_excluded: bool, source: str) -> Iterator[SourceRecord]:
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        reader.fieldnames = fields
        col_path = next((c for c in ("path", "image", "image_path", "file", "filename") if c in fields), None)
        col_label = next((c for c in ("label", "emotion", "expression", "class") if c in fields), None)
        if col_path is None or col_label is None:
            raise ValueError(f"generic CSV {p}: needs a header with path and label columns, got {fields}")
        parent_s = str(p.parent)
        for i, row in enumerate(reader):
            rel = (row.get(col_path) or "").strip()
            if not rel:
                continue
            row_split = (row.get("split") or "").strip()
            sp = canonical_split(row_split) if row_split else (want or "train")
            if want is not None and sp != want:
                continue
            raw = (row.get(col_label) or "").strip()
            label, reason = _generic_label(raw)
            img = rel if os.path.isabs(rel) else os.path.join(parent_s, rel)
            rid = (row.get("id") or "").strip() or rel.rsplit(".", 1)[0]
            rec = SourceRecord(f"{source}/{rid}", source, sp, raw, label, img, meta={"row": i})
            out = _emit(rec, stats, include_excluded, reason)
            if out is not None:
                yield out


def _generic_folder(base: Path, split: str, stats, include_excluded: bool, source: str) -> Iterator[SourceRecord]:
    for cls_dir in sorted((e for e in os.scandir(base) if e.is_dir()), key=lambda e: e.name):
        label, reason = _generic_label(cls_dir.name)
        for dirpath, dirnames, filenames in os.walk(cls_dir.path):
            dirnames.sort()
            for fn in sorted(filenames):
                if os.path.splitext(fn)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                full = os.path.join(dirpath, fn)
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                rec = SourceRecord(f"{source}/{rel.rsplit('.', 1)[0]}", source, split, cls_dir.name, label, full)
                out = _emit(rec, stats, include_excluded, reason)
                if out is not None:
                    yield out
