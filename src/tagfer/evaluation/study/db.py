"""SQLite storage of the human A/B study, and its aggregation.

Schema (WAL journal; one connection per operation, so the web server's worker threads
never share one)::

    pairs(pair_id TEXT PRIMARY KEY, position INTEGER, a_name TEXT, b_name TEXT)
    evaluators(name TEXT PRIMARY KEY, created REAL, token_hash TEXT UNIQUE, name_key TEXT)
                                                       -- SHA-256 of the evaluator's session token;
                                                       -- name_key: name_key(name), one evaluator each
    shown(evaluator TEXT, pair_id TEXT, first TEXT CHECK(first IN ('a','b')),
          PRIMARY KEY (evaluator, pair_id))           -- the order shown, fixed once drawn
    votes(evaluator TEXT, pair_id TEXT, choice TEXT CHECK(choice IN ('A','B','tie')),
          winner TEXT CHECK(winner IN ('a','b','tie')), first TEXT, created REAL,
          UNIQUE (evaluator, pair_id))                 -- one vote per evaluator × pair

Each evaluator sees the pairs in their own order (*choice*: the pairs file order shuffled
with ``Random(f"{seed}:{name}")``, so evaluators do not all start on the same pairs), and
for each pair the two responses in an order drawn at random once (seeded by seed, name and
pair) and stored. Resuming = the first pair of the evaluator's sequence without a vote.

Evaluators: :meth:`StudyDB.register` issues a random token for a new name (only its SHA-256 is
stored); the name can then be taken up again only with that token, so nobody can vote as
somebody else. Names are strings of 1 to 80 printable characters (whitespace runs collapsed).
Two names are the same evaluator when their :func:`name_key` is equal (NFKC, case folded,
accents and other combining marks removed, Cyrillic and Greek letters that look like Latin ones
folded to them), so "Alice", "ＡＬＩＣＥ", "alicé" and an all-Cyrillic "аlісе" are one name; a
name that mixes Latin, Cyrillic, Greek or other look-alike alphabets is refused. A study takes
at most ``max_evaluators`` evaluators (:class:`StudyFull` beyond).

Aggregate (:func:`export`): per evaluator the percentages of votes for ``a``, ``b`` and tie;
the study's preference = the mean of those over evaluators (each evaluator weighs the same).
Agreement: mean pairwise percent agreement over evaluator pairs (on the pairs both rated)
and Fleiss' kappa over the pairs rated by every evaluator (categories a / b / tie).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import random
import sqlite3
import time
import unicodedata
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tagfer.evaluation.judge import Pair

__all__ = ["StudyDB", "DuplicateVote", "NameTaken", "StudyFull", "TooManyRegistrations", "clean_name", "name_key",
           "fleiss_kappa", "pairwise_agreement", "export"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs(pair_id TEXT PRIMARY KEY, position INTEGER NOT NULL, a_name TEXT, b_name TEXT);
CREATE TABLE IF NOT EXISTS evaluators(name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS shown(
  evaluator TEXT NOT NULL, pair_id TEXT NOT NULL, first TEXT NOT NULL CHECK(first IN ('a','b')),
  PRIMARY KEY (evaluator, pair_id));
CREATE TABLE IF NOT EXISTS votes(
  evaluator TEXT NOT NULL, pair_id TEXT NOT NULL,
  choice TEXT NOT NULL CHECK(choice IN ('A','B','tie')),
  winner TEXT NOT NULL CHECK(winner IN ('a','b','tie')),
  first TEXT NOT NULL, created REAL NOT NULL,
  UNIQUE (evaluator, pair_id));
"""

CATEGORIES = ("a", "b", "tie")


class DuplicateVote(ValueError):
    """The evaluator already voted on this pair (the first vote is kept)."""


class NameTaken(PermissionError):
    """The evaluator name is registered and the request did not carry its token."""


class StudyFull(PermissionError):
    """The study has its maximum number of evaluators; no new name is registered."""


class TooManyRegistrations(PermissionError):
    """This client registered too many new names lately (``retry_after``: seconds to wait)."""

    def __init__(self, message: str, retry_after: float = 60.0):
        super().__init__(message)
        self.retry_after = retry_after


MAX_NAME = 80
MAX_EVALUATORS = 200
# Letters of Cyrillic, Greek and Armenian that look like Latin ones (after case folding).
_CONFUSABLES = str.maketrans({
    "а": "a", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "ӏ": "l", 
    "о": "o", "р": "p", "с": "c", "ѕ": "s", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q", "ԝ": "w",
    "ɡ": "g", "ʏ": "y", "ᴠ": "v",
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "γ": "y", "ϲ": "c", "ϳ": "j", "ѵ": "v",
    "ո": "n", "ս": "u", "օ": "o", "ց": "g", "հ": "h", "զ": "q",
})
# Alphabets with letters that look alike: a name may use only one of them.
_LOOKALIKE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC", "GEORGIAN"})


def clean_name(name: Any) -> str:
    """The evaluator name with whitespace runs collapsed; ValueError unless it is a string of
    1 to 80 printable characters (null, numbers, lists, control or invisible characters are refused)."""
    if not isinstance(name, str):
        raise ValueError(f"an evaluator name must be a string, not {type(name).__name__}")
    if len(name) > 4 * MAX_NAME:  # refused before any work on a huge input
        raise ValueError(f"an evaluator name must have 1 to {MAX_NAME} characters")
    n = " ".join(name.split())
    if not n or len(n) > MAX_NAME:
        raise ValueError(f"an evaluator name must have 1 to {MAX_NAME} characters")
    if not n.isprintable():
        raise ValueError("an evaluator name must not hold control or invisible characters")
    _check_scripts(n)
    if not name_key(n):
        raise ValueError("an evaluator name must hold a visible character")
    return n


def _script(ch: str) -> str:
    """The alphabet of a letter, from its Unicode name ("CYRILLIC SMALL LETTER A" -> "CYRILLIC")."""
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


def name_key(name: str) -> str:
    """The identity of an evaluator name (module docstring): NFKC, case folded, combining marks
    removed, look-alike Cyrillic/Greek/Armenian letters folded to Latin, whitespace collapsed."""
    n = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", name).casefold())
    n = "".join(ch for ch in n if unicodedata.category(ch) not in ("Mn", "Me", "Cf"))
    n = unicodedata.normalize("NFKC", n).casefold().translate(_CONFUSABLES)
    return " ".join(n.split())


def _check_scripts(name: str) -> None:
    """ValueError for a name that mixes look-alike alphabets (Latin "alice" with a Cyrillic "а")."""
    scripts = {_script(ch) for ch in unicodedata.normalize("NFKC", name) if ch.isalpha()} & _LOOKALIKE_SCRIPTS
    if len(scripts) > 1:
        raise ValueError("an evaluator name must not mix alphabets (" + ", ".join(sorted(s.title() for s in scripts))
                         + "): letters that look alike would pass for another name")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class StudyDB:
    """The study database for one pairs list (pairs are registered on open)."""

    def __init__(self, path: str | os.PathLike, pairs: Sequence[Pair] = (), seed: int = 0,
                 max_evaluators: int = MAX_EVALUATORS):
        self.path = str(path)
        self.seed = seed
        if max_evaluators < 1:
            raise ValueError("max_evaluators must be >= 1")
        self.max_evaluators = max_evaluators
        self.pairs = list(pairs)
        self.by_id = {p.id: p for p in self.pairs}
        self.position = {p.id: i for i, p in enumerate(self.pairs)}
        if len(self.by_id) != len(self.pairs):
            raise ValueError("pair ids must be unique")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        init = sqlite3.connect(self.path, timeout=30)
        try:
            init.execute("PRAGMA journal_mode=WAL")
            init.executescript(_SCHEMA)
            cols = {r[1] for r in init.execute("PRAGMA table_info(evaluators)")}
            if "token_hash" not in cols:  # a database from before tokens: its evaluators claim one at their next start
                init.execute("ALTER TABLE evaluators ADD COLUMN token_hash TEXT")
            init.execute("CREATE UNIQUE INDEX IF NOT EXISTS evaluators_token ON evaluators(token_hash)")
            if "name_key" not in cols:  # a database from before name keys: computed once here
                init.execute("ALTER TABLE evaluators ADD COLUMN name_key TEXT")
            rows = init.execute("SELECT name FROM evaluators WHERE name_key IS NULL").fetchall()
            init.executemany("UPDATE evaluators SET name_key=? WHERE name=?", [(name_key(r[0]), r[0]) for r in rows])
            init.execute("CREATE INDEX IF NOT EXISTS evaluators_key ON evaluators(name_key)")
            init.commit()
        finally:
            init.close()
        with self.connect() as c:
            c.executemany(
                "INSERT OR IGNORE INTO pairs(pair_id, position, a_name, b_name) VALUES (?,?,?,?)",
                [(p.id, i, p.a.get("name"), p.b.get("name")) for i, p in enumerate(self.pairs)],
            )

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection: nothing can be written through it, and it takes no write lock."""
        c = sqlite3.connect(f"file:{Path(self.path).resolve().as_posix()}?mode=ro", uri=True, timeout=30)
        try:
            c.execute("PRAGMA busy_timeout=30000")
            yield c
        finally:
            c.close()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        c = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            c.execute("PRAGMA busy_timeout=30000")
            c.execute("BEGIN IMMEDIATE")
            yield c
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        finally:
            c.close()

    # ----------------------------------------------------------------- evaluators
    def register(self, name: Any, token: str | None = None, allow_new: Any = None) -> tuple[str, str]:
        """Start (or resume) a session: ``(name as registered, token)``. A new name gets a fresh
        token; a registered one (the same :func:`name_key`) needs its ``token`` (else
        :class:`NameTaken`). An evaluator stored without a token (older database, or votes through
        :meth:`vote` only) gets one now. A new evaluator beyond ``max_evaluators`` raises
        :class:`StudyFull`; ``allow_new()`` (the web app's rate limit) is asked before one is added
        and may raise :class:`TooManyRegistrations`."""
        name = clean_name(name)
        key = name_key(name)
        with self.connect() as c:
            row = c.execute("SELECT name, token_hash FROM evaluators WHERE name_key=? ORDER BY created LIMIT 1", (key,)).fetchone()
            if row is not None and row[1] is not None:
                if isinstance(token, str) and secrets.compare_digest(_token_hash(token), row[1]):
                    return row[0], token
                raise NameTaken(f"the name {name!r} is already in use; continue in the browser where it was "
                                "started, or choose another name")
            new = secrets.token_urlsafe(32)
            if row is None:
                (n,) = c.execute("SELECT COUNT(*) FROM evaluators").fetchone()
                if n >= self.max_evaluators:
                    raise StudyFull(f"the study is full: it takes {self.max_evaluators} evaluators")
                if allow_new is not None:
                    allow_new()
                c.execute("INSERT INTO evaluators(name, created, token_hash, name_key) VALUES (?,?,?,?)",
                          (name, time.time(), _token_hash(new), key))
            else:
                name = row[0]
                c.execute("UPDATE evaluators SET token_hash=? WHERE name=?", (_token_hash(new), name))
        return name, new

    def evaluator(self, token: Any) -> str | None:
        """The name registered with ``token`` (None for a missing or unknown token). Reads only."""
        if not isinstance(token, str) or not token or len(token) > 256:
            return None
        with self.reader() as c:
            row = c.execute("SELECT name FROM evaluators WHERE token_hash=?", (_token_hash(token),)).fetchone()
        return None if row is None else row[0]

    def sequence(self, name: str) -> list[str]:
        """The evaluator's pair order (a seeded shuffle of the pairs file order)."""
        ids = [p.id for p in self.pairs]
        random.Random(f"{self.seed}:{name}").shuffle(ids)
        return ids

    def voted(self, name: str) -> set[str]:
        with self.reader() as c:
            return {r[0] for r in c.execute("SELECT pair_id FROM votes WHERE evaluator=?", (name,))}

    def first_shown(self, name: str, pair_id: str, record: bool = True) -> str:
        """Which system is shown as "A" to this evaluator for this pair (drawn once, then stored;
        ``record=False`` only reads: the stored order, else the draw, without storing it)."""
        draw = "a" if random.Random(f"{self.seed}:{name}:{pair_id}").random() < 0.5 else "b"
        if not record:
            with self.reader() as c:
                row = c.execute("SELECT first FROM shown WHERE evaluator=? AND pair_id=?", (name, pair_id)).fetchone()
            return draw if row is None else row[0]
        with self.connect() as c:
            c.execute("INSERT OR IGNORE INTO shown(evaluator, pair_id, first) VALUES (?,?,?)", (name, pair_id, draw))
            return c.execute("SELECT first FROM shown WHERE evaluator=? AND pair_id=?", (name, pair_id)).fetchone()[0]

    def next_item(self, name: str, record: bool = True) -> dict[str, Any]:
        """The next unvoted pair for ``name`` with its responses in the stored order, or
        ``{"done": True}``. ``record=False`` writes nothing (the web app's GET)."""
        name = clean_name(name)
        seq = self.sequence(name)
        done = self.voted(name)
        status = {"evaluator": name, "total": len(seq), "completed": len(done & set(seq))}
        for pid in seq:
            if pid in done:
                continue
            pair = self.by_id[pid]
            first = self.first_shown(name, pid, record)
            second = "b" if first == "a" else "a"
            return {
                **status, "done": False, "pair_id": pid, "position": self.position[pid],
                "responses": {"A": getattr(pair, first)["text"], "B": getattr(pair, second)["text"]},
            }
        return {**status, "done": True}

    def vote(self, name: str, pair_id: str, choice: str) -> str:
        """Record a vote ("A", "B" or "tie" as shown); returns the winning system (a / b / tie)."""
        name = clean_name(name)
        if pair_id not in self.by_id:
            raise KeyError(f"unknown pair {pair_id!r}")
        choice = {"a": "A", "b": "B", "tie": "tie"}.get(str(choice).strip().lower())
        if choice is None:
            raise ValueError("choice must be A, B or tie")
        first = self.first_shown(name, pair_id)
        winner = "tie" if choice == "tie" else (first if choice == "A" else ("b" if first == "a" else "a"))
        try:
            with self.connect() as c:
                c.execute("INSERT OR IGNORE INTO evaluators(name, created, name_key) VALUES (?,?,?)",
                          (name, time.time(), name_key(name)))
                c.execute(
                    "INSERT INTO votes(evaluator, pair_id, choice, winner, first, created) VALUES (?,?,?,?,?,?)",
                    (name, pair_id, choice, winner, first, time.time()),
                )
        except sqlite3.IntegrityError as e:
            raise DuplicateVote(f"{name} already voted on pair {pair_id}") from e
        return winner


# ----------------------------------------------------------------------- agreement
def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of an ``items × categories`` count matrix (same number of raters per item ≥ 2).

    ``None`` when undefined (no item, fewer than 2 raters, or chance agreement of 1).
    """
    m = np.asarray(counts, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        return None
    n = m.sum(axis=1)
    if n.min() < 2 or not np.all(n == n[0]):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings per item")
    r = n[0]
    p_item = ((m * m).sum(axis=1) - r) / (r * (r - 1))
    p_bar = p_item.mean()
    p_cat = m.sum(axis=0) / m.sum()
    p_e = float((p_cat**2).sum())
    if p_e >= 1.0:
        return None
    return float((p_bar - p_e) / (1.0 - p_e))


def pairwise_agreement(votes: dict[str, dict[str, str]]) -> float | None:
    """Mean over evaluator pairs of the share of commonly rated pairs with the same winner (None if no overlap)."""
    vals = []
    for e1, e2 in combinations(sorted(votes), 2):
        common = set(votes[e1]) & set(votes[e2])
        if common:
            vals.append(sum(votes[e1][p] == votes[e2][p] for p in common) / len(common))
    return float(np.mean(vals)) if vals else None


def export(db_path: str | os.PathLike, out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Aggregate the votes of a study database (module docstring); writes JSON to ``out`` when given."""
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"study database {db_path} not found")
    c = sqlite3.connect(str(db_path))
    try:
        pairs = {r[0]: (r[1], r[2]) for r in c.execute("SELECT pair_id, a_name, b_name FROM pairs")}
        rows = list(c.execute("SELECT evaluator, pair_id, winner, first, choice FROM votes ORDER BY created"))
    finally:
        c.close()
    votes: dict[str, dict[str, str]] = {}
    first_wins = decisive = 0
    for ev, pid, winner, first, choice in rows:
        votes.setdefault(ev, {})[pid] = winner
        if choice in ("A", "B"):
            decisive += 1
            first_wins += choice == "A"
    per_eval = {}
    for ev, vs in votes.items():
        n = len(vs)
        per_eval[ev] = {"n": n, **{k: 100.0 * sum(v == k for v in vs.values()) / n for k in CATEGORIES}}
    pref = {k: (float(np.mean([p[k] for p in per_eval.values()])) if per_eval else None) for k in CATEGORIES}
    complete = [pid for pid in pairs if votes and all(pid in vs for vs in votes.values())]
    kappa = None
    if len(votes) >= 2 and complete:
        counts = np.array([[sum(vs[pid] == k for vs in votes.values()) for k in CATEGORIES] for pid in complete])
        kappa = fleiss_kappa(counts)
    names = next(iter(pairs.values()), (None, None))
    result = {
        "systems": {"a": names[0], "b": names[1]},
        "n_pairs": len(pairs),
        "n_evaluators": len(votes),
        "n_votes": len(rows),
        "preference_pct": pref,
        "per_evaluator": per_eval,
        "agreement": {
            "pairwise_percent": None if (pa := pairwise_agreement(votes)) is None else 100.0 * pa,
            "fleiss_kappa": kappa,
            "n_pairs_all_rated": len(complete),
        },
        "order_effect": {"decisive": decisive, "first_shown_wins_pct": 100.0 * first_wins / decisive if decisive else None},
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
