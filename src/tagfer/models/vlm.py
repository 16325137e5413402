"""Loading a vision–language model (Qwen2.5-VL by default, any HF image-text-to-text VLM) and
generating from it.

What differs between model families (processor class, PIL image processor, image tokens) comes
from the registry in :mod:`tagfer.models.families`; Qwen2.5-VL, Qwen3-VL, Gemma 3 and LLaVA-OneVision are
tested here.

One entry point, :func:`load_vlm`, used by training, evaluation, ``tagfer analyze`` and the
in-process teacher. ``model`` is a local folder or a hub id; a folder holding a PEFT adapter
(``adapter_config.json``) loads its base model and the adapter. On a machine without the
weights and without internet the error (:class:`ModelNotAvailable`) says what to download.

Images follow :class:`ImagePolicy`, the one image rule of training, evaluation, analysis and
the exports: resized so their longer side is ``image_side`` (paper: 224, aspect ratio kept)
before the processor sees them; the processor's own pixel limits (``min_pixels`` /
``max_pixels``) can be set too. Boxes the model writes are on TAG's 512 canvas, which is
independent of this resize (see :mod:`tagfer.core.canvas`).

At most three boxes (the paper restricts the model to three ``<bbox>`` at inference):
``generate(max_boxes=3)`` installs :class:`BoxLimitProcessor`, a logits processor that
forbids every token that would start a fourth box opening (any spelling the parser reads,
:mod:`tagfer.traces.boxtags`), so the model goes on with its reasoning and answer instead.
Replies generated without it (served models) are held to the same limit by
:func:`tagfer.traces.boxtags.limit_boxes` (extra box elements removed, answer kept) or, on
vLLM, by the same language as a decode-time regex (:func:`tagfer.traces.boxtags.box_limit_regex`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
import importlib
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from tagfer.models.families import Family, UnknownFamily, family_of, get_family, smart_resize
from tagfer.traces.boxtags import STEM, advance

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

_BAN_TABLES: dict[int, tuple[Sequence[str], "_BanTable"]] = {}  # id(token_texts) -> (the list, its table)


class _BanTable:
    """For each automaton state of :func:`tagfer.traces.boxtags.advance`: the tokens that complete a
    box stem from it, with ``m`` (openings the token completes before that stem). Built once per
    vocabulary (~1 s for 152k tokens: most tokens hold no ``<`` and are skipped after a few tests)."""

    def __init__(self, token_texts: Sequence[str]):
        self.ids: list[list[int]] = []
        self.m: list[list[int]] = []
        for state in range(STEM + 1):
            ids, ms = [], []
            for i, t in enumerate(token_texts):
                if state == 0 and "<" not in t:
                    continue
                m = advance(state, t)[2]
                if m >= 0:
                    ids.append(i)
                    ms.append(m)
            self.ids.append(ids)
            self.m.append(ms)
        self._tensors: dict[tuple[int, int, Any], Any] = {}

    def banned(self, state: int, need: int, device: Any) -> Any:
        """Ids of the tokens that, read from ``state``, complete a stem after at least ``need``
        openings of their own (``need = max_boxes - openings so far``, at least 0)."""
        key = (state, need, str(device))
        if key not in self._tensors:
            import torch  # lazy (start-up time): torch

            ids = [i for i, m in zip(self.ids[state], self.m[state]) if m >= need]
            self._tensors[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._tensors[key]


def _ban_table(token_texts: Sequence[str]) -> _BanTable:
    hit = _BAN_TABLES.get(id(token_texts))
    if hit is not None and hit[0] is token_texts:
        return hit[1]
    table = _BanTable(token_texts)
    if len(_BAN_TABLES) > 4:
        _BAN_TABLES.clear()
    _BAN_TABLES[id(token_texts)] = (token_texts, table)
    return table


class BoxLimitProcessor:
    """A transformers logits processor: once the generated text of a row holds ``max_boxes`` box
    openings, every token that would complete the stem of another one gets ``-inf``.

    "A box opening" is the one definition of :mod:`tagfer.traces.boxtags` (the parser's): ``<bbox>``,
    ``< bbox >``, ``<BBOX>``, …, with the pieces split over tokens in any way (``"<"``, ``" "``,
    ``"Bb"``, ``"ox"``). ``token_texts[i]`` is the decoded text of token ``i``; ``prompt_len`` the
    (left-padded) prompt length, so only generated tokens count. Each step reads only the new
    token of each row and moves that row's automaton (:func:`tagfer.traces.boxtags.advance`: a
    state and an opening count): O(1) per row and step, where decoding the whole generated text
    every step would cost O(length) (O(length²) per sequence). The banned tokens per automaton
    state are precomputed once per vocabulary. A token that holds a whole opening and then
    another stem (``"<bbox><bbox"``) is banned as soon as that second stem would pass the limit.
    Rows keep their place between steps (greedy or sampled decoding, as tagfer generates; not
    beam search).
    """

    def __init__(self, tokenizer: Any, prompt_len: int, max_boxes: int, token_texts: Sequence[str]):
        self.tokenizer, self.prompt_len, self.max_boxes = tokenizer, int(prompt_len), int(max_boxes)
        self.token_texts = token_texts
        self.table = _ban_table(token_texts)
        space = [i for i, t in enumerate(token_texts) if t == " "]
        self.fallback = space[0] if space else 0
        self._seen = 0  # generated tokens already read (the same for every row)
        self._count: list[int] = []  # box openings per row
        self._state: list[int] = []  # automaton state per row (0: nothing pending, 5: a stem awaiting ">")

    def _read(self, input_ids: Any) -> None:
        new = input_ids[:, self.prompt_len + self._seen :].tolist()  # one device→host copy per step
        if not self._count:
            self._count, self._state = [0] * len(new), [0] * len(new)
        texts = self.token_texts
        for row, ids in enumerate(new):
            state, count = self._state[row], self._count[row]
            for i in ids:
                i = int(i)
                state, opened, _ = advance(state, texts[i] if 0 <= i < len(texts) else "")
                count += opened
            self._state[row], self._count[row] = state, count
        self._seen += len(new[0]) if new else 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self._read(input_ids)
        for row in range(input_ids.shape[0]):
            need = max(0, self.max_boxes - self._count[row])
            ban = self.table.banned(self._state[row], need, scores.device)
            if not ban.numel():
                continue
            scores[row, ban] = float("-inf")
            if bool(scores[row].isneginf().all()):  # a sampler kept only banned tokens
                scores[row, self.fallback] = 0.0
        return scores


class ModelNotAvailable(RuntimeError):
    """The model's weights are neither on disk nor downloadable (offline machine, wrong id)."""


@dataclass
class VLMConfig:
    """How to load a VLM.

    model      local folder or hub id (default Qwen2.5-VL-7B-Instruct)
    adapter    optional PEFT/LoRA adapter folder applied on top of ``model``
    dtype      auto | bfloat16 | float16 | float32 (auto: bf16 on a bf16-capable GPU, else fp32)
    device     auto | cpu | cuda | cuda:N (auto: cuda when available)
    image_side longer image side fed to the processor (paper: 224); 0 keeps the image as is
    min_pixels / max_pixels   processor pixel limits (None: the checkpoint's own)
    attn_implementation       e.g. "sdpa", "flash_attention_2" (None: library default)
    """

    model: str = DEFAULT_MODEL
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    image_side: int = 224
    min_pixels: int | None = None
    max_pixels: int | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def resize_for_model(image: Image.Image, side: int = 224) -> Image.Image:
    """RGB copy of ``image`` whose longer side is ``side`` (aspect ratio kept; ``side<=0``: unchanged)."""
    img = image.convert("RGB")
    if side <= 0:
        return img
    w, h = img.size
    s = side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == (w, h) else img.resize(size, Image.BICUBIC)


#: Qwen2-VL family: 14 px patches merged 2x2, so one image token covers 28x28 px.
PATCH_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56


@dataclass(frozen=True)
class ImagePolicy:
    """The one image rule of tagfer: training, evaluation, analysis and every export/interop config.

    1. resize so the longer side is ``side`` px, aspect kept, up or down (paper: 224;
       :func:`resize_for_model`); ``side=0`` keeps the image;
    2. the processor then rounds each side to a multiple of 28 px within
       ``[min_pixels, max_pixels]`` (:func:`smart_resize`); ``max_pixels`` defaults to
       ``side²`` (never binding after step 1) and ``min_pixels`` to Qwen's 56².

    Exports store the pixels of step 1 (so LLaMA-Factory, verl and stock TRL see the same
    image as tagfer) and the bounds of step 2 (LLaMA-Factory ``image_min/max_pixels``,
    verl per-image ``min_pixels``/``max_pixels``). A 100x100 RAF-DB face thus gives
    224x224 px = 64 image tokens everywhere, not 16 in one trainer and 64 in another.
    """

    side: int = 224
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def of(cls, cfg: Any) -> "ImagePolicy":
        """The policy of any config with ``image_side`` / ``min_pixels`` / ``max_pixels`` attributes."""
        return cls(int(getattr(cfg, "image_side", 224)), getattr(cfg, "min_pixels", None), getattr(cfg, "max_pixels", None))

    @property
    def bounds(self) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` actually applied by the processor."""
        lo = self.min_pixels if self.min_pixels is not None else QWEN_MIN_PIXELS
        hi = self.max_pixels if self.max_pixels is not None else (self.side * self.side if self.side > 0 else 16384 * 28 * 28)
        return lo, max(lo, hi)

    def apply(self, image: Image.Image) -> Image.Image:
        """Step 1: the resized RGB image."""
        return resize_for_model(image, self.side)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after step 1 (same arithmetic as :func:`resize_for_model`)."""
        if self.side <= 0:
            return width, height
        s = self.side / max(width, height)
        return max(1, round(width * s)), max(1, round(height * s))

    def image_tokens(self, width: int, height: int, family: str = "qwen2_5_vl", config: Any = None,
                     processor: Any = None) -> int:
        """Image tokens a model of ``family`` (:mod:`tagfer.models.families`) gets for an original ``width x height``
        image (:meth:`tagfer.models.families.Family.image_tokens`: Gemma 3 needs the model ``config``,
        LLaVA-OneVision the ``processor``)."""

        return get_family(family).image_tokens(self, width, height, config, processor)


def build_chat(user: str, system: str | None = None, with_image: bool = True, assistant: str | None = None) -> list[dict]:
    """Chat messages in the HF multimodal format: [system], user (image part first, then text), [assistant]."""
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    parts: list[dict] = [{"type": "image"}] if with_image else []
    parts.append({"type": "text", "text": user})
    msgs.append({"role": "user", "content": parts})
    if assistant is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return msgs


def _resolve_device(device: str) -> str:
    import torch  # lazy (start-up time): torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch  # lazy (start-up time): torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def _not_available(model: str, err: Exception) -> ModelNotAvailable:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    how = (
        f"On a machine with internet: `hf download {model} --local-dir MODEL_DIR` (or huggingface-cli download), "
        "copy MODEL_DIR here and pass its path."
    )
    where = "this machine is offline (HF_HUB_OFFLINE=1)" if offline else "it could not be downloaded"
    return ModelNotAvailable(f"model {model!r} is not a local folder and {where}: {type(err).__name__}: {err}. {how}")


def _peft_base(path: Path) -> str | None:
    cfg = path / "adapter_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("base_model_name_or_path")
    return None


def load_processor(path_or_id: str, min_pixels: int | None = None, max_pixels: int | None = None,
                   family: Any = None):
    """The checkpoint's processor; falls back to tokenizer + PIL image processor of the model's
    family (:mod:`tagfer.models.families`) when the full processor cannot be built here (Qwen's video
    processor and the fast image processors need torchvision, which we never install).

    ``family``: a :class:`~tagfer.models.families.Family` or name; None reads ``config.json`` (an adapter
    folder: its base model's); a folder with neither falls back to Qwen2.5-VL's PIL image processor."""
    from transformers import AutoProcessor, AutoTokenizer  # lazy (start-up time): transformers, yaml

    fam = family if isinstance(family, Family) else get_family(family) if family else None
    if fam is None:
        base = _peft_base(Path(path_or_id))
        for src in (path_or_id, base):
            try:
                fam = family_of(src) if src else None
            except UnknownFamily:
                continue
            break
    kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if fam is not None and not fam.pixel_limits:
        kw = {}
    if fam is None or not fam.video_processor:  # no video processor in the way: the stock processor
        try:
            proc = AutoProcessor.from_pretrained(path_or_id, **kw)
            if hasattr(proc, "image_processor") and hasattr(proc, "tokenizer"):
                return proc
        except (ImportError, OSError, ValueError, TypeError):
            pass
    fam = fam or get_family("qwen2_5_vl")
    tok = AutoTokenizer.from_pretrained(path_or_id)
    image_cls = getattr(importlib.import_module(fam.image_processor[0]), fam.image_processor[1])
    image_processor = image_cls.from_pretrained(path_or_id, **kw)
    extra = _processor_config(path_or_id)
    return _image_only_processor_class(fam.processor, fam.processor_args)(
        image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template, **extra)


def _processor_config(path_or_id: str) -> dict[str, Any]:
    """Processor init arguments saved in ``processor_config.json`` (e.g. Gemma 3's ``image_seq_length``)."""
    f = Path(path_or_id) / "processor_config.json"
    if not f.is_file():
        return {}
    cfg = json.loads(f.read_text())
    return {k: v for k, v in cfg.items() if k not in ("processor_class", "chat_template", "auto_map")}


_PROCESSOR_CLS: dict[str, type] = {}


def _image_only_processor_class(name: str = "Qwen2_5_VLProcessor", args_to_save: tuple[str, ...] = ()):
    """The transformers processor class ``name``, accepting ``video_processor=None`` (images only);
    ``args_to_save``: its init arguments written to ``processor_config.json`` by ``save_pretrained``."""
    if name not in _PROCESSOR_CLS:
        import transformers  # lazy (start-up time): transformers, yaml

        base = getattr(transformers, name)

        def check_argument_for_proper_class(self, argument_name, argument):  # video_processor may be None
            if argument_name == "video_processor" and argument is None:
                return
            return base.check_argument_for_proper_class(self, argument_name, argument)

        def save_pretrained(self, save_directory, *args, **kwargs):
            """Save tokenizer (with chat template), image processor and init arguments; :func:`load_processor`
            reloads them. ``ProcessorMixin.save_pretrained`` cannot run without a video processor."""
            out = Path(save_directory)
            out.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(str(out))
            self.image_processor.save_pretrained(str(out))
            args = {a: getattr(self, a) for a in args_to_save if getattr(self, a, None) is not None}
            if args:
                (out / "processor_config.json").write_text(json.dumps({"processor_class": name, **args}, indent=2))
            return [str(out)]

        _PROCESSOR_CLS[name] = type(f"ImageOnly{name}", (base,), {
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "save_pretrained": save_pretrained, "__doc__": f"{name} without a video processor (images only).",
        })
    return _PROCESSOR_CLS[name]


class VLM:
    """A loaded model + processor with batched chat generation.

    ``generate`` takes one image and one user text per request and returns the decoded
    completion (special tokens removed). Batches are left-padded.
    """

    def __init__(self, model, processor, config: VLMConfig):
        self.model = model
        self.processor = processor
        self.config = config
        tok = getattr(processor, "tokenizer", processor)
        tok.padding_side = "left"
        self.tokenizer = tok
        self._token_texts: list[str] | None = None

    def token_texts(self) -> list[str]:
        """Decoded text of every token id (computed once; used by :class:`BoxLimitProcessor`)."""
        if self._token_texts is None:
            self._token_texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return self._token_texts

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prepare(self, images: Sequence[Image.Image | None], users: Sequence[str], system: str | None = None):
        """Processor inputs (tensors) for a batch of chat requests with a generation prompt."""
        texts, pics = [], []
        for img, user in zip(images, users, strict=True):
            msgs = build_chat(user, system, with_image=img is not None)
            texts.append(self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
            pics.append([ImagePolicy.of(self.config).apply(img)] if img is not None else [])
        kw: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(pics):  # one list per request (Gemma 3 needs it; text-only requests: an empty list)
            kw["images"] = pics
        return self.processor(**kw).to(self.device)

    def generate(
        self,
        images: Sequence[Image.Image | None],
        users: Sequence[str],
        system: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 8,
        max_boxes: int | None = None,
    ) -> list[str]:
        """Completions for ``(image, user)`` pairs; greedy when ``temperature == 0`` (paper: TAG), else sampled.

        ``max_boxes``: at most this many ``<bbox>`` per completion, enforced while decoding
        (:class:`BoxLimitProcessor`); ``None``: no limit.
        """
        import torch  # lazy (start-up time): torch

        if len(images) != len(users):
            raise ValueError(f"{len(images)} images for {len(users)} prompts")
        if seed is not None:
            torch.manual_seed(seed)
        gen: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                               "use_cache": True}
        if temperature > 0:
            gen.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out: list[str] = []
        for i in range(0, len(users), max(1, batch_size)):
            inputs = self.prepare(images[i : i + batch_size], users[i : i + batch_size], system)
            extra: dict[str, Any] = {}
            if max_boxes is not None:
                from transformers import LogitsProcessorList  # lazy (start-up time): transformers, yaml

                limit = BoxLimitProcessor(self.tokenizer, inputs["input_ids"].shape[1], max_boxes, self.token_texts())
                extra["logits_processor"] = LogitsProcessorList([limit])
            with torch.inference_mode():
                ids = self.model.generate(**inputs, **gen, **extra)
            new = ids[:, inputs["input_ids"].shape[1] :]
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


#: A model folder holding this file has a config but no weights: :func:`load_vlm` builds the model
#: with random weights directly on the device (benchmarks of real sizes without a download;
#: :func:`tagfer.models.tiny.build_random_skeleton`). The file's JSON gives the seed.
RANDOM_INIT_MARKER = "tagfer_random_init.json"


def _random_model(path: Path, dtype, device: str, kw: dict[str, Any]):
    import torch  # lazy (start-up time): torch
    # lazy (start-up time): transformers, yaml
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    seed = int(json.loads((path / RANDOM_INIT_MARKER).read_text() or "{}").get("seed", 0))
    config = AutoConfig.from_pretrained(str(path))
    extra = {"attn_implementation": kw["attn_implementation"]} if kw.get("attn_implementation") else {}
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, **extra)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    except OSError:
        pass
    return model


def _family_or_none(model):

    try:
        return family_of(model)
    except UnknownFamily:
        return None


def load_vlm(config: VLMConfig | str | os.PathLike, **overrides: Any) -> VLM:
    """Load model + processor as described by ``config`` (a :class:`VLMConfig` or a path / hub id).

    Raises :class:`ModelNotAvailable` when the weights are missing and cannot be fetched.
    """
    cfg = VLMConfig(model=str(config)) if not isinstance(config, VLMConfig) else config
    cfg = replace(cfg, **overrides) if overrides else cfg
    from transformers import AutoModelForImageTextToText  # lazy (start-up time): transformers, yaml

    model_path, adapter = cfg.model, cfg.adapter
    local = Path(model_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotAvailable(f"{local} is a file; --model wants a model folder or a hub id")
        base = _peft_base(local)
        if base is not None and adapter is None:  # a bare adapter folder: load its base, then the adapter
            model_path, adapter = base, str(local)
        else:
            model_path = str(local)
    elif model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelNotAvailable(f"model folder {model_path!r} does not exist")

    device = _resolve_device(cfg.device)
    dtype = _resolve_dtype(cfg.dtype, device)
    kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, **cfg.extra}
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    try:
        if Path(model_path, RANDOM_INIT_MARKER).is_file():  # a weightless skeleton: random init on the device
            model = _random_model(Path(model_path), dtype, device, kw)
        else:
            model = AutoModelForImageTextToText.from_pretrained(model_path, **kw)
        proc_src = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
        processor = load_processor(proc_src, cfg.min_pixels, cfg.max_pixels, family=_family_or_none(model))
    except OSError as e:
        raise _not_available(model_path, e) from e
    if adapter:
        from peft import PeftModel  # lazy (start-up time): torch, transformers

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device)
    model.eval()
    return VLM(model, processor, replace(cfg, model=model_path, adapter=adapter))
