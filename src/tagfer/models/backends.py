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
- ``facs`` / ``facs:DETECTOR`` — :class:`FACSBackend`, the offline FACS-prototype engine.

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

import asyncio
import itertools
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from tagfer.core.errors import ItemError
from tagfer.models.vlm import VLMConfig

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
    "BackendKind",
    "COMMON_OPTIONS",
    "make_backend",
    "register_backend",
    "backend_kinds",
    "parse_spec",
    "load_request_image",
    "limit_boxes",
]

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
    """

    id: str
    user: str = ""
    image: ImageLike | None = None
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None


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
    (encode an image once for several requests: the value goes in ``GenRequest.image``)
    and ``async agenerate(request, config)`` (one request from an asyncio loop).
    """

    name: str
    thread_safe: bool
    batch_size: int

    def model_name(self) -> str: ...

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]: ...

    def close(self) -> None: ...


_BOX_OPEN = re.compile(r"<\s*bbox\s*>", re.IGNORECASE)
_BOX_CLOSE = re.compile(r"<\s*/\s*bbox\s*>", re.IGNORECASE)


def limit_boxes(text: str | None, max_boxes: int | None) -> tuple[str | None, dict[str, Any] | None]:
    """Cut ``text`` after the closing tag of its ``max_boxes``-th box when more boxes follow.

    Returns ``(text, None)`` when within the limit, else ``(cut text, {"max_boxes", "boxes",
    "cut_at"})`` (``boxes``: openings in the full reply). Without a closing tag before the
    next opening, the cut is at that next opening.
    """
    if text is None or max_boxes is None:
        return text, None
    opens = [m.start() for m in _BOX_OPEN.finditer(text)]
    if len(opens) <= max_boxes:
        return text, None
    nxt = opens[max_boxes]
    cut = nxt
    if max_boxes > 0:
        close = _BOX_CLOSE.search(text, opens[max_boxes - 1])
        if close is not None and close.end() <= nxt:
            cut = close.end()
    return text[:cut], {"max_boxes": max_boxes, "boxes": len(opens), "cut_at": cut}


def _limited(res: GenResult, max_boxes: int | None) -> GenResult:
    """``res`` with its text cut to ``max_boxes`` boxes; the violation goes to ``info["box_limit"]``."""
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

    def generate_all(self, requests: Iterable[GenRequest], config: GenerationConfig | None = None) -> list[GenResult]:
        """Convenience: the whole result list."""
        return list(self.generate(requests, config or GenerationConfig()))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- transformers

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


# ---------------------------------------------------------------------------- OpenAI-compatible

class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tagfer-backend-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Any):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def stop(self, finalize: Callable[[], Any] | None = None) -> None:
        """Cancel pending tasks, await ``finalize()`` (a coroutine function), stop the loop."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if finalize is not None:
                await finalize()

        try:
            self.run(cancel_all(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            if not self.loop.is_running():
                self.loop.close()


class OpenAIBackend(_BackendBase):
    """Generation through OpenAI-compatible server(s) with :class:`ChatClient`.

    ``client_config``: a :class:`tagfer.models.openai_client.ClientConfig`; ``concurrency`` (optional)
    lowers its ``total_concurrency``. Up to ``window`` requests (default: the number that can
    be in flight plus 25%, at least 32 — the slack keeps servers busy while an ordered stream
    waits for a slow head item; each holds its encoded image, ~0.1 MB as 224-px PNG) are read
    ahead and submitted; images are encoded (resized to
    ``image_side``) in the calling thread while an event loop thread talks to the servers.
    The loop thread and its :class:`ChatClient` (connection pool, discovered model name) are
    created on first use and kept until :meth:`close`, so many small ``generate`` calls are
    cheap; ``generate`` may be called from several threads at once.
    ``ordered=False`` yields in completion order instead of input order (ids still match).
    Error kinds: :class:`RequestFailed` kinds (``timeout``, ``http_500``, ``response_too_large``, ...)
    and image errors.
    """

    #: ``generate`` may be called from several threads at once (one shared loop and client).
    thread_safe = True

    name = "openai"

    def __init__(self, client_config: Any, concurrency: int | None = None, window: int | None = None, ordered: bool = True,
                 tag_requests: bool = False):
        from tagfer.models.openai_client import ClientConfig  # lazy (start-up time): httpx, PIL

        if not isinstance(client_config, ClientConfig):
            raise TypeError("OpenAIBackend needs a tagfer.models.openai_client.ClientConfig")
        if concurrency is not None:
            client_config = replace(client_config, total_concurrency=max(1, int(concurrency)))
        self.client_config = client_config
        n = client_config.max_in_flight
        self.window = int(window) if window else n + max(32, n // 4)
        self.ordered = ordered
        self.tag_requests = tag_requests
        self.batch_size = n
        self._runner: _LoopThread | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    def _ensure(self) -> tuple[_LoopThread, Any]:
        with self._lock:
            if self._runner is None:
                from tagfer.models.openai_client import ChatClient  # lazy (start-up time): httpx, PIL

                runner = _LoopThread()
                client = ChatClient(self.client_config)
                runner.run(client.open())
                self._runner, self._client = runner, client
            return self._runner, self._client

    def close(self) -> None:
        """Close the connection pool and stop the loop thread (idempotent)."""
        with self._lock:
            runner, client, self._runner, self._client = self._runner, self._client, None, None
        if runner is not None:
            runner.stop(client.aclose)

    def _messages(self, req: GenRequest) -> list[dict[str, Any]]:
        from tagfer.models.openai_client import chat_messages  # lazy (start-up time): httpx, PIL

        if req.messages is not None:
            return req.messages
        cfg = self.client_config
        images = [_image_or_part(req.image)] if req.image is not None else []
        return chat_messages(req.user, images, req.system, cfg.image_side, cfg.image_format)

    def prepare_image(self, image: ImageLike) -> dict[str, Any]:
        """The image encoded once as an OpenAI content part (reused by several requests)."""
        from tagfer.models.openai_client import image_part  # lazy (start-up time): httpx, PIL

        return image_part(load_request_image(image), self.client_config.image_side, self.client_config.image_format)

    def model_name(self) -> str:
        """The served model's name: the configured one, else asked from the server (``RequestFailed`` if unreachable)."""
        runner, client = self._ensure()
        return runner.run(client.model())

    async def _one(self, client: Any, req: GenRequest, msgs: list[dict[str, Any]], params: dict[str, Any],
                   config: GenerationConfig) -> GenResult:
        from tagfer.models.openai_client import RequestFailed  # lazy (start-up time): httpx, PIL

        if self.tag_requests:
            params = {**params, "user": req.id}
        try:
            r = await client.chat(msgs, **params)
            res = GenResult(req.id, r.text, None, dict(req.meta), {
                "backend": self.name, "endpoint": r.endpoint, "attempts": r.attempts,
                "latency_s": round(r.latency_s, 4), "finish_reason": r.finish_reason, "usage": r.usage})
            return _limited(res, config.max_boxes)
        except RequestFailed as e:
            return GenResult.failure(req, e.kind, e.message, backend=self.name, attempts=e.attempts, endpoint=e.endpoint)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - never lose an item
            return GenResult.failure(req, *_error_of(e, "client_error"), backend=self.name)

    async def agenerate(self, req: GenRequest, config: GenerationConfig | None = None) -> GenResult:
        """One request awaited from any asyncio loop (the data builder's); it runs on the backend's loop."""
        config = config or GenerationConfig()
        runner, client = self._ensure()
        try:
            msgs = self._messages(req)
        except Exception as e:  # noqa: BLE001 - bad image etc.
            return GenResult.failure(req, *_error_of(e), backend=self.name)
        return await asyncio.wrap_future(runner.submit(self._one(client, req, msgs, config.openai_params(), config)))

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig | None = None,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]:
        config = config or GenerationConfig()
        params = config.openai_params()
        done: queue.SimpleQueue[tuple[int, GenResult]] = queue.SimpleQueue()
        runner, client = self._ensure()

        async def one(seq: int, req: GenRequest, msgs: list[dict[str, Any]]) -> None:
            done.put((seq, await self._one(client, req, msgs, params, config)))

        futures: dict[int, Any] = {}
        try:
            it = iter(requests)
            exhausted = False
            submitted = yielded = 0
            buffer: dict[int, GenResult] = {}
            next_seq = 0
            while True:
                while not exhausted and submitted - yielded < self.window:
                    try:
                        req = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    seq = submitted
                    submitted += 1
                    try:
                        msgs = self._messages(req)
                    except Exception as e:  # noqa: BLE001 - bad image etc.
                        done.put((seq, GenResult.failure(req, *_error_of(e), backend=self.name)))
                        continue
                    futures[seq] = runner.submit(one(seq, req, msgs))
                if yielded == submitted and exhausted:
                    break
                seq, res = done.get()
                futures.pop(seq, None)
                if self.ordered:
                    buffer[seq] = res
                    ready = []
                    while next_seq in buffer:
                        ready.append(buffer.pop(next_seq))
                        next_seq += 1
                else:
                    ready = [res]
                for res in ready:
                    yielded += 1
                    if on_result is not None:
                        on_result(res)
                    yield res
        finally:
            for fut in futures.values():  # generator closed early: stop what is still in flight
                fut.cancel()


# ---------------------------------------------------------------------------- vLLM offline

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

    def _messages(self, req: GenRequest) -> list[dict[str, Any]]:
        from tagfer.models.openai_client import chat_messages  # lazy (start-up time): httpx, PIL

        if req.messages is not None:
            return req.messages
        images = [_image_or_part(req.image)] if req.image is not None else []
        return chat_messages(req.user, images, req.system, self.image_side, self.image_format)

    def model_name(self) -> str:
        return self.model_path

    def _sampling(self, config: GenerationConfig):
        return self._vllm.SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                         max_tokens=config.max_new_tokens, seed=config.seed)

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


# ---------------------------------------------------------------------------- FACS engine

class FACSBackend(_BackendBase):
    """The offline FACS-prototype engine (:func:`tagfer.au.facs.explain`) as a model (spec ``facs[:DETECTOR]``).

    Each image is grounded by the AU detector (``spec``, a :class:`tagfer.au.detectors.DetectorSpec`,
    default MediaPipe; built on first use, or by :meth:`warm`) and the engine writes a TAG trace
    from the largest face's AUs; the prompt and decoding settings are ignored (the engine is
    deterministic). Failures (no face, unreadable image) are per-item errors, like any backend's.
    :meth:`explain` serves callers that grounded the face already (``tagfer analyze``, ``build``).
    """

    name = "facs"

    def __init__(self, spec: Any = None, config: Any = None, rules_only: bool = False, engine: Any = None):
        from tagfer.au.facs import DEFAULT_CONFIG  # lazy (start-up time): urllib, importlib

        self.spec = spec
        self.config = config if config is not None else DEFAULT_CONFIG
        self._detector: Any = None
        # issue 19: by default a FER net's global impression + AU evidence (tagfer.au.impression.GroundedEngine);
        # rules_only (spec facs-rules): the FACS prototypes alone (tagfer.au.facs.explain)
        self.rules_only = rules_only
        self.name = "facs-rules" if rules_only else "facs"
        self._grounded: Any = engine  # built on first use (build --teacher facs never needs the net)

    @property
    def grounded(self) -> Any:
        """The :class:`tagfer.au.impression.GroundedEngine` (raises ``ImpressionUnavailable`` when the net is missing)."""
        if self._grounded is None:
            from tagfer.au.impression import GroundedEngine  # lazy (start-up time): numpy, PIL

            self._grounded = GroundedEngine(facs=self.config)
        return self._grounded

    @property
    def detector(self) -> Any:
        if self._detector is None:
            from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL

            self._detector = (self.spec or DetectorSpec()).build()
        return self._detector

    def warm(self) -> None:
        self.detector  # noqa: B018 - builds it

    def explain(self, face: Any, image: Any = None) -> Any:
        """The engine's :class:`tagfer.au.facs.FACSExplanation` of one grounded face (:class:`tagfer.au.aus.FaceAUs`);
        ``image``: the picture its canvas was made from (needed unless ``rules_only``)."""
        from tagfer.au.facs import explain  # lazy (start-up time): urllib, importlib

        if self.rules_only:
            return explain(face, self.config)
        return self.grounded.explain(image, face)

    def generate(self, requests: Iterable[GenRequest], config: GenerationConfig | None = None,
                 on_result: Callable[[GenResult], None] | None = None) -> Iterator[GenResult]:
        from tagfer.au.aus import largest_face  # lazy (start-up time): urllib, importlib
        from tagfer.core.imageio import load_image  # lazy (start-up time): PIL

        for req in requests:
            t0 = time.perf_counter()
            try:
                if req.image is None:
                    raise ItemError("no_image", "the FACS engine needs an image")
                img = load_image(req.image)
                faces = self.detector.detect(img, req.image if isinstance(req.image, str) else None)
                pic = None if self.rules_only else Image.fromarray(img.rgb)
                res = GenResult(req.id, self.explain(largest_face(faces), pic).trace, None, dict(req.meta),
                                {"backend": self.name, "latency_s": round(time.perf_counter() - t0, 4)})
            except ItemError as e:
                res = GenResult.failure(req, e.kind, e.message, backend=self.name)
            except Exception as e:  # noqa: BLE001 - recorded per item
                res = GenResult.failure(req, "internal", f"{type(e).__name__}: {e}", backend=self.name)
            if on_result is not None:
                on_result(res)
            yield res

    def close(self) -> None:
        if self._detector is not None:
            self._detector.close()
            self._detector = None


# ---------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class BackendKind:
    """One entry of the registry: ``build(target, options)`` makes the backend of a spec
    ``KIND:TARGET``; ``needs_target``: False when ``KIND`` alone is a spec (``facs``)."""

    name: str
    build: Callable[[str, dict[str, Any]], Any]
    needs_target: bool = True
    usage: str = ""


#: Options any caller may pass to :func:`make_backend` whatever the spec; a kind that has no
#: use for one ignores it (so one command line can offer them all). Other keyword arguments
#: go to the kind's own constructor (an unknown one is a ``TypeError``).
COMMON_OPTIONS = frozenset({
    "batch_size",     # hf: images per generate call; vllm: chunk size
    "device",         # hf
    "concurrency",    # openai: requests in flight in total
    "served_model",   # openai: the model name sent
    "api_key",        # openai (None: $OPENAI_API_KEY)
    "max_retries",    # openai
    "timeout_s",      # openai: seconds per attempt
    "image_side",     # hf, openai, vllm: longer image side sent to the model
    "image_format",   # openai, vllm: png | jpeg
    "detector",       # facs: AU detector kind (mediapipe, openface:CSV, ...)
    "client",         # openai: a base ClientConfig (the spec's URLs replace its endpoints)
    "tag_requests",   # openai: send each request's id as the OpenAI `user` field
})

_KINDS: dict[str, BackendKind] = {}
_ALIASES: dict[str, str] = {}
_KIND_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]+")  # two letters at least: "C:/models" is a drive, not a kind


def register_backend(name: str, build: Callable[[str, dict[str, Any]], Any], *, aliases: Iterable[str] = (),
                     needs_target: bool = True, usage: str = "") -> None:
    """Add (or replace) a backend kind: ``build(target, options)`` gets the text after ``name:``
    and the keyword arguments (:data:`COMMON_OPTIONS` included) and returns a :class:`Backend`.
    A new backend is this one call."""
    _KINDS[name] = BackendKind(name, build, needs_target, usage or f"{name}:TARGET")
    for a in aliases:
        _ALIASES[a] = name


def backend_kinds() -> list[str]:
    """The spec forms the registry knows, for help texts and error messages."""
    return [k.usage for k in _KINDS.values()]


def parse_spec(spec: str) -> tuple[str, str]:
    """``"hf:PATH"`` → ("hf", PATH); ``"openai:URL[,URL]"``; ``"vllm:PATH"``; ``"facs"`` /
    ``"facs:DETECTOR"``; a bare ``http(s)://`` URL means ``openai``; a bare path or hub id means
    ``hf``. ``WORD:…`` with an unknown WORD (and no such file) raises :class:`BackendUnavailable`."""
    spec = spec.strip()
    if not spec:
        raise BackendUnavailable(f"empty model spec; use one of: {', '.join(backend_kinds())}")
    head, sep, rest = spec.partition(":")
    kind = _ALIASES.get(head.lower(), head.lower())
    entry = _KINDS.get(kind)
    if entry is not None and (sep or not entry.needs_target):
        if entry.needs_target and not rest.strip():
            raise BackendUnavailable(f"model spec {spec!r} has nothing after '{head}:' (use {entry.usage})")
        return kind, rest.strip()
    if sep and kind in ("http", "https"):
        return "openai", spec
    if sep and _KIND_WORD.fullmatch(head) and not os.path.exists(spec):
        raise BackendUnavailable(f"unknown model kind {head!r} in {spec!r}; use one of: {', '.join(backend_kinds())} "
                                 "(a bare path or hub id means hf)")
    return "hf", spec


def make_backend(spec: Any, **kw: Any) -> Backend:
    """The one registry: a :class:`Backend` from a model spec (see :func:`parse_spec`); a
    backend object is returned as is, so every API taking a spec also takes a backend.

    Keyword arguments: :data:`COMMON_OPTIONS` (ignored by kinds that do not use them), plus the
    kind's own — ``hf``: :class:`tagfer.models.vlm.VLMConfig` fields (adapter, dtype, ...); ``openai``:
    ``window``/``ordered`` and :class:`ClientConfig` fields (model, per_endpoint_concurrency, ...); ``vllm``: ``chunk_size`` and
    ``vllm.LLM`` engine arguments; ``facs``: ``config`` (a :class:`tagfer.au.facs.FACSConfig`).
    """
    if not isinstance(spec, str):
        if isinstance(spec, Backend):
            return spec
        raise TypeError(f"a model spec is a string or a Backend, got {type(spec).__name__}")
    kind, target = parse_spec(spec)
    return _KINDS[kind].build(target, dict(kw))


def _drop(kw: dict[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    """``kw`` without the common options this kind does not use (those in ``keep`` stay)."""
    unused = COMMON_OPTIONS - set(keep)
    return {k: v for k, v in kw.items() if k not in unused}


def _build_hf(target: str, kw: dict[str, Any]) -> Backend:
    kw = _drop(kw, ("batch_size", "device", "image_side"))
    batch_size = kw.pop("batch_size", 8)
    if kw.get("device") is None:
        kw.pop("device", None)
    return TransformersBackend(VLMConfig(model=target, **kw), batch_size=batch_size)


def _build_openai(target: str, kw: dict[str, Any]) -> Backend:
    from tagfer.models.openai_client import ClientConfig  # lazy (start-up time): httpx, PIL

    kw = _drop(kw, ("concurrency", "served_model", "api_key", "max_retries", "timeout_s", "image_side", "image_format",
                    "client", "tag_requests"))
    own = {k: kw.pop(k) for k in ("concurrency", "window", "ordered", "tag_requests") if k in kw}
    served = kw.pop("served_model", None)
    if served:
        kw["model"] = served
    base = kw.pop("client", None)
    kw = {k: v for k, v in kw.items() if v is not None or k == "model"}  # None = the ClientConfig default
    endpoints = [u for u in target.split(",") if u.strip()]
    cfg = replace(base, endpoints=endpoints, **kw) if base is not None else ClientConfig(endpoints=endpoints, **kw)
    return OpenAIBackend(cfg, **own)


def _build_vllm(target: str, kw: dict[str, Any]) -> Backend:
    kw = _drop(kw, ("batch_size", "image_side", "image_format"))
    if "batch_size" in kw:
        kw["chunk_size"] = max(1, int(kw.pop("batch_size")))
    return VLLMBackend(target, **kw)


def _build_facs(target: str, kw: dict[str, Any], rules_only: bool = False) -> Backend:
    from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL
    from tagfer.au.impression import ImpressionUnavailable  # lazy (start-up time): numpy, PIL

    kw = _drop(kw, ("detector",))
    detector = target or kw.pop("detector", None) or "mediapipe"
    try:
        backend = FACSBackend(DetectorSpec(kind=detector), rules_only=rules_only, **kw)
        if not rules_only:
            backend.grounded  # noqa: B018 - load the net now: a missing one is a set-up error (exit 2), not a per-image one
        return backend
    except ImpressionUnavailable as e:
        raise BackendUnavailable(f"{e} (or use --model facs-rules: the FACS rules alone, no net)") from e


register_backend("hf", _build_hf, aliases=("transformers",), usage="hf:PATH")
register_backend("openai", _build_openai, usage="openai:URL[,URL...]")
register_backend("vllm", _build_vllm, usage="vllm:PATH")
register_backend("facs", _build_facs, needs_target=False, usage="facs[:DETECTOR]")
register_backend("facs-rules", lambda t, kw: _build_facs(t, kw, rules_only=True), needs_target=False,
                 usage="facs-rules[:DETECTOR]")
