"""Drawing an analysis: the detector's AUs in green, the model's boxes in their own colours (red first)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from tagfer.core.canvas import clip_box
from tagfer.core.imageio import LoadedImage, data_url
from tagfer.explainer.frames import crop_region

__all__ = ["BOX_COLORS", "DETECTOR_COLOR", "box_color", "render_overlay", "render_overlay_layout", "overlay_parts", "png_data_url"]

# Colours of the model's boxes, in box order (red first); green is the detector's.
BOX_COLORS: tuple[str, ...] = ("#e61e1e", "#ff8c00", "#b428c8", "#1e6eff", "#8c5014", "#00a0a0")
DETECTOR_COLOR = "#00c846"


def _rgb(hex_color: str) -> tuple[int, int, int]:
    h = hex_color.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def box_color(i: int) -> str:
    return BOX_COLORS[i % len(BOX_COLORS)]


def _role(step: dict[str, Any] | None, label: str | None) -> str:
    """What a cited box argues (the grounded engine's ``local.steps``), in words."""
    if not step:
        return ""
    role, target = step.get("role"), step.get("for")
    if role == "support":
        return f"supports {target or label}"
    if role == "contrary":
        return f"points to {target}" if target else f"argues against {label}"
    if role == "isolated":
        return "stands alone (no expression)"
    return str(role or "")


def _steps_by_box(analysis: Any) -> list[dict[str, Any] | None]:
    """The engine step of each box (``local.steps`` are in box order; matched by AU when not)."""
    steps = list((analysis.views.get("local") or {}).get("steps") or []) if getattr(analysis, "views", None) else []
    out: list[dict[str, Any] | None] = []
    for i, au in enumerate(analysis.box_aus):
        if i < len(steps) and steps[i].get("au") == au:
            out.append(steps[i])
        else:
            out.append(next((s for s in steps if au is not None and s.get("au") == au), None))
    return out


def overlay_parts(analysis: Any) -> tuple[list[Any], list[Any]]:
    """The boxes and legend lines of :func:`render_overlay` (``LabeledBox``, ``LegendLine`` of
    :mod:`tagfer.au.overlay`). An engine box that is exactly the detector's box of its AU is
    captioned like the detector's (``AU6 1.00``) and drawn once, in the engine's colour."""
    from tagfer.au.aus import AU_NAMES
    from tagfer.au.overlay import LabeledBox, LegendLine  # lazy (start-up time): PIL

    canvas = analysis.canvas
    det = {int(a["au"]): a for a in analysis.aus}
    active = [a for a in analysis.aus if a["active"]]
    lbs: list[LabeledBox] = []
    lines: list[LegendLine] = []
    label = analysis.label
    if label is None:
        head = "no readable answer"
    elif analysis.scores and label in analysis.scores:
        head = f"{label} (score {float(analysis.scores[label]):.2f})"
    else:
        head = label
    if not analysis.well_formed:
        head += " · malformed output"
    lines.append(LegendLine(head, None, heading=True))
    views = getattr(analysis, "views", None) or {}
    g = views.get("global")
    if g:
        text = f"overall impression ({g.get('net', 'FER')} net): {g.get('label')}, confidence {float(g.get('confidence', 0.0)):.2f}"
        local = (views.get("local") or {}).get("label")
        if views.get("agreement") == "agree":
            text += " · the regions agree"
        elif local:
            text += f" · the regions point to {local}"
        if (views.get("decision") or {}).get("decided_by") == "local":
            text += " · the regions decide"
        lines.append(LegendLine(text))
    cited_boxes: set[tuple[int, ...]] = set()
    for i, (coords, au, color, step) in enumerate(zip(analysis.boxes, analysis.box_aus, analysis.box_colors, _steps_by_box(analysis))):
        rgb = _rgb(color)
        name = f"AU{au} {AU_NAMES.get(au, '')}".strip() if au is not None else f"box {i + 1}"
        if coords is None:
            lines.append(LegendLine(f"{name}: unreadable box", rgb))
            continue
        c = clip_box(coords, canvas)
        if c[0] >= c[2] or c[1] >= c[3]:
            lines.append(LegendLine(f"{name}: box outside the picture", rgb))
            continue
        d = det.get(au) if au is not None else None
        same = d is not None and [int(v) for v in d["box"]] == [int(v) for v in c]
        caption = f"AU{au} {d['score']:.2f}" if same else (f"AU{au}" if au is not None else f"box {i + 1}")
        lbs.append(LabeledBox(c, caption, rgb))
        if same:
            cited_boxes.add(tuple(int(v) for v in c))
            name += f" {d['score']:.2f}"
        role = _role(step, label)
        lines.append(LegendLine(f"{name} · {role}" if role else name, rgb))
    green = _rgb(DETECTOR_COLOR)
    uncited = []
    for a in active:
        lbs.append(LabeledBox(a["box"], f"AU{a['au']} {a['score']:.2f}", green))
        if tuple(int(v) for v in a["box"]) not in cited_boxes:
            uncited.append(f"AU{a['au']} {a.get('name') or AU_NAMES.get(int(a['au']), '')} {a['score']:.2f}")
    if uncited:
        lines.append(LegendLine(("detector, not cited: " if analysis.boxes else "detector: ") + ", ".join(uncited), green))
    elif not active:
        lines.append(LegendLine("detector: no activated AU", green))
    return lbs, lines


def render_overlay_layout(img: LoadedImage, analysis: Any, legend: bool = True) -> Any:
    """:func:`render_overlay` with its layout: a :class:`tagfer.au.overlay.Rendered` (image, tags, legend)."""
    from tagfer.au.overlay import face_focus, render_boxes  # lazy (start-up time): PIL

    lbs, lines = overlay_parts(analysis)
    lines = lines if legend else []
    canvas = analysis.canvas
    if analysis.frame == "face":
        region = analysis.frame_box
        size = (region[2] - region[0], region[3] - region[1])
        return render_boxes(crop_region(img, region), lbs, canvas=canvas, original_size=size, legend=lines)
    crop = face_focus([analysis.face_bbox], (img.width, img.height))
    return render_boxes(img.rgb, lbs, canvas=canvas, original_size=(img.width, img.height), crop=crop, legend=lines)


def render_overlay(img: LoadedImage, analysis: Any, legend: bool = True) -> Image.Image:
    """Overlay of one face's :class:`tagfer.explainer.records.Analysis`, as the web page shows it:
    the model's boxes in their trace colours (``box_colors``, captioned ``AU12 0.90``, ``AU12`` or
    ``box 1``), the detector's other active AUs in green, one caption per distinct box, and (``legend``)
    a panel under the picture: the label and its score, the global impression (grounded engine),
    one line per box (swatch, AU number and name, what it argues: supports the label / points to
    another class) and the detector's uncited AUs. Unreadable or empty boxes are not drawn (the
    legend names them)."""
    return render_overlay_layout(img, analysis, legend).image


def png_data_url(im: Image.Image) -> str:
    """``data:image/png;base64,…`` of ``im`` (:func:`tagfer.core.imageio.data_url`, fast zlib level)."""
    return data_url(im, "png")
