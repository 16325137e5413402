"""The one way to call a model: the :class:`Backend` interface and the registry :func:`make_backend`.

``tagfer analyze``, ``tagfer eval``, the judge and the data builder's teacher all take a
:class:`Backend`, made from a model spec by :func:`make_backend` (the only place that reads a
``--model`` value). A :class:`Backend` turns a stream of :class:`GenRequest` (id, image, and
the chat: user text and optional system prompt, or ready ``messages``) into a stream of
:class:`GenResult` (id, text or error). Registered kinds (:func:`register_backend` adds one):

- ``hf:PATH`` or a bare path / hub id — :class:`TransformersBackend`, in-process via :mod:`tagfer.models.vlm`.
- ``openai:URL[,URL...]`` or a bare ``http(s)://`` URL — :class:`OpenAIBackend`, any
  OpenAI-compatible server(s) via :class:`tagfer.models.openai_client.ChatClient`: vLLM/SGLang servers,
  one per GPU, or a hosted API. This is the paper's teacher set-up (512 concurrent requests).
- ``vllm:PATH`` — :class:`VLLMBackend`, vLLM's offline engine in-process; vLLM is imported
  lazily and is not installed in this repository's environment.
- ``facs`` / ``facs:DETECTOR`` — :class:`FACSBackend`, the offline FACS-prototype engine. A
  request may carry the face its caller grounded already (``GenRequest.face``); the engine then
  writes its trace from those AUs without detecting again (``reads_face``).

Layout: :mod:`.base` (the interface and records), one module per kind (:mod:`.hf`,
:mod:`.served`, :mod:`.vllm_offline`, :mod:`.facs`) and :mod:`.registry`; this package
re-exports the public names.

Guarantees shared by all backends: results come back in input order, one per request, with
the request's id; a bad item (unreadable image, server failure, generation error) becomes a
result whose ``error`` is ``{"kind", "message"}`` — the batch never stops for it. Input is
consumed lazily (bounded look-ahead), so 300k requests stream in constant memory.

Generation settings (:class:`GenerationConfig`) follow the paper: TAG decodes greedily
(temperature 0); baselines use top-p 0.9; at most 512 new tokens. ``max_boxes`` (3 in
:meth:`GenerationConfig.tag`, the paper's limit at inference): the in-process backend
enforces it while decoding (:class:`tagfer.models.vlm.BoxLimitProcessor`); served backends
(OpenAI-compatible, vLLM offline) cut a reply after its third box's closing tag and record
the violation in ``info["box_limit"]`` (:func:`limit_boxes`), as does the in-process one
should a box slip past the processor (e.g. an upper-case tag).
"""

from __future__ import annotations

from tagfer.models.backends.base import (
    Backend,
    BackendUnavailable,
    GenerationConfig,
    GenRequest,
    GenResult,
    agenerate_one,
    call_lock,
    limit_boxes,
    load_request_image,
)
from tagfer.models.backends.facs import FACSBackend
from tagfer.models.backends.hf import TransformersBackend
from tagfer.models.backends.served import OpenAIBackend
from tagfer.models.backends.vllm_offline import VLLMBackend
from tagfer.models.backends.registry import (
    BACKENDS,
    COMMON_OPTIONS,
    backend_kinds,
    make_backend,
    parse_spec,
    register_backend,
)

__all__ = [
    "GenerationConfig",
    "GenRequest",
    "GenResult",
    "Backend",
    "BackendUnavailable",
    "TransformersBackend",
    "OpenAIBackend",
    "VLLMBackend",
    "FACSBackend",
    "BACKENDS",
    "COMMON_OPTIONS",
    "make_backend",
    "register_backend",
    "backend_kinds",
    "parse_spec",
    "load_request_image",
    "limit_boxes",
    "call_lock",
    "agenerate_one",
]
