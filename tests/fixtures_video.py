"""Session fixtures for the video tests: short clips built from the real sample faces, encoded with PyAV.

Timeline of ``happy_clip`` (25 fps, 192×192, 48 frames): Grace Hopper (near neutral for the
facs engine) for frames 0–11, the astronaut (smiling) for 12–35, Grace Hopper again for 36–47.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

CLIP_FPS = 25
CLIP_SIDE = 192
HAPPY_FRAMES = (12, 35)  # first and last astronaut frame of happy_clip


def face_square(rgb: np.ndarray, box: tuple[int, int, int, int], side: int = CLIP_SIDE) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb[box[1]:box[3], box[0]:box[2]]).resize((side, side), Image.Resampling.BILINEAR))


def write_clip(path, frames, fps: float = CLIP_FPS, times=None) -> str:
    """Encode RGB frames (an iterable) with PyAV through tagfer's own writer; ``times`` in seconds."""
    from tagfer.au.video_render import VideoWriter

    with VideoWriter(path, fps=fps, crf=18) as w:
        for i, f in enumerate(frames):
            w.write(f, times[i] if times is not None else i / fps)
    return str(path)


@pytest.fixture(scope="session")
def clip_faces(astronaut_rgb, grace_rgb) -> dict[str, np.ndarray]:
    return {"astronaut": face_square(astronaut_rgb, (110, 20, 350, 260)), "grace": face_square(grace_rgb, (0, 20, 512, 532))}


@pytest.fixture(scope="session")
def happy_clip(tmp_path_factory, clip_faces) -> str:
    a, g = clip_faces["astronaut"], clip_faces["grace"]
    lo, hi = HAPPY_FRAMES
    frames = [a if lo <= i <= hi else g for i in range(48)]
    return write_clip(tmp_path_factory.mktemp("clips") / "happy.mp4", frames)


@pytest.fixture(scope="session")
def enter_leave_clip(tmp_path_factory, clip_faces) -> str:
    """320×192, 40 frames: Grace on the left (0–9), nobody (10–24), the astronaut on the right (25–39)."""
    a, g = clip_faces["astronaut"], clip_faces["grace"]
    frames = []
    for i in range(40):
        f = np.full((CLIP_SIDE, 320, 3), 200, np.uint8)
        if i < 10:
            f[:, :CLIP_SIDE] = g
        elif i >= 25:
            f[:, 320 - CLIP_SIDE:] = a
        frames.append(f)
    return write_clip(tmp_path_factory.mktemp("clips") / "enter_leave.mp4", frames)


# ----------------------------------------------------------------------------- adversarial clips (PyAV, packets muxed by hand)
def jpeg_bytes(rgb: np.ndarray, quality: int = 85) -> bytes:
    """One MJPEG packet: a baseline JPEG (4:2:0, decoded as yuvj420p: 1.5 bytes per pixel)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, pix_fmt: str) -> bytes:
    """One PNG packet encoded by FFmpeg (``rgb24``, ``rgb48be`` or ``rgba64be``: 3, 6 or 8 bytes per pixel)."""
    import fractions

    import av

    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt = arr.shape[1], arr.shape[0], pix_fmt
    cc.time_base = fractions.Fraction(1, 25)
    src = {"rgb24": "rgb24", "rgb48be": "rgb48le", "rgba64be": "rgba64le"}[pix_fmt]
    f = av.VideoFrame.from_ndarray(arr, format=src)
    f.pts = 0
    return b"".join(bytes(p) for p in [*cc.encode(f), *cc.encode(None)])


def mux_packets(path, payloads, *, codec: str, header: tuple[int, int], pix_fmt: str, fmt: str | None = None,
                pts=None, ms_per_frame: int = 40) -> str:
    """A clip whose container header says ``header`` (width, height) and ``pix_fmt``, whatever the
    packets hold (each an intra-coded image: MJPEG or PNG). ``pts`` in milliseconds (default one
    frame every ``ms_per_frame``); decode timestamps stay monotonic (1 ms apart), so any pts ≥ its
    index can be muxed."""
    import fractions

    import av

    tb = fractions.Fraction(1, 1000)
    c = av.open(str(path), "w", format=fmt)
    s = c.add_stream(codec, rate=round(1000 / ms_per_frame))
    s.width, s.height = header
    s.pix_fmt = pix_fmt
    for i, b in enumerate(payloads):
        p = av.Packet(b)
        p.stream, p.time_base = s, tb
        p.dts = i if pts is not None else i * ms_per_frame  # 1 ms apart: any pts ≥ its index can be muxed
        p.pts = pts[i] if pts is not None else p.dts
        c.mux(p)
    c.close()
    return str(path)
