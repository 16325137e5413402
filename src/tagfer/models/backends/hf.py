"""``hf:PATH``: in-process generation with :class:`tagfer.models.vlm.VLM` (transformers)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from PIL import Image

from tagfer.models.backends.base import (
    GenerationConfig,
    GenRequest,
    GenResult,
    _BackendBase,
    _emit,
    _error_of,
    _limited,
    load_request_image,
)

__all__ = ["TransformersBackend"]


class TransformersBackend(_BackendBase):
    """In-process generation with :class:`tagfer.models.vlm.VLM`.

    ``vlm_or_config``: a loaded ``VLM``, a ``VLMConfig``, or a model path / hub id (loaded
    with :func:`tagfer.models.vlm.load_vlm`, ``load_kw`` passed on). Requests are taken
    ``batch_size`` at a time; within a batch, requests sharing a system prompt are generated
    together. If a batch fails, its items are retried one by one so only the bad item gets
    an error (kinds: image errors from :mod:`tagfer.core.imageio`, ``generation_failed``,
    ``unsupported``).
    """

    name = "hf"
    #: ``BoxLimitProcessor`` bans a 4th box opening while decoding
    decodes_box_limit = True

    def __init__(self, vlm_or_config: Any, batch_size: int = 8, **load_kw: Any):
        if hasattr(vlm_or_config, "generate"):  # a loaded tagfer.models.vlm.VLM, or anything with its generate()
            self.vlm = vlm_or_config
        else:
            from tagfer.models.vlm import load_vlm

            self.vlm = load_vlm(vlm_or_config, **load_kw)
        self.batch_size = max(1, int(batch_size))

    def model_name(self) -> str:
        cfg = getattr(self.vlm, "config", None)
        return str(getattr(cfg, "adapter", None) or getattr(cfg, "model", None) or self.name)

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig | None = None,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]:
        config = config or GenerationConfig()
        it = iter(requests)
        while chunk := list(itertools.islice(it, self.batch_size)):
            yield from _emit(self._run_chunk(chunk, config), on_result)

    def _call(self, items: list[tuple[int, GenRequest, Image.Image | None]], system: str | None,
              config: GenerationConfig) -> list[str]:
        texts = self.vlm.generate(
            [p for _, _, p in items], [r.user for _, r, _ in items], system=system,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            seed=config.seed, batch_size=len(items), max_boxes=config.max_boxes,
        )
        if len(texts) != len(items):
            raise RuntimeError(f"model returned {len(texts)} texts for {len(items)} requests")
        return texts

    def _run_chunk(self, chunk: list[GenRequest], config: GenerationConfig) -> list[GenResult]:
        out: dict[int, GenResult] = {}
        groups: dict[str | None, list[tuple[int, GenRequest, Image.Image | None]]] = {}
        model = str(getattr(getattr(self.vlm, "config", None), "model", ""))
        for pos, req in enumerate(chunk):
            if req.messages is not None:
                out[pos] = GenResult.failure(req, "unsupported", "TransformersBackend takes user/image/system, not raw messages", backend=self.name)
                continue
            try:
                pil = load_request_image(req.image) if req.image is not None else None
            except Exception as e:  # noqa: BLE001 - recorded per item
                out[pos] = GenResult.failure(req, *_error_of(e), backend=self.name)
                continue
            groups.setdefault(req.system, []).append((pos, req, pil))
        for system, items in groups.items():
            t0 = time.perf_counter()
            try:
                texts = self._call(items, system, config)
                dt = time.perf_counter() - t0
                for (pos, req, _), text in zip(items, texts):
                    out[pos] = GenResult(req.id, text, None, dict(req.meta),
                                         {"backend": self.name, "model": model, "batch": len(items), "latency_s": round(dt, 4)})
            except Exception as e:  # noqa: BLE001 - isolate the bad item below
                if len(items) == 1:
                    pos, req, _ = items[0]
                    out[pos] = GenResult.failure(req, "generation_failed", f"{type(e).__name__}: {e}", backend=self.name)
                    continue
                for item in items:
                    pos, req, _ = item
                    t1 = time.perf_counter()
                    try:
                        text = self._call([item], system, config)[0]
                        out[pos] = GenResult(req.id, text, None, dict(req.meta),
                                             {"backend": self.name, "model": model, "batch": 1, "latency_s": round(time.perf_counter() - t1, 4)})
                    except Exception as e1:  # noqa: BLE001
                        out[pos] = GenResult.failure(req, "generation_failed", f"{type(e1).__name__}: {e1}", backend=self.name)
        return [_limited(out[i], config.max_boxes) for i in range(len(chunk))]
