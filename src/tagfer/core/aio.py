"""Running asyncio code from synchronous code: the one helper of the package.

:class:`LoopThread` is an event loop in a daemon thread that sync callers submit coroutines
to (a long-lived async client shared by many sync calls, e.g. the ``openai`` backend).
:func:`run_sync` runs one coroutine to completion from sync code, also when the calling
thread already runs a loop (a notebook, a server): then the coroutine runs on a
:class:`LoopThread` of its own and the caller blocks until it is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "run_sync"]

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread.

    ``submit(coro)`` returns a :class:`concurrent.futures.Future` (wrap it with
    :func:`asyncio.wrap_future` to await it from another loop); ``run(coro)`` blocks for the
    result; ``stop(finalize)`` cancels what is still pending, awaits ``finalize()`` (e.g. a
    client's ``aclose``) and ends the thread. Also a context manager (``stop`` on exit).
    """

    def __init__(self, name: str = "tagfer-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self, finalize: Callable[[], Awaitable[Any]] | None = None, timeout: float = 30.0) -> None:
        """Cancel pending tasks, await ``finalize()``, close async generators, stop the loop (idempotent)."""
        if self.loop.is_closed():
            return

        async def wind_down() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if finalize is not None:
                await finalize()
            await self.loop.shutdown_asyncgens()

        try:
            if self.loop.is_running():
                self.run(wind_down(), timeout=timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
            if not self.loop.is_running():
                self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, even if this thread already runs a loop.

    Without a running loop this is :func:`asyncio.run`; with one (which must not be blocked
    by a nested ``run_until_complete``) the coroutine runs on a fresh :class:`LoopThread`.
    Its exception, if any, is raised in the caller's thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with LoopThread("tagfer-run-sync") as runner:
        return runner.run(coro)
