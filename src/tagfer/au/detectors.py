"""Pluggable AU detectors: anything that turns an image into :class:`~tagfer.au.aus.FaceAUs` records.

A detector implements :class:`AUDetector` (``name``, ``detect(image, key)``, ``close()``) and is
named by a spec ``KIND[:TARGET][?key=value&...]`` of the registry :data:`DETECTORS`
(:class:`tagfer.core.registry.Registry`). Shipped kinds:

* ``mediapipe`` (default, :class:`MediaPipeAUDetector`): FaceLandmarker landmarks + blendshapes
  → AU scores (:func:`tagfer.au.aus.au_scores`) and boxes on the 478-point mesh.
* ``openface:CSV|DIR`` and ``table:CSV`` (:class:`TableAUDetector`): AU scores precomputed by
  another tool (OpenFace 2.x / 3.0, GraphAU, LibreFace …) read from a table. This is also the
  independent detector of the cross-detector evaluation.

Adding a detector is one decorator; the builder gets the spec's target, the
:class:`DetectorSpec` (config, landmarker settings, :meth:`DetectorSpec.table_detector`) and the
``?key=value`` options::

    from tagfer.au.detectors import DETECTORS, AUTable, TableFace

    @DETECTORS.register("graphau", usage="graphau:CSV")
    def graphau(target, spec, **options):
        table = AUTable(source=f"graphau:{target}")
        for key, scores in my_reader(target):
            table.add(key, TableFace(scores))
        return spec.table_detector(table)

Box geometry (``FaceAUs.geometry``, :attr:`TableAUDetector.geometry`)
---------------------------------------------------------------------
A table face that carries its own landmarks (OpenFace 2.x ``x_0..x_67``/``y_0..y_67``, OpenFace
3.0's 98 WFLW points) gets its AU boxes from them (:mod:`tagfer.au.regions68`,
``"openface-landmarks"``): an AU localiser independent of MediaPipe, as the cross-detector
evaluation intends. Without landmarks (or with ``?geometry=mediapipe``) MediaPipe supplies the
landmarks and the AUs get the default detector's regions (``"mediapipe-regions"``).

Table formats
-------------
OpenFace 2.x CSV (a file, or a directory of per-image CSVs as written by ``FaceLandmarkImg``):
columns ``AUxx_r`` (intensity 0–5, score = r/5) and/or ``AUxx_c`` (presence 0/1; when present it
decides ``active``). Header whitespace is ignored. Rows with ``success == 0`` are skipped.

OpenFace 3.0 CSV (``openface detect``, one ``face_analysis_<stem>.csv`` per image): columns
``image_path, face_id, face_detection, landmarks, emotion, gaze_yaw, gaze_pitch, action_units``,
where ``landmarks`` is a list of 98 ``[x, y]`` (WFLW layout) and ``action_units`` a list of 8
outputs. Their AUs are, in order, ``1, 2, 4, 6, 9, 12, 25, 26`` (the DISFA set, as OpenFace 3.0's
own demo labels them; override with ``?aus=1,2,...``); an output is clipped to [0, 1] for the
score and is present when ``≥ 0.5`` (``?presence=``). Rows without a face are skipped.

For both, the image key is taken from a column named ``input``, ``image``, ``image_path``,
``file``, ``filename``, ``path`` or ``img`` if there is one, else from the CSV file's stem.
Several rows for one image are several faces; matched to MediaPipe faces (when MediaPipe places
the boxes) by nearest centre when the rows have landmarks or a face box, otherwise in row order
to faces sorted left to right.

Long CSV (``table:``): columns ``image, au, score`` (``au`` as ``AU12``, ``12`` or ``AU12_r``;
score in [0, 1]), optional ``face`` (0-based) and ``active``.

Keys match an image by absolute path, then by relative path suffix, then file name, then stem.

Grounding on a region (:class:`RegionAUDetector`)
-------------------------------------------------
A detector may also offer ``detect_in_regions(image, key, region_of)``: every face grounded straight
on the canvas of a region it picks from the face box (``tagfer analyze``'s face frame), equal to
``detect`` followed by :func:`tagfer.explainer.frames.reframe` but with one grounding per face, not
two. :class:`MediaPipeAUDetector` offers it, and so does a subclass that keeps its ``detect``; a
subclass that overrides ``detect`` (:class:`TableAUDetector`, a plugin with its own scores) loses
it unless it defines its own, so callers fall back to ``detect`` + reframe and never get scores
that its ``detect`` would not give.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
import stat
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from tagfer.au.aus import AUConfig, FaceAUs, au_number, au_scores, ground_face
from tagfer.au.faces import FaceLandmarker, FaceMesh
from tagfer.au.regions68 import GEOMETRY_MEDIAPIPE, GEOMETRY_OPENFACE, ground_face_68, inner_eye_distance, wflw98_to_68
from tagfer.core.canvas import CanvasTransform
from tagfer.core.errors import ItemError
from tagfer.core.imageio import LoadedImage
from tagfer.core.registry import Registry


class DetectionError(ItemError):
    """A per-image detection failure (``kind``: ``no_face``, ``not_in_table``)."""


@runtime_checkable
class AUDetector(Protocol):
    name: str

    def detect(self, image: LoadedImage, key: str | None = None) -> list[FaceAUs]:
        """All faces in ``image``, left to right. Raise :class:`DetectionError` for per-image failures."""
        ...

    def close(self) -> None: ...


#: A region of an image, ``(x1, y1, x2, y2)`` in image pixels.
Region = tuple[float, float, float, float]


@runtime_checkable
class RegionAUDetector(AUDetector, Protocol):
    """An :class:`AUDetector` that can ground each face straight on a region's canvas (a capability:
    callers check ``isinstance(detector, RegionAUDetector)``; a class sets the method to None to
    withdraw it)."""

    def detect_in_regions(self, image: LoadedImage, key: str | None,
                          region_of: Callable[[Region], Region]) -> list[tuple[FaceAUs, Region]]:
        """Every face (left to right) with ``region = region_of(face box in image pixels)``, grounded
        on the canvas of ``region`` (boxes on a ``region``-sized image whose origin is the region's
        corner), as ``(face, region)``. Equal to ``detect`` then
        :func:`tagfer.explainer.frames.reframe` on each face's region."""
        ...


class MediaPipeAUDetector:
    """The default detector: MediaPipe blendshapes + landmark geometry → AU scores and boxes."""

    name = "mediapipe"
    geometry = GEOMETRY_MEDIAPIPE

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that overrides :meth:`detect` but not :meth:`detect_in_regions` loses the
        latter (it would ground MediaPipe's scores, not its own): callers take detect + reframe."""
        super().__init_subclass__(**kwargs)
        if "detect" in cls.__dict__ and "detect_in_regions" not in cls.__dict__:
            cls.detect_in_regions = None  # type: ignore[assignment]

    def detect(self, image: LoadedImage, key: str | None = None) -> list[FaceAUs]:
        tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
        return [ground_face(m, tr, self.config, detector=self.name) for m in self.meshes(image)]

    def detect_in_regions(self, image: LoadedImage, key: str | None,
                          region_of: Callable[[Region], Region]) -> list[tuple[FaceAUs, Region]]:
        """:meth:`RegionAUDetector.detect_in_regions`: the AU scores of each face as detected (on its
        own mesh), the boxes placed once, on its region's canvas."""
        out = []
        for m in self.meshes(image):
            x1, y1, x2, y2 = region = tuple(float(v) for v in region_of(m.bbox))
            scores = au_scores(m.blendshapes, m.landmarks, self.config, m.rotation)
            tr = CanvasTransform(x2 - x1, y2 - y1, canvas=self.config.canvas)
            out.append((ground_face(m.shifted(x1, y1), tr, self.config, scores=scores, detector=self.name), region))
        return out

    def close(self) -> None:
        if self._own:
            self.landmarker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- AU tables
#: OpenFace 3.0's eight AU outputs, in order (the DISFA set its demo labels them with).
OPENFACE3_AUS: tuple[int, ...] = (1, 2, 4, 6, 9, 12, 25, 26)
#: OpenFace 3.0 AU outputs at or above this count as present (its own evaluation's cut).
OPENFACE3_PRESENCE = 0.5


@dataclass
class TableFace:
    """AU scores of one face from a table: ``scores`` {au: score}, ``active`` {au: bool} (may be empty),
    ``center`` (x, y) image pixels if the table had landmarks or a face box, ``landmarks`` the
    face's own 68 points (68×2 image pixels, :mod:`tagfer.au.regions68` layout) if it had them."""

    scores: dict[int, float]
    active: dict[int, bool] = field(default_factory=dict)
    center: tuple[float, float] | None = None
    landmarks: np.ndarray | None = None


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

    @property
    def geometry(self) -> str:
        """``"openface-landmarks"`` when every face has its own landmarks, ``"mediapipe-regions"`` when
        none has, ``"mixed"`` otherwise (then each face record says which it got)."""
        have = {f.landmarks is not None for faces in self.rows.values() for f in faces}
        return "mixed" if len(have) > 1 else GEOMETRY_OPENFACE if have == {True} else GEOMETRY_MEDIAPIPE

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
    def from_openface(cls, path: str | os.PathLike, aus: str | tuple[int, ...] | None = None,
                      presence: float = OPENFACE3_PRESENCE) -> "AUTable":
        """OpenFace 2.x or 3.0 CSV(s) (a file or a folder, read recursively; the layout is told by the
        header). ``aus``/``presence``: OpenFace 3.0's AU order and presence threshold."""
        p = Path(path)
        files = sorted(p.rglob("*.csv")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"no OpenFace CSV files under {p}")
        order = _au_order(aus)
        table = cls(source=f"openface:{p}")
        for f in files:
            for key, face in _read_openface_csv(f, order, float(presence)):
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


_KEY_COLUMNS = ("input", "image", "image_path", "file", "filename", "path", "img")


def _au_order(aus: str | tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    if aus is None or aus == "":
        return OPENFACE3_AUS
    items = aus.replace(";", ",").split(",") if isinstance(aus, str) else list(aus)
    return tuple(au_number(a) for a in items if str(a).strip())


def _regular_file(path: Path) -> Path:
    """``path`` if it is a regular file; a FIFO, socket or device would block or never end, so it is refused unread."""
    st = os.stat(path)  # FileNotFoundError / ELOOP / permission errors as they are
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a FIFO, socket, device or directory); an AU table must be a CSV file")
    return path


def _own_landmarks(lm: np.ndarray) -> np.ndarray | None:
    """68 landmarks if they are usable (finite, eyes apart), else None (MediaPipe places the boxes)."""
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        return None
    d = inner_eye_distance(lm)
    return lm if math.isfinite(d) and d > 1e-6 else None


def _read_openface_csv(path: Path, aus3: tuple[int, ...] = OPENFACE3_AUS,
                       presence: float = OPENFACE3_PRESENCE) -> Iterator[tuple[str, TableFace]]:
    with open(_regular_file(path), newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return
        if "action_units" in header:
            yield from _openface3_rows(path, reader, header, aus3, presence)
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
                center = landmarks = None
                if len(xs) == 68 and len(ys) == 68:
                    lm = np.array([[float(row[i]), float(row[j])] for i, j in zip(xs, ys)])
                    center = (float(lm[:, 0].mean()), float(lm[:, 1].mean()))
                    landmarks = _own_landmarks(lm)
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{lineno}: malformed OpenFace row: {e}") from e
            key = row[key_col].strip() if key_col is not None else path.stem
            yield key, TableFace(scores=scores, active=active, center=center, landmarks=landmarks)


def _openface3_rows(path: Path, reader: Any, header: list[str], aus: tuple[int, ...],
                    presence: float) -> Iterator[tuple[str, TableFace]]:
    """OpenFace 3.0 rows: list-valued cells (``landmarks``, ``action_units``, ``face_detection``)."""
    idx = {h: i for i, h in enumerate(header)}
    key_col = next((idx[c] for c in header if c.lower() in _KEY_COLUMNS), None)

    def cell(row: list[str], name: str) -> Any:
        i = idx.get(name)
        text = row[i].strip() if i is not None and i < len(row) else ""
        return None if text in ("", "None", "nan", "NaN") else json.loads(text)

    for lineno, row in enumerate(reader, 2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            out = cell(row, "action_units")
            if out is None:  # no face in this image
                continue
            vals = np.asarray(out, dtype=np.float64).reshape(-1)
            if len(vals) != len(aus):
                raise ValueError(f"{len(vals)} AU outputs for {len(aus)} AUs {list(aus)} (set ?aus= to the model's AU order)")
            scores = {au: float(min(1.0, max(0.0, v))) for au, v in zip(aus, vals)}
            active = {au: bool(v >= presence) for au, v in zip(aus, vals)}
            center = landmarks = None
            pts = cell(row, "landmarks")
            if pts is not None:
                lm = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
                lm = wflw98_to_68(lm) if len(lm) == 98 else lm
                center = (float(lm[:, 0].mean()), float(lm[:, 1].mean()))
                landmarks = _own_landmarks(lm)
            box = cell(row, "face_detection")
            if center is None and box is not None and len(box) >= 4:
                center = ((float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{lineno}: malformed OpenFace 3.0 row: {e}") from e
        key = row[key_col].strip() if key_col is not None else path.stem
        yield key, TableFace(scores=scores, active=active, center=center, landmarks=landmarks)


class TableAUDetector(MediaPipeAUDetector):
    """AU scores from an :class:`AUTable`. Boxes from the table's own landmarks when a face has them
    (``use_landmarks``, the default), else from MediaPipe's regions; MediaPipe is opened only when
    needed (``landmarker`` or ``landmarker_factory``, else a default :class:`FaceLandmarker`).
    Its own :meth:`detect` withdraws ``detect_in_regions`` (callers reframe its faces)."""

    def __init__(self, table: AUTable, config: AUConfig = AUConfig(), landmarker: FaceLandmarker | None = None, *,
                 own_landmarker: bool | None = None, use_landmarks: bool = True,
                 landmarker_factory: Callable[[], FaceLandmarker] | None = None, **landmarker_kwargs):
        self.config = config
        self.table = table
        self.name = table.source.split(":", 1)[0]
        self.use_landmarks = use_landmarks
        self._lm = landmarker
        self._own = landmarker is None if own_landmarker is None else own_landmarker
        self._factory = landmarker_factory or (lambda: FaceLandmarker(**landmarker_kwargs))

    @property
    def landmarker(self) -> FaceLandmarker:  # type: ignore[override]
        if self._lm is None:
            self._lm = self._factory()
        return self._lm

    @property
    def geometry(self) -> str:  # type: ignore[override]
        """What places this detector's boxes: ``"openface-landmarks"``, ``"mediapipe-regions"`` or
        ``"mixed"`` (some table faces have landmarks; each face record says which it got)."""
        return self.table.geometry if self.use_landmarks else GEOMETRY_MEDIAPIPE

    def detect(self, image: LoadedImage, key: str | None = None) -> list[FaceAUs]:
        rows = self.table.lookup(key or image.source)
        if rows is None:
            raise DetectionError("not_in_table", f"{key or image.source} has no row in {self.table.source}")
        tr = CanvasTransform(image.width, image.height, canvas=self.config.canvas)
        if self.use_landmarks and all(r.landmarks is not None for r in rows):
            out = [ground_face_68(r.landmarks, tr, self.config, r.scores, r.active or None, detector=self.name,
                                  source=self.name) for r in rows]
        else:
            out = [ground_face(mesh, tr, self.config, scores=tf.scores, active=tf.active or None, detector=self.name)
                   for mesh, tf in _match_faces(self.meshes(image), rows)]
        out.sort(key=lambda f: (f.mesh.bbox[0] + f.mesh.bbox[2]) / 2 if f.mesh else 0)
        return out

    def close(self) -> None:
        if self._own and self._lm is not None:
            self._lm.close()


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


# ----------------------------------------------------------------------------- registry and specs
#: The AU detector kinds: a builder ``build(target, spec: DetectorSpec, **options) -> AUDetector``
#: per kind (see the module docstring for adding one).
DETECTORS = Registry("AU detector", usage="KIND[:TARGET][?key=value&...]")


@dataclass(frozen=True)
class DetectorSpec:
    """A picklable description of a detector, built inside each worker process.

    ``kind``: a :data:`DETECTORS` spec — ``"mediapipe"``, ``"openface:PATH[?aus=..&geometry=mediapipe]"``,
    ``"table:PATH"`` or a kind registered by the user. The other fields configure the AU
    thresholds/canvas and the MediaPipe landmarker (when the detector uses one).
    """

    kind: str = "mediapipe"
    config: AUConfig = AUConfig()
    landmarker_path: str | None = None
    max_faces: int = 5
    fallback: str | None = None

    def landmarker(self) -> FaceLandmarker:
        """A new MediaPipe landmarker with this spec's settings (the caller closes it)."""
        return FaceLandmarker(model_path=self.landmarker_path, max_faces=self.max_faces, fallback=self.fallback)

    def table_detector(self, table: AUTable, *, use_landmarks: bool = True) -> TableAUDetector:
        """A :class:`TableAUDetector` over ``table`` with this spec's config; MediaPipe opens on first need."""
        return TableAUDetector(table, self.config, own_landmarker=True, use_landmarks=use_landmarks,
                               landmarker_factory=self.landmarker)

    def build(self) -> AUDetector:
        """The detector of :attr:`kind` (``ValueError`` listing the kinds when it is unknown)."""
        return DETECTORS.create(self.kind, self)


@DETECTORS.register("mediapipe", needs_target=False, usage="mediapipe",
                    help="MediaPipe landmarks + blendshapes → AU scores (the default)")
def _build_mediapipe(target: str, spec: DetectorSpec) -> AUDetector:
    return MediaPipeAUDetector(spec.config, landmarker=spec.landmarker(), own_landmarker=True)


def _geometry_option(geometry: str) -> bool:
    g = str(geometry).strip().lower()
    if g not in ("auto", "mediapipe", "openface", "landmarks"):
        raise ValueError(f"geometry must be auto (the table's own landmarks when it has them) or mediapipe, got {geometry!r}")
    return g != "mediapipe"


@DETECTORS.register("openface", usage="openface:CSV|DIR[?aus=1,2,..&presence=0.5&geometry=auto|mediapipe]",
                    help="OpenFace 2.x or 3.0 CSV output (scores; boxes from its landmarks when present)")
def _build_openface(target: str, spec: DetectorSpec, aus: str | None = None, presence: float | str = OPENFACE3_PRESENCE,
                    geometry: str = "auto") -> AUDetector:
    use = _geometry_option(geometry)
    return spec.table_detector(AUTable.from_openface(target, aus=aus, presence=float(presence)), use_landmarks=use)


@DETECTORS.register("table", usage="table:CSV", help="a long CSV image,au,score[,face,active] (boxes from MediaPipe)")
def _build_table(target: str, spec: DetectorSpec) -> AUDetector:
    return spec.table_detector(AUTable.from_long_csv(target))
