"""Fixtures of the live and video tests of ``tagfer serve``: webcam-like 640×480 frames made of the
real sample faces, a y4m file for Chromium's fake camera (written with PyAV) and a short clip.

Camera timeline (``cam_y4m``, :data:`CAM_FPS` frames/s, looped by Chromium): Grace Hopper (neutral
for the default engine) for :data:`NEUTRAL_S` seconds, then the smiling astronaut (happiness) for
:data:`SMILE_S` seconds while the face slides from x = :data:`X_RANGE` [0] to [1] and back. A
marker square in the top-left corner is black during the neutral part and white during the smile,
so the page can tell when the expression appeared in the camera's own stream.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from PIL import Image

CAM_W, CAM_H = 640, 480
CAM_FPS = 10
NEUTRAL_S, SMILE_S = 2.0, 4.0
FACE_SIDE = 300
X_RANGE = (60, 280)  # left edge of the face square during the smile
MARK = 24  # marker square side (top-left corner)


def face_crops(astronaut_rgb: np.ndarray, grace_rgb: np.ndarray) -> dict[str, Image.Image]:
    return {"smile": Image.fromarray(astronaut_rgb[20:260, 110:350]).resize((FACE_SIDE, FACE_SIDE), Image.Resampling.BILINEAR),
            "neutral": Image.fromarray(grace_rgb[20:532, 0:512]).resize((FACE_SIDE, FACE_SIDE), Image.Resampling.BILINEAR)}


def cam_frame(face: Image.Image, x: int, marker: bool) -> np.ndarray:
    im = Image.new("RGB", (CAM_W, CAM_H), (118, 128, 138))
    im.paste(face, (x, (CAM_H - FACE_SIDE) // 2))
    a = np.asarray(im).copy()
    a[:MARK, :MARK] = 255 if marker else 0
    return a


def cam_frames(astronaut_rgb: np.ndarray, grace_rgb: np.ndarray):
    """(rgb, phase, face left x) for each frame of the camera timeline."""
    faces = face_crops(astronaut_rgb, grace_rgb)
    n0, n1 = round(NEUTRAL_S * CAM_FPS), round(SMILE_S * CAM_FPS)
    mid = (CAM_W - FACE_SIDE) // 2
    for i in range(n0):
        yield cam_frame(faces["neutral"], mid, False), "neutral", mid
    lo, hi = X_RANGE
    for i in range(n1):
        u = i / max(1, n1 - 1)
        x = round(lo + (hi - lo) * (1 - abs(2 * u - 1)))  # there and back
        yield cam_frame(faces["smile"], x, True), "smile", x


def write_y4m(path, frames, fps: int = CAM_FPS) -> str:
    """Raw YUV 4:2:0 frames in a YUV4MPEG2 file (Chromium's fake camera reads it), with PyAV."""
    import av

    with av.open(str(path), "w", format="yuv4mpegpipe") as c:
        s = c.add_stream("rawvideo", rate=fps)
        s.width, s.height, s.pix_fmt = CAM_W, CAM_H, "yuv420p"
        for rgb in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return str(path)


def jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def cam_y4m(tmp_path_factory, astronaut_rgb, grace_rgb) -> str:
    return write_y4m(tmp_path_factory.mktemp("cam") / "cam.y4m", (f for f, _, _ in cam_frames(astronaut_rgb, grace_rgb)))


@pytest.fixture(scope="session")
def cam_jpeg(astronaut_rgb, grace_rgb):
    """``cam_jpeg("smile" | "neutral", x)``: a JPEG camera frame with that face's left edge at ``x``."""
    faces = face_crops(astronaut_rgb, grace_rgb)
    return lambda kind, x: jpeg(cam_frame(faces[kind], x, kind == "smile"))


@pytest.fixture(scope="session")
def live_frames(astronaut_rgb, grace_rgb) -> dict[str, bytes]:
    """One JPEG camera frame of each kind: ``neutral``, ``smile`` (face at the middle), ``smile_left``
    and ``smile_right`` (the face at either end of its path)."""
    faces = face_crops(astronaut_rgb, grace_rgb)
    mid = (CAM_W - FACE_SIDE) // 2
    return {"neutral": jpeg(cam_frame(faces["neutral"], mid, False)), "smile": jpeg(cam_frame(faces["smile"], mid, True)),
            "smile_left": jpeg(cam_frame(faces["smile"], X_RANGE[0], True)),
            "smile_right": jpeg(cam_frame(faces["smile"], X_RANGE[1], True))}


@pytest.fixture(scope="session")
def smile_clip(tmp_path_factory, astronaut_rgb, grace_rgb) -> str:
    """A 3 s, 10 fps, 320×240 WebM (VP8): neutral 1 s, smile 1.5 s, neutral 0.5 s — what the page uploads."""
    import av

    faces = face_crops(astronaut_rgb, grace_rgb)
    path = tmp_path_factory.mktemp("clip") / "smile.webm"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx", rate=10)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        s.options = {"crf": "10", "b:v": "1M"}
        for i in range(30):
            face = faces["smile"] if 10 <= i < 25 else faces["neutral"]
            rgb = np.asarray(Image.fromarray(cam_frame(face, (CAM_W - FACE_SIDE) // 2, False)).resize((320, 240)))
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return str(path)


@contextlib.contextmanager
def serving(app):
    """``app`` on a real uvicorn server on loopback (own thread), with the connection limits users
    get (:class:`tagfer.core.serving.BackgroundServer`); yields its base URL."""
    from tagfer.core.serving import BackgroundServer

    with BackgroundServer(app) as srv:
        yield srv.url
