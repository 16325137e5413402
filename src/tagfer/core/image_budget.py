"""The decode budget: what decoding an image will cost, read from its header before any pixel is.

Used by the loader (:mod:`tagfer.core.imageio`, whose docstring states the whole policy) to
refuse decompression bombs with kind ``too_large``. The *decode cost* of an opened image is its
pixels × the bytes per pixel of the decoded mode as Pillow stores it (:func:`bytes_per_pixel`),
plus the decoders' own buffers: libjpeg's full-resolution DCT coefficients for progressive and
multi-scan JPEGs (2 bytes per sample), libwebp's three RGBA canvases, libtiff's buffer of one
decoded strip or tile of a compressed TIFF (:func:`decode_cost`). The budget is
:data:`DECODE_BUDGET` unless ``TAGFER_DECODE_BUDGET_MB`` or the caller says otherwise
(:func:`decode_budget`). A *header flood* is a file with more than :data:`MAX_HEADER_ITEMS`
structures before its pixels (PNG chunks, JPEG markers or stray bytes, GIF extension blocks),
which Pillow would walk one at a time in Python (:func:`header_flood`, a scan of milliseconds).
No pixel is decoded here.
"""

from __future__ import annotations

import os

from PIL import Image

__all__ = ["DECODE_BUDGET", "MAX_HEADER_ITEMS", "decode_budget", "bytes_per_pixel", "decode_cost", "header_flood"]

# Default decode budget: what a 64-megapixel RGB photo costs (64 M × 4 bytes).
DECODE_BUDGET = 256_000_000
# Header structures (PNG chunks, JPEG markers, GIF blocks) allowed before the pixels (module docstring).
MAX_HEADER_ITEMS = 4096


def decode_budget(budget: int | None = None) -> int:
    """The decode budget in bytes: ``budget`` if given, else ``$TAGFER_DECODE_BUDGET_MB`` (10⁶ bytes),
    else :data:`DECODE_BUDGET`."""
    if budget is not None:
        return int(budget)
    env = os.environ.get("TAGFER_DECODE_BUDGET_MB", "").strip()
    if not env:
        return DECODE_BUDGET
    try:
        mb = float(env)
    except ValueError:
        raise ValueError(f"TAGFER_DECODE_BUDGET_MB must be a number of megabytes, got {env!r}") from None
    if not mb > 0:
        raise ValueError(f"TAGFER_DECODE_BUDGET_MB must be positive, got {env!r}")
    return int(mb * 1_000_000)



_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # others: 4


def bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow stores per pixel of ``mode`` (RGB/YCbCr/LAB are padded to 4)."""
    return _BYTES_PER_PIXEL.get(mode, 4)


def _jpeg_first_scan_components(fp) -> int | None:
    """Number of components in a JPEG's first scan (walks the markers; None if not found)."""
    pos = fp.tell()
    try:
        fp.seek(2)
        for _ in range(10_000):
            b = fp.read(2)
            if len(b) < 2 or b[0] != 0xFF:
                return None
            m = b[1]
            if m == 0xFF:  # fill byte
                fp.seek(-1, 1)
                continue
            if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:
                continue
            ln = fp.read(2)
            if len(ln) < 2:
                return None
            if m == 0xDA:
                n = fp.read(1)
                return n[0] if n else None
            fp.seek(int.from_bytes(ln, "big") - 2, 1)
        return None
    finally:
        fp.seek(pos)


def _tiff_buffer(im: Image.Image) -> int:
    """Bytes libtiff decodes into before Pillow copies them: one strip or tile of a compressed
    TIFF at the file's own depth (raw files are read in small blocks by Pillow itself)."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return 0
    try:
        compression = int(tags.get(259, 1))
        if compression == 1:
            return 0
        w, h = im.size
        spp = max(1, int(tags.get(277, 1)))
        bps = tags.get(258, (1,))
        bps = [int(b) for b in bps] if isinstance(bps, (tuple, list)) else [int(bps)] * spp
        bits = sum(bps) if int(tags.get(284, 1)) == 1 else max(bps)  # contiguous: all samples; planar: one
        if 322 in tags and 323 in tags:
            tw, tl = int(tags[322]), int(tags[323])
            buf = -(-tw * bits // 8) * tl
            rgba = tw * tl * 4
        else:
            rps = tags.get(278, h)
            rps = min(h, int(rps[0] if isinstance(rps, (tuple, list)) else rps) or h)
            buf = -(-w * bits // 8) * rps
            rgba = w * rps * 4
        ycbcr = compression in (6, 7) or int(tags.get(262, 0)) == 6  # read through libtiff's RGBA interface
        return max(buf, rgba) if ycbcr else buf
    except (TypeError, ValueError, IndexError):
        return 0


def decode_cost(im: Image.Image, fp) -> int:
    """Bytes the decoder will hold for ``im`` (opened, not loaded; ``fp`` its file, at 0) at its
    (possibly drafted) size: the decoded pixels and the decoder's own buffers (module docstring).
    The loader adds the cost of its own conversion (:mod:`tagfer.core.imageio`)."""
    w, h = im.size
    cost = w * h * bytes_per_pixel(im.mode)
    if im.format == "TIFF":
        cost += _tiff_buffer(im)
    if im.format == "WEBP":
        cost += 3 * w * h * 4  # libwebp's animation decoder: three RGBA canvases besides Pillow's (measured)
    elif im.format in ("JPEG", "MPO"):
        layers = getattr(im, "layer", None) or []
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        if progressive or (layers and (_jpeg_first_scan_components(fp) or len(layers)) < len(layers)):
            # libjpeg buffers every DCT coefficient of a multi-scan file at full resolution (2 bytes each)
            ow, oh = getattr(im, "_tagfer_full_size", im.size)
            hmax = max((lay[1] for lay in layers), default=1) or 1
            vmax = max((lay[2] for lay in layers), default=1) or 1
            samples = sum(lay[1] * lay[2] for lay in layers) / (hmax * vmax) if layers else 3
            cost += int(2 * ow * oh * samples)
    return int(cost)


def _count_png(fp, limit: int) -> int:
    """Chunks before the first IDAT (stops past ``limit``)."""
    fp.seek(8)
    n = 0
    while n <= limit:
        head = fp.read(8)
        if len(head) < 8 or head[4:8] in (b"IDAT", b"IEND"):
            break
        n += 1
        fp.seek(int.from_bytes(head[:4], "big") + 4, 1)
    return n


def _count_jpeg(fp, limit: int) -> int:
    """Markers, fill and stray bytes before the frame header (SOFn) (stops past ``limit``)."""
    fp.seek(2)
    n = 0
    while n <= limit:
        b = fp.read(1)
        if not b:
            break
        n += 1
        if b != b"\xff":
            continue  # a stray byte: Pillow skips these one by one too
        m = fp.read(1)
        if not m:
            break
        if m == b"\xff":
            fp.seek(-1, 1)
            continue
        c = m[0]
        if 0xC0 <= c <= 0xCF and c not in (0xC4, 0xC8, 0xCC):
            break  # the frame header: Pillow stops here
        if c in (0x01, 0xD8) or 0xD0 <= c <= 0xD7 or c == 0x00:
            continue
        ln = fp.read(2)
        if len(ln) < 2:
            break
        fp.seek(max(0, int.from_bytes(ln, "big") - 2), 1)
    return n


def _count_gif(fp, limit: int) -> int:
    """Blocks, sub-blocks and stray bytes before the first image descriptor (stops past ``limit``)."""
    fp.seek(6)
    lsd = fp.read(7)
    if len(lsd) < 7:
        return 0
    if lsd[4] & 0x80:  # global colour table
        fp.seek(3 << ((lsd[4] & 7) + 1), 1)
    n = 0
    while n <= limit:
        b = fp.read(1)
        if not b or b in (b",", b";"):
            break
        n += 1
        if b != b"!":
            continue
        fp.read(1)  # extension label
        while n <= limit:
            size = fp.read(1)
            if not size or size == b"\0":
                break
            n += 1
            fp.seek(size[0], 1)
    return n


def header_flood(fp, head: bytes) -> str | None:
    """What makes the file a header flood (module docstring), e.g. ``"PNG with more than 4,096 chunks
    before its image data"``, or ``None``. ``head``: the file's first bytes; ``fp`` is left at 0."""
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        kind, count, what = "PNG", _count_png, "chunks before its image data"
    elif head[:2] == b"\xff\xd8":
        kind, count, what = "JPEG", _count_jpeg, "markers or stray bytes before its frame header"
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        kind, count, what = "GIF", _count_gif, "extension blocks before its first image"
    else:
        return None
    try:
        n = count(fp, MAX_HEADER_ITEMS)
    finally:
        fp.seek(0)
    if n > MAX_HEADER_ITEMS:
        return f"{kind} with more than {MAX_HEADER_ITEMS:,} {what}"
    return None
