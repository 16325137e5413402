import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tagfer.au.overlay import GREEN, RED, LabeledBox, au_overlay, draw_boxes, face_focus
from tagfer.core.canvas import CanvasTransform


def _is(px, color, tol=40):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, color))


def test_boxes_drawn_where_the_canvas_says():
    img = Image.new("RGB", (300, 200), (128, 128, 128))  # non-square: letterboxed canvas
    box = (100, 150, 300, 350)  # canvas coordinates
    out = draw_boxes(img, [LabeledBox(box, "", RED)], min_side=0)
    assert out.size == (300, 200)
    x1, y1, x2, y2 = CanvasTransform(300, 200).box_to_image(box)
    arr = np.asarray(out)
    assert _is(arr[int((y1 + y2) / 2), int(x1)], RED)  # left edge
    assert _is(arr[int(y1), int((x1 + x2) / 2)], RED)  # top edge
    assert _is(arr[int((y1 + y2) / 2), int((x1 + x2) / 2)], (128, 128, 128), tol=0)  # inside untouched


def test_label_has_colour_and_small_images_are_upscaled():
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    out = draw_boxes(img, [LabeledBox((100, 200, 400, 450), "AU12 0.83", GREEN)])
    assert out.size == (512, 512)
    arr = np.asarray(out).reshape(-1, 3)
    assert (np.abs(arr.astype(int) - GREEN).sum(1) < 30).sum() > 500  # frame + label background
    assert (arr == 255).all(1).sum() > 20  # white label text


def test_au_overlay_focuses_on_small_faces(mp_detector, astronaut_rgb):
    from tagfer.core.imageio import LoadedImage

    faces = mp_detector.detect(LoadedImage(astronaut_rgb, 512, 512))
    region = face_focus([faces[0].mesh.bbox], (512, 512))
    assert region is not None and (region[2] - region[0]) < 300
    out = au_overlay(astronaut_rgb, faces)
    assert out.size == (512, 512)
    assert not np.array_equal(np.asarray(out), astronaut_rgb)  # zoomed crop, not the full picture
    full = au_overlay(astronaut_rgb, faces, focus=False)
    assert full.size == (512, 512)
    assert face_focus([(0, 0, 500, 500)], (512, 512)) is None


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.floats(-50, 600), st.floats(-50, 600), st.floats(5, 200), st.floats(5, 40)), max_size=12))
def test_place_captions_never_overlap(items):
    from tagfer.au.overlay import place_captions

    spots = place_captions([(x, y) for x, y, _, _ in items], [(w, h) for _, _, w, h in items], width=512)
    rects = [(x, y, w, h) for (x, y), (_, _, w, h) in zip(spots, items)]
    for i, (x, y, w, h) in enumerate(rects):
        assert x >= 0 and y >= 0 and (x + w <= 512 or x == 0)
        for px, py, pw, ph in rects[:i]:
            assert not (x < px + pw and px < x + w and y < py + ph and py < y + h)
