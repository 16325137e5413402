"""JSON Lines on disk: crash-safe appends and resume bookkeeping.

Every long job in tagfer writes one JSON object per line and flushes after
each line. A run killed mid-write leaves at most one partial last line;
:class:`JsonlWriter` cuts it off when it reopens the file, so a resumed run
never sees a corrupt record and never loses a complete one. :func:`done_keys`
reads the keys already written so a resumed run skips them.

One run at a time per file: :class:`JsonlWriter` and :func:`drop_records` hold an advisory
lock (:func:`output_lock`: ``fcntl.flock`` on a sidecar ``.NAME.lock`` next to the file,
removed when released) while they append or rewrite. A second process on the same file gets
:class:`OutputLocked` at once (the CLI prints its message and exits 2) instead of writing
every record a second time. Locks are re-entrant within a process.
"""

from __future__ import annotations

import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]


class OutputLocked(RuntimeError):
    """Another process is writing the same JSONL file (it holds its lock)."""

    exit_code = 2

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.message = (f"{self.path} is being written by another run (lock {_lock_path(Path(path))} is held); "
                        "wait for it to finish or choose another --out")
        super().__init__(self.message)


def _cli_error(path: Path) -> OutputLocked:
    """:class:`OutputLocked`, also the CLI's ``ClickException`` (exit code 2), so that every ``tagfer``
    command prints the message and exits 2 without catching it itself (typer vendors click as
    ``typer._click``; typer is pinned in pyproject.toml)."""
    global _CLI_LOCKED
    if _CLI_LOCKED is None:
        try:
            from typer._click.exceptions import ClickException  # lazy: only when a lock is refused
        except ImportError:  # pragma: no cover - another typer: click's own
            try:
                from click import ClickException
            except ImportError:
                ClickException = None
        if ClickException is None:  # pragma: no cover
            _CLI_LOCKED = OutputLocked
        else:
            class _Locked(OutputLocked, ClickException):
                exit_code = 2

                def format_message(self) -> str:
                    return self.message

            _CLI_LOCKED = _Locked
    return _CLI_LOCKED(path)


_CLI_LOCKED: Any = None
_HELD: dict[str, list] = {}  # resolved data path -> [lock fd, lock path, count] (re-entrant in a process)
_HELD_LOCK = threading.Lock()


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _key(path: Path) -> str:
    return str(path.parent.resolve() / path.name)


def acquire_output_lock(path: str | os.PathLike) -> None:
    """Take the advisory lock of ``path`` (re-entrant within a process). Raises :class:`OutputLocked`
    at once if another process holds it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = _key(p)
    with _HELD_LOCK:
        if key in _HELD:
            _HELD[key][2] += 1
            return
        if fcntl is None:  # pragma: no cover
            _HELD[key] = [None, None, 1]
            return
        lp = _lock_path(p)
        for _ in range(100):
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _cli_error(p) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.stat(lp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                _HELD[key] = [fd, lp, 1]
                return
            os.close(fd)
        raise OSError(f"could not take the lock {lp}")  # pragma: no cover


def release_output_lock(path: str | os.PathLike) -> None:
    """Release one hold of ``path``'s lock; the last one removes the sidecar file and unlocks."""
    key = _key(Path(path))
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is None:
            return
        held[2] -= 1
        if held[2] > 0:
            return
        del _HELD[key]
        fd, lp = held[0], held[1]
        if fd is not None:
            try:
                os.unlink(lp)  # while still locked: a waiting opener sees the inode change and retries
            except OSError:
                pass
            os.close(fd)


def remove_output(path: str | os.PathLike) -> bool:
    """Delete ``path`` (a run that starts over) under its lock, so that a run still writing it is
    never left appending to a deleted file (:class:`OutputLocked` instead). True if it existed."""
    p = Path(path)
    with output_lock(p):
        try:
            p.unlink()
        except FileNotFoundError:
            return False
    return True


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the advisory lock of ``path`` (module docstring) for the ``with`` block."""
    acquire_output_lock(path)
    try:
        yield
    finally:
        release_output_lock(path)


def _truncate_partial_tail(path: Path) -> int:
    """Cut a trailing partial line (no final newline). Returns bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the previous newline.
        pos = size - 1
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                f.truncate(cut)
                return size - cut
            pos = start
        f.truncate(0)
        return size


class JsonlWriter:
    """Append JSON records to ``path``, one per line, flushed per record.

    ``fsync_every``: call ``os.fsync`` every N records (0 = never) for
    durability against power loss, not just process death.
    """

    def __init__(self, path: str | os.PathLike, fsync_every: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        acquire_output_lock(self.path)  # before the tail is cut: another run may be writing that line
        try:
            self.repaired_bytes = _truncate_partial_tail(self.path)
            self._f = open(self.path, "a", encoding="utf-8")
        except BaseException:
            release_output_lock(self.path)
            raise
        self.fsync_every = fsync_every
        self._n = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        self._f.write(line + "\n")
        self._f.flush()
        self._n += 1
        if self.fsync_every and self._n % self.fsync_every == 0:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.flush()
                self._f.close()
            finally:
                release_output_lock(self.path)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_INVALID = object()


def _parsed_lines(f) -> Iterator[tuple[int, str, Any]]:
    """(line number, stripped line, decoded value or ``_INVALID``) for each non-blank line."""
    for lineno, line in enumerate(f, 1):
        s = line.strip()
        if not s:
            continue
        try:
            yield lineno, s, json.loads(s)
        except json.JSONDecodeError:
            yield lineno, s, _INVALID


def read_jsonl(path: str | os.PathLike, skip_invalid: bool = True) -> Iterator[dict[str, Any]]:
    """Stream records from a JSONL file (a partial or corrupt line is skipped, or raises)."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, encoding="utf-8") as f:
        for lineno, _, rec in _parsed_lines(f):
            if rec is _INVALID and not skip_invalid:
                raise ValueError(f"{p}:{lineno}: invalid JSON line")
            if isinstance(rec, dict):
                yield rec


def done_keys(path: str | os.PathLike, key: str = "image", include: Callable[[dict], bool] | None = None) -> set[str]:
    """Keys of records already in ``path`` (only those for which ``include(record)`` is true)."""
    out: set[str] = set()
    for rec in read_jsonl(path):
        if key in rec and (include is None or include(rec)):
            out.add(str(rec[key]))
    return out


def drop_records(path: str | os.PathLike, predicate: Callable[[dict], bool]) -> int:
    """Rewrite ``path`` without the records matching ``predicate`` (atomic replace). Returns count dropped."""
    p = Path(path)
    if not p.exists():
        return 0
    with output_lock(p):
        return _drop_records(p, predicate)


def _drop_records(p: Path, predicate: Callable[[dict], bool]) -> int:
    _truncate_partial_tail(p)
    tmp = p.with_name(p.name + ".tmp")
    dropped = 0
    with open(p, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for _, s, rec in _parsed_lines(src):
            if rec is _INVALID or (isinstance(rec, dict) and predicate(rec)):
                dropped += 1
                continue
            dst.write(s + "\n")
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, p)
    return dropped



_DECODER = json.JSONDecoder()
# JSON's skeleton: a whole string (escapes included), a bracket, or a stray quote (an unterminated string).
_JSON_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]|"', re.DOTALL)
MAX_JSON_DEPTH = 64
# Fast refusal (in the regex engine) of the common too-deep shapes "{{{{…", "[[[…", '{"a":{"a":…'.
_TOO_DEEP = re.compile(r'(?:[\[{]\s*+(?:"(?:[^"\\]++|\\.)*+"\s*+:\s*+)?+){%d}' % (MAX_JSON_DEPTH + 1), re.DOTALL)


def decode_json_at(text: str, start: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON object or array beginning at ``text[start]``, else ``ValueError``.

    Equal to ``json.JSONDecoder().raw_decode(text, start)[0]`` for such a
    value, but a scan of the brackets and strings first finds where it closes,
    so a failed attempt costs at most the text up to its closing bracket (or
    ``max_depth`` levels of it), never ``len(text)``: ``raw_decode`` builds each
    error's line number from ``text[:start]``, and trying every ``{`` of a long
    reply that way is quadratic. Nesting deeper than ``max_depth`` is refused
    (no RecursionError).
    """
    if start >= len(text) or text[start] not in "{[":
        raise ValueError("no JSON object or array starts here")
    if max_depth == MAX_JSON_DEPTH and _TOO_DEEP.match(text, start):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    depth = 0
    for m in _JSON_TOKENS.finditer(text, start):
        tok = m.group()
        if tok == "{" or tok == "[":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels")
        elif tok == "}" or tok == "]":
            depth -= 1
            if depth == 0:
                return _DECODER.raw_decode(text[start : m.end()])[0]
        elif tok == '"':
            break  # an unterminated string: the value never closes
    raise ValueError("the JSON value is not closed")
