import json
import re

import numpy as np
import pytest
from PIL import Image

from tagfer.models.vlm import ModelNotAvailable, VLMConfig, build_chat, load_vlm, resize_for_model


@pytest.mark.parametrize("size", [(48, 48), (640, 480), (100, 300), (224, 224)])
def test_resize_for_model_keeps_aspect_and_longer_side(size):
    img = Image.new("L", size, 128)
    out = resize_for_model(img, 224)
    assert out.mode == "RGB" and max(out.size) == 224
    assert abs(out.size[0] / out.size[1] - size[0] / size[1]) < 0.02
    assert resize_for_model(img, 0).size == size


def test_build_chat_layout():
    msgs = build_chat("why?", system="be brief", assistant="<answer>fear</answer>")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"][0] == {"type": "image"} and msgs[1]["content"][1]["text"] == "why?"
    assert build_chat("q", with_image=False)[0]["content"] == [{"type": "text", "text": "q"}]


def test_tiny_tokenizer_round_trips_traces_and_ids(tiny_vlm):
    tok = tiny_vlm.tokenizer
    text = "<think>Mouth AU12 <bbox>[93, 306, 445, 417]</bbox> raised — ünïcode 😀</think><answer>happiness</answer>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<|image_pad|>") == tiny_vlm.model.config.image_token_id
    assert tok.eos_token == "<|im_end|>"


def test_prepare_gives_64_image_tokens_for_a_224_face(tiny_vlm, astronaut_path):
    img = Image.open(astronaut_path)
    inputs = tiny_vlm.prepare([img], ["label?"], system="sys")
    n_img = int((inputs["input_ids"] == tiny_vlm.model.config.image_token_id).sum())
    assert n_img == 64  # 224×224 → 16×16 patches → 8×8 after the 2×2 merge
    text = tiny_vlm.tokenizer.decode(inputs["input_ids"][0])
    assert text.startswith("<|im_start|>system\nsys<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_greedy_generation_is_deterministic_and_batch_independent(tiny_vlm, astronaut_path, grace_path):
    a, g = Image.open(astronaut_path), Image.open(grace_path)
    batch = tiny_vlm.generate([a, g], ["q1", "a longer second question"], max_new_tokens=8, batch_size=2)
    single = [tiny_vlm.generate([a], ["q1"], max_new_tokens=8)[0], tiny_vlm.generate([g], ["a longer second question"], max_new_tokens=8)[0]]
    assert len(batch) == 2 and all(isinstance(s, str) for s in batch)
    assert batch == single  # left padding does not change greedy outputs
    with pytest.raises(ValueError):
        tiny_vlm.generate([a], ["x", "y"])


def test_sampled_generation_is_seeded(tiny_vlm, astronaut_path):
    a = Image.open(astronaut_path)
    r1 = tiny_vlm.generate([a], ["q"], max_new_tokens=10, temperature=1.5, top_p=0.9, seed=3)
    r2 = tiny_vlm.generate([a], ["q"], max_new_tokens=10, temperature=1.5, top_p=0.9, seed=3)
    assert r1 == r2


def test_saved_tiny_model_reloads_with_identical_logits(tiny_vlm, tiny_vlm_dir, astronaut_path):
    import torch

    inputs = tiny_vlm.prepare([Image.open(astronaut_path)], ["q"])
    again = load_vlm(VLMConfig(model=str(tiny_vlm_dir), device="cpu"))
    with torch.no_grad():
        l1 = tiny_vlm.model(**inputs).logits
        l2 = again.model(**inputs).logits
    assert torch.equal(l1, l2)


@pytest.mark.model
def test_missing_models_raise_model_not_available(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_vlm(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelNotAvailable, match="hf download"):
        load_vlm("Qwen/Qwen2.5-VL-7B-Instruct")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailable, match="is a file"):
        load_vlm(str(tmp_path / "f.bin"))


def test_unknown_dtype_is_rejected(tiny_vlm_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_vlm(str(tiny_vlm_dir), dtype="int3")


def test_every_packaged_prompt_loads_and_overrides_work(tmp_path):
    from tagfer.models.prompts import load_prompt, prompt_names, render, tag_prompt

    names = prompt_names()
    assert {"tag_system", "tag_user"} <= set(names)
    assert all(load_prompt(n) for n in names)
    own = tmp_path / "sys.txt"
    own.write_text("my system prompt for $who\n")
    system, user = tag_prompt(system=own)
    assert system == "my system prompt for $who" and "512" in user
    assert render(system, who="raters") == "my system prompt for raters"
    with pytest.raises(KeyError):
        render(system)
    with pytest.raises(FileNotFoundError):
        load_prompt("tag_system", tmp_path / "missing.txt")


def test_image_only_processor_saves_and_reloads(tiny_vlm, tmp_path, astronaut_path):
    from tagfer.models.vlm import load_processor

    tiny_vlm.processor.save_pretrained(tmp_path / "proc")
    again = load_processor(str(tmp_path / "proc"))
    img = Image.open(astronaut_path)
    a = tiny_vlm.processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img], return_tensors="pt")
    b = again(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img], return_tensors="pt")
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert again.tokenizer.chat_template == tiny_vlm.processor.tokenizer.chat_template


FOUR_BOXES = ("<think>look. brow <bbox>[1, 2, 30, 40]</bbox> eyes <bbox>[5, 6, 70, 80]</bbox> "
              "mouth <bbox>[9, 9, 90, 99]</bbox> chin <bbox>[0, 0, 10, 10]</bbox> so.</think><answer>fear</answer>")


def test_box_limit_processor_forbids_a_fourth_box_while_decoding(tiny_vlm, astronaut_path, monkeypatch):
    """A scripted push makes the tiny model write four boxes; with max_boxes=3 the fourth cannot open
    and decoding goes on to the answer (the paper's limit, enforced in-process)."""
    import torch
    from transformers import LogitsProcessorList

    from tagfer.models.vlm import BoxLimitProcessor
    from tagfer.traces.boxtags import advance

    tok = tiny_vlm.tokenizer
    target = tok(FOUR_BOXES, add_special_tokens=False)["input_ids"]

    class Script:  # adds a large bonus to the next token of FOUR_BOXES
        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            self.start = input_ids.shape[1] if self.start is None else self.start
            step = input_ids.shape[1] - self.start
            if step < len(target):
                scores[:, target[step]] += 1e4
            return scores

    generate = tiny_vlm.model.generate

    def scripted(**kw):
        kw["logits_processor"] = LogitsProcessorList([Script(), *kw.get("logits_processor", [])])
        return generate(**kw)

    monkeypatch.setattr(tiny_vlm.model, "generate", scripted)
    img = Image.open(astronaut_path)
    free = tiny_vlm.generate([img], ["q"], max_new_tokens=len(target))[0]
    assert free.count("<bbox") == 4  # the script alone writes four boxes
    limited = tiny_vlm.generate([img], ["q"], max_new_tokens=len(target) + 2, max_boxes=3)[0]
    assert limited.count("<bbox") == 3 and "<answer>fear</answer>" in limited
    assert limited.split("chin")[0] == free.split("chin")[0]  # identical up to the fourth box
    proc = BoxLimitProcessor(tok, 0, 3, tiny_vlm.token_texts())
    texts = tiny_vlm.token_texts()
    for state, prefix in enumerate(("", "<", "<b", "<bb", "<bbo", "<bbox")):  # the automaton's states, spelled
        assert advance(0, prefix)[0] == state
        want = {i for i, t in enumerate(texts) if re.search(r"<\s*(?ai:bbox)", prefix + t)
                and not re.fullmatch(r"<\s*(?ai:bbox)\s*", prefix)}  # tokens completing a stem from there
        got = set(proc.table.banned(state, 0, "cpu").tolist())
        assert got == want, state
    assert sum(proc.table.banned(s, 0, "cpu").numel() for s in range(6)) > 0


@pytest.mark.model  # the tiny model's tokenizer
def test_box_limit_processor_counts_incrementally_as_the_whole_text_would(tiny_vlm):
    """The processor reads one token per step; its opening count and automaton state equal those of
    the whole decoded text after every step (token pieces that spell "<bbox>" across steps included)."""
    import random

    import torch

    from tagfer.models.vlm import BoxLimitProcessor
    from tagfer.traces.boxtags import advance, count_box_openings

    texts = tiny_vlm.token_texts()
    pieces = [i for i, t in enumerate(texts) if t and t in "<bbox>"]  # "<", "b", "bo", "<bb", ...: openings span tokens
    rng = random.Random(0)
    openings = 0
    for trial in range(20):
        rows = [[rng.choice(pieces) if rng.random() < 0.8 else rng.randrange(len(texts)) for _ in range(40)] for _ in range(3)]
        proc = BoxLimitProcessor(tiny_vlm.tokenizer, 2, 99, texts)
        ids = torch.tensor([[0, 0] + r for r in rows])
        for n in range(1, 41):
            proc(ids[:, : 2 + n], torch.zeros(3, len(texts)))
            for row in range(3):
                whole = "".join(texts[i] for i in rows[row][:n])
                assert proc._count[row] == count_box_openings(whole)
                assert proc._state[row] == advance(0, whole)[0]
        openings += sum(proc._count)
    assert openings > 0  # the random streams did spell openings


@pytest.mark.model  # builds and loads a random model
def test_random_skeleton_loads_with_random_weights_on_the_device(tmp_path):
    """A weightless skeleton (config + tokenizer + marker) loads through load_vlm as a seeded random model:
    same seed, same weights; another seed, other weights; the model generates."""
    import json

    import torch
    from PIL import Image

    from tagfer.models.tiny import build_random_skeleton
    from tagfer.models.vlm import RANDOM_INIT_MARKER, load_vlm

    a = build_random_skeleton(tmp_path / "a", "tiny", seed=3)
    assert not list(a.glob("*.safetensors")) and (a / RANDOM_INIT_MARKER).is_file()
    v1, v2 = load_vlm(str(a), device="cpu"), load_vlm(str(a), device="cpu")
    w1 = dict(v1.model.named_parameters())
    assert all(torch.equal(p, w1[n]) for n, p in v2.model.named_parameters())
    b = build_random_skeleton(tmp_path / "b", "tiny", seed=4)
    w3 = dict(load_vlm(str(b), device="cpu").model.named_parameters())
    assert any(not torch.equal(p, w3[n]) for n, p in w1.items())
    out = v1.generate([Image.new("RGB", (100, 100), 128)], ["Which expression?"], max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)
    assert json.loads((a / RANDOM_INIT_MARKER).read_text())["size"] == "tiny"
    with pytest.raises(ValueError, match="unknown size"):
        build_random_skeleton(tmp_path / "c", "70b")


# ------------------------------------------------------------------ the box limit on a hand-made vocabulary
#: Token texts that split box tags oddly: every spelling the parser reads can be assembled from them.
ODD_VOCAB = ["<", " ", "\t", "\u3000", "b", "B", "bo", "Bo", "ox", "oX", "x", "X", ">", " >", "< b", "box>", "<BB",
             "ox >", "<bbox>", "</bbox>", "[1, 2, 30, 40]", " look", ".", "<think>", "</think>", "<answer>", "fear",
             "</answer>", "<bbox><bbox", "<b", "/", "o", "bbox", "<bbo"]


def test_box_limit_processor_bans_every_spelling_the_parser_reads():
    """Decoding with random scores over a vocabulary whose tokens split "< bbox >" at odd places: with
    the processor no text ever holds more than max_boxes openings (the parser's count), and the
    processor's count is the parser's after every step; without it the same streams do exceed."""
    import random

    import torch

    from tagfer.models.vlm import BoxLimitProcessor
    from tagfer.traces.boxtags import count_box_openings
    from tagfer.traces.trace import parse_trace

    rng = random.Random(1)
    over_without = 0
    for trial in range(60):
        limit = trial % 4
        proc = BoxLimitProcessor(None, 1, limit, ODD_VOCAB)
        ids = [[0], [0]]
        texts = ["", ""]
        for step in range(60):
            scores = torch.tensor([[rng.random() for _ in ODD_VOCAB] for _ in ids])
            free = scores.argmax(dim=1).tolist()
            out = proc(torch.tensor(ids), scores.clone())
            for row in range(2):
                i = int(out[row].argmax())
                ids[row].append(i)
                texts[row] += ODD_VOCAB[i]
                over_without += count_box_openings(texts[row][: -len(ODD_VOCAB[i]) or None] + ODD_VOCAB[free[row]]) > limit
                assert count_box_openings(texts[row]) <= limit, texts[row]
        proc(torch.tensor(ids), torch.zeros(2, len(ODD_VOCAB)))
        assert proc._count == [count_box_openings(t) for t in texts]
        assert all(len(parse_trace(t).boxes) <= limit for t in texts)
    assert over_without > 0  # the unconstrained choice would have opened more boxes


def test_box_limit_processor_bans_exactly_the_tokens_that_start_another_box():
    import torch

    from tagfer.models.vlm import BoxLimitProcessor

    proc = BoxLimitProcessor(None, 0, 1, ODD_VOCAB)
    tok = {t: i for i, t in enumerate(ODD_VOCAB)}

    def allowed_after(prefix_tokens):
        p = BoxLimitProcessor(None, 0, 1, ODD_VOCAB)
        ids = torch.tensor([[tok[t] for t in prefix_tokens]]) if prefix_tokens else torch.zeros(1, 0, dtype=torch.long)
        out = p(ids, torch.zeros(1, len(ODD_VOCAB)))
        return {ODD_VOCAB[i] for i in range(len(ODD_VOCAB)) if out[0, i] == 0}

    start = allowed_after([])
    assert "<bbox>" in start and "<bbox><bbox" not in start  # one box allowed, not two in one token
    after_one = allowed_after(["<bbox>", "[1, 2, 30, 40]", "</bbox>", " look"])
    # tokens that would complete a stem are out; partial stems ("<BB", "<bbo") are fine, and "bbox" alone opens nothing
    assert {"<bbox>", "<BB", "<bbo", "<bbox><bbox", "bbox"} & after_one == {"<BB", "<bbo", "bbox"}
    after_bbo = allowed_after(["<bbox>", "</bbox>", "<bbo"])
    assert not {"x", "X"} & after_bbo and {"ox", "oX", "o"} <= after_bbo  # "<bboox" is no stem
    assert {"<", "<b", " look", "</bbox>"} <= after_one  # a "<" may still start other tags
    half = allowed_after(["<bbox>", "</bbox>", "<", "\u3000"])  # "<" + ideographic space pending: "bbox" completes a stem
    assert "bbox" not in half and {"b", "B", "bo", "o", " ", "<think>"} <= half
    stem = allowed_after(["<bbox>", "</bbox>", "< b", "B"])  # "< bB" pending: "o" is fine, "ox" completes the stem
    assert "o" in stem and not {"ox", "oX", "ox >"} & stem
    assert proc.fallback == ODD_VOCAB.index(" ")
