"""The configuration of a build (:class:`BuildConfig`, written to ``build_config.json``; a valid ``--config``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tagfer.core.canvas import TOP_K
from tagfer.data.teacher import TeacherPrompts
from tagfer.models.openai_client import ClientConfig
from tagfer.traces.trace import MAX_BOXES

__all__ = ["BuildConfig", "teacher_client", "parse_shard"]


def teacher_client(**kw: Any) -> ClientConfig:
    """The teacher's client settings: :class:`ClientConfig`'s defaults (the paper's 128 per
    endpoint, 512 in total), except JPEG images (several times smaller requests than PNG)."""
    kw.setdefault("image_format", "jpeg")
    return ClientConfig(**kw)


@dataclass
class BuildConfig:
    """Everything a build needs (written to ``build_config.json``).

    Sources and output: ``sources`` (specs for :func:`tagfer.data.sources.open_source`),
    ``split`` (train: only train splits feed the builder), ``out``, ``shard`` (i, N),
    ``limit`` (stop after this many new items, for trials).
    Teacher: ``teacher`` = a model spec of the one registry (:func:`tagfer.models.backends.make_backend`):
    ``"openai"`` (the endpoints of ``client``), ``"openai:URL[,URL]"``, ``"hf:PATH"`` (in-process
    transformers), ``"vllm:PATH"``, or ``"facs"`` (the offline engine writes from the grounded
    face, :class:`tagfer.models.backends.FACSBackend`). ``client``: the one
    :class:`tagfer.models.openai_client.ClientConfig` of the teacher (endpoints, model, api_key,
    total_concurrency, timeout, retries, back-off, ``image_side`` 224 and ``image_format``
    jpeg); in a mapping it is a nested ``"client"`` object of those fields.
    Decoding: ``temperature`` (the first request of an item's first round), ``retry_temperature``
    (default 0.7: every format retry, in both ``format_retry`` modes, and every elimination
    round — a greedy teacher asked the same thing again at temperature 0 would only repeat
    its malformed reply), ``max_tokens``. Algorithm: ``top_k`` (3), ``max_regions`` (3), ``quality``
    (Stage I on/off), ``max_format_retries``, ``max_eliminations``,
    ``last_candidate``, ``no_au``, ``format_retry``, ``max_requests``,
    ``min_tags``; two Stage III rules that are ours, not the paper's (docs/data.md), each
    switchable: ``unique_tags`` (no AU tagged twice) and ``limit_tags`` (at most ``max_regions``
    tags in a reply). Prompts: ``prompt_*`` override files. AU detector: ``detector``
    (a :class:`tagfer.au.detectors.DetectorSpec` kind: ``mediapipe``,
    ``openface:PATH``, ``table:PATH``), ``au_threshold`` (activation, B_AU),
    ``au_candidate_threshold`` (the teacher's candidate pool; ``None`` = the
    :class:`tagfer.au.aus.AUConfig` defaults), ``au_workers``.
    Jobs: ``max_in_flight`` items (default: 2 × concurrency), ``retry_failed``,
    ``fsync_every``, ``tag_requests`` (send the item id as the OpenAI ``user`` field).
    """

    sources: list[str] = field(default_factory=list)
    out: str = "tag_data"
    split: str = "train"
    shard: tuple[int, int] = (0, 1)
    limit: int | None = None
    teacher: str = "openai"
    client: ClientConfig = field(default_factory=teacher_client)
    temperature: float = 0.0
    retry_temperature: float = 0.7
    max_tokens: int = 1024
    top_k: int = TOP_K
    max_regions: int = MAX_BOXES
    quality: bool = True
    max_format_retries: int = 2
    max_eliminations: int = 6
    last_candidate: str = "ask"
    no_au: str = "noau"
    format_retry: str = "repeat"
    max_requests: int = 32
    min_tags: int = 0
    unique_tags: bool = True
    limit_tags: bool = True
    prompt_quality: str | None = None
    prompt_trace: str | None = None
    prompt_candidates: str | None = None
    prompt_trace_noau: str | None = None
    detector: str = "mediapipe"
    au_threshold: float | None = None
    au_candidate_threshold: float | None = None
    au_workers: int = 2
    max_in_flight: int | None = None
    retry_failed: bool = True
    fsync_every: int = 0
    tag_requests: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if isinstance(self.client, dict):
            self.client = teacher_client(**self.client)
        if isinstance(self.shard, str):
            self.shard = parse_shard(self.shard)
        self.shard = (int(self.shard[0]), int(self.shard[1]))
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"shard must be i/N with 0 <= i < N, got {i}/{n}")
        if self.no_au not in ("noau", "skip"):
            raise ValueError(f"no_au must be 'noau' or 'skip', got {self.no_au!r}")
        if self.last_candidate not in ("ask", "stop"):
            raise ValueError(f"last_candidate must be 'ask' or 'stop', got {self.last_candidate!r}")
        if self.format_retry not in ("repeat", "feedback"):
            raise ValueError(f"format_retry must be 'repeat' or 'feedback', got {self.format_retry!r}")
        if self.min_tags < 0:
            raise ValueError("min_tags must be >= 0")
        if self.max_format_retries < 0 or self.max_eliminations < 0:
            raise ValueError("max_format_retries and max_eliminations must be >= 0")
        if not 1 <= self.max_regions <= MAX_BOXES:
            raise ValueError(f"max_regions must be 1..{MAX_BOXES} (the TAG grammar allows at most {MAX_BOXES} boxes)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        """A config from a mapping (a ``--config`` file, ``build_config.json``): BuildConfig fields
        and a nested ``client`` mapping of :class:`ClientConfig` fields. Unknown keys, and values
        of the wrong kind (``"quality": "false"``), raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a build config must be a JSON object, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        client_fields = {f.name for f in dataclasses.fields(ClientConfig)}
        unknown = sorted(k for k in data if k not in own)
        if unknown:
            raise ValueError(f"unknown build config key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(own))} "
                             f"(the teacher's client settings go in \"client\": {', '.join(sorted(client_fields))})")
        kw = {k: v for k, v in data.items() if k != "client"}
        client = data.get("client") or {}
        if not isinstance(client, dict):
            raise ValueError(f"client must be a JSON object of client settings, got {client!r}")
        client = dict(client)
        bad = sorted(k for k in client if k not in client_fields)
        if bad:
            raise ValueError(f"unknown client key(s) {', '.join(map(repr, bad))}; known: {', '.join(sorted(client_fields))}")
        if client.get("api_key") is None:
            client.pop("api_key", None)  # None = the client's default ($OPENAI_API_KEY)
        for name, value in kw.items():
            _check_type(cls, name, value, name)
        for name, value in client.items():
            _check_type(ClientConfig, name, value, f"client.{name}")
        return cls(client=teacher_client(**client), **kw)

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or max(4, 2 * self.client.total_concurrency)

    def prompts(self) -> TeacherPrompts:
        return TeacherPrompts(self.prompt_quality, self.prompt_trace, self.prompt_candidates, self.prompt_trace_noau, self.max_regions)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shard"] = list(self.shard)
        for secret in ("api_key", "extra_headers"):  # credentials are never written to disk
            d["client"].pop(secret, None)
        return d


def _check_type(cls: type, name: str, value: Any, key: str) -> None:
    """``ValueError`` when ``value`` cannot be a ``cls.name`` of the kind its default is (bool, int,
    float, str): e.g. ``"quality": "false"`` in a JSON file. Fields defaulting to None are not checked."""
    default = next((f.default for f in dataclasses.fields(cls) if f.name == name), dataclasses.MISSING)
    if value is None or default is None or default is dataclasses.MISSING:
        return
    kind = type(default)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, str) if kind is str else True)
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise ValueError(f"{key} must be {want}, got {value!r}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` → ``(2, 8)`` (0-based index)."""
    try:
        a, b = str(text).split("/")
        return int(a), int(b)
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None
