import io

import numpy as np
import pytest
from PIL import Image

from tagfer.imageio import ImageError, load_image


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
    import tagfer.imageio as tio

    monkeypatch.setattr(tio, "MAX_PIXELS", 1000)
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(p)
    with pytest.raises(ImageError) as ei:
        load_image(p)
    assert ei.value.kind == "too_large"


def test_load_pil_matches_load_image_and_caps_the_side(tmp_path, astronaut_path, bad_inputs):
    from tagfer.imageio import ImageError, load_image, load_pil

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

    from tagfer.openai_client import encode_image
    from tagfer.vlm import resize_for_model

    big = tmp_path / "big.jpg"
    Image.open(astronaut_path).convert("RGB").resize((2048, 2048)).save(big, quality=95)
    url = encode_image(big, 224, "png")
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=np.float64)
    ref = np.asarray(resize_for_model(Image.open(big), 224), dtype=np.float64)
    assert got.shape == ref.shape == (224, 224, 3)
    assert np.abs(got - ref).mean() < 3.0  # draft decoding changes pixels only slightly


def test_data_url_round_trips_png_and_jpeg():
    import base64

    from tagfer.imageio import data_url

    im = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))
    png = data_url(im)
    assert png.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1])))
    assert back.format == "PNG" and np.array_equal(np.asarray(back.convert("RGB")), np.asarray(im))  # lossless, not resized
    jpg = data_url(im, "JPG")
    assert jpg.startswith("data:image/jpeg;base64,") and Image.open(io.BytesIO(base64.b64decode(jpg.split(",", 1)[1]))).size == (48, 32)
    with pytest.raises(ValueError, match="gif"):
        data_url(im, "gif")
