"""The per-item error every long job records instead of crashing its batch."""

from __future__ import annotations


class ItemError(Exception):
    """One input that cannot be used. ``kind`` is a stable machine-readable code; ``message`` says why."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message
