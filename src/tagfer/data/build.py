"""Building TAG data: Algorithm 1 of the paper, as a resumable, sharded, streaming async job.

For every usable record of the train split of each source (:mod:`tagfer.data.sources`):

0. **Ground** — load the image, run the AU detector (:mod:`tagfer.au.detectors`,
   MediaPipe by default or an imported GraphAU/OpenFace table), keep the
   largest face: activated AUs (score ≥ ``au_threshold``), their canvas boxes
   (``au_boxes``, B_AU, one per activated AU) and the candidate pool the teacher
   sees: the top-K (``top_k=3``) activated AUs scoring ≥ ``au_candidate_threshold``.
   The two thresholds are separate, as in the paper (App. D): ≈5–6 activated
   AUs per image, but ≈21% of images without a confident candidate.
1. **Stage I, quality** — the teacher judges the image
   (``teacher_quality``); a reply that is not a valid verdict is asked again
   up to ``max_format_retries`` times (see ``format_retry``), then the item
   is rejected (when in doubt, reject); ``suitable_for_training: false``
   rejects it.
2. **Stage II, trace** — the teacher writes ``{"CoT", "Answer"}`` from the AU
   list and the full label list (``teacher_trace``).
3. **Stage III, validation** — :func:`tagfer.data.teacher.check_trace`; a reply
   that fails is asked again (``max_format_retries`` per round, see
   ``format_retry``). A well-formed
   reply with the wrong label starts **label elimination**: the predicted
   label is removed from the candidates and the teacher is asked again with
   the remaining ones (``teacher_candidates``), never told the truth, until
   it answers correctly or ``max_eliminations`` is reached.
4. **Accept** only correct, well-formed traces: the CoT's ``<AUx> [box]`` tags
   become ``AUx <bbox>[box]</bbox>`` and the record is a
   :class:`tagfer.core.records.TAGSample` (``au_boxes`` = all activated AU boxes,
   ``aus`` = activated AUs).

Policies (all in :class:`BuildConfig`)
--------------------------------------
* ``format_retry``: what a format retry sends. ``"repeat"`` (default, the
  paper: "repeat the same request until the output is valid") sends the same
  prompt at the same temperature; ``"feedback"`` (ours) appends the list of
  problems found (:func:`feedback`) and uses ``retry_temperature``. The paper's
  behaviour is the default because no measurement here shows the feedback
  variant accepts more on a real teacher (our test server is scripted); with
  a greedy teacher (``temperature=0``) a repeated request usually returns the
  same reply, so set a non-zero ``temperature`` or use ``"feedback"`` there.
  ``retries`` in a record counts the extra requests actually sent (a reply
  that fails after the last allowed retry is not a retry).
* ``no_au``: an image with no confident candidate (an empty AU list; the
  paper: ~21%) is asked with the no-AU prompt (``"noau"``, default) or
  rejected (``"skip"``). Its sample still carries the activated AUs' boxes,
  so R_AU applies to it in RL unless the detector activated nothing.
* ``min_tags`` (default 0, the paper: the teacher "may select zero" AUs):
  the fewest ``<AUx>`` tags a trace with a non-empty AU list must hold.
* ``last_candidate``: after eliminations only the true label can be left.
  ``"ask"`` (default, the paper: ask until the candidates are exhausted) still
  asks the teacher, with a one-label list — the trace is then a rationalisation
  and the sample's ``meta.n_candidates == 1`` lets you filter it; ``"stop"``
  rejects the item instead of showing a single label.
* ``max_eliminations`` (default 6 = every wrong label of 7) and
  ``max_requests`` (per-item request budget) bound the work per image.
* A teacher request that fails for good (server down after the client's own
  retries) is recorded as a rejection with ``retryable: true``; the next run
  drops those records and tries the items again (``retry_failed``).

Storage (``out/``)
------------------
``accepted.jsonl`` (one TAGSample per line), ``rejected.jsonl`` (one
:func:`rejection` record per line: id, reason, detail, retries, eliminations,
predictions, requests, retryable, AU summary), ``images/`` (images that only
exist as bytes, e.g. FERPlus pixels, written before their sample line),
``build_config.json`` and ``build_summary.json``. With ``shard=(i, N)``, N > 1,
the files are ``accepted-0000i-of-0000N.jsonl`` etc. and only items with
``shard_of(id, N) == i`` (a hash of the id) are processed, so N machines can
share one folder. Lines are flushed one by one: a ``kill -9`` loses only the
items in flight; a re-run skips every id already written (accepted or
rejected) and never writes a sample twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from PIL import Image
from rich.console import Console
from rich.live import Live
from rich.text import Text

from tagfer.au.aus import AUConfig, largest_face
from tagfer.au.detectors import DetectionError, DetectorSpec
from tagfer.au.facs import facs_sample
from tagfer.core.canvas import TOP_K
from tagfer.core.errors import ItemError
from tagfer.core.jobs import resume_from
from tagfer.core.jsonl import JsonlWriter
from tagfer.core.labels import LABELS
from tagfer.core.records import TAGSample
from tagfer.data.sources import SourceRecord, SourceStats, open_source
from tagfer.data.teacher import TeacherPrompts, check_quality, check_trace
from tagfer.models.backends import backend_kinds, make_backend, parse_spec
from tagfer.models.backends import Backend, BackendUnavailable, FACSBackend, GenerationConfig, GenRequest
from tagfer.models.openai_client import ClientConfig, run_coroutine_sync
from tagfer.traces.trace import MAX_BOXES, format_au_list

__all__ = [
    "BuildConfig",
    "CLIENT_KEYS",
    "teacher_client",
    "BuildSummary",
    "Teacher",
    "BackendTeacher",
    "teacher_backend",
    "Grounded",
    "shard_of",
    "output_paths",
    "build",
    "run_build",
    "process_item",
]


# --------------------------------------------------------------------------- config
#: Old flat keys of a build config (and of the CLI) → the :class:`ClientConfig` field they set.
CLIENT_KEYS = {
    "endpoints": "endpoints",
    "model": "model",
    "api_key": "api_key",
    "concurrency": "total_concurrency",
    "per_endpoint": "per_endpoint_concurrency",
    "timeout_s": "timeout_s",
    "request_retries": "max_retries",
    "backoff_base_s": "backoff_base_s",
    "backoff_max_s": "backoff_max_s",
    "image_side": "image_side",
    "image_format": "image_format",
}


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
    transformers), ``"vllm:PATH"``, or ``"facs"`` (offline engine, :func:`tagfer.au.facs.facs_sample`). ``client``: the one
    :class:`tagfer.models.openai_client.ClientConfig` of the teacher (endpoints, model, api_key,
    concurrency, timeout, retries, back-off, ``image_side`` 224 and ``image_format``
    jpeg); :meth:`from_dict` also takes its fields under the CLI's flat names
    (:data:`CLIENT_KEYS`: ``concurrency``, ``per_endpoint``, ``request_retries``, ...).
    Decoding: ``temperature`` (first try), ``retry_temperature`` (format retries and
    elimination rounds), ``max_tokens``. Algorithm: ``top_k`` (3), ``max_regions`` (3), ``quality``
    (Stage I on/off), ``max_format_retries``, ``max_eliminations``,
    ``last_candidate``, ``no_au``, ``format_retry``, ``max_requests``,
    ``min_tags``. Prompts: ``prompt_*`` override files. AU detector: ``detector``
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
        """A config from a mapping (a ``--config`` file, ``build_config.json``): BuildConfig fields,
        a nested ``client`` mapping of :class:`ClientConfig` fields, and the flat client keys of
        :data:`CLIENT_KEYS` (which win over ``client``). Unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a build config must be a JSON object, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        client_fields = {f.name for f in dataclasses.fields(ClientConfig)}
        unknown = sorted(k for k in data if k not in own and k not in CLIENT_KEYS)
        if unknown:
            known = sorted((own - {"client"}) | set(CLIENT_KEYS) | {"client"})
            raise ValueError(f"unknown build config key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
        kw = {k: v for k, v in data.items() if k in own and k != "client"}
        client = dict(data.get("client") or {})
        bad = sorted(k for k in client if k not in client_fields)
        if bad:
            raise ValueError(f"unknown client key(s) {', '.join(map(repr, bad))}; known: {', '.join(sorted(client_fields))}")
        client.update({CLIENT_KEYS[k]: v for k, v in data.items() if k in CLIENT_KEYS})
        if client.get("api_key") is None:
            client.pop("api_key", None)  # None = the client's default ($OPENAI_API_KEY)
        for name, value in kw.items():
            _check_type(cls, name, value, name)
        for name, value in client.items():
            flat = next((k for k, f in CLIENT_KEYS.items() if f == name), f"client.{name}")
            _check_type(ClientConfig, name, value, flat)
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


# Read-only aliases of the client settings under the build's flat names (``config.model``,
# ``config.request_retries``, ...): the values live once, in ``config.client``.
for _flat, _field in CLIENT_KEYS.items():
    setattr(BuildConfig, _flat, property(lambda self, _f=_field: getattr(self.client, _f), doc=f"``client.{_field}`` (read-only)."))
del _flat, _field


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` → ``(2, 8)`` (0-based index)."""
    try:
        a, b = str(text).split("/")
        return int(a), int(b)
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None


def shard_of(item_id: str, n: int) -> int:
    """Deterministic shard of an id (BLAKE2b of the UTF-8 id, mod ``n``): same on every machine and run."""
    if n <= 1:
        return 0
    h = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") % n


def output_paths(out: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> dict[str, Path]:
    """File names of a build (per shard when N > 1)."""
    o = Path(out)
    i, n = shard
    suffix = "" if n <= 1 else f"-{i:05d}-of-{n:05d}"
    return {
        "accepted": o / f"accepted{suffix}.jsonl",
        "rejected": o / f"rejected{suffix}.jsonl",
        "summary": o / f"build_summary{suffix}.json",
        "config": o / f"build_config{suffix}.json",
        "images": o / "images",
    }


# --------------------------------------------------------------------------- teachers
class Teacher(Protocol):
    """What the builder asks: one image + one prompt → reply text (raises ``ItemError`` on failure)."""

    name: str

    def prepare(self, image: Any) -> Any:
        """Turn a PIL image into what :meth:`ask` sends (done once per item)."""

    async def ask(self, prompt: str, prepared: Any, *, temperature: float, item_id: str) -> tuple[str, int]:
        """Reply text and the number of transport attempts it took."""


class BackendTeacher:
    """The teacher: any :class:`tagfer.models.backends.Backend` (the one inference interface) asked
    one image + one prompt at a time from the builder's event loop.

    A backend with ``agenerate`` (the OpenAI-compatible one: the paper's set-up, hundreds of
    requests in flight) is awaited directly; any other runs in worker threads, one at a time
    unless it is ``thread_safe`` (in-process models: for small jobs and tests; at scale serve
    the teacher with vLLM and use ``openai:``). The image is encoded once per item
    (``prepare_image``) and reused by every request of the item.
    """

    def __init__(self, backend: Any, max_tokens: int = 1024, name: str | None = None):
        self.backend = backend
        self.max_tokens = max_tokens
        self.name = name or ""
        workers = max(1, int(getattr(backend, "batch_size", 1))) if getattr(backend, "thread_safe", False) else 1
        self._pool = ThreadPoolExecutor(min(workers, 64), thread_name_prefix="tagfer-teacher")

    async def open(self) -> None:
        """The model's name for the samples (a served model's is asked: fails fast if unreachable)."""
        if not self.name:
            model_name = getattr(self.backend, "model_name", None)
            name = await asyncio.get_running_loop().run_in_executor(self._pool, model_name) if model_name else None
            self.name = str(name or getattr(self.backend, "name", "teacher"))

    async def close(self, close_backend: bool = True) -> None:
        if close_backend:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.backend.close)
        self._pool.shutdown(wait=True)

    def prepare(self, image: Any) -> Any:
        prep = getattr(self.backend, "prepare_image", None)
        return prep(image) if prep is not None else image

    def _one(self, req: Any, cfg: Any) -> Any:
        return next(iter(self.backend.generate([req], cfg)))

    async def ask(self, prompt: str, prepared: Any, *, temperature: float, item_id: str) -> tuple[str, int]:
        req = GenRequest(item_id, user=prompt, image=prepared)
        cfg = GenerationConfig(temperature=temperature, max_new_tokens=self.max_tokens)
        agenerate = getattr(self.backend, "agenerate", None)
        if agenerate is not None:
            res = await agenerate(req, cfg)
        else:
            res = await asyncio.get_running_loop().run_in_executor(self._pool, self._one, req, cfg)
        if res.error:
            raise ItemError(str(res.error.get("kind", "generation_failed")), str(res.error.get("message", "")))
        return res.text or "", int((res.info or {}).get("attempts", 1))


def teacher_backend(config: BuildConfig) -> Any:
    """The teacher's :class:`tagfer.models.backends.Backend` from ``config.teacher`` through the one registry
    (:func:`tagfer.models.backends.make_backend`): ``"openai"`` means the endpoints of ``config.client``;
    ``openai:URL`` takes the client's other settings; ``facs`` is the offline engine."""
    spec = config.teacher.strip()
    if spec.lower() == "openai":
        spec = "openai:" + ",".join(config.client.endpoints)
    elif parse_spec(spec)[0] == "hf" and ":" not in spec:  # a 300k-item job names its teacher's kind
        raise ValueError(f"teacher must be openai or a model spec with its kind ({', '.join(backend_kinds())}), "
                         f"got {config.teacher!r} (for a local model write hf:{config.teacher})")
    return make_backend(spec, client=config.client, image_side=config.client.image_side, tag_requests=config.tag_requests)


# --------------------------------------------------------------------------- grounding
@dataclass
class Grounded:
    """The AU grounding of one item's image (largest face)."""

    image: Any  # PIL.Image (RGB)
    top: list[tuple[int, float, tuple[int, int, int, int]]]  # the top-K AU list items
    active: list[int]  # activated AU numbers, score-descending
    au_boxes: list[list[int]]  # canvas boxes of the activated AUs, one per AU (B_AU)
    face: Any = None  # the tagfer.au.aus.FaceAUs (for the facs teacher)
    detector: str = ""

    @property
    def au_list(self) -> str:
        return format_au_list(self.top)


def ground_record(rec: SourceRecord, detector: Any) -> Grounded:
    """Load + detect (runs in a worker thread). Raises ``ItemError`` (image errors, no face)."""
    img = rec.load()
    faces = detector.detect(img, rec.image_path or rec.id)
    if not faces:
        raise DetectionError("no_face", f"no face found in {rec.image_path or rec.id}")
    face = largest_face(faces)
    top = [(a.au, float(a.score), tuple(int(v) for v in a.box)) for a in face.top]
    return Grounded(
        image=Image.fromarray(img.rgb),
        top=top,  # type: ignore[arg-type]
        active=[a.au for a in face.active],
        au_boxes=[list(b) for b in face.au_boxes],
        face=face,
        detector=str(getattr(face, "detector", getattr(detector, "name", ""))),
    )


class _DetectorPool:
    """Worker threads, each with its own detector (MediaPipe graphs are not shared across threads)."""

    def __init__(self, config: BuildConfig, detector: Any | None):
        self._given = detector
        self._local = threading.local()
        self._made: list[Any] = []
        self._lock = threading.Lock()
        self.config = config
        workers = 1 if detector is not None else max(1, config.au_workers)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="tagfer-au")

    def _detector(self) -> Any:
        if self._given is not None:
            return self._given
        det = getattr(self._local, "det", None)
        if det is None:
            kw: dict[str, Any] = {"top_k": self.config.top_k}
            if self.config.au_threshold is not None:
                kw["threshold"] = self.config.au_threshold
            if self.config.au_candidate_threshold is not None:
                kw["candidate_threshold"] = self.config.au_candidate_threshold
            det = DetectorSpec(self.config.detector, AUConfig(**kw)).build()
            self._local.det = det
            with self._lock:
                self._made.append(det)
        return det

    def ground(self, rec: SourceRecord) -> Grounded:
        return ground_record(rec, self._detector())

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for d in self._made:
            try:
                d.close()
            except Exception:
                pass


# --------------------------------------------------------------------------- records
def rejection(rec: SourceRecord, reason: str, detail: str = "", *, retryable: bool = False, **info: Any) -> dict[str, Any]:
    """A ``rejected.jsonl`` record.

    Schema: ``{"id", "source", "split", "label", "image", "reason", "detail",
    "retryable", "retries", "eliminations", "predictions", "requests",
    "top", "active", "quality_reason"}`` (the last ones when known).
    Reasons: image error kinds (``not_found``, ``corrupt``, ...), ``no_face``,
    ``no_au``, ``quality`` (judged unfit), ``quality_invalid`` (no valid
    verdict), ``format`` (no valid trace after the retries), ``exhausted``
    (``max_eliminations`` wrong labels), ``one_candidate_left``
    (``last_candidate="stop"``), ``budget`` (``max_requests``), ``facs_mismatch``,
    ``teacher_error`` (retryable), ``internal``.
    """
    out = {
        "id": rec.id,
        "source": rec.source,
        "split": rec.split,
        "label": rec.label,
        "image": rec.image_path,
        "reason": reason,
        "detail": detail[:2000],
        "retryable": retryable,
    }
    out.update(info)
    return out


def _image_ref(rec: SourceRecord, out: Path) -> str:
    """The image path for the sample: the source file, or a PNG written under ``out/images`` for byte images."""
    if rec.image_path is not None:
        return rec.image_path
    rel = Path("images") / rec.source / (rec.id.split("/", 1)[-1].replace("/", "_") + ".png")
    dest = out / rel
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.write_bytes(rec.image_bytes or b"")
        os.replace(tmp, dest)
    return rel.as_posix()


# --------------------------------------------------------------------------- the algorithm
def feedback(problems: list[str], limit: int = 5) -> str:
    """The note appended to a format retry. Problems about the answer are replaced by a
    generic sentence so that no label word other than the candidate list enters a prompt."""
    out: list[str] = []
    for p in problems:
        q = "the Answer must be exactly one label from the list given above" if p.startswith("Answer") else p
        if q not in out:
            out.append(q)
    return "Your previous reply was not usable: " + "; ".join(out[:limit]) + ". Follow the instructions and the reply format exactly."


@dataclass
class _Counters:
    requests: int = 0
    attempts: int = 0
    format_retries: int = 0
    eliminations: int = 0


class _Budget(Exception):
    pass


async def process_item(
    rec: SourceRecord,
    g: Grounded,
    teacher: Teacher,
    config: BuildConfig,
    prompts: TeacherPrompts,
    counters: _Counters | None = None,
    prepared: Any = None,
) -> tuple[str, dict[str, Any]]:
    """Stages I–III for one grounded item → ``("accepted", TAGSample json)`` or ``("rejected", record)``.

    ``prepared``: ``teacher.prepare(g.image)`` when already done (off the event loop);
    ``image`` of an accepted sample is filled in by the caller.
    """
    c = counters or _Counters()
    truth = rec.label
    info: dict[str, Any] = {"top": [a for a, _, _ in g.top], "active": g.active}
    n_req = 0
    retries = 0
    eliminations = 0
    predictions: list[str] = []
    if prepared is None:
        prepared = teacher.prepare(g.image)

    async def ask(prompt: str, temperature: float) -> str:
        nonlocal n_req
        if n_req >= config.max_requests:
            raise _Budget()
        n_req += 1
        c.requests += 1
        text, attempts = await teacher.ask(prompt, prepared, temperature=temperature, item_id=rec.id)
        c.attempts += attempts
        return text

    def rejected(reason: str, detail: str = "", retryable: bool = False) -> tuple[str, dict[str, Any]]:
        return "rejected", rejection(
            rec, reason, detail, retryable=retryable, retries=retries, eliminations=eliminations, predictions=predictions, requests=n_req, **info
        )

    def retry_temperature(k: int, first: bool) -> float:
        """The first try of the first round uses ``temperature``; a "repeat" retry sends the
        same request again; "feedback" retries and later rounds use ``retry_temperature``."""
        if k and config.format_retry == "feedback":
            return config.retry_temperature
        return config.temperature if first else config.retry_temperature

    if not g.top and config.no_au == "skip":
        return rejected("no_au", "no confident AU candidate (empty AU list)")
    try:
        # ---- Stage I: quality
        if config.quality:
            verdict = None
            qprompt = prompts.quality_prompt()
            for k in range(config.max_format_retries + 1):
                text = await ask(qprompt, retry_temperature(k, first=True))
                if k:  # a retry is a request sent again, not the failed reply before it
                    retries += 1
                    c.format_retries += 1
                v = check_quality(text)
                if v.valid:
                    verdict = v
                    break
            if verdict is None:
                return rejected("quality_invalid", "no valid quality verdict: " + "; ".join(v.problems))
            info["quality_reason"] = verdict.reason
            if not verdict.suitable:
                return rejected("quality", verdict.reason)
        # ---- Stages II + III with label elimination
        candidates = list(LABELS)
        first = True
        while True:
            base = prompts.trace_prompt(g.au_list, candidates)
            check = None
            for k in range(config.max_format_retries + 1):
                prompt = base
                if k and config.format_retry == "feedback" and check is not None and check.problems:
                    prompt = base + "\n\n" + feedback(check.problems)
                text = await ask(prompt, retry_temperature(k, first))
                if k:  # counted once the request went out (a budget stop is not a retry)
                    retries += 1
                    c.format_retries += 1
                check = check_trace(text, g.top, candidates, max_regions=config.max_regions, min_tags=config.min_tags)
                if check.ok:
                    break
            first = False
            assert check is not None
            if not check.ok:
                return rejected("format", "; ".join(check.problems))
            predictions.append(check.label)  # type: ignore[arg-type]
            if check.label == truth:
                meta = {
                    "retries": retries,
                    "eliminations": eliminations,
                    "predictions": predictions,
                    "candidates": candidates,
                    "n_candidates": len(candidates),
                    "requests": n_req,
                    "aus_used": check.aus_used,
                    "top": [list(a[:2]) + [list(a[2])] for a in g.top],
                    "no_au_prompt": not g.top,
                    "quality_reason": info.get("quality_reason"),
                    "original_label": rec.original_label,
                    "detector": g.detector,
                }
                sample = TAGSample(
                    id=rec.id,
                    source=rec.source,
                    image="",
                    label=truth,
                    completion=check.completion,  # type: ignore[arg-type]
                    au_boxes=g.au_boxes,
                    aus=g.active,
                    teacher=getattr(teacher, "name", ""),
                    split=rec.split,
                    meta=meta,
                )
                return "accepted", sample.to_json()
            # wrong but well-formed: eliminate the predicted label
            eliminations += 1
            c.eliminations += 1
            candidates = [lab for lab in candidates if lab != check.label]
            if eliminations > config.max_eliminations or not candidates:
                return rejected("exhausted", f"wrong labels: {', '.join(predictions)}")
            if len(candidates) == 1 and config.last_candidate == "stop":
                return rejected("one_candidate_left", f"wrong labels: {', '.join(predictions)}")
    except _Budget:
        return rejected("budget", f"more than {config.max_requests} requests")
    except ItemError as e:
        return rejected("teacher_error", f"{e.kind}: {e.message}", retryable=True)


def facs_item(rec: SourceRecord, g: Grounded, config: BuildConfig) -> tuple[str, dict[str, Any]]:
    """The offline teacher: :func:`tagfer.au.facs.facs_sample` on the grounded face (no VLM, no quality stage)."""
    info = {"top": [a for a, _, _ in g.top], "active": g.active}
    if not g.top and config.no_au == "skip":
        return "rejected", rejection(rec, "no_au", "no confident AU candidate (empty AU list)", **info)
    s = facs_sample(g.face, label=rec.label, id=rec.id, source=rec.source, image="", split=rec.split)
    if s is None:
        return "rejected", rejection(rec, "facs_mismatch", "the FACS engine's label differs from the ground truth", **info)
    s.meta.update({"top": [list(a[:2]) + [list(a[2])] for a in g.top], "original_label": rec.original_label})
    return "accepted", s.to_json()


# --------------------------------------------------------------------------- the job
@dataclass
class BuildSummary:
    """Counts of one run (``build_summary.json``).

    ``rejected`` counts every rejection; ``failed`` those that are not a verdict on the item
    but a failure to process it (``retryable: true``: ``teacher_error``, ``internal``), plus,
    with ``retry_failed=False``, the retryable records kept from earlier runs.
    """

    seen: int = 0
    excluded: int = 0
    other_shard: int = 0
    already_done: int = 0
    processed: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    requests: int = 0
    attempts: int = 0
    format_retries: int = 0
    eliminations: int = 0
    elapsed_s: float = 0.0
    sources: dict[str, Any] = field(default_factory=dict)
    dropped_retryable: int = 0
    failed: int = 0  # items that could not be processed (retryable rejections), this run and kept from earlier ones

    @property
    def exit_code(self) -> int:
        """0: every item built or rejected by validation; 1: some items could not be processed (retryable)."""
        return 1 if self.failed else 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reasons"] = dict(self.reasons)
        d["requests_per_s"] = round(self.requests / self.elapsed_s, 3) if self.elapsed_s > 0 else 0.0
        return d


def _iter_records(config: BuildConfig, summary: BuildSummary, done: set[str], records: Iterable[SourceRecord] | None) -> Iterator[SourceRecord]:
    i, n = config.shard
    if records is not None:
        streams: list[tuple[str, Iterable[SourceRecord], SourceStats | None]] = [("records", records, None)]
    else:
        streams = []
        for spec in config.sources:
            st = SourceStats()
            streams.append((spec, open_source(spec, split=config.split, stats=st), st))
    new = 0
    for spec, stream, st in streams:
        for rec in stream:
            summary.seen += 1
            if rec.excluded:
                summary.excluded += 1
                continue
            if shard_of(rec.id, n) != i:
                summary.other_shard += 1
                continue
            if rec.id in done:
                summary.already_done += 1
                continue
            if config.limit is not None and new >= config.limit:
                return
            new += 1
            done.add(rec.id)  # a repeated id later in the stream (duplicate rows, two sources named alike) is skipped
            yield rec
        if st is not None:
            summary.sources[spec] = st.to_json()
            summary.excluded += st.n_excluded  # excluded rows are counted by the reader, not yielded


class _Progress:
    """A live one-line status (rich) refreshed twice a second."""

    def __init__(self, summary: BuildSummary, counters: _Counters, enabled: bool, console: Any = None):
        self.summary, self.c, self.enabled = summary, counters, enabled
        self.t0 = time.monotonic()
        self._live = None
        self._console = console

    def line(self) -> str:
        s, c = self.summary, self.c
        dt = max(1e-9, time.monotonic() - self.t0)
        return (
            f"done {s.accepted + s.rejected}  accepted {s.accepted}  rejected {s.rejected}  "
            f"retries {c.format_retries}  eliminations {c.eliminations}  requests {c.requests}  {c.requests / dt:.1f} req/s"
        )

    async def run(self) -> None:
        if not self.enabled:
            return

        console = self._console or Console(stderr=True)
        with Live(Text(self.line()), console=console, refresh_per_second=4, transient=False) as live:
            try:
                while True:
                    await asyncio.sleep(0.5)
                    live.update(Text(self.line()))
            except asyncio.CancelledError:
                live.update(Text(self.line()))
                raise
            finally:
                if not console.is_terminal:  # rich leaves the last frame unterminated off a terminal
                    live.stop()
                    console.line()


async def build(
    config: BuildConfig,
    *,
    records: Iterable[SourceRecord] | None = None,
    detector: Any | None = None,
    teacher: Teacher | None = None,
    progress: bool = False,
    console: Any = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> BuildSummary:
    """Run (or resume) a build; returns the :class:`BuildSummary` of this run.

    ``records`` replaces ``config.sources``; ``detector`` (an object with
    ``.detect(LoadedImage, key) -> list[FaceAUs]``) replaces the configured AU
    detector; ``teacher`` (a :class:`Teacher` or a :class:`tagfer.models.backends.Backend`) replaces the
    one built from ``config.teacher`` (it is opened if it has ``open()``, and left open for the
    caller to close).
    ``on_result(kind, record)`` is called after each line is written.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, config.shard)
    summary = BuildSummary()
    counters = _Counters()
    t0 = time.monotonic()
    earlier = resume_from([paths["accepted"], paths["rejected"]], "id", retry_errors=config.retry_failed,
                          is_error=lambda r: bool(r.get("retryable")))  # the one resume set-up (tagfer.core.jobs)
    summary.dropped_retryable = earlier.retried
    if not config.retry_failed:
        summary.failed = len(earlier.failed)
    done = earlier.done
    paths["config"].write_text(json.dumps(config.to_json(), indent=2))

    own_teacher = teacher is None
    if teacher is None:
        try:
            teacher = teacher_backend(config)
        except BackendUnavailable as e:
            raise ValueError(f"teacher {config.teacher!r}: {e}") from e
    use_facs = isinstance(teacher, FACSBackend)  # the offline engine writes from the grounded face: no prompts
    if use_facs:
        if own_teacher:
            teacher.close()
        teacher, own_teacher = None, False
    wrapped = not own_teacher and isinstance(teacher, Backend)
    if wrapped or (own_teacher and teacher is not None):
        teacher = BackendTeacher(teacher, config.max_tokens)  # a backend passed in stays the caller's to close
    prompts = config.prompts()
    dpool = _DetectorPool(config, detector)
    io_pool = ThreadPoolExecutor(max(2, config.au_workers), thread_name_prefix="tagfer-io")
    loop = asyncio.get_running_loop()
    acc_w = JsonlWriter(paths["accepted"], fsync_every=config.fsync_every)
    rej_w = JsonlWriter(paths["rejected"], fsync_every=config.fsync_every)
    sem = asyncio.Semaphore(config.in_flight)
    tasks: set[asyncio.Task] = set()
    prog = _Progress(summary, counters, progress, console)
    prog_task = asyncio.create_task(prog.run())

    def write(kind: str, rec: SourceRecord, obj: dict[str, Any]) -> None:
        if kind == "accepted":
            acc_w.write(obj)
            summary.accepted += 1
        else:
            rej_w.write(obj)
            summary.rejected += 1
            summary.reasons[obj["reason"]] += 1
            summary.failed += bool(obj.get("retryable"))
        if on_result is not None:
            on_result(kind, obj)

    async def one(rec: SourceRecord) -> None:
        try:
            try:
                g = await loop.run_in_executor(dpool.pool, dpool.ground, rec)
                # image resizing + encoding for the teacher: in worker threads (PIL releases the GIL), not on the loop
                prepared = None if use_facs else await loop.run_in_executor(io_pool, teacher.prepare, g.image)  # type: ignore[union-attr]
            except ItemError as e:
                write("rejected", rec, rejection(rec, e.kind, e.message))
                return
            if use_facs:
                kind, obj = await loop.run_in_executor(dpool.pool, facs_item, rec, g, config)
            else:
                kind, obj = await process_item(rec, g, teacher, config, prompts, counters, prepared)  # type: ignore[arg-type]
            if kind == "accepted":
                obj["image"] = rec.image_path if rec.image_path is not None else await loop.run_in_executor(io_pool, _image_ref, rec, out)
            write(kind, rec, obj)
        except Exception as e:  # a bug or an unexpected library failure: record it, keep the batch going
            write("rejected", rec, rejection(rec, "internal", f"{type(e).__name__}: {e}", retryable=True))
        finally:
            sem.release()

    try:
        if teacher is not None and hasattr(teacher, "open"):
            await teacher.open()  # idempotent; a teacher passed in is opened but not closed here
        for rec in _iter_records(config, summary, done, records):
            await sem.acquire()
            summary.processed += 1
            t = asyncio.create_task(one(rec))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks))
    finally:
        for t in list(tasks):
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        prog_task.cancel()
        await asyncio.gather(prog_task, return_exceptions=True)
        acc_w.close()
        rej_w.close()
        dpool.close()
        io_pool.shutdown(wait=True)
        if own_teacher or wrapped:
            await teacher.close(close_backend=own_teacher)  # type: ignore[union-attr]
        summary.requests, summary.attempts = counters.requests, counters.attempts
        summary.format_retries, summary.eliminations = counters.format_retries, counters.eliminations
        summary.elapsed_s = round(time.monotonic() - t0, 3)
        paths["summary"].write_text(json.dumps(summary.to_json(), indent=2))
    return summary


def run_build(config: BuildConfig, **kw: Any) -> BuildSummary:
    """Synchronous wrapper of :func:`build`."""
    return run_coroutine_sync(build(config, **kw))
