"""Robust image loading: any path or bytes → upright 8-bit RGB array, or a clear :class:`ImageError`.

Handled: EXIF orientation (coordinates everywhere refer to the *upright*
image), grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit and
float images (rescaled to 8 bit; NaN and ±inf pixels are ignored when the
range is measured, NaN maps to black), multi-frame files (first frame), and
huge images (decoded with JPEG draft mode when possible, then box-reduced tile
by tile so the longer side is at most ``max_side``; ``scale`` records the
factor so that results can be reported in original-pixel coordinates).
Formats: :data:`FORMATS` only (a file in any other format is ``not_an_image``).

Decode budget (decompression bombs). Before any pixel is decoded, the header
gives the *decode cost*: pixels × bytes per pixel of the decoded mode as Pillow
stores it (1 for 1-bit, L and P; 2 for 16-bit grey ``I;16``; 4 for RGB, RGBA,
CMYK, 32-bit ``I`` and float ``F``), at the size the decoder will produce (after
JPEG draft scaling), plus known decoder buffers: libjpeg's full-resolution DCT
coefficients for progressive and multi-scan JPEGs (2 bytes per sample),
libwebp's three RGBA canvases, libtiff's buffer of one decoded strip or tile of a
compressed TIFF at the file's own bit depth (a single-strip 16-bit RGBA TIFF
holds 8 bytes per pixel there besides Pillow's 4; an RGBA strip for JPEG/YCbCr
TIFFs), and, for an image whose longer side is between ``max_side`` and twice
it, the full-size RGB copy made before the final resize. An image above the budget is refused with kind
``too_large`` without decoding. Default :data:`DECODE_BUDGET` = 256 MB, what a
64-megapixel RGB photo costs; set ``TAGFER_DECODE_BUDGET_MB`` or pass
``budget=`` (bytes). Peak memory for one image is about the decode cost plus
~30–60 MB whatever the image's size (conversion works tile by tile on ≤ 1 M pixels; the
box-reduced RGB output, ≤ 37 MB, and its final resize are held besides; measured per format
by ``benchmarks/bench_decode.py --images``); memory of decodes above
32 MB is handed back to the OS afterwards (``malloc_trim``). :func:`probe` runs
every header check alone (milliseconds; ``tagfer serve`` answers 413 with it).
Header floods: Pillow walks the structures before the pixels one at a time in Python, so a
PNG with more than :data:`MAX_HEADER_ITEMS` chunks before its image data, a JPEG with as many
markers (or stray bytes) before its frame header, or a GIF with as many extension blocks
before its first image is refused ``too_large`` after a scan of milliseconds (825k empty PNG
chunks took Pillow 3.5 s). The cost model, the budget and the flood scan are
:mod:`tagfer.core.image_budget` (re-exported here); this module opens, checks and decodes.

Files: only regular files are read. A FIFO, socket or device (``/dev/zero``)
is ``unreadable`` without being opened for reading (the open is non-blocking
and the type is checked on the descriptor); so are directories, symbolic-link
loops, dangling symbolic links and permission errors, each with its reason.

Failures raise :class:`ImageError` with a stable ``kind``:
``not_found``, ``unreadable``, ``empty_file``, ``not_an_image``, ``corrupt``,
``too_small``, ``too_large``.
"""

from __future__ import annotations

import base64
import errno
import io
import math
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from tagfer.core.errors import ItemError
from tagfer.core.image_budget import DECODE_BUDGET, MAX_HEADER_ITEMS, bytes_per_pixel, decode_budget, decode_cost, header_flood

__all__ = [
    "MAX_PIXELS", "DECODE_BUDGET", "FORMATS", "MIN_SIDE", "MAX_HEADER_ITEMS", "IMAGE_EXTENSIONS",
    "ImageError", "LoadedImage", "ImageHeader", "decode_budget", "bytes_per_pixel",
    "load_image", "load_pil", "probe", "is_image_path", "data_url",
]

# Images beyond this many pixels are refused outright; below it the decode budget decides
# (module docstring); anything accepted but above ``max_side`` is downscaled at decode time.
MAX_PIXELS = 400_000_000
# Formats decoded (only these plugins are tried; the JPEG one also opens MPO, what many cameras write).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP")
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


@dataclass(frozen=True)
class ImageHeader:
    """What :func:`probe` learns from an image's header without decoding its pixels.

    ``width``/``height``: upright full-resolution size (as stored for a PNG whose EXIF chunk
    comes after its pixels: finding it would mean decoding them); ``mode``: Pillow mode of the
    decoded pixels; ``decode_bytes``: the decode cost (module docstring) at the size
    the decoder will actually produce (JPEG draft scaling applied).
    """

    format: str
    width: int
    height: int
    mode: str
    decode_bytes: int


def load_image(source: str | os.PathLike | bytes, max_side: int = 2048, budget: int | None = None) -> LoadedImage:
    """Read ``source`` (path or encoded bytes) into a :class:`LoadedImage`.

    ``budget``: decode budget in bytes (default :func:`decode_budget`). Raises
    :class:`ImageError` with a clear message for every unusable input.
    """
    rgb, W, H, name = _decode(source, max_side, budget)
    arr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    scale = arr.shape[1] / W
    return LoadedImage(rgb=arr, width=int(W), height=int(H), scale=float(scale), source=name)


def load_pil(source: str | os.PathLike | bytes, max_side: int = 2048, budget: int | None = None) -> Image.Image:
    """The same checks and decoding as :func:`load_image`, as an upright RGB PIL image
    whose longer side is at most ``max_side`` (no NumPy copy; for model inputs)."""
    return _decode(source, max_side, budget)[0]


def probe(source: str | os.PathLike | bytes, max_side: int = 2048, budget: int | None = None) -> ImageHeader:
    """Every check of :func:`load_image` that needs only the header (file kind, format,
    size, decode budget), in milliseconds and without decoding. Raises :class:`ImageError`."""
    return _decode(source, max_side, budget, header_only=True)  # type: ignore[return-value]


def _release_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps large freed blocks otherwise)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
_RELEASE_ABOVE = 32_000_000  # decodes costing more than this give their memory back afterwards
_OPEN_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS and the warning filters are process-wide


# --------------------------------------------------------------------------- opening
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _open_regular(path: Path) -> io.BufferedReader:
    """Open ``path`` for reading only if it is a regular file (a FIFO, socket or device is
    never read: opening is non-blocking and the type is checked on the open descriptor)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise ImageError("unreadable", f"dangling symbolic link (its target does not exist): {path}") from None
        raise ImageError("not_found", f"no such file: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("unreadable", f"symbolic link loop (too many levels of symbolic links): {path}") from e
        if e.errno == errno.ENOTDIR:
            raise ImageError("not_found", f"no such file (a parent is not a directory): {path}") from e
        raise ImageError("unreadable", f"cannot read {path}: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("unreadable", f"is a directory, not an image: {path}")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("unreadable", f"not a regular file ({_file_kind(st.st_mode)}), not read: {path}")
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError("unreadable", f"symbolic link loop (too many levels of symbolic links): {path}") from e
        raise ImageError("unreadable", f"cannot read {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)  # the file actually opened (it may have been replaced since the stat)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("unreadable", f"not a regular file ({_file_kind(st.st_mode)}), not read: {path}")
        if flags & getattr(os, "O_NONBLOCK", 0) and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1–8; 1 when absent or malformed)."""
    try:
        orient = int(im.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF: treat as upright
        return 1
    return orient if orient in _TRANSPOSE else 1


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _decode(source: str | os.PathLike | bytes, max_side: int, budget: int | None = None, header_only: bool = False):
    """(upright RGB image ≤ max_side, original upright width, height, display name), or the
    :class:`ImageHeader` when ``header_only``."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    limit = decode_budget(budget)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("empty_file", "empty input: 0 bytes")
        fp: io.IOBase = io.BytesIO(data)
    else:
        path = Path(source)
        fp = _open_regular(path)
        if os.fstat(fp.fileno()).st_size == 0:
            fp.close()
            raise ImageError("empty_file", f"empty file: {path}")
    big = False
    try:
        with fp:
            head = fp.read(30)
            fp.seek(0)
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                try:
                    from PIL.WebPImagePlugin import _get_size  # lazy (start-up time): PIL.WebPImagePlugin
                except ImportError:  # Pillow without WebP: Image.open below refuses the file
                    _get_size = lambda _head: None  # noqa: E731
                size = _get_size(head)  # libwebp allocates its canvases when the file is opened
                if size and size[0] * size[1] * 16 > limit:
                    raise ImageError("too_large", _too_large_msg(size[0], size[1], size[0] * size[1] * 16, limit, name))
            flood = header_flood(fp, head)
            if flood:
                raise ImageError("too_large", f"{flood} (a header flood): {name}")
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, with the budget
                old_max = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = MAX_PIXELS
                try:
                    im = Image.open(fp, formats=FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = old_max
            with im:
                w0, h0 = im.size
                if w0 * h0 > MAX_PIXELS:
                    raise ImageError("too_large", f"image has {w0}×{h0} pixels, above the {MAX_PIXELS:,} limit: {name}")
                if min(w0, h0) < MIN_SIDE:
                    raise ImageError("too_small", f"image is {w0}×{h0} pixels; faces need at least {MIN_SIDE} pixels per side: {name}")
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: cheap downscaling of huge photos.
                if im.format in ("JPEG", "MPO") and max(w0, h0) > 2 * max_side:
                    f = max_side / max(w0, h0)
                    im._tagfer_full_size = (w0, h0)  # type: ignore[attr-defined]
                    im.draft("RGB", (max(1, int(w0 * f)), max(1, int(h0 * f))))
                cost = decode_cost(im, fp) + _shrink_cost(im.size, max_side)
                if cost > limit:
                    raise ImageError("too_large", _too_large_msg(w0, h0, cost, limit, name, im.mode))
                # Nothing above may decode pixels (Pillow's PNG getexif() does, to find a late eXIf chunk).
                if header_only:
                    orient = _orientation(im) if im.format != "PNG" or "exif" in im.info else 1
                    W, H = (h0, w0) if orient in (5, 6, 7, 8) else (w0, h0)
                    return ImageHeader(str(im.format), int(W), int(H), im.mode, int(cost))
                big = cost > _RELEASE_ABOVE
                im.load()
                orient = _orientation(im)
                # Upright full-resolution size: orientations 5–8 swap the axes.
                W, H = (h0, w0) if orient in (5, 6, 7, 8) else (w0, h0)
                rgb = _shrink_to_rgb(im, max_side)
                if orient != 1:
                    rgb = rgb.transpose(_TRANSPOSE[orient])
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", f"not a recognised image format ({', '.join(FORMATS)}): {name}") from e
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"image too large (decompression bomb guard): {name}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("corrupt", f"corrupt or truncated image: {name} ({e})") from e
    finally:
        if big:
            im = None  # noqa: F841 - drop the decoded pixels before trimming
            _release_memory()
    if max(rgb.size) > max_side:
        f = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * f)), max(1, round(rgb.height * f))), Image.Resampling.BILINEAR)
    return rgb, int(W), int(H), name


def _too_large_msg(w: int, h: int, cost: int, limit: int, name: str, mode: str | None = None) -> str:
    m = f" {mode}" if mode else ""
    return (f"decoding this {w}×{h}{m} image needs {cost / 1e6:,.0f} MB, above the decode budget of "
            f"{limit / 1e6:,.0f} MB (TAGFER_DECODE_BUDGET_MB): {name}")


# --------------------------------------------------------------------------- pixels → RGB
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_TILE_PIXELS = 1 << 20  # conversions run tile by tile: their scratch memory stays ~10 MB whatever the image


def _tiles(w: int, h: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    for y in range(0, h, step):
        for x in range(0, w, step):
            yield x, y, min(w, x + step), min(h, y + step)


def _value_range(im: Image.Image) -> tuple[float, float]:
    """The 8-bit mapping range of a 16-bit, 32-bit integer or float image; NaN and ±inf are ignored."""
    if im.mode.startswith("I;16"):
        return 0.0, 65535.0
    lo, hi = math.inf, -math.inf
    step = max(1, math.isqrt(_TILE_PIXELS))
    for box in _tiles(im.width, im.height, step):
        arr = np.asarray(im.crop(box), dtype=np.float64)
        fin = arr[np.isfinite(arr)]
        if fin.size:
            lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
    if lo > hi:  # no finite value at all
        return 0.0, 1.0
    if im.mode == "I" and 255 < hi <= 65535:
        lo, hi = 0.0, 65535.0
    elif im.mode == "I" and 0 <= lo and hi <= 255:
        lo, hi = 0.0, 255.0
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _to_rgb(im: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _HIGH_BIT:
        lo, hi = value_range or _value_range(im)
        arr = np.asarray(im, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)  # NaN → black, ±inf → the range ends
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


def _shrink_cost(size: tuple[int, int], max_side: int) -> int:
    """Bytes :func:`_shrink_to_rgb` adds for an image decoded at ``size``: a full-size RGB copy
    before the final resize when it cannot box-reduce (longer side between ``max_side`` and twice it)."""
    w, h = size
    return w * h * 4 if w * h > _TILE_PIXELS and max_side < max(w, h) < 2 * max_side else 0


def _shrink_to_rgb(im: Image.Image, max_side: int) -> Image.Image:
    """A decoded image of any mode → RGB, box-reduced by an integer factor towards ``max_side``
    (the caller finishes with a bilinear resize). Works tile by tile, so memory beyond the
    decoded pixels is the output plus one tile, never a full-size copy in another mode."""
    w, h = im.size
    k = max(1, max(w, h) // max_side)
    rng = _value_range(im) if im.mode in _HIGH_BIT else None
    if w * h <= _TILE_PIXELS:  # small: converted whole, the caller's bilinear resize does all the scaling
        return _to_rgb(im, rng)
    step = k * max(1, math.isqrt(_TILE_PIXELS) // k)  # a multiple of k: tiles reduce exactly like the whole
    out = Image.new("RGB", (-(-w // k), -(-h // k)))
    for box in _tiles(w, h, step):
        part = _to_rgb(im.crop(box), rng)
        if k > 1:
            part = part.reduce(k)
        out.paste(part, (box[0] // k, box[1] // k))
    return out


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# Never let PIL silently accept truncated files.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def data_url(image: Image.Image, fmt: str = "png") -> str:
    """``data:image/<fmt>;base64,…`` of a PIL image, as is (no resize): ``png`` at zlib level 1
    (~4× quicker than PNG's default, ~15% larger) or ``jpeg``/``jpg`` at quality 95.
    The one encoder of images for model requests and web pages."""
    fmt = "jpeg" if fmt.lower() in ("jpg", "jpeg") else fmt.lower()
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
