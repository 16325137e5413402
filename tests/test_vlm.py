import json

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

    from tagfer.models.vlm import BoxLimitProcessor, _open_suffix

    assert [_open_suffix(t) for t in ("x", "x<", "x<b", "x<bb", "x<bbo", "x<bbox")] == [0, 1, 2, 3, 4, 0]
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
    for k in range(5):  # exactly the tokens that complete "<bbox" after k of its characters
        want = {i for i, t in enumerate(texts) if "<bbox" in "<bbox"[:k] + t}
        assert set(proc.banned[k].tolist()) == want
    assert sum(b.numel() for b in proc.banned) > 0


@pytest.mark.model  # the tiny model's tokenizer
def test_box_limit_processor_counts_incrementally_as_the_whole_text_would(tiny_vlm):
    """The processor reads one token per step; its opening count and suffix equal those of the
    whole decoded text after every step (token pieces that spell "<bbox" across steps included)."""
    import random

    import torch

    from tagfer.models.vlm import BOX_OPEN, BoxLimitProcessor, _open_suffix

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
                assert proc._count[row] == whole.count(BOX_OPEN)
                assert _open_suffix(proc._tail[row]) == _open_suffix(whole)
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
