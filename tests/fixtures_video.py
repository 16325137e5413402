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
