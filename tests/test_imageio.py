import io
import os

import numpy as np
import pytest
from PIL import Image

from tagfer.core.imageio import ImageError, load_image, load_pil


@pytest.mark.parametrize("kind", ["corrupt", "not_an_image", "empty_file", "too_small", "not_found"])
def test_bad_files_raise_clear_errors(bad_inputs, kind):
    with pytest.raises(ImageError) as ei:
        load_image(bad_inputs[kind])
    assert ei.value.kind == kind
    assert str(bad_inputs[kind].name) in ei.value.message


def test_truncated_jpeg_is_corrupt(tmp_path, astronaut_rgb):
    buf = io.BytesIO()
    Image.fromarray(astronaut_rgb).save(buf, format="JPEG")
    p = tmp_path / "half.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind == "corrupt"


def test_directory_and_bytes(tmp_path, astronaut_rgb):
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path)
    assert ei.value.kind == "unreadable"
    with pytest.raises(ImageError) as ei:
        load_image(b"")
    assert ei.value.kind == "empty_file"
    buf = io.BytesIO()
    Image.fromarray(astronaut_rgb).save(buf, format="PNG")
    img = load_image(buf.getvalue())
    assert img.rgb.shape == (512, 512, 3) and img.size == (512, 512)


def _modes(astronaut_rgb):
    base = Image.fromarray(astronaut_rgb)
    rgba = base.convert("RGBA")
    a = np.array(rgba)
    a[:50, :50, 3] = 0  # transparent corner → composited on white
    i16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype("<u2"))
    assert i16.mode.startswith("I;16")
    return {
        "L": base.convert("L"),
        "RGBA": Image.fromarray(a),
        "P": base.convert("P"),
        "CMYK": base.convert("CMYK"),
        "I;16": i16,
        "1": base.convert("1"),
    }


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_modes_become_rgb_uint8(tmp_path, astronaut_rgb, mode):
    im = _modes(astronaut_rgb)[mode]
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    p = tmp_path / f"x.{fmt.lower()}"
    im.save(p, format=fmt)
    out = load_image(p)
    assert out.rgb.dtype == np.uint8 and out.rgb.shape == (512, 512, 3)
    gray = np.asarray(Image.fromarray(astronaut_rgb).convert("L"), dtype=np.float64)
    if mode in ("L", "I;16"):
        assert np.abs(out.rgb[..., 0].astype(float) - gray).mean() < 1.5  # 16-bit rescaled, not clipped
    if mode == "RGBA":
        assert (out.rgb[:50, :50] == 255).all()
        assert np.array_equal(out.rgb[100:, 100:], astronaut_rgb[100:, 100:])
    if mode == "CMYK":
        assert np.abs(out.rgb.astype(float) - astronaut_rgb).mean() < 12


@pytest.mark.parametrize("orientation,transpose", [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotation_gives_upright_image(tmp_path, astronaut_rgb, orientation, transpose):
    upright = Image.fromarray(astronaut_rgb[:, :400])  # non-square to catch swapped axes
    stored = upright.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "rot.jpg"
    stored.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert (out.width, out.height) == upright.size
    assert np.abs(out.rgb.astype(float) - np.asarray(upright, dtype=float)).mean() < 6


@pytest.mark.slow
def test_huge_image_is_downscaled_with_original_size(tmp_path):
    p = tmp_path / "huge.jpg"
    Image.new("RGB", (12000, 9000), (90, 120, 150)).save(p, quality=70)
    out = load_image(p, max_side=2048)
    assert (out.width, out.height) == (12000, 9000)
    assert max(out.rgb.shape[:2]) == 2048
    assert out.scale == pytest.approx(2048 / 12000, rel=1e-3)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    import tagfer.core.imageio as tio

    monkeypatch.setattr(tio, "MAX_PIXELS", 1000)
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(p)
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind == "too_large"


def test_load_pil_matches_load_image_and_caps_the_side(tmp_path, astronaut_path, bad_inputs):
    from tagfer.core.imageio import ImageError, load_image, load_pil

    pil = load_pil(astronaut_path)
    assert pil.mode == "RGB" and np.array_equal(np.asarray(pil), load_image(astronaut_path).rgb)
    big = tmp_path / "big.jpg"
    Image.fromarray(load_image(astronaut_path).rgb).resize((2000, 1500)).save(big, quality=92)
    small = load_pil(big, max_side=448)  # JPEG draft decoding + resize
    assert max(small.size) == 448 and abs(small.size[0] / small.size[1] - 2000 / 1500) < 0.01
    for kind, path in bad_inputs.items():
        if kind != "no_face":  # a valid image without a face
            with pytest.raises(ImageError) as e:
                load_pil(path)
            assert e.value.kind == kind


def test_model_image_encoding_of_a_big_jpeg_matches_a_full_resolution_resize(tmp_path, astronaut_path):
    import base64
    import io

    from tagfer.models.openai_client import encode_image
    from tagfer.models.vlm import resize_for_model

    big = tmp_path / "big.jpg"
    Image.open(astronaut_path).convert("RGB").resize((2048, 2048)).save(big, quality=95)
    url = encode_image(big, 224, "png")
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=np.float64)
    ref = np.asarray(resize_for_model(Image.open(big), 224), dtype=np.float64)
    assert got.shape == ref.shape == (224, 224, 3)
    assert np.abs(got - ref).mean() < 3.0  # draft decoding changes pixels only slightly


# --------------------------------------------------------------------------- decode budget (bombs)
BOMB_NAMES = ["png8.png", "png16.png", "png_rgba16.png", "float.tif", "uint16.tif", "rgb.bmp", "screen.gif", "canvas.webp", "progressive.jpg"]


@pytest.fixture()
def no_decoding(monkeypatch):
    """Records every attempt to decode pixels (or to create libwebp's decoder, which allocates its
    canvases); the attempt also fails. The test asserts the record stays empty (a failure alone
    could be swallowed by a broad ``except`` on the way)."""
    from PIL import ImageFile, WebPImagePlugin

    calls: list[str] = []

    def boom(*a, **k):
        calls.append("decode")
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", boom)
    return calls


@pytest.mark.parametrize("name", BOMB_NAMES)
def test_bombs_are_refused_from_the_header_without_decoding(bombs, no_decoding, name):
    import tracemalloc

    from tagfer.core.imageio import probe

    path = bombs[name]
    assert path.stat().st_size < 4096
    tracemalloc.start()
    try:
        for src in (path, path.read_bytes()):
            for fn in (load_image, load_pil, probe):
                with pytest.raises(ImageError) as ei:
                    fn(src)
                assert ei.value.kind == "too_large" and "decode budget" in ei.value.message
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000 and no_decoding == []


@pytest.mark.parametrize("mode,fmt,bpp", [("L", "PNG", 1), ("I;16", "PNG", 2), ("RGB", "PNG", 4), ("RGBA", "PNG", 4), ("F", "TIFF", 4), ("I", "TIFF", 4), ("P", "GIF", 1)])
def test_decode_cost_is_pixels_times_bytes_per_pixel(tmp_path, mode, fmt, bpp):
    from tagfer.core.imageio import probe

    p = tmp_path / f"x.{fmt.lower()}"
    Image.new(mode, (300, 200)).save(p, format=fmt)
    h = probe(p)
    assert (h.width, h.height, h.decode_bytes) == (300, 200, 300 * 200 * bpp)
    assert probe(p, budget=300 * 200 * bpp).decode_bytes == h.decode_bytes  # at the budget: accepted
    with pytest.raises(ImageError) as ei:
        load_image(p, budget=300 * 200 * bpp - 1)
    assert ei.value.kind == "too_large"


def test_decode_budget_from_the_environment(tmp_path, monkeypatch):
    from tagfer.core.imageio import DECODE_BUDGET, decode_budget

    p = tmp_path / "x.png"
    Image.new("RGB", (300, 300)).save(p)  # 360 kB decoded
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "0.3")
    assert decode_budget() == 300_000
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind == "too_large" and "TAGFER_DECODE_BUDGET_MB" in ei.value.message
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "0.4")
    assert load_image(p).size == (300, 300)
    monkeypatch.setenv("TAGFER_DECODE_BUDGET_MB", "lots")
    with pytest.raises(ValueError, match="TAGFER_DECODE_BUDGET_MB"):
        decode_budget()
    monkeypatch.delenv("TAGFER_DECODE_BUDGET_MB")
    assert decode_budget() == DECODE_BUDGET == 64_000_000 * 4  # a 64 MP RGB photo


def test_jpeg_cost_follows_draft_scaling_and_progressive_buffers():
    from fixtures_imageio import jpeg_with_size

    from tagfer.core.imageio import probe

    base = probe(jpeg_with_size(20000, 20000, progressive=False))  # decoded at 1/8 scale
    assert (base.width, base.height) == (20000, 20000) and base.decode_bytes == 2500 * 2500 * 4 * 2  # drafted pixels + the full-size RGB copy (2048 < 2500 < 4096)
    small_progressive = probe(jpeg_with_size(3000, 2000, progressive=True))  # coefficients buffered at full size
    assert small_progressive.decode_bytes >= 2 * 3000 * 2000 + 3000 * 2000 * 4 // 4
    with pytest.raises(ImageError) as ei:
        probe(jpeg_with_size(20000, 20000, progressive=True))
    assert ei.value.kind == "too_large"
    # A baseline file whose first scan holds fewer components than the frame is multi-scan: buffered too.
    data = bytearray(jpeg_with_size(3000, 2000, progressive=False))
    single = probe(bytes(data)).decode_bytes
    sos = data.index(b"\xff\xda")
    assert data[sos + 4] == 3
    data[sos + 4] = 1
    assert probe(bytes(data)).decode_bytes >= single + 2 * 3000 * 2000


def test_many_frame_gif_decodes_only_the_first_frame(tmp_path, monkeypatch):
    from fixtures_imageio import many_frame_gif
    from PIL import GifImagePlugin

    p = tmp_path / "anim.gif"
    p.write_bytes(many_frame_gif(500))
    frames = []
    real = GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", lambda self, f, *a, **k: (frames.append(f), real(self, f, *a, **k))[1])
    out = load_image(p)
    assert set(frames) == {0}
    assert (out.rgb[..., 0] == 255).all() and (out.rgb[..., 2] == 0).all()  # frame 0 is red, the others blue


@pytest.mark.parametrize("mode", ["I;16", "F", "I", "P", "RGBA", "L", "1"])
@pytest.mark.parametrize("size,max_side", [((517, 389), 100), ((389, 517), 64), ((300, 40), 60)])
def test_tiled_reduction_equals_whole_image_reduction(monkeypatch, mode, size, max_side):
    import tagfer.core.imageio as tio

    rng = np.random.default_rng(0)
    w, h = size
    if mode in ("I;16", "I"):
        im = Image.fromarray(rng.integers(0, 60000, (h, w)).astype("<u2" if mode == "I;16" else np.int32))
    elif mode == "F":
        a = rng.normal(0, 3, (h, w)).astype(np.float32)
        a[5, 7], a[9, 1], a[3, 3] = np.nan, np.inf, -np.inf
        im = Image.fromarray(a)
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
        if mode == "P":
            im.info["transparency"] = 3
    assert im.mode == mode
    k = max(w, h) // max_side
    whole = tio._to_rgb(im, tio._value_range(im) if mode in tio._HIGH_BIT else None).reduce(k)
    monkeypatch.setattr(tio, "_TILE_PIXELS", 37 * 37)  # many tiles, not aligned to anything but k
    tiled = tio._shrink_to_rgb(im, max_side)
    assert tiled.size == whole.size and np.array_equal(np.asarray(tiled), np.asarray(whole))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_inf_pixels_keeps_its_contrast(tmp_path, astronaut_rgb, bad):
    gray = np.asarray(Image.fromarray(astronaut_rgb).convert("L"), dtype=np.float32)
    a = gray / 255.0 * 2.0 - 0.5  # floats in [-0.5, 1.5]
    a[10, 20] = bad
    a[300, 300] = np.nan
    p = tmp_path / "f.tif"
    Image.fromarray(a.astype(np.float32), mode="F").save(p)
    out = load_image(p)
    assert out.rgb[300, 300, 0] == 0  # NaN maps to black
    mask = np.ones(gray.shape, bool)
    mask[10, 20] = mask[300, 300] = False
    assert np.abs(out.rgb[..., 0].astype(float) - gray)[mask].mean() < 1.5  # stretched as if the bad pixels were absent


def test_a_face_in_a_float_tiff_with_nan_is_found(tmp_path, astronaut_rgb, mp_detector):
    a = np.asarray(Image.fromarray(astronaut_rgb).convert("L"), dtype=np.float32) / 255.0
    a[0, 0] = np.nan
    p = tmp_path / "nan.tif"
    Image.fromarray(a, mode="F").save(p)
    assert len(mp_detector.detect(load_image(p))) == 1


def test_other_formats_are_not_decoded(tmp_path):
    p = tmp_path / "x.jpg"
    Image.new("RGB", (64, 64)).save(p, format="PPM")  # a Pillow-readable format outside FORMATS
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind == "not_an_image"


# --------------------------------------------------------------------------- files that are not regular files
@pytest.mark.timeout(20)
def test_fifo_socket_and_devices_are_unreadable_without_being_read(tmp_path):
    import os
    import socket

    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it for reading would block forever
    sock_path = tmp_path / "s.png"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        for path, what in ((fifo, "FIFO"), (sock_path, "socket"), ("/dev/zero", "character device"), ("/dev/null", "character device")):
            with pytest.raises(ImageError) as ei:
                load_image(path)
            assert ei.value.kind == "unreadable" and what in ei.value.message
    finally:
        s.close()


def test_symlink_loop_and_dangling_link_are_unreadable_with_the_reason(tmp_path, astronaut_path):
    import os

    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(ImageError) as ei:
        load_image(a)
    assert ei.value.kind == "unreadable" and "loop" in ei.value.message
    dangling = tmp_path / "gone.jpg"
    os.symlink(tmp_path / "nowhere.jpg", dangling)
    with pytest.raises(ImageError) as ei:
        load_image(dangling)
    assert ei.value.kind == "unreadable" and "dangling" in ei.value.message
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "nowhere.jpg")
    assert ei.value.kind == "not_found"
    good = tmp_path / "good.png"
    os.symlink(astronaut_path, good)  # a link to a real image still works
    assert load_image(good).size == (512, 512)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_permission_denied_is_unreadable(tmp_path, astronaut_path):
    import shutil

    p = tmp_path / "locked.png"
    shutil.copy(astronaut_path, p)
    p.chmod(0)
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind == "unreadable" and "ermission" in ei.value.message


def test_data_url_round_trips_png_and_jpeg():
    import base64

    from tagfer.core.imageio import data_url

    im = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))
    png = data_url(im)
    assert png.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1])))
    assert back.format == "PNG" and np.array_equal(np.asarray(back.convert("RGB")), np.asarray(im))  # lossless, not resized
    jpg = data_url(im, "JPG")
    assert jpg.startswith("data:image/jpeg;base64,") and Image.open(io.BytesIO(base64.b64decode(jpg.split(",", 1)[1]))).size == (48, 32)
    with pytest.raises(ValueError, match="gif"):
        data_url(im, "gif")


# ----------------------------------------------------------------------------- decoder buffers, header floods (issue 21 #5)
from fixtures_imageio import header_flood, tiff_image
from tagfer.core.imageio import probe


@pytest.mark.parametrize("kw, buffer", [
    (dict(w=2000, h=1000), 2000 * 1000 * 8),  # one 16-bit RGBA strip: 8 bytes per pixel in libtiff
    (dict(w=2000, h=1000, rows_per_strip=100), 2000 * 100 * 8),
    (dict(w=2000, h=1000, tile=256), 256 * 256 * 8),
    (dict(w=2000, h=1000, bits=16, spp=1), 2000 * 1000 * 2),
    (dict(w=2000, h=1000, compression=1), 0),  # raw: Pillow reads it in small blocks
])
def test_tiff_cost_includes_libtiffs_strip_or_tile_buffer(kw, buffer):
    h = probe(tiff_image(**kw))
    pixels = 2000 * 1000 * (2 if kw.get("spp") == 1 else 4)
    assert h.format == "TIFF" and h.decode_bytes == pixels + buffer


def test_single_strip_16bit_rgba_tiff_is_refused_at_its_real_cost():
    """The reported bomb: costed at the pixels alone (256 MB at 8000²) it decoded at 785 MB peak."""
    data = tiff_image(8000, 8000)
    assert len(data) < 2_000_000
    with pytest.raises(ImageError) as e:
        load_image(data)
    assert e.value.kind == "too_large" and "768 MB" in e.value.message
    img = load_image(tiff_image(300, 200))  # a small one decodes (RGBA composited on white)
    assert img.rgb.shape == (200, 300, 3) and int(img.rgb.min()) == 255


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif"])
def test_header_floods_are_refused_in_milliseconds(fmt):
    import time

    ok = header_flood(fmt, 1000)
    assert probe(ok).width == 64 and load_image(ok).rgb.shape == (64, 64, 3)  # a long but sane header is fine
    flood = header_flood(fmt, 400_000)
    t = time.perf_counter()
    with pytest.raises(ImageError) as e:
        probe(flood)
    assert e.value.kind == "too_large" and "header flood" in e.value.message
    assert time.perf_counter() - t < 0.5  # Pillow took 1.5–6 s on such files (10 MB)
