"""tagfer.models.backends: one interface over HF (tiny model), OpenAI-compatible servers (fake server)
and vLLM (a stand-in module, since vLLM is not installed here)."""

from __future__ import annotations

import base64
import io
import sys
import threading
import types

import pytest
from PIL import Image

from fakeserver import Reply
from tagfer.models.backends import (
    Backend,
    BackendUnavailable,
    FACSBackend,
    GenerationConfig,
    GenRequest,
    GenResult,
    OpenAIBackend,
    TransformersBackend,
    VLLMBackend,
    make_backend,
    parse_spec,
)
from tagfer.models.openai_client import ClientConfig


def ocfg(url: str, **kw) -> ClientConfig:
    base = dict(model="m", api_key="", timeout_s=5.0, backoff_base_s=0.001, backoff_max_s=0.01, max_retries=1)
    base.update(kw)
    return ClientConfig(endpoints=[url], **base)


def text_of(req_json: dict) -> str:
    content = req_json["messages"][-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


@pytest.fixture(scope="module")
def srv(fake_openai):
    return fake_openai()


@pytest.fixture
def obackend(srv):
    b = OpenAIBackend(ocfg(srv.url))
    yield b
    b.close()


# ----------------------------------------------------------------------------- config, specs

def test_generation_config_presets_and_params():
    assert GenerationConfig().openai_params() == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 512}
    assert GenerationConfig.tag().temperature == 0.0
    b = GenerationConfig.baseline(seed=3)
    assert b.top_p == 0.9 and b.openai_params()["seed"] == 3


@pytest.mark.parametrize("spec,expected", [
    ("hf:/models/x", ("hf", "/models/x")),
    ("transformers:Qwen/Qwen2.5-VL-7B-Instruct", ("hf", "Qwen/Qwen2.5-VL-7B-Instruct")),
    ("/models/tag-7b", ("hf", "/models/tag-7b")),
    ("Qwen/Qwen2.5-VL-7B-Instruct", ("hf", "Qwen/Qwen2.5-VL-7B-Instruct")),
    ("openai:http://a:8000/v1,http://b:8000/v1", ("openai", "http://a:8000/v1,http://b:8000/v1")),
    ("http://a:8000/v1", ("openai", "http://a:8000/v1")),
    ("vllm:/models/x", ("vllm", "/models/x")),
    ("C:/models/x", ("hf", "C:/models/x")),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("bad", ["", "openai:", "vllm:  "])
def test_parse_spec_rejects_empty(bad):
    with pytest.raises(BackendUnavailable):
        parse_spec(bad)


def test_make_backend_openai_passes_client_options():
    b = make_backend("openai:a:1,b:2", model="srv-model", per_endpoint_concurrency=7, concurrency=10, ordered=False, api_key="")
    assert isinstance(b, OpenAIBackend) and isinstance(b, Backend)
    cfg = b.client_config
    assert cfg.endpoints == ["http://a:1/v1", "http://b:2/v1"] and cfg.model == "srv-model"
    assert cfg.per_endpoint_concurrency == 7 and cfg.total_concurrency == 10 and b.ordered is False
    with pytest.raises(TypeError):
        make_backend("openai:a:1", no_such_option=1)


def test_make_backend_vllm_without_vllm_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm → ImportError
    with pytest.raises(BackendUnavailable, match="pip install vllm"):
        make_backend("vllm:/models/x")


def test_result_json_roundtrip():
    r = GenResult("a", None, {"kind": "timeout", "message": "m"}, {"k": 1}, {"backend": "openai"})
    assert GenResult.from_json(r.to_json()) == r and not r.ok


# ----------------------------------------------------------------------------- OpenAI backend

def test_openai_backend_order_ids_errors_and_meta(srv, obackend, bad_inputs, astronaut_path):
    def script(req, i):
        t = text_of(req)
        if t == "explode":
            return Reply(status=500, text="server broke")
        return Reply(text=f"answer to {t}", delay_s=0.05 if t == "q0" else 0.0)  # the first finishes last

    srv.reset(script)
    reqs = [
        GenRequest("r0", "q0", image=astronaut_path, system="be brief", meta={"label": "happiness"}),
        GenRequest("r1", "q1", image=bad_inputs["corrupt"]),
        GenRequest("r2", "explode"),
        GenRequest("r3", "q3", image=bad_inputs["not_found"]),
        GenRequest("r4", "q4", image=Image.new("RGB", (400, 100), "white")),
        GenRequest("r5", "q5", messages=[{"role": "user", "content": "q5"}]),
    ]
    seen = []
    out = list(obackend.generate(reqs, GenerationConfig(max_new_tokens=64, seed=1), on_result=seen.append))
    assert [r.id for r in out] == [f"r{i}" for i in range(6)] and seen == out
    assert out[0].text == "answer to q0" and out[0].meta == {"label": "happiness"}
    assert out[0].info["endpoint"] == srv.url and out[0].info["attempts"] == 1
    assert out[1].error["kind"] == "corrupt" and out[1].text is None
    assert out[2].error["kind"] == "http_500" and out[2].info["attempts"] == 2
    assert out[3].error["kind"] == "not_found"
    assert out[4].text == "answer to q4" and out[5].text == "answer to q5"
    # what went over the wire
    by_text = {text_of(r): r for r in srv.requests}
    first = by_text["q0"]
    assert first["messages"][0] == {"role": "system", "content": "be brief"}
    assert first["max_tokens"] == 64 and first["seed"] == 1 and first["temperature"] == 0.0
    url = by_text["q4"]["messages"][0]["content"][0]["image_url"]["url"]
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (224, 56)
    assert len(srv.requests) == 5  # corrupt/missing images never reach the server; "explode" twice


def test_openai_backend_unordered_yields_as_completed(srv):
    srv.reset(lambda req, i: Reply(text=text_of(req), delay_s=0.3 if text_of(req) == "slow" else 0.0))
    b = OpenAIBackend(ocfg(srv.url), ordered=False)
    try:
        out = list(b.generate([GenRequest("s", "slow")] + [GenRequest(f"f{i}", f"fast{i}") for i in range(5)]))
    finally:
        b.close()
    assert out[-1].id == "s" and sorted(r.id for r in out) == sorted(["s"] + [f"f{i}" for i in range(5)])
    assert all(r.text == {"s": "slow"}.get(r.id, f"fast{r.id[1:]}") for r in out)


def test_openai_backend_reads_input_lazily(srv):
    srv.reset(lambda req, i: "x")
    pulled = []

    def requests():
        for i in range(100):
            pulled.append(i)
            yield GenRequest(str(i), f"q{i}")

    b = OpenAIBackend(ocfg(srv.url), window=4)
    try:
        gen = b.generate(requests())
        first = next(gen)
        assert first.id == "0" and len(pulled) <= 5  # bounded look-ahead
        rest = list(gen)
    finally:
        b.close()
    assert len(rest) == 99 and [r.id for r in rest] == [str(i) for i in range(1, 100)]


def test_openai_backend_early_close_then_reuse(srv):
    srv.reset(lambda req, i: Reply(hang=True) if text_of(req).startswith("hang") else Reply(text="fine"))
    b = OpenAIBackend(ocfg(srv.url, timeout_s=30.0), window=8)
    try:
        gen = b.generate([GenRequest("a", "quick")] + [GenRequest(f"h{i}", f"hang{i}") for i in range(5)])
        assert next(gen).text == "fine"
        gen.close()  # cancels the hanging requests instead of waiting 30 s
        assert [r.text for r in b.generate([GenRequest("b", "quick")])] == ["fine"]
    finally:
        b.close()
        b.close()  # idempotent


def test_openai_backend_from_several_threads(srv):
    srv.reset(lambda req, i: Reply(text=text_of(req).upper()))
    b = OpenAIBackend(ocfg(srv.url))
    results: dict[int, list[str]] = {}

    def work(k: int) -> None:
        results[k] = [r.text for r in b.generate([GenRequest(f"{k}-{i}", f"t{k}{i}") for i in range(10)])]

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        b.close()
    assert results == {k: [f"T{k}{i}" for i in range(10)] for k in range(3)}


def test_openai_backend_timeout_recorded(srv):
    srv.reset(lambda req, i: Reply(hang=True))
    b = OpenAIBackend(ocfg(srv.url, timeout_s=0.2, max_retries=1))
    try:
        (r,) = list(b.generate([GenRequest("h", "x")]))
    finally:
        b.close()
    assert r.error["kind"] == "timeout" and r.info["attempts"] == 2


def test_openai_backend_records_an_oversized_reply_and_goes_on(srv):
    """A runaway reply (endless body) fails only its item, as response_too_large; make_backend
    passes the cap through to ClientConfig."""
    srv.reset(lambda req, i: Reply(endless=True) if text_of(req) == "huge" else Reply(text=text_of(req).upper()))
    b = make_backend(f"openai:{srv.url}", model="m", api_key="", max_response_bytes=256 * 1024, max_retries=3, timeout_s=30.0)
    try:
        out = list(b.generate([GenRequest("a", "one"), GenRequest("h", "huge"), GenRequest("c", "three")]))
    finally:
        b.close()
    assert [r.id for r in out] == ["a", "h", "c"] and out[0].text == "ONE" and out[2].text == "THREE"
    assert out[1].text is None and out[1].error["kind"] == "response_too_large" and out[1].info["attempts"] == 1


# ----------------------------------------------------------------------------- Transformers backend

def test_transformers_backend_tiny_model(tiny_vlm, bad_inputs, astronaut_path):
    b = TransformersBackend(tiny_vlm, batch_size=3)
    reqs = [
        GenRequest("a", "What is the expression?", image=astronaut_path, system="sys A", meta={"i": 0}),
        GenRequest("b", "What is the expression?", image=bad_inputs["corrupt"]),
        GenRequest("c", "Describe.", image=Image.new("RGB", (64, 48), (120, 80, 60)), system="sys B"),
        GenRequest("d", "Text only."),
        GenRequest("e", "raw", messages=[{"role": "user", "content": "hi"}]),
    ]
    seen = []
    out = list(b.generate(reqs, GenerationConfig(max_new_tokens=4), on_result=seen.append))
    assert [r.id for r in out] == ["a", "b", "c", "d", "e"] and seen == out
    for r in (out[0], out[2], out[3]):
        assert r.ok and isinstance(r.text, str) and r.info["backend"] == "hf"
    assert out[0].meta == {"i": 0}
    assert out[1].error["kind"] == "corrupt"
    assert out[4].error["kind"] == "unsupported"


def test_transformers_backend_is_deterministic_when_greedy(tiny_vlm, astronaut_path):
    b = TransformersBackend(tiny_vlm, batch_size=2)
    reqs = [GenRequest(str(i), "Which emotion?", image=astronaut_path) for i in range(2)]
    one = [r.text for r in b.generate(reqs, GenerationConfig(max_new_tokens=5))]
    two = [r.text for r in b.generate(reqs, GenerationConfig(max_new_tokens=5))]
    assert one == two and one[0] == one[1]


def test_transformers_backend_isolates_a_failing_item(tiny_vlm, monkeypatch):
    calls = []

    def flaky(images, users, system=None, **kw):
        calls.append(list(users))
        if "poison" in users:
            raise RuntimeError("boom")
        return [f"out:{u}" for u in users]

    monkeypatch.setattr(tiny_vlm, "generate", flaky)
    b = TransformersBackend(tiny_vlm, batch_size=4)
    out = list(b.generate([GenRequest(str(i), u) for i, u in enumerate(["x", "poison", "y", "z", "w"])]))
    assert [r.text for r in out] == ["out:x", None, "out:y", "out:z", "out:w"]
    assert out[1].error == {"kind": "generation_failed", "message": "RuntimeError: boom"}
    assert calls[0] == ["x", "poison", "y", "z"] and ["poison"] in calls  # batch, then one by one


# ----------------------------------------------------------------------------- vLLM backend (stand-in module)

@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    log: dict = {"chat": []}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, **kw):
            log["init"] = (model, kw)

        def chat(self, convs, sampling_params=None, use_tqdm=True):
            log["chat"].append((convs, sampling_params.kw))
            outs = []
            for conv in convs:
                user = conv[-1]["content"]
                text = user if isinstance(user, str) else user[-1]["text"]
                if text == "poison":
                    raise RuntimeError("engine error")
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"v:{text}", finish_reason="stop")]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return log


def test_vllm_backend_calls_engine(fake_vllm, bad_inputs, astronaut_path):
    b = make_backend("vllm:/models/tag", chunk_size=3, tensor_parallel_size=2)
    assert isinstance(b, VLLMBackend)
    assert fake_vllm["init"] == ("/models/tag", {"tensor_parallel_size": 2, "limit_mm_per_prompt": {"image": 1}})
    reqs = [GenRequest("a", "hello", image=astronaut_path, system="S"), GenRequest("b", "bad", image=bad_inputs["corrupt"]),
            GenRequest("c", "poison"), GenRequest("d", "last")]
    out = list(b.generate(reqs, GenerationConfig(temperature=0.7, top_p=0.9, max_new_tokens=32, seed=5)))
    assert [r.id for r in out] == ["a", "b", "c", "d"]
    assert out[0].text == "v:hello" and out[3].text == "v:last"
    assert out[1].error["kind"] == "corrupt" and out[2].error["kind"] == "generation_failed"
    convs, sp = fake_vllm["chat"][0]
    assert sp == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 32, "seed": 5}
    assert convs[0][0] == {"role": "system", "content": "S"}
    assert convs[0][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_request_images_from_arrays_and_bad_objects(srv, obackend, astronaut_rgb):
    import numpy as np

    srv.reset(lambda req, i: "seen")
    reqs = [GenRequest("arr", "x", image=astronaut_rgb), GenRequest("bad-arr", "x", image=np.zeros((4, 4, 7), dtype=np.float64)),
            GenRequest("obj", "x", image=12345)]
    out = list(obackend.generate(reqs))
    assert out[0].text == "seen"
    assert out[1].error["kind"] == "bad_array"
    assert out[2].text is None and out[2].error["kind"] == "bad_request"  # an int is no image: recorded, not raised


# ----------------------------------------------------------------------------- at most three boxes

FOUR_BOXES = ("<think>look. brow <bbox>[1, 2, 30, 40]</bbox> eyes <bbox>[5, 6, 70, 80]</bbox> "
              "mouth <bbox>[9, 9, 90, 99]</bbox> chin <bbox>[0, 0, 10, 10]</bbox> so.</think><answer>fear</answer>")


def test_limit_boxes_removes_the_extra_box_elements_and_keeps_the_answer():
    """Served replies are held to the limit like the in-process path: extra box elements go, the rest stays."""
    from tagfer.models.backends import limit_boxes

    text, v = limit_boxes(FOUR_BOXES, 3)
    assert " ".join(text.split()) == " ".join(FOUR_BOXES.replace("<bbox>[0, 0, 10, 10]</bbox>", "").split())
    assert text.endswith("<answer>fear</answer>")
    assert v["mode"] == "repaired" and (v["max_boxes"], v["boxes"], v["removed"]) == (3, 4, 1)
    assert limit_boxes(FOUR_BOXES, 4) == (FOUR_BOXES, None)
    assert limit_boxes(FOUR_BOXES, None) == (FOUR_BOXES, None) and limit_boxes(None, 3) == (None, None)
    unclosed = "a <bbox>[1, 2, 3, 4] b <BBOX>[1, 2, 3, 4]</bbox> <answer>fear</answer>"
    fixed = limit_boxes(unclosed, 1)[0]
    assert fixed.count("bbox>[") <= 1 and fixed.endswith("<answer>fear</answer>")


def test_served_backends_repair_a_fourth_box_and_record_it(srv, obackend, fake_vllm):
    srv.reset(lambda req, i: Reply(text=FOUR_BOXES))
    (tag,) = list(obackend.generate([GenRequest("t", "q")], GenerationConfig.tag()))
    assert tag.text.count("<bbox>") == 3 and tag.text.endswith("<answer>fear</answer>")  # the answer is kept
    assert tag.info["box_limit"]["mode"] == "repaired" and tag.info["box_limit"]["boxes"] == 4
    (base,) = list(obackend.generate([GenRequest("b", "q")], GenerationConfig.baseline()))
    assert base.text == FOUR_BOXES and "box_limit" not in base.info  # baselines are not restricted
    b = make_backend("vllm:/models/tag")  # this stand-in vLLM has no structured outputs: repaired afterwards
    assert not b.decodes_box_limit
    (v,) = list(b.generate([GenRequest("v", FOUR_BOXES)], GenerationConfig.tag()))
    assert v.text == limit_boxes_text(FOUR_BOXES) and v.info["box_limit"]["max_boxes"] == 3


def test_vllm_backend_decodes_under_the_box_regex_when_structured_outputs_exist(fake_vllm):
    import re

    from tagfer.traces.boxtags import box_limit_regex

    class StructuredOutputsParams:
        def __init__(self, regex):
            self.regex = regex

    sys.modules["vllm"].StructuredOutputsParams = StructuredOutputsParams
    b = make_backend("vllm:/models/tag")
    assert b.decodes_box_limit
    (v,) = list(b.generate([GenRequest("v", "q")], GenerationConfig.tag()))
    sp = fake_vllm["chat"][-1][1]
    assert sp["structured_outputs"].regex == box_limit_regex(3)
    assert re.fullmatch(sp["structured_outputs"].regex, FOUR_BOXES) is None  # a 4th box cannot be decoded
    (w,) = list(b.generate([GenRequest("w", "q")], GenerationConfig.baseline()))
    assert "structured_outputs" not in fake_vllm["chat"][-1][1]  # baselines are not restricted


def limit_boxes_text(text: str) -> str:
    from tagfer.models.backends import limit_boxes

    return limit_boxes("v:" + text, 3)[0]


# ----------------------------------------------------------------------------- the registry (one way to call a model)

class _FakeVLM:
    """Stands in for a loaded tagfer.models.vlm.VLM (no transformers import)."""

    def __init__(self, cfg):
        self.config = cfg

    def generate(self, images, users, system=None, **kw):
        return ["<think>x</think><answer>fear</answer>" for _ in images]


@pytest.fixture
def fake_load_vlm(monkeypatch):
    import tagfer.models.vlm

    made = []

    def load(cfg, **kw):
        made.append(cfg)
        return _FakeVLM(cfg)

    monkeypatch.setattr(tagfer.models.vlm, "load_vlm", load)
    return made


SPEC_KINDS = [
    ("hf:/models/x", TransformersBackend),
    ("transformers:Org/model", TransformersBackend),
    ("/models/tag-7b", TransformersBackend),  # a bare path
    ("Org/model", TransformersBackend),  # a hub id
    ("openai:http://127.0.0.1:9/v1,http://127.0.0.1:10/v1", OpenAIBackend),
    ("http://127.0.0.1:9/v1", OpenAIBackend),
    ("vllm:/models/x", VLLMBackend),
    ("facs", FACSBackend),
    ("facs:openface:/data/of.csv", FACSBackend),
]


@pytest.mark.parametrize("spec,cls", SPEC_KINDS)
def test_every_spec_kind_resolves_to_the_same_object_in_analyze_and_eval(spec, cls, fake_load_vlm, fake_vllm):
    """`tagfer eval` builds its model with make_backend; `tagfer analyze` with load_engine: same spec, same backend."""
    from tagfer.explainer.analyze import load_engine

    common = dict(batch_size=2, device="cpu", concurrency=3, served_model="srv", api_key="", max_retries=0, timeout_s=5.0,
                  image_format="jpeg")  # the eval command line passes them all; each kind takes what it uses
    b = make_backend(spec, **common)
    assert type(b) is cls and isinstance(b, Backend) and b.model_spec == spec
    eng = load_engine(spec, device="cpu")
    assert type(eng) is cls and eng.model_spec == spec
    if cls is TransformersBackend:
        assert b.vlm.config.model == spec.split(":", 1)[-1] and b.vlm.config.device == "cpu" and b.batch_size == 2
        assert not b.thread_safe
    elif cls is OpenAIBackend:
        cfg = b.client_config
        assert cfg.model == "srv" and cfg.total_concurrency == 3 and cfg.max_retries == 0 and cfg.image_format == "jpeg"
        assert b.thread_safe and b.batch_size == cfg.max_in_flight
    elif cls is VLLMBackend:
        assert b.chunk_size == b.batch_size == 2
    else:
        assert b.detector_spec.kind == (spec.split(":", 1)[1] if ":" in spec else "mediapipe")
        assert b._detector is None  # the detector is built on first use (analyze never needs it)
    for x in (b, eng):
        x.close()


def test_unknown_or_empty_specs_are_clear_errors(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"unknown model kind 'gpt4'.*facs.*hf:PATH.*openai:URL.*vllm:PATH"):
        make_backend("gpt4:turbo")
    with pytest.raises(BackendUnavailable, match="did you mean 'openai'"):  # the one registry's suggestion
        make_backend("opnai:http://h:1/v1")
    with pytest.raises(BackendUnavailable, match="empty model spec"):
        make_backend("  ")
    with pytest.raises(TypeError):
        make_backend(42)
    with pytest.raises(TypeError):  # an option no kind knows is not silently dropped
        make_backend("facs", no_such_option=1)
    odd = tmp_path / "ab:cd"
    odd.mkdir()
    assert parse_spec(str(odd)) == ("hf", str(odd))  # an existing path with a colon is a path
    assert parse_spec("facs") == ("facs", "") and parse_spec("FACS:table:/x.csv") == ("facs", "table:/x.csv")


class _Probe:
    """A new backend: everything it takes is the registry entry below."""

    name = "probe"
    thread_safe = False
    batch_size = 1
    reply = "<think>The mouth corners rise.</think>\n<answer>happiness</answer>"

    def __init__(self, target):
        self.target = target

    def model_name(self):
        return self.target

    def generate(self, requests, config=None, on_result=None):
        for r in requests:
            yield GenResult(r.id, self.reply, None, dict(r.meta), {"backend": "probe"})

    def close(self):
        pass


@pytest.fixture
def probe_kind():
    """Registers the ``probe`` kind for one test (decorator form of the one registry), then removes it."""
    import tagfer.models.backends as B

    built: list[str] = []

    @B.register_backend("probe", usage="probe:NAME")
    def build_probe(target, **kw):  # command lines pass their common options; a kind takes what it uses
        built.append(target)
        return _Probe(target)

    yield built
    B.BACKENDS.unregister("probe")


def test_a_new_backend_is_one_registration(probe_kind, tmp_path, rafdb_root, astronaut_path):
    import json

    from typer.testing import CliRunner

    from tagfer.cli import app
    from tagfer.models.backends import backend_kinds

    assert "probe:NAME" in backend_kinds()
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--model", "probe:p1", "--dataset", f"rafdb:{rafdb_root}", "--out", str(tmp_path / "p.jsonl"),
                            "--no-progress", "--batch-size", "3", "--concurrency", "2"])
    assert r.exit_code == 0, r.output
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert preds and all(p["output"] == _Probe.reply and p["pred"] == "happiness" and p["model"] == "probe:p1" for p in preds)
    r = runner.invoke(app, ["analyze", str(astronaut_path), "--json", "--model", "probe:p2"])
    assert r.exit_code == 0, r.output
    (a,) = json.loads(r.stdout.splitlines()[-1])["analyses"]
    assert a["engine"] == "probe:p2" and a["trace"] == _Probe.reply and a["label"] == "happiness"
    assert probe_kind == ["p1", "p2"]
    r = runner.invoke(app, ["eval", "--model", "nope:x", "--dataset", f"rafdb:{rafdb_root}", "--out", str(tmp_path / "q.jsonl")])
    assert r.exit_code == 2 and "unknown model kind 'nope'" in r.output


def test_openai_backend_prepared_images_tags_and_async_requests(srv):
    """The teacher's path: an image encoded once, the item id as `user`, awaited from another event loop."""
    import asyncio

    srv.reset(lambda req, i: f"{req.get('user')}:{text_of(req)}")
    b = OpenAIBackend(ocfg(srv.url), tag_requests=True)
    try:
        part = b.prepare_image(Image.new("RGB", (64, 48), (200, 10, 10)))
        assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")

        async def ask():
            return await asyncio.gather(*(b.agenerate(GenRequest(f"item{i}", f"q{i}", image=part)) for i in range(3)))

        out = asyncio.run(ask())
        assert [r.text for r in out] == ["item0:q0", "item1:q1", "item2:q2"] and out[0].info["attempts"] == 1
        assert b.model_name() == "m"
        bad = asyncio.run(b.agenerate(GenRequest("x", "q", image=b"not an image")))
        assert bad.error is not None and bad.text is None
    finally:
        b.close()


# ----------------------------------------------------------------------------- the FACS backend (one model interface)

class _CountingDetector:
    """Stands in for the facs backend's own AU detector: counts the detections it is asked for."""

    def __init__(self, rows):
        self.rows, self.calls = rows, 0

    def detect(self, image, key=None):
        from fixtures_data import FakeAUDetector

        self.calls += 1
        return FakeAUDetector({"k": self.rows}).detect(image, "k")

    def close(self):
        pass


def test_facs_backend_writes_from_a_grounded_face_without_detecting(astronaut_path):
    """A request carrying the caller's grounded face (FaceAUs, or its AU list) is explained from those
    AUs: no detection, no pixels; the engine's decision comes back in ``info``."""
    from fixtures_data import FakeAUDetector, fake_au_rows

    from tagfer.au.facs import TRAINING_CONFIG, explain

    (face,) = FakeAUDetector({"k": fake_au_rows(3)}).detect(None, "k")
    det = _CountingDetector(fake_au_rows(3))
    b = FACSBackend(config=TRAINING_CONFIG, rules_only=True)
    b._detector = det
    assert b.name == "facs-rules" and not b.needs_pixels
    out = list(b.generate([GenRequest("f", face=face), GenRequest("aus", face=list(face.aus)),
                           GenRequest("img", image=astronaut_path), GenRequest("none")]))
    ex = explain(face, TRAINING_CONFIG)
    assert [r.id for r in out] == ["f", "aus", "img", "none"]
    assert out[0].text == out[1].text == out[2].text == ex.trace and b.reads_face and b.thread_safe
    assert out[0].info["label"] == ex.label and out[0].info["scores"] == ex.scores
    assert out[0].info["evidence_aus"] == list(ex.evidence_aus)
    assert det.calls == 1  # only the request without a face was detected
    assert out[3].error["kind"] == "no_image" and out[3].text is None


def test_grounded_facs_backend_needs_the_faces_picture(astronaut_path):
    """The default engine (``facs``) looks at the face with its FER net: a grounded face comes with the
    picture its canvas was made from; without one the item fails (no support is invented)."""
    from fixtures_data import FakeAUDetector, fake_au_rows
    from PIL import Image

    (face,) = FakeAUDetector({"k": fake_au_rows(3)}).detect(None, "k")
    b = make_backend("facs")
    assert b.name == "facs" and b.needs_pixels and b.reads_face
    pic = Image.open(astronaut_path).convert("RGB")
    with_pic, without = list(b.generate([GenRequest("p", image=pic, face=face), GenRequest("q", face=face)]))
    assert without.error["kind"] == "no_image" and without.text is None
    views = with_pic.info["views"]
    assert set(views) == {"global", "local", "agreement", "decision"} and views["global"]["net"] == "fer"
    assert with_pic.info["label"] in with_pic.text and with_pic.text.startswith("<think>")


def test_call_lock_serialises_a_backend_that_is_not_thread_safe():
    """Analyzers sharing one backend hold call_lock around generate: one lock per backend object
    (the same for every caller), none for a thread-safe backend."""
    from tagfer.models.backends import call_lock

    class Plain:
        thread_safe = False

    class Unhashable(Plain):
        __hash__ = None

    a, b, u = Plain(), Plain(), Unhashable()
    assert call_lock(a) is call_lock(a) and call_lock(a) is not call_lock(b)
    assert call_lock(u) is call_lock(u)
    with call_lock(a):
        assert not call_lock(a).acquire(blocking=False)  # a second caller would wait
    safe = types.SimpleNamespace(thread_safe=True)
    with call_lock(safe), call_lock(safe):  # nothing to wait for
        pass
