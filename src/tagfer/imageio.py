"""Robust image loading: any path or bytes → upright 8-bit RGB array, or a clear :class:`ImageError`.

Handled: EXIF orientation (coordinates everywhere refer to the *upright*
image, i.e. after ``exif_transpose``), grayscale, palette, RGBA/LA
(composited on white), CMYK, 16-bit and float images (rescaled to 8 bit),
and huge images (decoded with JPEG draft mode when possible and downscaled so
the longer side is at most ``max_side``; ``scale`` records the factor so that
results can be reported in original-pixel coordinates).

Failures raise :class:`ImageError` with a stable ``kind``:
``not_found``, ``unreadable``, ``empty_file``, ``not_an_image``, ``corrupt``,
``too_small``, ``too_large``.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tagfer.errors import ItemError

# Images beyond this many pixels are refused outright (decompression bombs);
# anything smaller but above ``max_side`` is downscaled at decode time.
MAX_PIXELS = 400_000_000
MIN_SIDE = 16
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


class ImageError(ItemError):
    """An image that cannot be used (``kind`` as listed in the module docstring)."""


@dataclass
class LoadedImage:
    """An upright RGB image ready for detection.

    ``rgb``: H×W×3 uint8 (possibly downscaled); ``width``/``height``: size of
    the upright image at full resolution; ``scale``: ``rgb`` pixels per
    original pixel (1.0 unless downscaled).
    """

    rgb: np.ndarray
    width: int
    height: int
    scale: float = 1.0
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or (mode == "I" and 255 < top <= 65535):
            lo, hi = 0.0, 65535.0
        elif mode == "I" and 0 <= top <= 255 and float(arr.min()) >= 0:
            lo, hi = 0.0, 255.0
        else:  # float or out-of-range data: stretch to the full 8-bit range
            lo, hi = (float(arr.min()), top) if arr.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        arr8 = np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, P without transparency


def load_image(source: str | os.PathLike | bytes, max_side: int = 2048) -> LoadedImage:
    """Read ``source`` (path or encoded bytes) into a :class:`LoadedImage`.

    Raises :class:`ImageError` with a clear message for every unusable input.
    """
    rgb, W, H, name = _decode(source, max_side)
    arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    scale = arr.shape[1] / W
    return LoadedImage(rgb=arr, width=int(W), height=int(H), scale=float(scale), source=name)


def load_pil(source: str | os.PathLike | bytes, max_side: int = 2048) -> Image.Image:
    """The same checks and decoding as :func:`load_image`, as an upright RGB PIL image
    whose longer side is at most ``max_side`` (no NumPy copy; for model inputs)."""
    return _decode(source, max_side)[0]


def _decode(source: str | os.PathLike | bytes, max_side: int) -> tuple[Image.Image, int, int, str]:
    """(upright RGB image ≤ max_side, original upright width, height, display name)."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if not data:
            raise ImageError("empty_file", "empty input: 0 bytes")
        fp: io.BytesIO | str = io.BytesIO(data)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError("not_found", f"no such file: {path}")
        if path.is_dir():
            raise ImageError("unreadable", f"is a directory, not an image: {path}")
        try:
            size = path.stat().st_size
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ImageError("unreadable", f"cannot read {path}: {e.strerror or e}") from e
        if size == 0:
            raise ImageError("empty_file", f"empty file: {path}")
        fp = str(path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old_max = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = MAX_PIXELS
            try:
                im = Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = old_max
            with im:
                w0, h0 = im.size
                if w0 * h0 > MAX_PIXELS:
                    raise ImageError("too_large", f"image has {w0}×{h0} pixels, above the {MAX_PIXELS:,} limit: {name}")
                try:
                    orient = int(im.getexif().get(0x0112, 1))
                except Exception:  # malformed EXIF: treat as upright
                    orient = 1
                # Upright full-resolution size: orientations 5–8 swap the axes.
                W, H = (h0, w0) if orient in (5, 6, 7, 8) else (w0, h0)
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: cheap downscaling of huge photos.
                if im.format == "JPEG" and max(w0, h0) > 2 * max_side:
                    f = max_side / max(w0, h0)
                    im.draft("RGB", (max(1, int(w0 * f)), max(1, int(h0 * f))))
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # malformed EXIF: keep the pixels as stored
                    W, H = w0, h0
                rgb = _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", f"not a recognised image format: {name}") from e
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"image too large (decompression bomb guard): {name}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("corrupt", f"corrupt or truncated image: {name} ({e})") from e

    if min(W, H) < MIN_SIDE:
        raise ImageError("too_small", f"image is {W}×{H} pixels; faces need at least {MIN_SIDE} pixels per side: {name}")
    if max(rgb.size) > max_side:
        f = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * f)), max(1, round(rgb.height * f))), Image.Resampling.BILINEAR)
    return rgb, int(W), int(H), name


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# Never let PIL silently accept truncated files.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def data_url(image: Image.Image, fmt: str = "png") -> str:
    """``data:image/<fmt>;base64,…`` of a PIL image, as is (no resize): ``png`` at zlib level 1
    (~4× quicker than PNG's default, ~15% larger) or ``jpeg``/``jpg`` at quality 95.
    The one encoder of images for model requests and web pages."""
    import base64

    fmt = "jpeg" if fmt.lower() in ("jpg", "jpeg") else fmt.lower()
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
