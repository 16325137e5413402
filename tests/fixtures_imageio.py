"""Decompression-bomb files built in a few KB and milliseconds: headers that claim huge
sizes (little or no pixel data), in every decoded format. Nothing here decodes them."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

__all__ = ["png_bomb", "tiff_bomb", "tiff_image", "header_flood", "bmp_bomb", "gif_bomb", "webp_bomb", "jpeg_with_size", "bombs", "many_frame_gif"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w: int = 20000, h: int = 20000, bit_depth: int = 8, color_type: int = 0, rows: int = 2) -> bytes:
    """A PNG whose header says ``w``×``h`` with only ``rows`` rows of (zero) pixel data."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\x00" + bytes(w * channels * bit_depth // 8)
    idat = zlib.compress(row * rows, 9)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def tiff_bomb(w: int = 20000, h: int = 20000, bits: int = 32, sample_format: int = 3, spp: int = 1) -> bytes:
    """An uncompressed little-endian TIFF header (float by default) claiming ``w``×``h``, with 64 bytes of data."""
    tags = [
        (256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, bits), (259, 3, 1, 1), (262, 3, 1, 1 if spp == 1 else 2),
        (273, 4, 1, 0), (277, 3, 1, spp), (278, 4, 1, h), (279, 4, 1, w * h * spp * bits // 8), (339, 3, 1, sample_format),
    ]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, 1, data_offset)
    out = b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        packed = struct.pack("<H", value) + b"\x00\x00" if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    return out + struct.pack("<I", 0) + bytes(64)


def bmp_bomb(w: int = 20000, h: int = 20000, bpp: int = 24) -> bytes:
    """A BMP header (BITMAPINFOHEADER) claiming ``w``×``h`` with 64 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bpp, 0, 0, 2835, 2835, 0, 0)
    body = info + bytes(64)
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, 14 + 40) + body


def gif_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A GIF whose logical screen and only frame claim ``w``×``h`` (a few bytes of LZW data)."""
    head = b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame + b"\x3b"


def webp_bomb(w: int = 16383, h: int = 16383) -> bytes:
    """A WebP extended-format (VP8X) header claiming a ``w``×``h`` canvas."""
    vp8x = bytes([0, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_with_size(w: int, h: int, progressive: bool) -> bytes:
    """A small real JPEG whose SOF header is patched to claim ``w``×``h`` (the scan data stays small)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 60)).save(buf, format="JPEG", progressive=progressive, quality=80)
    data = bytearray(buf.getvalue())
    marker = b"\xff\xc2" if progressive else b"\xff\xc0"
    i = data.index(marker)
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def many_frame_gif(n: int = 1000, side: int = 64) -> bytes:
    """An animated GIF of ``n`` frames; frame 0 is red, the others blue."""
    frames = [Image.new("P", (side, side), 0)] + [Image.new("P", (side, side), 1) for _ in range(n - 1)]
    pal = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    for f in frames:
        f.putpalette(pal)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0, optimize=False)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """Name → file of each bomb (all ≤ a few KB; each would need ≥ 400 MB to decode)."""
    d = tmp_path_factory.mktemp("bombs")
    made = {
        "png8.png": png_bomb(bit_depth=8),
        "png16.png": png_bomb(bit_depth=16),
        "png_rgba16.png": png_bomb(12000, 12000, bit_depth=16, color_type=6, rows=1),
        "float.tif": tiff_bomb(),
        "uint16.tif": tiff_bomb(bits=16, sample_format=1),
        "rgb.bmp": bmp_bomb(),
        "screen.gif": gif_bomb(),
        "canvas.webp": webp_bomb(),
        "progressive.jpg": jpeg_with_size(20000, 20000, progressive=True),
    }
    out = {}
    for name, data in made.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


def deflate_zeros(n: int) -> bytes:
    """The zlib stream of ``n`` zero bytes (level 9), in milliseconds for any ``n``: each MiB ends in a
    full flush (no reference to earlier data), so every full MiB compresses to the same bytes, written
    once and repeated; the Adler-32 of ``n`` zeros is ``(n mod 65521) << 16 | 1``."""
    import zlib

    step = 1 << 20
    full, rest = divmod(n, step)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: header and trailer written here
    block = z.compress(bytes(step)) + z.flush(zlib.Z_FULL_FLUSH) if full else b""
    body = block * full + z.compress(bytes(rest)) + z.flush()
    return b"\x78\xda" + body + ((n % 65521) << 16 | 1).to_bytes(4, "big")


def tiff_image(w: int, h: int, bits: int = 16, spp: int = 4, compression: int = 8, rows_per_strip: int | None = None,
               tile: int | None = None) -> bytes:
    """A complete little-endian TIFF of zeros: ``spp`` samples of ``bits`` each (4 = RGBA with
    alpha), Deflate (8), LZW is not written (5 falls back to 8), or raw (1); one strip by default,
    ``rows_per_strip`` rows per strip, or ``tile``×``tile`` tiles. Built in streaming fashion."""
    import struct
    import zlib

    bpp = spp * bits // 8
    if tile:
        parts = [(tile * bpp * tile)] * (-(-w // tile) * -(-h // tile))
    else:
        rps = rows_per_strip or h
        parts = [min(rps, h - y) * w * bpp for y in range(0, h, rps)]
    blobs: list[bytes] = []
    cache: dict[int, bytes] = {}
    for n in parts:
        if n not in cache:
            if compression == 1:
                cache[n] = bytes(n)
            else:
                cache[n] = deflate_zeros(n)
        blobs.append(cache[n])
    photometric = 2 if spp >= 3 else 1
    entries = [(256, 4, [w]), (257, 4, [h]), (258, 3, [bits] * spp), (259, 3, [1 if compression == 1 else 8]),
               (262, 3, [photometric]), (277, 3, [spp]), (284, 3, [1])]
    if spp in (2, 4):
        entries.append((338, 3, [2]))  # unassociated alpha
    if tile:
        entries += [(322, 4, [tile]), (323, 4, [tile]), (324, 4, "offsets"), (325, 4, [len(b) for b in blobs])]
    else:
        entries += [(273, 4, "offsets"), (278, 4, [rows_per_strip or h]), (279, 4, [len(b) for b in blobs])]
    entries.sort()
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    extras = b""
    n_parts = len(blobs)
    extra_len = sum(len(v if v != "offsets" else [0] * n_parts) * (2 if t == 3 else 4) for _, t, v in entries
                    if len(v if v != "offsets" else [0] * n_parts) * (2 if t == 3 else 4) > 4)
    data_at = extra_at + extra_len
    offsets, pos = [], data_at
    for b in blobs:
        offsets.append(pos)
        pos += len(b)
    ifd = struct.pack("<H", len(entries))
    for tag, typ, vals in entries:
        vals = offsets if vals == "offsets" else vals
        raw = struct.pack("<" + ("H" if typ == 3 else "I") * len(vals), *vals)
        if len(raw) <= 4:
            ifd += struct.pack("<HHI", tag, typ, len(vals)) + raw.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, len(vals), extra_at + len(extras))
            extras += raw
    ifd += b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + extras + b"".join(blobs)


def header_flood(fmt: str, n: int) -> bytes:
    """A valid 64×64 image with ``n`` empty header structures before its pixels: PNG chunks,
    JPEG APP1 markers or GIF comment extensions (Pillow walks them one by one in Python)."""
    import io
    import struct
    import zlib

    from PIL import Image

    if fmt == "png":
        ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"abCd", b"") * n
                + _chunk(b"IDAT", zlib.compress(bytes(65 * 64))) + _chunk(b"IEND", b""))
    buf = io.BytesIO()
    if fmt == "gif":
        Image.new("L", (64, 64), 128).save(buf, "GIF")
        g = buf.getvalue()
        at = 13 + ((3 << ((g[10] & 7) + 1)) if g[10] & 0x80 else 0)  # after the header and global colour table
        return g[:at] + b"\x21\xfe\x01a\x00" * n + g[at:]
    Image.new("RGB", (64, 64)).save(buf, "JPEG")
    j = buf.getvalue()
    return j[:2] + b"\xff\xe1\x00\x02" * n + j[2:]
