"""tagfer.core.aio: running coroutines from sync code, with or without a running loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tagfer.core.aio import LoopThread, run_sync


async def _where(value):
    await asyncio.sleep(0)
    return value, threading.current_thread().name


async def _boom():
    await asyncio.sleep(0)
    raise KeyError("boom")


def test_run_sync_without_a_loop_runs_here():
    assert run_sync(_where(3)) == (3, threading.current_thread().name)
    with pytest.raises(KeyError, match="boom"):
        run_sync(_boom())


def test_run_sync_inside_a_running_loop_uses_another_thread():
    async def caller():
        value, thread = run_sync(_where("x"))  # a nested asyncio.run would raise here
        with pytest.raises(KeyError):
            run_sync(_boom())
        return value, thread

    value, thread = asyncio.run(caller())
    assert value == "x" and thread == "tagfer-run-sync"
    assert not any(t.name == "tagfer-run-sync" for t in threading.enumerate())  # its thread ended


def test_loop_thread_serves_several_threads_and_stops_cleanly():
    runner = LoopThread("t-loop")
    results = []

    def worker(i):
        results.append(runner.run(_where(i))[1])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["t-loop"] * 8

    pending = runner.submit(asyncio.sleep(3600))
    closed = []

    async def finalize():
        closed.append(asyncio.get_running_loop() is runner.loop)

    runner.stop(finalize)
    assert pending.cancelled() and closed == [True]
    assert not runner.thread.is_alive() and runner.loop.is_closed()
    runner.stop()  # idempotent


def test_loop_thread_context_manager():
    with LoopThread() as runner:
        fut = runner.submit(_where(1))
        assert fut.result(5)[0] == 1
    assert runner.loop.is_closed()
