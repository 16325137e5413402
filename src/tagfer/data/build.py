"""Building TAG data: Algorithm 1 of the paper, as a resumable, sharded, streaming async job.

For every usable record of the train split of each source (:mod:`tagfer.data.sources`):

0. **Ground** (:class:`tagfer.data.ground.GroundedItem`) — load the image, run the AU detector (:mod:`tagfer.au.detectors`,
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

Modules: :mod:`tagfer.data.build_config` (:class:`BuildConfig`), :mod:`tagfer.data.ground`
(step 0), :mod:`tagfer.data.algorithm` (steps 1–4 for one item), this module (the resumable
asyncio job and its files). The teacher is any :class:`tagfer.models.backends.Backend`; the
progress bar of ``tagfer build`` lives in :mod:`tagfer.cli.data` (fed by ``on_event`` and ``on_result``).

Policies (all in :class:`BuildConfig`)
--------------------------------------
* ``format_retry``: what a format retry sends. ``"repeat"`` (default, the
  paper: "repeat the same request until the output is valid") sends the same
  inputs again; ``"feedback"`` (ours) appends the list of problems found
  (:func:`feedback`). Either way a retry is sampled at ``retry_temperature``
  (default 0.7): the first request is greedy (``temperature=0``), and a greedy
  teacher asked the same thing again would only repeat its malformed reply.
  The paper's behaviour is the default because no measurement here shows the
  feedback variant accepts more on a real teacher (our test server is scripted).
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
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tagfer.au.facs import TRAINING_CONFIG
from tagfer.core.errors import ItemError
from tagfer.core.jobs import Event, JobRecorder, JobResult, Resume, resume_from
from tagfer.core.jsonl import JsonlWriter
from tagfer.data.algorithm import Counters, feedback, prepare_image, process_item, rejection, write_from_face
from tagfer.data.build_config import BuildConfig, parse_shard, teacher_client
from tagfer.data.ground import DetectorPool, GroundedItem, ground_record
from tagfer.data.sources import SourceRecord, SourceStats, open_source
from tagfer.models.backends import Backend, BackendUnavailable, backend_kinds, make_backend, parse_spec
from tagfer.core.aio import run_sync

__all__ = [
    "BuildConfig",
    "GroundedItem",
    "build",
    "run_build",
    "teacher_backend",
    "teacher_client",
    "shard_of",
    "parse_shard",
    "output_paths",
    "process_item",
    "feedback",
    "rejection",
    "ground_record",
]


# --------------------------------------------------------------------------- files
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


# --------------------------------------------------------------------------- the teacher
def teacher_backend(config: BuildConfig) -> Backend:
    """The teacher's :class:`tagfer.models.backends.Backend` from ``config.teacher`` through the one registry
    (:func:`tagfer.models.backends.make_backend`): ``"openai"`` means the endpoints of ``config.client``;
    ``openai:URL`` takes the client's other settings; ``facs`` (or ``facs-rules``) is the offline FACS-rules
    engine writing training traces (:data:`tagfer.au.facs.TRAINING_CONFIG`: no detector numbers
    quoted; the rules, not the FER net, so the label elimination of Algorithm 1 applies to them)."""
    spec = config.teacher.strip()
    if spec.lower() == "openai":
        spec = "openai:" + ",".join(config.client.endpoints)
    kind = parse_spec(spec)[0]
    if kind == "hf" and ":" not in spec:  # a 300k-item job names its teacher's kind
        raise ValueError(f"teacher must be openai or a model spec with its kind ({', '.join(backend_kinds())}), "
                         f"got {config.teacher!r} (for a local model write hf:{config.teacher})")
    if kind == "facs":  # training traces come from the FACS rules (deterministic, no net): facs-rules
        spec = "facs-rules" + spec[len("facs"):]
        kind = "facs-rules"
    own = {"config": TRAINING_CONFIG} if kind == "facs-rules" else {}
    return make_backend(spec, client=config.client, image_side=config.client.image_side, tag_requests=config.tag_requests, **own)


# --------------------------------------------------------------------------- the job
def _iter_records(config: BuildConfig, job: JobRecorder | None, done: set[str], earlier: Resume,
                  records: Iterable[SourceRecord] | None) -> Iterator[SourceRecord]:
    """The records to build, in stream order. With ``job`` (the run), the stream's counts go to its
    metrics (``seen``, ``excluded``, ``other_shard``, ``sources``) and each item done before is
    reported (:class:`tagfer.core.jobs.Skipped`); without (the counting pass), nothing is reported."""
    i, n = config.shard
    r = job.result if job is not None else None
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
            if r is not None:
                r.add_metric("seen")
            if rec.excluded:
                if r is not None:
                    r.add_metric("excluded")
                continue
            if shard_of(rec.id, n) != i:
                if r is not None:
                    r.add_metric("other_shard")
                continue
            if rec.id in done:
                if job is not None:  # a repeated id later in the stream counts as done (ok)
                    job.skip(rec.id, earlier.status.get(rec.id, "ok"))
                continue
            if config.limit is not None and new >= config.limit:
                return
            new += 1
            done.add(rec.id)  # a repeated id later in the stream (duplicate rows, two sources named alike) is skipped
            yield rec
        if st is not None and r is not None:
            r.metrics.setdefault("build/sources", {})[spec] = st.to_json()
            r.add_metric("excluded", st.n_excluded)  # excluded rows are counted by the reader, not yielded


def _count_records(config: BuildConfig, earlier: Resume, records: Iterable[SourceRecord] | None) -> int | None:
    """How many items this run will build (a first pass over the sources), or None when ``records``
    is a one-shot iterator (it cannot be read twice)."""
    if records is not None and not isinstance(records, (list, tuple)):
        return None
    return sum(1 for _ in _iter_records(config, None, set(earlier.done), earlier, records))


async def build(
    config: BuildConfig,
    *,
    records: Iterable[SourceRecord] | None = None,
    detector: Any | None = None,
    teacher: Any = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> JobResult:
    """Run (or resume) a build; returns the :class:`tagfer.core.jobs.JobResult` of this run (job ``build``,
    also written to ``build_summary.json``).

    ``records`` replaces ``config.sources``; ``detector`` (an object with
    ``.detect(LoadedImage, key) -> list[FaceAUs]``) replaces the configured AU
    detector; ``teacher`` (a :class:`tagfer.models.backends.Backend`, or a model spec) replaces the
    one built from ``config.teacher`` (a backend object is left open for the caller to close).
    ``on_result(kind, record)`` is called after each line is written (``kind``: ``"accepted"`` or
    ``"rejected"``); ``on_event`` gets the job events (:mod:`tagfer.core.jobs`: the total is
    counted from the sources first). A rejection by validation is a normal outcome; one with
    ``retryable: true`` (teacher/transport errors, internal failures) is a failed item, and one
    kept from an earlier run (``retry_failed=False``) is failed-before: both give exit code 1.
    Metrics (``build/…``): ``accepted``, ``rejected``, ``reasons``, ``seen``, ``excluded``,
    ``other_shard``, ``sources``, ``requests``, ``attempts``, ``format_retries``,
    ``eliminations``, ``requests_per_s``, ``retried_errors``.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, config.shard)
    job = JobRecorder("build", on_event)
    result = job.result
    counters = Counters()
    reasons: Counter = Counter()
    earlier = resume_from([paths["accepted"], paths["rejected"]], "id", retry_errors=config.retry_failed,
                          is_error=lambda r: bool(r.get("retryable")))  # the one resume set-up (tagfer.core.jobs)
    result.set_metric("retried_errors", earlier.retried)
    for name in ("accepted", "rejected"):
        result.set_metric(name, 0)
    done = earlier.done
    job.start(_count_records(config, earlier, records))
    paths["config"].write_text(json.dumps(config.to_json(), indent=2))

    own_teacher = teacher is None or isinstance(teacher, str)
    try:
        backend = teacher_backend(config) if teacher is None else make_backend(teacher)
    except BackendUnavailable as e:
        raise ValueError(f"teacher {teacher if isinstance(teacher, str) else config.teacher!r}: {e}") from e
    reads_face = bool(getattr(backend, "reads_face", False))  # writes from the grounded face: no prompts, no image
    # the backend's own threads: several for a thread-safe one without agenerate, else one (calls serialised)
    workers = min(64, max(1, int(getattr(backend, "batch_size", 1)))) if getattr(backend, "thread_safe", False) else 1
    teacher_pool = ThreadPoolExecutor(workers, thread_name_prefix="tagfer-teacher")
    prompts = config.prompts()
    dpool = DetectorPool(config, detector)
    io_pool = ThreadPoolExecutor(max(2, config.au_workers), thread_name_prefix="tagfer-io")
    loop = asyncio.get_running_loop()
    acc_w = JsonlWriter(paths["accepted"], fsync_every=config.fsync_every)
    rej_w = JsonlWriter(paths["rejected"], fsync_every=config.fsync_every)
    sem = asyncio.Semaphore(config.in_flight)
    tasks: set[asyncio.Task] = set()
    name = ""

    def write(kind: str, rec: SourceRecord, obj: dict[str, Any]) -> None:
        if kind == "accepted":
            acc_w.write(obj)
        else:
            rej_w.write(obj)
            reasons[obj["reason"]] += 1
        result.add_metric(kind)
        job.item(rec.id, obj["reason"] if kind != "accepted" and obj.get("retryable") else None)
        if on_result is not None:
            on_result(kind, obj)

    async def one(rec: SourceRecord) -> None:
        try:
            try:
                item = await loop.run_in_executor(dpool.pool, dpool.ground, rec)
                # image resizing + encoding for the teacher: in worker threads (PIL releases the GIL), not on the loop
                prepared = None if reads_face else await loop.run_in_executor(io_pool, prepare_image, backend, item.image)
            except ItemError as e:
                write("rejected", rec, rejection(rec, e.kind, e.message))
                return
            if reads_face:
                kind, obj = await write_from_face(rec, item, backend, config, executor=teacher_pool, teacher_name=name)
            else:
                kind, obj = await process_item(rec, item, backend, config, prompts, counters, prepared,
                                               executor=teacher_pool, teacher_name=name)
            if kind == "accepted":
                obj["image"] = rec.image_path if rec.image_path is not None else await loop.run_in_executor(io_pool, _image_ref, rec, out)
            write(kind, rec, obj)
        except Exception as e:  # a bug or an unexpected library failure: record it, keep the batch going
            write("rejected", rec, rejection(rec, "internal", f"{type(e).__name__}: {e}", retryable=True))
        finally:
            sem.release()

    try:
        # the model's name for the samples (a served model's is asked: fails fast if unreachable)
        name = str(await loop.run_in_executor(teacher_pool, backend.model_name) or getattr(backend, "name", "teacher"))
        for rec in _iter_records(config, job, done, earlier, records):
            await sem.acquire()
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
        acc_w.close()
        rej_w.close()
        dpool.close()
        io_pool.shutdown(wait=True)
        if own_teacher:
            await loop.run_in_executor(teacher_pool, backend.close)
        teacher_pool.shutdown(wait=True)
        for name in ("requests", "attempts", "format_retries", "eliminations"):
            result.set_metric(name, getattr(counters, name))
        result.set_metric("reasons", dict(reasons))
        job.finish()
        result.set_metric("requests_per_s", round(counters.requests / result.elapsed_s, 3) if result.elapsed_s > 0 else 0.0)
        result.save(paths["summary"])
    return result


def run_build(config: BuildConfig, **kw: Any) -> JobResult:
    """Synchronous wrapper of :func:`build`."""
    return run_sync(build(config, **kw))
