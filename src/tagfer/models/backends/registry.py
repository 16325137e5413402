"""The model spec registry: :data:`BACKENDS` (a :class:`tagfer.core.registry.Registry`) and :func:`make_backend`.

A spec is ``KIND:TARGET``: ``hf:PATH`` (or a bare path / hub id), ``openai:URL[,URL...]`` (or a
bare ``http(s)://`` URL), ``vllm:PATH``, ``facs[:DETECTOR]``. A kind is a builder
``build(target, **options) -> Backend``; adding one is one decorator::

    @BACKENDS.register("mine", usage="mine:NAME")
    def build_mine(target, **kw): return MyBackend(target)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from tagfer.core.registry import Registry
from tagfer.models.backends.base import Backend, BackendUnavailable
from tagfer.models.backends.facs import FACSBackend
from tagfer.models.backends.hf import TransformersBackend
from tagfer.models.backends.served import OpenAIBackend
from tagfer.models.backends.vllm_offline import VLLMBackend
from tagfer.models.vlm import VLMConfig

__all__ = ["BACKENDS", "COMMON_OPTIONS", "make_backend", "register_backend", "backend_kinds", "parse_spec"]

#: The model kinds. A bare path or hub id means ``hf``; ``http(s)://…`` means ``openai``. No
#: ``?k=v`` options (a URL may hold a query). Errors are :class:`BackendUnavailable`.
BACKENDS = Registry("model", usage="KIND:TARGET", default="hf", options=False, error=BackendUnavailable)

#: ``register_backend(name, build, *, aliases=(), needs_target=True, usage="")``: add a kind
#: (:meth:`tagfer.core.registry.Registry.register`; also a decorator without ``build``).
register_backend = BACKENDS.register

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


def backend_kinds() -> list[str]:
    """The spec forms the registry knows, for help texts and error messages."""
    return BACKENDS.usages()


def parse_spec(spec: str) -> tuple[str, str]:
    """``"hf:PATH"`` → ("hf", PATH); ``"openai:URL[,URL]"``; ``"vllm:PATH"``; ``"facs"`` /
    ``"facs:DETECTOR"``; a bare ``http(s)://`` URL means ``openai``; a bare path or hub id means
    ``hf``. ``WORD:…`` with an unknown WORD (and no such file) raises :class:`BackendUnavailable`."""
    p = BACKENDS.parse(spec)
    return p.kind, p.target


def make_backend(spec: Any, **kw: Any) -> Backend:
    """The one way to get a model: a :class:`Backend` from a model spec (see :func:`parse_spec`);
    a backend object is returned as is, so every API taking a spec also takes a backend. The
    backend's ``model_spec`` is set to ``spec`` (the name callers record).

    Keyword arguments: :data:`COMMON_OPTIONS` (ignored by kinds that do not use them), plus the
    kind's own — ``hf``: :class:`tagfer.models.vlm.VLMConfig` fields (adapter, dtype, ...); ``openai``:
    ``window``/``ordered`` and :class:`ClientConfig` fields (model, per_endpoint_concurrency, ...); ``vllm``: ``chunk_size`` and
    ``vllm.LLM`` engine arguments; ``facs``: ``config`` (a :class:`tagfer.au.facs.FACSConfig`).
    """
    if not isinstance(spec, str):
        if isinstance(spec, Backend):
            return spec
        raise TypeError(f"a model spec is a string or a Backend, got {type(spec).__name__}")
    backend = BACKENDS.create(spec, **kw)
    if getattr(backend, "model_spec", None) is None:
        try:
            backend.model_spec = spec.strip()
        except AttributeError:  # a backend with slots or a read-only attribute: it keeps its own name
            pass
    return backend


def _drop(kw: dict[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    """``kw`` without the common options this kind does not use (those in ``keep`` stay)."""
    unused = COMMON_OPTIONS - set(keep)
    return {k: v for k, v in kw.items() if k not in unused}


@BACKENDS.register("hf", aliases=("transformers",), usage="hf:PATH", help="in-process transformers model")
def _build_hf(target: str, **kw: Any) -> Backend:
    kw = _drop(kw, ("batch_size", "device", "image_side"))
    batch_size = kw.pop("batch_size", 8)
    if kw.get("device") is None:
        kw.pop("device", None)
    return TransformersBackend(VLMConfig(model=target, **kw), batch_size=batch_size)


@BACKENDS.register("openai", usage="openai:URL[,URL...]", claims=("http", "https"), help="OpenAI-compatible server(s)")
def _build_openai(target: str, **kw: Any) -> Backend:
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


@BACKENDS.register("vllm", usage="vllm:PATH", help="vLLM offline engine in this process")
def _build_vllm(target: str, **kw: Any) -> Backend:
    kw = _drop(kw, ("batch_size", "image_side", "image_format"))
    if "batch_size" in kw:
        kw["chunk_size"] = max(1, int(kw.pop("batch_size")))
    return VLLMBackend(target, **kw)


@BACKENDS.register("facs", needs_target=False, usage="facs[:DETECTOR]",
                   help="offline engine: a FER net's global impression + AU evidence grounded in boxes")
def _build_facs(target: str, rules_only: bool = False, **kw: Any) -> Backend:
    from tagfer.au.detectors import DetectorSpec  # lazy (start-up time): PIL
    from tagfer.au.impression import ImpressionUnavailable  # lazy (start-up time)

    kw = _drop(kw, ("detector",))
    detector = target or kw.pop("detector", None) or "mediapipe"
    kw.pop("detector", None)
    backend = FACSBackend(DetectorSpec(kind=detector), rules_only=rules_only, **kw)
    if not rules_only:
        try:
            backend.grounded  # noqa: B018 - load the net now: a missing one is a set-up error (exit 2), not per image
        except ImpressionUnavailable as e:
            raise BackendUnavailable(f"{e} (or use --model facs-rules: the FACS rules alone, no net)") from e
    return backend


@BACKENDS.register("facs-rules", needs_target=False, usage="facs-rules[:DETECTOR]",
                   help="offline FACS-prototype rules alone (no net, no pixels)")
def _build_facs_rules(target: str, **kw: Any) -> Backend:
    return _build_facs(target, rules_only=True, **kw)
