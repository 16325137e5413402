"""Small helpers several commands share (no command registered here, so any command module may import it)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_image(p: Path) -> Path:
    """``sample:astronaut`` / ``sample:grace_hopper`` → the real face shipped by an installed package."""
    s = str(p)
    if s.startswith("sample:"):
        from tagfer.core.samples import sample_face_path  # lazy: keeps `tagfer --help` fast

        return sample_face_path(s.split(":", 1)[1])
    return p


def set_verbose(verbose: bool) -> None:
    """``--verbose``: let MediaPipe's C++ log lines through (``TAGFER_VERBOSE``, inherited by workers)."""
    if verbose:
        os.environ["TAGFER_VERBOSE"] = "1"
