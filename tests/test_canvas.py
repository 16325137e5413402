"""Tests for tagfer.core.canvas: the letterbox transform, box helpers and IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagfer.core.canvas import CANVAS, CanvasTransform, clip_box, iou, iou_matrix, iou_pairs, is_valid_box

relaxed = settings(deadline=None)

SIDES = st.integers(1, 4000)
ALIGNS = st.sampled_from(["center", "topleft"])


@st.composite
def image_and_box(draw: st.DrawFn):
    w, h = draw(SIDES), draw(SIDES)
    x1 = draw(st.floats(0, w, allow_nan=False))
    x2 = draw(st.floats(x1, w, allow_nan=False))
    y1 = draw(st.floats(0, h, allow_nan=False))
    y2 = draw(st.floats(y1, h, allow_nan=False))
    return w, h, (x1, y1, x2, y2)


@st.composite
def canvas_boxes(draw: st.DrawFn, lo: int = -100, hi: int = 700):
    return tuple(draw(st.integers(lo, hi)) for _ in range(4))


@st.composite
def proper_boxes(draw: st.DrawFn):
    x1 = draw(st.integers(0, 510))
    y1 = draw(st.integers(0, 510))
    return (x1, y1, draw(st.integers(x1 + 1, 511)), draw(st.integers(y1 + 1, 511)))


# ----------------------------------------------------------------------------------------
# CanvasTransform
# ----------------------------------------------------------------------------------------


@relaxed
@given(SIDES, SIDES, ALIGNS, st.sampled_from([64, 512, 1000]),
       st.lists(st.tuples(*[st.floats(-1e5, 1e5, allow_nan=False)] * 4), min_size=1, max_size=8))
def test_boxes_to_canvas_equals_box_to_canvas_row_by_row(w, h, align, canvas, boxes):
    tr = CanvasTransform(w, h, canvas=canvas, align=align)
    got = tr.boxes_to_canvas(np.asarray(boxes))
    assert got == [tr.box_to_canvas(b) for b in boxes]
    assert all(type(v) is int for b in got for v in b)  # plain ints: the records' JSON and is_valid_box


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_boxes_to_canvas_refuses_non_finite_coordinates(bad):
    with pytest.raises(ValueError, match="NaN or infinite"):
        CanvasTransform(100, 100).boxes_to_canvas(np.array([[1.0, 2.0, bad, 4.0]]))


@relaxed
@given(SIDES, SIDES, ALIGNS, st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)), min_size=1, max_size=5))
def test_points_round_trip(w, h, align, pts):
    t = CanvasTransform(w, h, align=align)
    back = t.points_to_image(t.points_to_canvas(np.array(pts)))
    assert np.allclose(back, pts, atol=1e-6 * max(w, h, 1))


@relaxed
@given(image_and_box(), ALIGNS)
def test_box_round_trip_image_canvas_image(case, align):
    w, h, box = case
    t = CanvasTransform(w, h, align=align)
    c = t.box_to_canvas(box)
    assert all(isinstance(v, int) and 0 <= v <= CANVAS - 1 for v in c)
    assert c[0] <= c[2] and c[1] <= c[3]
    back = t.box_to_image(c)
    one_px = 1.0 / t.scale + 1e-9 * max(w, h)  # one canvas pixel in image pixels
    for orig, new in zip(box, back):
        assert abs(orig - new) <= one_px
    # rounded outward: the canvas box covers the original except at the canvas' last pixel
    assert back[0] <= box[0] + 1e-9 * w and back[1] <= box[1] + 1e-9 * h
    assert back[2] >= box[2] - one_px and back[3] >= box[3] - one_px
    assert 0 <= back[0] <= back[2] <= w and 0 <= back[1] <= back[3] <= h


@relaxed
@given(SIDES, SIDES, ALIGNS)
def test_content_box(w, h, align):
    t = CanvasTransform(w, h, align=align)
    cb = t.content_box
    s = CANVAS / max(w, h)
    ox, oy = t.offset
    assert cb == (math.floor(ox), math.floor(oy), min(math.ceil(ox + w * s), CANVAS - 1), min(math.ceil(oy + h * s), CANVAS - 1))
    if align == "topleft":
        assert cb[:2] == (0, 0)
    else:  # centred: equal padding on both sides, up to rounding
        assert abs(ox - (CANVAS - (ox + w * s))) < 1e-6 and abs(oy - (CANVAS - (oy + h * s))) < 1e-6
    long_side = (cb[0], cb[2]) if w >= h else (cb[1], cb[3])
    assert long_side == (0, CANVAS - 1)
    assert abs((cb[2] - cb[0]) - w * s) <= 2 and abs((cb[3] - cb[1]) - h * s) <= 2


def test_square_images_fill_the_canvas_in_both_modes():
    for align in ("center", "topleft"):
        t = CanvasTransform(224, 224, align=align)
        assert t.content_box == (0, 0, 511, 511)
        assert t.box_to_canvas((0, 0, 112, 112)) == (0, 0, 256, 256)


def test_non_square_example():
    t = CanvasTransform(1024, 512)  # landscape 2:1 → scale 0.5, 128 px padding top and bottom
    assert t.scale == 0.5 and t.offset == (0.0, 128.0)
    assert t.box_to_canvas((0, 0, 1024, 512)) == (0, 128, 511, 384)
    assert t.box_to_image((0, 128, 256, 384)) == (0.0, 0.0, 512.0, 512.0)
    assert CanvasTransform(1024, 512, align="topleft").offset == (0.0, 0.0)


@pytest.mark.parametrize("args", [(0, 10), (10, -1), (10, 10, 512, "middle")])
def test_transform_validation(args):
    with pytest.raises(ValueError):
        CanvasTransform(*args)


# ----------------------------------------------------------------------------------------
# clip_box / is_valid_box
# ----------------------------------------------------------------------------------------


@relaxed
@given(st.tuples(*[st.floats(-1e6, 1e6)] * 4), st.sampled_from([64, 512, 1000]))
def test_clip_box_bounds_and_idempotence(box, canvas):
    c = clip_box(box, canvas)
    assert all(isinstance(v, int) and 0 <= v <= canvas - 1 for v in c)
    assert clip_box(c, canvas) == c


@relaxed
@given(proper_boxes())
def test_clip_box_keeps_valid_boxes(box):
    assert is_valid_box(box)
    assert clip_box(box) == box


@pytest.mark.parametrize(
    "box, ok",
    [
        ((0, 0, 511, 511), True),
        ((93, 306, 445, 417), True),
        ((np.int64(1), np.int32(2), np.int16(3), np.int8(4)), True),
        ([1, 2, 3, 4], True),
        ((0, 0, 512, 10), False),
        ((-1, 0, 10, 10), False),
        ((10, 10, 10, 20), False),
        ((20, 10, 10, 20), False),
        ((1.0, 2, 3, 4), False),
        ((True, 2, 3, 4), False),
        ((1, 2, 3), False),
        ((1, 2, 3, 4, 5), False),
        ("abcd", False),
        (None, False),
        (5, False),
    ],
)
def test_is_valid_box(box, ok):
    assert is_valid_box(box) is ok


def test_is_valid_box_other_canvas():
    assert is_valid_box((0, 0, 600, 600), canvas=1024)
    assert not is_valid_box((0, 0, 64, 10), canvas=64)


# ----------------------------------------------------------------------------------------
# IoU
# ----------------------------------------------------------------------------------------


@relaxed
@given(canvas_boxes(), canvas_boxes())
def test_iou_symmetric_and_bounded(a, b):
    v = iou(a, b)
    assert 0.0 <= v <= 1.0
    assert v == iou(b, a)


@relaxed
@given(proper_boxes())
def test_iou_identity_is_one(a):
    assert iou(a, a) == 1.0


@relaxed
@given(proper_boxes(), st.integers(0, 200), st.integers(0, 200))
def test_iou_disjoint_is_zero(a, gap, dy):
    w = a[2] - a[0]
    b = (a[2] + gap, a[1] + dy, a[2] + gap + w, a[3] + dy)  # entirely to the right (touching when gap=0)
    assert iou(a, b) == 0.0


def test_iou_known_values():
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (0, 0, 5, 5)) == pytest.approx(0.25)
    assert iou((10, 10, 0, 0), (10, 10, 0, 0)) == 0.0  # reversed: zero area
    assert iou((5, 5, 5, 9), (0, 0, 10, 10)) == 0.0  # zero width


@relaxed
@given(st.lists(canvas_boxes(), max_size=5), st.lists(canvas_boxes(), max_size=5))
def test_iou_matrix_matches_pairwise_and_pairs(a, b):
    m = iou_matrix(a, b)
    assert m.shape == (len(a), len(b))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert m[i, j] == iou(x, y)
    n = min(len(a), len(b))
    assert np.array_equal(iou_pairs(a[:n], b[:n]), np.diag(m)[:n] if n else np.zeros(0))


def test_iou_pairs_requires_aligned_inputs():
    with pytest.raises(ValueError):
        iou_pairs([(0, 0, 1, 1)], [(0, 0, 1, 1), (0, 0, 2, 2)])
    assert iou_pairs([], []).shape == (0,)
