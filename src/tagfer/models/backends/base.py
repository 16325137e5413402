"""The interface every model implements: :class:`Backend`, its records and the helpers backends share.

A :class:`Backend` turns a stream of :class:`GenRequest` into a stream of :class:`GenResult`, in
input order, one per request, never raising for a single bad item. The kinds live in their own
modules (:mod:`.hf`, :mod:`.served`, :mod:`.vllm_offline`, :mod:`.facs`) and are made from a spec
by :func:`tagfer.models.backends.make_backend` (:mod:`.registry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from tagfer.core.errors import ItemError
from tagfer.traces.boxtags import limit_boxes

ImageLike = Image.Image | str | os.PathLike | bytes  # or an H×W×3 uint8 numpy array


class BackendUnavailable(RuntimeError):
    """The backend cannot be built here (e.g. vLLM not installed, bad or unknown spec string)."""


@dataclass
class GenerationConfig:
    """Decoding settings. ``temperature == 0`` means greedy decoding (paper: TAG);
    ``top_p`` applies when sampling (paper: 0.9 for baselines); ``max_new_tokens``
    (paper: 512); ``seed`` for reproducible sampling where the backend supports it."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    max_boxes: int | None = None

    @classmethod
    def tag(cls, **kw: Any) -> GenerationConfig:
        """The paper's setting for TAG models: greedy, 512 new tokens, at most three boxes."""
        return cls(**{"temperature": 0.0, "top_p": 1.0, "max_boxes": 3, **kw})

    @classmethod
    def baseline(cls, **kw: Any) -> GenerationConfig:
        """The paper's setting for baselines: nucleus sampling with top-p 0.9. The paper does
        not give a temperature; we keep the usual sampler default of 1.0 (override with kw)."""
        return cls(**{"temperature": 1.0, "top_p": 0.9, **kw})

    def openai_params(self) -> dict[str, Any]:
        """Request fields for an OpenAI-compatible ``/chat/completions`` call."""
        p: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_new_tokens}
        if self.seed is not None:
            p["seed"] = self.seed
        return p

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenRequest:
    """One generation request.

    ``id``: caller's key (echoed in the result); ``user``: user text; ``image``: PIL image,
    path or encoded bytes (None: text only); ``system``: optional system prompt; ``meta``:
    free-form dict copied to the result. ``messages`` (OpenAI chat format, images already as
    ``image_url`` parts) replaces user/image/system for :class:`OpenAIBackend` and
    :class:`VLLMBackend`; :class:`TransformersBackend` reports it as ``unsupported``.
    ``face``: the face already grounded by the caller's AU detector for this image or crop
    (a :class:`tagfer.au.aus.FaceAUs`, or its list of :class:`tagfer.au.aus.AUDetection`).
    A backend that writes its trace from the AUs (``reads_face``: the FACS engine) uses it
    instead of detecting again; prompted models ignore it.
    """

    id: str
    user: str = ""
    image: ImageLike | None = None
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None
    face: Any = None


@dataclass
class GenResult:
    """The outcome of one :class:`GenRequest`.

    JSON: ``{"id": str, "text": str | null, "error": {"kind": str, "message": str} | null,
    "meta": {...request meta...}, "info": {...backend details: backend, latency_s, endpoint,
    attempts, finish_reason, usage...}}``. Exactly one of ``text``/``error`` is set.
    """

    id: str
    text: str | None
    error: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "error": self.error, "meta": self.meta, "info": self.info}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenResult:
        return cls(id=d["id"], text=d.get("text"), error=d.get("error"), meta=d.get("meta") or {}, info=d.get("info") or {})

    @classmethod
    def failure(cls, req: GenRequest, kind: str, message: str, **info: Any) -> GenResult:
        return cls(id=req.id, text=None, error={"kind": kind, "message": message}, meta=dict(req.meta), info=info)


@runtime_checkable
class Backend(Protocol):
    """The one inference interface: anything that streams :class:`GenResult` for
    :class:`GenRequest` (an image and a chat: user/system text or ready ``messages``) in
    input order. Built from a spec string by :func:`make_backend` (the one registry).

    ``on_result(result)`` is called for each result just before it is yielded (use it for
    progress bars or writing JSONL). ``generate`` never raises for a single bad item.

    Capabilities: ``thread_safe`` — ``generate`` may be called from several threads at once
    (callers serialise otherwise); ``batch_size`` — how many requests the backend works on
    together (callers size their look-ahead by it); ``model_name()`` — the model answering
    (a served model's name is asked from the server). Optional: ``prepare_image(image)``
    (encode an image once for several requests: the value goes in ``GenRequest.image``),
    ``async agenerate(request, config)`` (one request from an asyncio loop) and
    ``reads_face`` (True: the backend writes a finished TAG trace from ``GenRequest.face``, with
    no prompt and no pixels — the FACS engine; callers skip prompts and image encoding for it).
    ``model_spec``: the spec string :func:`make_backend` built it from (None for an object made
    directly), which callers record as the model's name.
    """

    name: str
    thread_safe: bool
    batch_size: int

    def model_name(self) -> str: ...

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]: ...

    def close(self) -> None: ...


def _limited(res: GenResult, max_boxes: int | None) -> GenResult:
    """``res`` held to ``max_boxes`` boxes (:func:`tagfer.traces.boxtags.limit_boxes`: the extra box
    elements removed, the answer kept); the repair note goes to ``info["box_limit"]``."""
    text, violation = limit_boxes(res.text, max_boxes)
    if violation is not None:
        res.text = text
        res.info["box_limit"] = violation
    return res


def load_request_image(image: ImageLike) -> Image.Image:
    """RGB PIL image from a PIL image, an H×W(×3) uint8 array, a path or bytes; bad input
    raises :class:`tagfer.core.imageio.ImageError` / :class:`ItemError`."""
    if hasattr(image, "__array_interface__") and not isinstance(image, Image.Image):
        try:
            return Image.fromarray(image).convert("RGB")
        except (TypeError, ValueError) as e:
            raise ItemError("bad_array", f"cannot use array as an image: {e}") from e
    if isinstance(image, Image.Image):
        try:
            return image.convert("RGB") if image.mode != "RGB" else image
        except (OSError, ValueError) as e:
            raise ItemError("corrupt", f"cannot convert image to RGB: {e}") from e
    from tagfer.core.imageio import load_image  # lazy (start-up time): PIL

    return Image.fromarray(load_image(image).rgb)


def _image_or_part(image: Any) -> Any:
    """An image for :func:`tagfer.models.openai_client.chat_messages`: a prepared content part as is, else an RGB PIL image."""
    return image if isinstance(image, dict) else load_request_image(image)


def _error_of(e: BaseException, kind: str = "bad_request") -> tuple[str, str]:
    """(kind, message) of a per-item failure: an ItemError keeps its kind; anything else gets
    ``kind`` and a message naming the exception type."""
    if isinstance(e, ItemError):
        return e.kind, e.message
    return kind, f"{type(e).__name__}: {e}"


def _emit(results: Iterable[GenResult], on_result: Callable[[GenResult], None] | None) -> Iterator[GenResult]:
    for r in results:
        if on_result is not None:
            on_result(r)
        yield r


class _BackendBase:
    name = "base"
    thread_safe = False
    batch_size = 1
    reads_face = False
    model_spec: str | None = None

    def model_name(self) -> str:
        return self.name

    def warm(self) -> None:
        """Build what is built lazily now (fail fast on a missing model file)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_ID_LOCKS: dict[int, threading.Lock] = {}  # backends that cannot be weak keys (unhashable, slots)
_LOCKS_GUARD = threading.Lock()


def call_lock(backend: Any) -> AbstractContextManager[Any]:
    """What a caller holds around ``backend.generate`` when several threads share the backend:
    nothing for a ``thread_safe`` one, else one lock per backend object (shared by every caller)."""
    if getattr(backend, "thread_safe", False):
        return contextlib.nullcontext()
    with _LOCKS_GUARD:
        try:
            return _LOCKS.setdefault(backend, threading.Lock())
        except TypeError:
            return _ID_LOCKS.setdefault(id(backend), threading.Lock())


async def agenerate_one(backend: Any, request: GenRequest, config: GenerationConfig, executor: Any = None) -> GenResult:
    """One request from an asyncio loop, whatever the backend: its own ``agenerate`` when it has
    one (the OpenAI-compatible backend: hundreds in flight), else ``generate`` in ``executor``'s
    threads (give a one-thread executor for a backend that is not ``thread_safe``)."""
    agenerate = getattr(backend, "agenerate", None)
    if agenerate is not None:
        return await agenerate(request, config)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, lambda: next(iter(backend.generate([request], config))))
