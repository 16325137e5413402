"""``vllm:PATH``: vLLM's offline engine in this process (vLLM imported lazily; optional)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tagfer.traces.boxtags import vllm_sampling_kwargs

from tagfer.models.backends.base import (
    BackendUnavailable,
    GenerationConfig,
    GenRequest,
    GenResult,
    _BackendBase,
    _emit,
    _error_of,
    _image_or_part,
    _limited,
)

__all__ = ["VLLMBackend"]


class VLLMBackend(_BackendBase):
    """vLLM's offline engine in this process: ``vllm.LLM(model=model_path, **engine_kwargs)``
    and ``LLM.chat`` with ``SamplingParams``. Images are sent as ``data:`` URLs resized to
    ``image_side`` (the same encoding as :class:`OpenAIBackend`). Requests are processed
    ``chunk_size`` at a time (vLLM batches internally); a failing chunk is retried item by
    item. vLLM is imported lazily: without it, construction raises
    :class:`BackendUnavailable`. Not exercised against a real GPU engine in this repository
    (tests use a stand-in ``vllm`` module to check the calls).
    """

    name = "vllm"

    def __init__(self, model_path: str, chunk_size: int = 256, image_side: int = 224, image_format: str = "png",
                 **engine_kwargs: Any):
        try:
            import vllm  # lazy: optional dependency
        except ImportError as e:
            raise BackendUnavailable(
                "the vllm backend needs vLLM (GPU machine): `pip install vllm`, or serve the model with "
                "`vllm serve MODEL` and use the spec 'openai:http://HOST:8000/v1'") from e
        self._vllm = vllm
        engine_kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
        self.model_path = str(model_path)
        self.llm = vllm.LLM(model=self.model_path, **engine_kwargs)
        self.chunk_size = self.batch_size = max(1, int(chunk_size))
        self.image_side = image_side
        self.image_format = image_format
        # the box limit while decoding (a structured-output regex) where this vLLM has structured
        # outputs; otherwise replies are repaired afterwards (traces.boxtags.limit_boxes)
        try:
            vllm_sampling_kwargs(vllm, 1)
            self.decodes_box_limit = True
        except RuntimeError:
            self.decodes_box_limit = False

    def _messages(self, req: GenRequest) -> list[dict[str, Any]]:
        from tagfer.models.openai_client import chat_messages  # lazy (start-up time): httpx, PIL

        if req.messages is not None:
            return req.messages
        images = [_image_or_part(req.image)] if req.image is not None else []
        return chat_messages(req.user, images, req.system, self.image_side, self.image_format)

    def model_name(self) -> str:
        return self.model_path

    def _sampling(self, config: GenerationConfig):
        """vLLM's sampling settings; ``max_boxes`` becomes a decode-time limit (a structured-output
        regex, :func:`tagfer.traces.boxtags.vllm_sampling_kwargs`), so no reply needs repair."""
        limit = {} if config.max_boxes is None or not self.decodes_box_limit else vllm_sampling_kwargs(self._vllm, config.max_boxes)
        return self._vllm.SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                         max_tokens=config.max_new_tokens, seed=config.seed, **limit)

    def _chat(self, convs: list[list[dict[str, Any]]], sp: Any) -> list[tuple[str, str | None]]:
        outs = self.llm.chat(convs, sampling_params=sp, use_tqdm=False)
        if len(outs) != len(convs):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(convs)} conversations")
        return [(o.outputs[0].text, getattr(o.outputs[0], "finish_reason", None)) for o in outs]

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig | None = None,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]:
        config = config or GenerationConfig()
        sp = self._sampling(config)
        it = iter(requests)
        while chunk := list(itertools.islice(it, self.chunk_size)):
            out: dict[int, GenResult] = {}
            ready: list[tuple[int, GenRequest, list[dict[str, Any]]]] = []
            for pos, req in enumerate(chunk):
                try:
                    ready.append((pos, req, self._messages(req)))
                except Exception as e:  # noqa: BLE001
                    out[pos] = GenResult.failure(req, *_error_of(e), backend=self.name)
            if ready:
                t0 = time.perf_counter()
                try:
                    answers = self._chat([m for _, _, m in ready], sp)
                    dt = round(time.perf_counter() - t0, 4)
                    for (pos, req, _), (text, fin) in zip(ready, answers):
                        out[pos] = GenResult(req.id, text, None, dict(req.meta),
                                             {"backend": self.name, "finish_reason": fin, "batch": len(ready), "latency_s": dt})
                except Exception:  # noqa: BLE001 - isolate the bad item
                    for pos, req, msgs in ready:
                        try:
                            text, fin = self._chat([msgs], sp)[0]
                            out[pos] = GenResult(req.id, text, None, dict(req.meta), {"backend": self.name, "finish_reason": fin, "batch": 1})
                        except Exception as e1:  # noqa: BLE001
                            out[pos] = GenResult.failure(req, "generation_failed", f"{type(e1).__name__}: {e1}", backend=self.name)
            yield from _emit((_limited(out[i], config.max_boxes) for i in range(len(chunk))), on_result)
