"""tagfer.core.prefetch: a background-thread iterator that keeps order, re-raises and stops early."""

from __future__ import annotations

import pytest

from tagfer.core.prefetch import prefetch


def test_prefetch_keeps_order_raises_in_order_and_stops_early():
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def boom():
        yield 1
        yield 2
        raise ValueError("bad file")

    got = []
    with pytest.raises(ValueError, match="bad file"):
        for x in prefetch(boom()):
            got.append(x)
    assert got == [1, 2]
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    for x in prefetch(endless()):
        if x == 5:
            break
    assert closed == [True]  # the producer was closed, not left running
