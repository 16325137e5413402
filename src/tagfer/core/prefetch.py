"""``prefetch``: run an iterator in a background thread a few items ahead of its consumer.

Used to overlap decoding (PyAV releases the GIL) with detection (MediaPipe releases it too):
the video job and the annotated-clip renderer read their frames through it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, at most ``depth`` ahead (e.g. decoding overlaps the
    landmarker, which releases the GIL); exceptions are re-raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer
            put((done, e))
        finally:
            close = getattr(items, "close", None)
            if close is not None and stop.is_set():
                close()

    th = threading.Thread(target=work, name="tagfer-prefetch", daemon=True)
    th.start()
    try:
        while True:
            x, err = q.get()
            if x is done:
                if err is not None:
                    raise err
                return
            yield x
    finally:
        stop.set()
        th.join()

