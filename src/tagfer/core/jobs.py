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
"""

from __future__ import annotations

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

__all__ = ["Resume", "resume_from", "has_error", "ordered_map", "exit_with_parent"]

T = TypeVar("T")
R = TypeVar("R")

OK, FAILED = "ok", "failed"


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
