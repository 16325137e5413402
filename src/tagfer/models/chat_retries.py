"""Retry policy and endpoint scheduling of :class:`tagfer.models.openai_client.ChatClient`.

Which failures are retried (:data:`RETRYABLE_STATUS`, :class:`AttemptError`), how long to
wait (:func:`backoff_s`, :func:`retry_after_s`) and which endpoint takes the next attempt
(:class:`Slots`: least in flight under per-endpoint and total limits, failing endpoints
ejected for a while). The rules themselves are described in the client's module docstring.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

__all__ = ["RETRYABLE_STATUS", "AttemptError", "Slots", "backoff_s", "retry_after_s"]

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx


class AttemptError(Exception):
    """One failed attempt (retryable or not); ``endpoint``: index of the endpoint that failed."""

    def __init__(self, kind: str, message: str, retryable: bool, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.endpoint: int | None = None


def backoff_s(retry: int, base_s: float, max_s: float, retry_after: float | None = None) -> float:
    """The wait before retry ``retry`` (1-based): ``min(max_s, base_s * 2**(retry-1)) * U(0.5, 1)``
    ("equal jitter"), or the server's ``Retry-After`` (capped at ``max_s``) when larger."""
    d = min(max_s, base_s * (2 ** (retry - 1))) * random.uniform(0.5, 1.0)
    if retry_after is not None:
        d = max(d, min(retry_after, max_s))
    return d


class Slots:
    """Least-in-flight endpoint choice under per-endpoint and total limits (one event loop).

    Ejection: after ``eject_after`` consecutive transport/5xx failures an endpoint "cools
    down" for ``min(cool_max, cool_base * 2**(streak - eject_after))`` seconds, during which
    it gets no new attempts while any other endpoint is healthy (a dead server fails fast, so
    least-in-flight alone would send it *more* work). The first attempt after the cool-down
    is a probe; a success resets the streak. When every endpoint is cooling, all are used.
    """

    def __init__(self, n: int, per_endpoint: int, total: int, eject_after: int = 3,
                 cool_base: float = 0.5, cool_max: float = 30.0):
        self.n = n
        self.per = per_endpoint
        self.total = total
        self.in_flight = [0] * n
        self.sum = 0
        self.served = [0] * n
        self.streak = [0] * n
        self.cool_until = [0.0] * n
        self.eject_after = eject_after
        self.cool_base = cool_base
        self.cool_max = cool_max
        self._rr = 0
        self._cond = asyncio.Condition()

    def _pick(self, avoid: int | None) -> int | None:
        if self.sum >= self.total:
            return None
        n, rr = self.n, self._rr
        cooling: list[bool] | None = None
        if self.eject_after > 0 and n > 1:
            now = time.monotonic()
            cooling = [t > now for t in self.cool_until]
            if all(cooling):
                cooling = None
        best, best_key = None, None
        for i in range(n):
            if cooling is not None and cooling[i]:
                continue
            k = self.in_flight[i]
            if k >= self.per:
                continue
            key = (i == avoid and n > 1, k, (i - rr) % n)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    def record(self, i: int, healthy: bool) -> None:
        """Update endpoint ``i``'s failure streak after an attempt (see class docstring)."""
        if healthy:
            self.streak[i] = 0
            self.cool_until[i] = 0.0
            return
        self.streak[i] += 1
        over = self.streak[i] - self.eject_after
        if self.eject_after > 0 and over >= 0:
            self.cool_until[i] = time.monotonic() + min(self.cool_max, self.cool_base * 2 ** min(over, 30))

    async def acquire(self, avoid: int | None = None) -> int:
        async with self._cond:
            while (i := self._pick(avoid)) is None:
                await self._cond.wait()
            self.in_flight[i] += 1
            self.sum += 1
            self._rr = (i + 1) % self.n
            return i

    async def release(self, i: int) -> None:
        async with self._cond:
            self.in_flight[i] -= 1
            self.sum -= 1
            self.served[i] += 1
            self._cond.notify()


def retry_after_s(value: str | None) -> float | None:
    """Seconds asked by a ``Retry-After`` header (delay seconds or an HTTP date; None if absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - time.time())
