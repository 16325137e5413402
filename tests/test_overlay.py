import numpy as np
from tiers import examples
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
    out = au_overlay(astronaut_rgb, faces, legend=False)
    assert out.size == (512, 512)
    assert not np.array_equal(np.asarray(out), astronaut_rgb)  # zoomed crop, not the full picture
    full = au_overlay(astronaut_rgb, faces, focus=False, legend=False)
    assert full.size == (512, 512)
    assert face_focus([(0, 0, 500, 500)], (512, 512)) is None


@settings(deadline=None, max_examples=examples(200))
@given(st.lists(st.tuples(st.floats(-50, 600), st.floats(-50, 600), st.floats(5, 200), st.floats(5, 40)), max_size=12))
def test_place_captions_never_overlap(items):
    from tagfer.au.overlay import place_captions

    spots = place_captions([(x, y) for x, y, _, _ in items], [(w, h) for _, _, w, h in items], width=512)
    rects = [(x, y, w, h) for (x, y), (_, _, w, h) in zip(spots, items)]
    for i, (x, y, w, h) in enumerate(rects):
        assert x >= 0 and y >= 0 and (x + w <= 512 or x == 0)
        for px, py, pw, ph in rects[:i]:
            assert not (x < px + pw and px < x + w and y < py + ph and py < y + h)


def _rects_overlap(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def test_merge_boxes_one_outline_and_one_caption_per_rectangle():
    from tagfer.au.overlay import merge_boxes

    out = merge_boxes([
        LabeledBox((10, 10, 50, 50), "AU1 0.60", GREEN), LabeledBox((10.2, 9.8, 50, 50), "AU2 0.70", RED),
        LabeledBox((10, 10, 50, 50), "AU1 0.60", RED), LabeledBox((60, 60, 90, 90), "", RED),
    ])
    assert [(tuple(b.box), b.label, b.color) for b in out] == [
        ((10, 10, 50, 50), "AU1 0.60 · AU2 0.70", GREEN), ((60, 60, 90, 90), "", RED)]


@settings(deadline=None, max_examples=examples(150))
@given(st.lists(st.text(alphabet="ab ·-", min_size=0, max_size=30), max_size=6).map(" ".join), st.integers(1, 40))
def test_wrap_text_fits_and_keeps_the_words(text, width):
    from tagfer.au.overlay import wrap_text

    lines = wrap_text(text, width, len)  # one "pixel" per character
    assert all(len(line) <= width for line in lines)
    assert "".join("".join(lines).split()) == "".join(text.split())  # nothing lost, only cut


def _analysis(views: bool = True):
    """A grounded-engine analysis on a flat 400×400 picture: the engine cites AU6 (exactly the
    detector's box) and AU23; the detector also has AU10 and AU1/AU2 on one shared box."""
    from tagfer.explainer.overlay import box_color
    from tagfer.explainer.records import Analysis

    det = [
        {"au": 6, "name": "Cheek Raiser", "score": 0.8, "active": True, "box": [100, 150, 410, 260]},
        {"au": 23, "name": "Lip Tightener", "score": 0.5, "active": True, "box": [190, 320, 340, 390]},
        {"au": 10, "name": "Upper Lip Raiser", "score": 0.4, "active": True, "box": [150, 280, 370, 330]},
        {"au": 1, "name": "Inner Brow Raiser", "score": 0.6, "active": True, "box": [160, 60, 350, 120]},
        {"au": 2, "name": "Outer Brow Raiser", "score": 0.7, "active": True, "box": [160, 60, 350, 120]},
        {"au": 12, "name": "Lip Corner Puller", "score": 0.1, "active": False, "box": [120, 300, 400, 400]},
    ]
    v = {"global": {"net": "fer", "label": "anger", "confidence": 0.62, "scores": {}},
         "local": {"label": "anger", "steps": [{"au": 6, "role": "contrary", "for": "happiness"},
                                               {"au": 23, "role": "support", "for": "anger"}]},
         "agreement": "agree", "decision": {"decided_by": "global"}} if views else {}
    return Analysis(
        image="flat.png", face=0, n_faces=1, face_bbox=[0, 0, 400, 400], frame="face", frame_box=[0, 0, 400, 400],
        canvas=512, engine="facs", detector="mediapipe", label="anger",
        scores={"anger": 0.55, "happiness": 0.3, "neutral": 0.15}, trace="…", well_formed=True, violations=[],
        boxes=[[100, 150, 410, 260], [190, 320, 340, 390]], box_aus=[6, 23], box_colors=[box_color(0), box_color(1)],
        segments=[], evidence_aus=[6, 23], aus=det, au_boxes=[], r_fmt=1.0, r_au=1.0, views=v)


def _flat():
    from tagfer.core.imageio import LoadedImage

    return LoadedImage(np.full((400, 400, 3), 128, np.uint8), 400, 400)


def _rgb(h):
    return tuple(int(h[i : i + 2], 16) for i in (1, 3, 5))


def test_overlay_png_one_tag_per_box_names_roles_label_and_a_legend_in_the_trace_colours():
    from tagfer.explainer.overlay import DETECTOR_COLOR, render_overlay, render_overlay_layout

    a = _analysis()
    r = render_overlay_layout(_flat(), a)
    assert r.image.size[0] == 512 and r.image.size[1] > r.picture_height == 512  # legend panel under the picture
    # one tag per distinct box: the cited AU6 is the detector's box (no second "AU6" tag), AU1/AU2 share one
    assert sorted(t.text for t in r.tags) == ["AU1 0.60 · AU2 0.70", "AU10 0.40", "AU23 0.50", "AU6 0.80"]
    for i, t in enumerate(r.tags):
        assert all(not _rects_overlap(t.rect, u.rect) for u in r.tags[:i])
    tag_colour = {t.text: t.color for t in r.tags}
    assert tag_colour["AU6 0.80"] == _rgb(a.box_colors[0]) and tag_colour["AU23 0.50"] == _rgb(a.box_colors[1])
    assert tag_colour["AU10 0.40"] == _rgb(DETECTOR_COLOR)
    px = np.asarray(r.image)
    for t in r.tags:  # each caption's background really has its colour
        x, y, _, _ = t.rect
        assert tuple(px[int(y) + 1, int(x) + 1]) == t.color
    texts = [" ".join(e.lines) for e in r.legend]
    assert texts[0] == "anger (score 0.55)" and r.legend[0].line.heading
    assert "overall impression (fer net): anger, confidence 0.62" in texts[1]
    assert texts[2] == "AU6 Cheek Raiser 0.80 · points to happiness" and r.legend[2].line.color == _rgb(a.box_colors[0])
    assert texts[3] == "AU23 Lip Tightener 0.50 · supports anger" and r.legend[3].line.color == _rgb(a.box_colors[1])
    assert r.legend[4].line.color == _rgb(DETECTOR_COLOR)
    for name in ("AU10 Upper Lip Raiser 0.40", "AU1 Inner Brow Raiser 0.60", "AU2 Outer Brow Raiser 0.70"):
        assert name in texts[4]
    assert "AU6" not in texts[4] and "AU12" not in " ".join(texts)  # cited, or not active
    for e in r.legend:  # swatches drawn in their line's colour, inside the panel, entries stacked without overlap
        assert e.rect[1] >= r.picture_height and e.rect[0] + e.rect[2] <= r.image.width
        if e.swatch is not None:
            x, y, w, h = e.swatch
            assert tuple(px[int(y + h / 2), int(x + w / 2)]) == e.line.color
    for i, e in enumerate(r.legend):
        assert all(not _rects_overlap(e.rect, f.rect) for f in r.legend[:i])
    assert render_overlay(_flat(), a).size == r.image.size

    plain = render_overlay_layout(_flat(), _analysis(views=False))  # a VLM: no impression line, no roles
    texts = [" ".join(e.lines) for e in plain.legend]
    assert not any("impression" in t for t in texts) and texts[1:3] == ["AU6 Cheek Raiser 0.80", "AU23 Lip Tightener 0.50"]
    bare = render_overlay_layout(_flat(), a, legend=False)
    assert bare.legend == [] and bare.image.size == (512, 512)


def test_overlay_legend_wraps_a_long_line_inside_the_picture_width():
    import dataclasses

    from tagfer.explainer.overlay import render_overlay_layout

    a = dataclasses.replace(_analysis(), label="x" * 400, scores=None, well_formed=False)
    r = render_overlay_layout(_flat(), a)
    head = r.legend[0]
    assert len(head.lines) > 2 and head.lines[-1].endswith("malformed output")
    assert all(e.rect[0] + e.rect[2] <= r.image.width for e in r.legend)


def test_au_overlay_legend_names_every_au(mp_detector, astronaut_rgb):
    from tagfer.au.aus import AU_NAMES
    from tagfer.core.imageio import LoadedImage

    faces = mp_detector.detect(LoadedImage(astronaut_rgb, 512, 512))
    with_legend = au_overlay(astronaut_rgb, faces)
    without = au_overlay(astronaut_rgb, faces, legend=False)
    assert with_legend.size[1] > without.size[1] == 512
    panel = np.asarray(with_legend)[512:]
    n_active = len(faces[0].active)
    assert n_active and (np.abs(panel.reshape(-1, 3).astype(int) - GREEN).sum(1) < 10).sum() > 50 * n_active  # a swatch per AU
    assert all(d.au in AU_NAMES for d in faces[0].active)


@settings(deadline=None, max_examples=examples(200))
@given(st.lists(st.tuples(st.floats(0, 500), st.floats(0, 500), st.floats(5, 400), st.floats(10, 200), st.floats(8, 30), st.booleans()),
                min_size=1, max_size=8))
def test_outside_captions_avoid_their_box_and_nothing_overlaps(items):
    """A face caption (``outside``) goes above its box, else below it — not over it while the image has
    room on either side — and no two captions overlap."""
    from tagfer.au.overlay import place_captions

    H = 512.0
    anchors = [(x, y) for x, y, _, _, _, _ in items]
    sizes = [(w, th) for _, _, w, _, th, _ in items]
    bottoms = [min(H, y + h) if out else None for _, y, _, h, _, out in items]
    spots = place_captions(anchors, sizes, 512, bottoms, H)
    rects = [(x, y, w, th) for (x, y), (w, th) in zip(spots, sizes)]
    for i, r in enumerate(rects):
        assert all(not _rects_overlap(r, q) for q in rects[:i])
    (x, y), (w, th), b = anchors[0], sizes[0], bottoms[0]
    if b is not None and (y - th >= 0 or b + th <= H):  # the first outside caption: nothing placed before it
        first = [i for i in range(len(items)) if bottoms[i] is not None][0]
        if first == 0:
            ty = spots[0][1]
            assert ty + th <= y + 1e-9 or ty >= b - 1e-9
