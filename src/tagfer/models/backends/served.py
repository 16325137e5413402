"""``openai:URL[,URL...]``: generation through OpenAI-compatible server(s) (vLLM/SGLang servers, hosted APIs)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from tagfer.core.aio import LoopThread
from tagfer.models.backends.base import (
    GenerationConfig,
    GenRequest,
    GenResult,
    ImageLike,
    _BackendBase,
    _error_of,
    _image_or_part,
    _limited,
    load_request_image,
)

__all__ = ["OpenAIBackend"]


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
        self._runner: LoopThread | None = None
        self._client: Any = None
        self._lock = threading.Lock()

    def _ensure(self) -> tuple[LoopThread, Any]:
        with self._lock:
            if self._runner is None:
                from tagfer.models.openai_client import ChatClient  # lazy (start-up time): httpx, PIL

                runner = LoopThread("tagfer-backend-loop")
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
