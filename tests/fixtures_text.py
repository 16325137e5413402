"""Hypothesis strategies for adversarial model output (shared by test_trace and test_integrations)."""

from __future__ import annotations

from hypothesis import strategies as st

# Characters Unicode case folding or compatibility mapping relate to ASCII letters of the tag
# names (dotless i, dotted I, long s, Kelvin sign, fullwidth forms, ligatures), plus invisible ones.
CONFUSABLES = (
    "\u0131\u0130\u017f\u212a\u212b\ufb01\ufb06\u00df\u1e9e"  # ı İ ſ K(elvin) Å(ngstrom) ﬁ ﬆ ß ẞ
    "＜＞／ｔｈｉｎｋａｎｓｗｅｒｂｏｘＴＨＩＮＫ"  # fullwidth brackets and letters
    "\u0307\u0301\u200b\u200d\u2060\ufeff\u00ad\u00a0\u3000\u2028\u3164"  # combining, invisible, spaces
)
FUZZ_CHAR = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), st.sampled_from(CONFUSABLES), st.sampled_from("<>/[], ")
)


# Per ASCII letter of a tag name: characters Unicode case-insensitive matching or NFKC relates to it.
LOOK_ALIKES = {c: chr(0xFF41 + ord(c) - 97) + chr(0xFF21 + ord(c) - 97) for c in "abcdefghijklmnopqrstuvwxyz"}  # fullwidth
LOOK_ALIKES["i"] += "\u0131\u0130"  # dotless i, dotted capital I
LOOK_ALIKES["s"] += "\u017f"  # long s
LOOK_ALIKES["k"] += "\u212a"  # Kelvin sign


@st.composite
def look_alike_name(draw: st.DrawFn, name: str) -> str:
    """``name`` with at least one letter swapped for a look-alike (and the rest in random ASCII case)."""
    letters = [draw(st.sampled_from([c, c.upper()])) for c in name]
    for k in draw(st.lists(st.integers(0, len(name) - 1), min_size=1, max_size=len(name), unique=True)):
        letters[k] = draw(st.sampled_from(LOOK_ALIKES[name[k]]))
    return "".join(letters)


@st.composite
def unicode_tag_soup(draw: st.DrawFn) -> str:
    """Tags whose names, brackets and surroundings carry arbitrary Unicode, mixed with real tags."""
    out = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["tag", "fuzzed_tag", "look_alike_tag", "text", "box"]))
        if kind == "text":
            out.append(draw(st.text(FUZZ_CHAR, max_size=8)))
            continue
        name = draw(st.sampled_from(["think", "answer", "bbox"]))
        if kind == "look_alike_tag":
            name = draw(look_alike_name(name))
        if kind == "fuzzed_tag":
            name = "".join(draw(FUZZ_CHAR) if draw(st.integers(0, 3)) == 0 else c for c in name)
            name = draw(st.sampled_from([name, name.upper(), name.title()]))
        body = f"[{draw(st.integers(-5, 600))}, 2, 30, 40]" if kind == "box" else ""
        slash = draw(st.sampled_from(["", "/"]))
        inside = draw(st.text(FUZZ_CHAR, max_size=2))
        out.append(f"<{slash}{inside}{name}{draw(st.text(FUZZ_CHAR, max_size=2))}>{body}")
    return "".join(out)
