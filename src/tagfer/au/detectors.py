"""Pluggable AU detectors: anything that turns an image into :class:`~tagfer.au.aus.FaceAUs` records.

A detector implements :class:`AUDetector` (``name``, ``detect(image, key)``,
``close()``). Shipped:

* :class:`MediaPipeAUDetector` (default, ``"mediapipe"``): FaceLandmarker
  landmarks + blendshapes → AU scores (:func:`tagfer.au.aus.au_scores`).
* :class:`TableAUDetector` (``"openface:PATH"``, ``"table:PATH"``): AU scores
  precomputed by another tool (GraphAU, OpenFace, LibreFace …) read from a
  table; MediaPipe still supplies the landmarks so the AUs get boxes from the
  same regions. This is also the independent detector of the cross-detector
  evaluation.

Table formats
-------------
OpenFace 2.x CSV (a file, or a directory of per-image CSVs as written by
``FaceLandmarkImg``): columns ``AUxx_r`` (intensity 0–5, score = r/5) and/or
``AUxx_c`` (presence 0/1; when present it decides ``active``). Header
whitespace is ignored. Rows with ``success == 0`` are skipped. The image key
is taken from a column named ``input``, ``image``, ``file``, ``filename``,
``path`` or ``img`` if there is one, else from the CSV file's stem. Several
rows for one image are several faces; with ``x_0..x_67`` landmark columns
they are matched to MediaPipe faces by nearest centre, otherwise in row order
to faces sorted left to right.

Long CSV: columns ``image, au, score`` (``au`` as ``AU12``, ``12`` or
``AU12_r``; score in [0, 1]), optional ``face`` (0-based) and ``active``.

Keys match an image by absolute path, then by relative path suffix, then
file name, then stem.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
import stat
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from tagfer.au.aus import AUConfig, FaceAUs, au_number, ground_face
from tagfer.au.faces import FaceLandmarker, FaceMesh
from tagfer.core.canvas import CanvasTransform
from tagfer.core.errors import ItemError
from tagfer.core.imageio import LoadedImage


class DetectionError(ItemError):
    """A per-image detection failure (``kind``: ``no_face``, ``not_in_table``)."""


@runtime_checkable
class AUDetector(Protocol):
    name: str

    def detect(self, image: LoadedImage, key: str | None = None) -> list[FaceAUs]:
        """All faces in ``image``, left to right. Raise :class:`DetectionError` for per-image failures."""
        ...

    def close(self) -> None: ...


class MediaPipeAUDetector:
    """The default detector: MediaPipe blendshapes + landmark geometry → AU scores and boxes."""

    name = "mediapipe"

    def __init__(
        self, config: AUConfig = AUConfig(), landmarker: FaceLandmarker | None = None, *,
        own_landmarker: bool | None = None, **landmarker_kwargs,
    ):
        """``own_landmarker``: close the landmarker in :meth:`close` (default: only one built here)."""
        self.config = config
        self._own = landmarker is None if own_landmarker is None else own_landmarker
        self.landmarker = landmarker or FaceLandmarker(**landmarker_kwargs)

    def meshes(self, image: LoadedImage) -> list[FaceMesh]:
        faces = self.landmarker.detect(image.rgb, scale=image.scale)
        if not faces:
            raise DetectionError("no_face", f"no face found in {image.source or 'image'} ({image.width}×{image.height})")
        return faces

    def detect(self, image: LoadedImage, key: str | None = None) -> list[FaceAUs]:
        tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
        return [ground_face(m, tr, self.config, detector=self.name) for m in self.meshes(image)]

    def close(self) -> None:
        if self._own:
            self.landmarker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- AU tables
@dataclass
class TableFace:
    """AU scores of one face from a table: ``scores`` {au: score}, ``active`` {au: bool} (may be empty),
    ``center`` (x, y) image pixels if the table had landmarks."""

    scores: dict[int, float]
    active: dict[int, bool] = field(default_factory=dict)
    center: tuple[float, float] | None = None


class AUTable:
    """Precomputed AU scores keyed by image (see module docstring for formats and key matching)."""

    def __init__(self, rows: dict[str, list[TableFace]] | None = None, source: str = "table"):
        self.rows: dict[str, list[TableFace]] = rows or {}
        self.source = source
        self._by_name: dict[str, list[str]] = {}
        self._by_stem: dict[str, list[str]] = {}
        for k in self.rows:
            self._index(k)

    def _index(self, k: str) -> None:
        p = Path(k)
        self._by_name.setdefault(p.name, []).append(k)
        self._by_stem.setdefault(p.stem, []).append(k)

    def add(self, key: str, face: TableFace) -> None:
        if key not in self.rows:
            self.rows[key] = []
            self._index(key)
        self.rows[key].append(face)

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, image_key: str) -> list[TableFace] | None:
        if image_key in self.rows:
            return self.rows[image_key]
        p = Path(image_key)
        ap = str(p.resolve()) if p.exists() else os.path.abspath(image_key)
        if ap in self.rows:
            return self.rows[ap]
        norm = ap.replace(os.sep, "/")
        for cand in self._by_name.get(p.name, []):
            if norm.endswith("/" + cand.replace(os.sep, "/").lstrip("./")):
                return self.rows[cand]
        names = self._by_name.get(p.name, [])
        if len(names) == 1:
            return self.rows[names[0]]
        stems = self._by_stem.get(p.stem, [])
        if len(stems) == 1:
            return self.rows[stems[0]]
        return None

    # -- readers ---------------------------------------------------------------------
    @classmethod
    def from_openface(cls, path: str | os.PathLike) -> "AUTable":
        p = Path(path)
        files = sorted(p.rglob("*.csv")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no OpenFace CSV files under {p}")
        table = cls(source=f"openface:{p}")
        for f in files:
            for key, face in _read_openface_csv(f):
                table.add(key, face)
        return table

    @classmethod
    def from_long_csv(cls, path: str | os.PathLike) -> "AUTable":
        p = Path(path)
        table = cls(source=f"table:{p}")
        faces: dict[tuple[str, int], TableFace] = {}
        with open(_regular_file(p), newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            for need in ("image", "au", "score"):
                if need not in cols:
                    raise ValueError(f"{p}: long AU table needs columns image, au, score (found {reader.fieldnames})")
            for i, row in enumerate(reader, 2):
                try:
                    key = row[cols["image"]].strip()
                    au = au_number(row[cols["au"]])
                    score = float(row[cols["score"]])
                    face_i = int(row[cols["face"]]) if "face" in cols and row[cols["face"]].strip() else 0
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{p}:{i}: bad row {row}: {e}") from e
                if not math.isfinite(score):
                    raise ValueError(f"{p}:{i}: score is not a finite number")
                tf = faces.get((key, face_i))
                if tf is None:
                    tf = faces[(key, face_i)] = TableFace(scores={})
                tf.scores[au] = min(1.0, max(0.0, score))
                if "active" in cols and row[cols["active"]].strip() != "":
                    tf.active[au] = row[cols["active"]].strip().lower() in ("1", "true", "yes", "1.0")
        for (key, _), tf in sorted(faces.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            table.add(key, tf)
        return table

    @classmethod
    def from_spec(cls, spec: str) -> "AUTable":
        kind, _, path = spec.partition(":")
        if kind == "openface":
            return cls.from_openface(path)
        if kind == "table":
            return cls.from_long_csv(path)
        raise ValueError(f"unknown AU table spec {spec!r}; use openface:PATH or table:PATH")


_KEY_COLUMNS = ("input", "image", "file", "filename", "path", "img")


def _regular_file(path: Path) -> Path:
    """``path`` if it is a regular file; a FIFO, socket or device would block or never end, so it is refused unread."""
    st = os.stat(path)  # FileNotFoundError / ELOOP / permission errors as they are
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, socket, device or directory); an AU table must be a CSV file")
    return path


def _read_openface_csv(path: Path) -> Iterator[tuple[str, TableFace]]:
    with open(_regular_file(path), newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return
        idx = {h: i for i, h in enumerate(header)}
        r_cols = {au_number(h): idx[h] for h in header if h.upper().startswith("AU") and h.endswith("_r")}
        c_cols = {au_number(h): idx[h] for h in header if h.upper().startswith("AU") and h.endswith("_c")}
        if not r_cols and not c_cols:
            raise ValueError(f"{path}: no AUxx_r / AUxx_c columns (is this an OpenFace CSV?)")
        key_col = next((idx[c] for c in header if c.lower() in _KEY_COLUMNS), None)
        xs = [idx[f"x_{i}"] for i in range(68) if f"x_{i}" in idx]
        ys = [idx[f"y_{i}"] for i in range(68) if f"y_{i}" in idx]
        succ = idx.get("success")
        for lineno, row in enumerate(reader, 2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                if succ is not None and float(row[succ]) == 0:
                    continue
                scores: dict[int, float] = {}
                active: dict[int, bool] = {}
                for au, i in r_cols.items():
                    scores[au] = min(1.0, max(0.0, float(row[i]) / 5.0))
                for au, i in c_cols.items():
                    c = float(row[i]) >= 0.5
                    active[au] = c
                    scores.setdefault(au, float(c))
                center = None
                if len(xs) == 68 and len(ys) == 68:
                    center = (float(np.mean([float(row[i]) for i in xs])), float(np.mean([float(row[i]) for i in ys])))
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: malformed OpenFace row: {e}") from e
            key = row[key_col].strip() if key_col is not None else path.stem
            yield key, TableFace(scores=scores, active=active, center=center)


class TableAUDetector(MediaPipeAUDetector):
    """AU scores from an :class:`AUTable`; landmarks (hence boxes) from MediaPipe."""

    def __init__(self, table: AUTable, config: AUConfig = AUConfig(), landmarker: FaceLandmarker | None = None, **kw):
        super().__init__(config, landmarker, **kw)
        self.table = table
        self.name = table.source.split(":", 1)[0]

    def detect(self, image: LoadedImage, key: str | None = None) -> list[FaceAUs]:
        rows = self.table.lookup(key or image.source)
        if rows is None:
            raise DetectionError("not_in_table", f"{key or image.source} has no row in {self.table.source}")
        meshes = self.meshes(image)
        tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
        out = []
        for mesh, tf in _match_faces(meshes, rows):
            out.append(ground_face(mesh, tr, self.config, scores=tf.scores, active=tf.active or None, detector=self.name))
        out.sort(key=lambda f: (f.mesh.bbox[0] + f.mesh.bbox[2]) / 2 if f.mesh else 0)
        return out


def _match_faces(meshes: list[FaceMesh], rows: list[TableFace]) -> list[tuple[FaceMesh, TableFace]]:
    """Pair table faces with detected meshes (nearest centre when known, else order / largest)."""
    if len(rows) == 1:
        return [(max(meshes, key=lambda m: m.area), rows[0])]
    if all(r.center is not None for r in rows):
        from scipy.optimize import linear_sum_assignment  # lazy (start-up time): scipy, numpy

        mc = np.array([((m.bbox[0] + m.bbox[2]) / 2, (m.bbox[1] + m.bbox[3]) / 2) for m in meshes])
        rc = np.array([r.center for r in rows])
        cost = np.linalg.norm(mc[:, None, :] - rc[None, :, :], axis=-1)
        mi, ri = linear_sum_assignment(cost)
        return [(meshes[i], rows[j]) for i, j in zip(mi, ri)]
    return list(zip(meshes, rows))


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class DetectorSpec:
    """A picklable description of a detector, built inside each worker process.

    ``kind``: ``"mediapipe"`` or a table spec ``"openface:PATH"`` / ``"table:PATH"``.
    """

    kind: str = "mediapipe"
    config: AUConfig = AUConfig()
    landmarker_path: str | None = None
    max_faces: int = 5
    fallback: str | None = None

    def build(self) -> AUDetector:
        table = None if self.kind == "mediapipe" else AUTable.from_spec(self.kind)  # before opening the model
        lm = FaceLandmarker(model_path=self.landmarker_path, max_faces=self.max_faces, fallback=self.fallback)
        if table is None:
            return MediaPipeAUDetector(self.config, landmarker=lm, own_landmarker=True)
        return TableAUDetector(table, self.config, landmarker=lm, own_landmarker=True)
