"""Real sample faces shipped by installed packages (offline): for demos and tests.

* ``astronaut`` — scikit-image's ``data.astronaut()`` (public domain), smiling.
* ``grace_hopper`` — matplotlib's ``sample_data/grace_hopper.jpg``, slight smile.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = ("astronaut", "grace_hopper")


def sample_face_path(name: str = "astronaut") -> Path:
    """Path of a sample face image file on disk (no copies made)."""
    if name == "astronaut":
        try:
            import skimage  # lazy (start-up time): skimage
        except ImportError as e:
            raise RuntimeError("the 'astronaut' sample needs scikit-image (pip install scikit-image)") from e
        p = Path(skimage.__file__).parent / "data" / "astronaut.png"
    elif name == "grace_hopper":
        try:
            import matplotlib  # lazy (start-up time): matplotlib, PIL
        except ImportError as e:
            raise RuntimeError("the 'grace_hopper' sample needs matplotlib (pip install matplotlib)") from e
        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    else:
        raise ValueError(f"unknown sample {name!r}; choose from {SAMPLES}")
    if not p.is_file():
        raise RuntimeError(f"sample image missing from the installed package: {p}")
    return p


def available_samples() -> list[Path]:
    out = []
    for n in SAMPLES:
        try:
            out.append(sample_face_path(n))
        except RuntimeError:
            pass
    return out


__all__ = ["SAMPLES", "sample_face_path", "available_samples"]
