"""The one job runner of tagfer's long jobs (``tagfer au``, ``analyze --out``, ``eval``, ``build``).

Two pieces, used together or apart:

:func:`resume_from`
    Resume set-up from the JSON Lines output(s) of an earlier run: ``resume=False``
    (``--no-resume``) deletes them; ``retry_errors`` (``--retry-errors``) drops the error
    records so those items run again; then the key of every record left is read with the
    status of its *last* record (``"ok"``, ``"failed"``, or what ``status`` says), so a
    job skips what is done and still knows which requested items failed before.

:func:`ordered_map`
    ``fn`` over a stream of items with at most ``window`` items in flight (constant
    memory whatever the stream's length), results yielded in input order, in worker
    threads (``processes=False``: for work that releases the GIL or waits on I/O) or worker
    processes. A process pool that breaks (a worker killed by the OS, a crash in native
    code) is rebuilt and the items that were in flight are run again, one at a time; an item
    that breaks the pool on its own gets ``on_crash(item)`` as its result, so one poisonous
    input costs only itself and cannot stop a batch. Worker processes exit with the parent, even when it is ``kill -9``-ed
    (:func:`exit_with_parent`).

Records are written by the caller with :class:`tagfer.core.jsonl.JsonlWriter` (flushed per
line, a torn last line cut on reopen), so an interrupted job resumes with no gap and no
duplicate.

:class:`JobResult` and its events
    The one summary of every job (au, analyze, eval, build, export, video). A job does not
    keep counters of its own: it reports :class:`Started` (how many items it will run, when
    that is knowable), one :class:`Progress` per finished item (its key and, for a failure, the
    error kind), :class:`Skipped` for items an earlier run did, and :class:`Done`.
    :class:`JobRecorder` folds those events into the :class:`JobResult` and hands each to an
    observer (``on_event``): the command line draws its progress bar from the same events
    (:mod:`tagfer.cli.progress`), so the bar and the summary cannot disagree. Library modules
    never draw anything.

Exit codes of every long command: :data:`EXIT_OK` 0, :data:`EXIT_FAILED` 1 (an item has an
error record, written now or left by an earlier run), :data:`EXIT_USAGE` 2 (bad options, the job
cannot start), :data:`EXIT_MALFORMED` 3 (every item done, but a model output is malformed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tagfer.core.jsonl import drop_records, read_jsonl, remove_output

__all__ = [
    "Resume", "resume_from", "has_error", "ordered_map", "exit_with_parent",
    "JobResult", "JobRecorder", "SetupError", "Started", "Progress", "Skipped", "Done", "Event",
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_MALFORMED",
]

T = TypeVar("T")
R = TypeVar("R")

OK, FAILED, MALFORMED = "ok", "failed", "malformed"

EXIT_OK = 0  # every item done, every output well-formed
EXIT_FAILED = 1  # at least one requested item has an error record (now or from an earlier run)
EXIT_USAGE = 2  # bad options or config; the job cannot start
EXIT_MALFORMED = 3  # every item done, but at least one model output is malformed


def has_error(rec: dict) -> bool:
    """The default error test: the record's ``error`` is set."""
    return bool(rec.get("error"))


@dataclass
class Resume:
    """What an earlier run left: ``status`` maps each key to the status of its last record;
    ``retried``: error records dropped by ``retry_errors``."""

    status: dict[str, str] = field(default_factory=dict)
    retried: int = 0

    def __contains__(self, key: object) -> bool:
        return key in self.status

    @property
    def done(self) -> set[str]:
        return set(self.status)

    @property
    def failed(self) -> set[str]:
        return {k for k, s in self.status.items() if s == FAILED}

    def count(self, keys: Iterable[str], status: str = FAILED) -> int:
        """How many distinct ``keys`` have ``status`` (e.g. requested items that failed before)."""
        return sum(self.status.get(k) == status for k in set(keys))


def resume_from(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    key: str = "image",
    *,
    resume: bool = True,
    retry_errors: bool = False,
    is_error: Callable[[dict], bool] = has_error,
    status: Callable[[dict], str] | None = None,
) -> Resume:
    """Prepare the output file(s) ``paths`` for a run and read the keys already there.

    ``resume=False`` deletes them (start over); ``retry_errors`` drops the records for which
    ``is_error`` is true (atomic rewrite); ``status(record)`` names a record's outcome
    (default ``"failed"`` when ``is_error``, else ``"ok"``). Records without ``key`` are ignored.
    """
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    out = Resume()
    if not resume:
        for p in files:
            if p.exists():
                remove_output(p)
        return out
    if retry_errors:
        out.retried = sum(drop_records(p, is_error) for p in files if p.exists())
    classify = status or (lambda r: FAILED if is_error(r) else OK)
    for p in files:
        for rec in read_jsonl(p):
            if key in rec:
                out.status[str(rec[key])] = classify(rec)
    return out


# --------------------------------------------------------------------------- job result and events
class SetupError(ValueError):
    """A job that cannot start (bad options, a model or model file not available): exit code 2,
    raised before any item runs and before any output is written."""


MAX_LISTED = 20  # failed items named per error kind (the count stays exact)


@dataclass(frozen=True)
class Started:
    """The job will run ``total`` items (None when it cannot know, e.g. an open-ended stream)."""

    total: int | None


@dataclass(frozen=True)
class Progress:
    """One item finished: ``key`` names it; ``error`` is its error kind (None = done); ``status``
    ``"ok"`` | ``"failed"`` | ``"malformed"`` (done, but the model output breaks the grammar)."""

    key: str | None = None
    error: str | None = None
    status: str = OK


@dataclass(frozen=True)
class Skipped:
    """An item an earlier run did (``status`` of its record there: ok | failed | malformed)."""

    key: str | None = None
    status: str = OK


@dataclass(frozen=True)
class Done:
    """The job ended; ``result`` is the folded summary."""

    result: "JobResult"


Event = Started | Progress | Skipped | Done


@dataclass
class JobResult:
    """What one run of a job did, folded from its events (:meth:`apply`).

    ``processed``: items finished by this run (``failed`` and ``malformed`` among them);
    ``skipped``: items an earlier run did (``failed_before`` / ``malformed_before`` of them still
    have an error / a malformed output); ``errors``: error kind → count of this run,
    ``failed_items``: error kind → the first :data:`MAX_LISTED` keys; ``metrics``: the job's own
    figures, keyed ``"<job>/<name>"`` (``build/accepted``, ``eval/correct`` …); ``warnings``: notes
    for the user. JSON: :meth:`to_json`; text: :meth:`render`; exit code: :meth:`exit_code`.
    """

    job: str
    total: int | None = None
    processed: int = 0
    failed: int = 0
    malformed: int = 0
    skipped: int = 0
    failed_before: int = 0
    malformed_before: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    failed_items: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    # ---------------------------------------------------------------- folding
    def apply(self, event: Event) -> None:
        """Fold one event into the counts."""
        if isinstance(event, Started):
            self.total = event.total
        elif isinstance(event, Progress):
            self.processed += 1
            if event.error is not None or event.status == FAILED:
                kind = event.error or "error"
                self.failed += 1
                self.errors[kind] = self.errors.get(kind, 0) + 1
                listed = self.failed_items.setdefault(kind, [])
                if event.key is not None and len(listed) < MAX_LISTED:
                    listed.append(event.key)
            elif event.status == MALFORMED:
                self.malformed += 1
        elif isinstance(event, Skipped):
            self.skipped += 1
            self.failed_before += event.status == FAILED
            self.malformed_before += event.status == MALFORMED

    def metric(self, name: str, default: Any = 0) -> Any:
        """The job's metric ``name`` (stored as ``"<job>/<name>"``)."""
        return self.metrics.get(f"{self.job}/{name}", default)

    def set_metric(self, name: str, value: Any) -> None:
        self.metrics[f"{self.job}/{name}"] = value

    def add_metric(self, name: str, n: int | float = 1) -> None:
        key = f"{self.job}/{name}"
        self.metrics[key] = self.metrics.get(key, 0) + n

    # ---------------------------------------------------------------- reading
    @property
    def ok(self) -> int:
        """Items of this run without an error."""
        return self.processed - self.failed

    @property
    def any_failed(self) -> bool:
        """True while a requested item has an error record (written now or left by an earlier run)."""
        return bool(self.failed or self.failed_before)

    @property
    def throughput(self) -> float:
        """Items finished per second by this run."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def exit_code(self) -> int:
        """1 while an item has failed (now or before), else 3 while an output is malformed, else 0."""
        if self.any_failed:
            return EXIT_FAILED
        return EXIT_MALFORMED if self.malformed or self.malformed_before else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job, "total": self.total, "processed": self.processed, "failed": self.failed,
            "malformed": self.malformed, "skipped": self.skipped, "failed_before": self.failed_before,
            "malformed_before": self.malformed_before, "errors": dict(self.errors),
            "failed_items": {k: list(v) for k, v in self.failed_items.items()},
            "elapsed_s": round(self.elapsed_s, 3), "items_per_s": round(self.throughput, 3),
            "exit_code": self.exit_code(), "metrics": dict(self.metrics), "warnings": list(self.warnings),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (atomic replace)."""
        p = Path(path)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, p)
        return p

    def render(self, out: str | os.PathLike | None = None, noun: str = "item") -> str:
        """Plain-text summary for people: counts, error kinds with the items that failed, what is left."""
        parts = [f"{self.processed} {noun}(s) processed"]
        extra = []
        if self.failed:
            extra.append(f"{self.failed} failed")
        if self.malformed:
            extra.append(f"{self.malformed} malformed")
        if extra:
            parts[0] += f" ({', '.join(extra)})"
        parts.append(f"{self.skipped} already done")
        line = ", ".join(parts)
        if self.elapsed_s > 0 and self.processed:
            line += f" in {self.elapsed_s:.1f} s"
        if out is not None:
            line += f" → {out}"
        lines = [line]
        for kind in sorted(self.errors):
            names = self.failed_items.get(kind, [])
            more = self.errors[kind] - len(names)
            shown = ", ".join(names) + (f" and {more} more" if more > 0 else "")
            lines.append(f"  {kind} ({self.errors[kind]}): {shown}" if shown else f"  {kind}: {self.errors[kind]}")
        if self.failed_before:
            lines.append(f"{self.failed_before} requested {noun}(s) still have an error record from an earlier run "
                         "(--retry-errors runs them again)")
        if self.malformed_before:
            lines.append(f"{self.malformed_before} requested {noun}(s) have a malformed model output from an earlier run")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class JobRecorder:
    """Builds a :class:`JobResult` by folding events, and passes every event on to ``on_event``.

    A job calls :meth:`start`, then :meth:`item` / :meth:`skip` per item, and :meth:`finish`
    (which sets ``elapsed_s`` and sends :class:`Done`). Metrics go straight to ``result``.
    """

    def __init__(self, job: str, on_event: Callable[[Event], None] | None = None):
        self.result = JobResult(job)
        self.on_event = on_event
        self._t0 = time.monotonic()

    def emit(self, event: Event) -> None:
        self.result.apply(event)
        if self.on_event is not None:
            self.on_event(event)

    def start(self, total: int | None) -> None:
        self.emit(Started(total))

    def item(self, key: Any = None, error: str | None = None, status: str | None = None) -> None:
        st = status or (FAILED if error is not None else OK)
        self.emit(Progress(None if key is None else str(key), error, st))

    def skip(self, key: Any = None, status: str = OK) -> None:
        self.emit(Skipped(None if key is None else str(key), status))

    def finish(self) -> JobResult:
        self.result.elapsed_s = time.monotonic() - self._t0
        self.emit(Done(self.result))
        return self.result


# --------------------------------------------------------------------------- ordered map
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int, poll_s: float = 1.0, use_prctl: bool = True) -> str:
    """Make the calling (worker) process exit when the process ``parent_pid`` dies, even by SIGKILL.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere (or if prctl fails) a daemon
    thread polls ``os.getppid()`` every ``poll_s`` seconds. A parent that died before this
    call is caught by the ``getppid`` check. Returns the mechanism used (``"prctl"`` or ``"watchdog"``).
    """
    how = "watchdog"
    if use_prctl and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # orphaned already (the parent died before the signal was armed)
        os._exit(1)
    if how == "watchdog":

        def watch() -> None:
            while True:
                time.sleep(poll_s)
                if os.getppid() != parent_pid:
                    os._exit(1)

        threading.Thread(target=watch, name="tagfer-parent-watchdog", daemon=True).start()
    return how


def _process_init(parent_pid: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    exit_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    window: int | None = None,
    processes: bool = False,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    on_crash: Callable[[T], R] | None = None,
    name: str = "tagfer-job",
) -> Iterator[R]:
    """``fn(item)`` for each item, yielded in input order, at most ``window`` (default
    ``2 × workers``) items in flight. ``workers=0`` runs inline (no thread); one worker
    thread still overlaps ``fn`` with the consumer's own work.

    ``processes=True``: ``fn`` and the items must be picklable; ``initializer(*initargs)``
    runs once in each worker; a broken pool is rebuilt and the item that breaks it when run
    alone yields ``on_crash(item)`` (without ``on_crash`` the ``BrokenProcessPool`` is raised).
    An exception raised by ``fn`` propagates to the caller when its item's turn comes.
    """
    window = max(1, window or 2 * max(1, workers))
    if workers <= 0 and not processes:
        for it in items:
            yield fn(it)
        return
    if not processes:
        with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
            pending: deque[Future] = deque()
            try:
                for it in items:
                    pending.append(pool.submit(fn, it))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # closed early: drop what has not started
                for f in pending:
                    f.cancel()
        return
    yield from _process_map(fn, items, workers, window, initializer, initargs, on_crash)


def _submit(pool: ProcessPoolExecutor, fn: Callable, item: Any) -> Future:
    """``pool.submit``, or a future holding the ``BrokenProcessPool`` when the pool broke already."""
    try:
        return pool.submit(fn, item)
    except BrokenProcessPool as e:
        f: Future = Future()
        f.set_exception(e)
        return f


def _process_map(fn, items, workers, window, initializer, initargs, on_crash) -> Iterator:
    """The process flavour of :func:`ordered_map`. After a break, the items that were in flight
    are run again one at a time (``isolating``), so the one that kills a worker on its own is
    found exactly and its neighbours are not lost."""
    pending: deque[list] = deque()  # [item, future | None (not submitted yet)], input order
    isolating = 0  # head items still to run alone after a break

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, initializer=_process_init, initargs=(os.getpid(), initializer, initargs))

    pool = new_pool()
    try:
        it = iter(items)
        exhausted = False
        while True:
            while not isolating and not exhausted and len(pending) < window:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append([item, _submit(pool, fn, item)])
            if not pending:
                break
            head = pending[0]
            if head[1] is None:
                head[1] = _submit(pool, fn, head[0])
            try:
                res = head[1].result()
            except BrokenProcessPool:
                if on_crash is None:
                    raise
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
                if isolating:  # it ran alone: it is the culprit
                    pending.popleft()
                    isolating -= 1
                    yield on_crash(head[0])
                else:  # every item in flight is a suspect: run each alone
                    isolating = len(pending)
                for entry in pending:
                    if entry[1] is not None and not (entry[1].done() and entry[1].exception() is None):
                        entry[1] = None  # lost with the pool (a finished result is kept)
                continue
            pending.popleft()
            if isolating:
                isolating -= 1
            yield res
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
