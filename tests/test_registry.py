"""The one ``KIND:TARGET`` registry (tagfer.core.registry): registering, parsing, errors, options."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import examples

from tagfer.core.registry import Registry, Spec, SpecError


@pytest.fixture
def reg() -> Registry:
    r = Registry("widget", default="file")
    r.register("file", lambda target, **kw: ("file", target, kw), help="a path")

    @r.register("openface", aliases=("of", "openface2"), usage="openface:CSV")
    def _of(target, scale=1, **kw):
        return ("openface", target, int(scale), kw)

    r.register("mediapipe", object(), needs_target=False)
    r.register("openai", lambda t, **kw: ("openai", t), claims=("http", "https"))
    return r


def test_decorator_returns_function_and_registers(reg):
    def f(target):
        return target

    assert reg.register("newkind")(f) is f
    assert "newkind" in reg and reg.get("NewKind") is f
    assert reg.create("newkind:abc") == "abc"


def test_parse_kinds_aliases_and_targets(reg):
    assert reg.parse("openface:/x/y.csv") == Spec("openface", "/x/y.csv", {})
    assert reg.parse("OF:/x/y.csv").kind == "openface"
    assert reg.parse("mediapipe") == Spec("mediapipe", "", {})
    assert reg.parse("/data/a.csv") == Spec("file", "/data/a.csv", {})
    assert reg.parse(r"C:\data\a.csv") == Spec("file", r"C:\data\a.csv", {})  # a drive letter is not a kind
    assert reg.parse("https://h:8000/v1") == Spec("openai", "https://h:8000/v1", {})


def test_options_parsed_and_overridden_by_keywords(reg):
    s = reg.parse("openface:/x.csv?scale=3&mode=a%26b&empty=")
    assert s.options == {"scale": "3", "mode": "a&b", "empty": ""}
    assert reg.create("openface:/x.csv?scale=3") == ("openface", "/x.csv", 3, {})
    assert reg.create("openface:/x.csv?scale=3", scale=5) == ("openface", "/x.csv", 5, {})
    with pytest.raises(SpecError, match="no name"):
        reg.parse("openface:/x.csv?=3")


def test_unknown_kind_lists_valid_kinds_and_suggests(reg):
    with pytest.raises(ValueError) as e:
        reg.parse("opnface:/x.csv")
    msg = str(e.value)
    assert "did you mean 'openface'?" in msg
    for u in ("openface:CSV", "mediapipe", "file:TARGET"):
        assert u in msg
    with pytest.raises(SpecError, match="did you mean 'openface'"):
        reg.get("openface3")  # alias-close name still points at the kind
    with pytest.raises(SpecError) as e2:
        reg.parse("zzzzzz:/x")
    assert "did you mean" not in str(e2.value)


def test_unknown_kind_that_is_an_existing_path_is_a_path(reg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ab:c.csv").write_text("x")
    assert reg.parse("ab:c.csv") == Spec("file", "ab:c.csv", {})


def test_missing_target_and_empty_spec(reg):
    with pytest.raises(SpecError, match="nothing after 'openface:'.*openface:CSV"):
        reg.parse("openface:")
    with pytest.raises(SpecError, match="empty widget spec"):
        reg.parse("  ")


def test_no_default_means_bare_words_must_be_kinds():
    r = Registry("family", options=False)
    r.register("qwen2_5_vl", {"n": 1}, aliases=("qwen2.5-vl",), needs_target=False)
    assert r.get("qwen2.5-vl") == {"n": 1}
    with pytest.raises(SpecError, match="did you mean 'qwen2_5_vl'"):
        r.parse("qwen2_5_v")
    assert r.parse("qwen2_5_vl:x?y=1") == Spec("qwen2_5_vl", "x?y=1", {})  # options off: '?' is text


def test_list_pattern_and_usages(reg):
    assert reg.list() == ["file", "mediapipe", "openai", "openface"]
    assert reg.list("open*") == ["openai", "openface"]
    assert "openface:CSV" in reg.usages()
    assert "of" not in reg.list() and "of" in reg


def test_reregister_replaces_and_warns(reg):
    with pytest.warns(RuntimeWarning, match="re-registered"):
        reg.register("openface", lambda t: "new")
    assert reg.create("openface:x") == "new"
    assert "of" not in reg  # the old aliases went with the old entry
    reg.unregister("openface")
    assert "openface" not in reg


def test_kind_must_be_two_characters():
    with pytest.raises(ValueError, match="2\\+ characters"):
        Registry("x").register("c", object())


def test_custom_error_class():
    class Boom(RuntimeError):
        pass

    r = Registry("thing", error=Boom)
    with pytest.raises(Boom, match="unknown thing kind"):
        r.parse("nope:x")


# ------------------------------------------------------------------------- property tests
_kind = st.from_regex(r"[a-z][a-z0-9_]{1,8}", fullmatch=True)
_target = st.text(alphabet=string.ascii_letters + string.digits + "/._-:\\ ", min_size=1, max_size=30).map(str.strip).filter(
    lambda t: t != "")
_opts = st.dictionaries(st.text(string.ascii_letters + "&=?% é", min_size=1, max_size=6).map(str.strip).filter(bool),
                        st.text(string.printable + "é", max_size=8).map(str.strip), max_size=4)


@settings(max_examples=examples(200), deadline=None)
@given(kind=_kind, target=_target, opts=_opts)
def test_spec_round_trips(kind, target, opts):
    r = Registry("p", default=None)
    r.register(kind, object())
    s = Spec(kind, target, opts)
    assert r.parse(str(s)) == s


@settings(max_examples=examples(200), deadline=None)
@given(text=st.text(max_size=40))
def test_parse_never_crashes_with_anything_but_spec_error(text):
    r = Registry("p", default="file")
    r.register("file", object())
    r.register("solo", object(), needs_target=False)
    try:
        s = r.parse(text)
    except SpecError:
        return
    assert s.kind in ("file", "solo")
    assert isinstance(s.options, dict)
