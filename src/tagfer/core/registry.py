"""One registry for every pluggable part named by a ``KIND:TARGET`` spec (timm-style).

Model backends (``hf:PATH``, ``openai:URL``), dataset readers (``rafdb:/data/RAF-DB?variant=original``),
AU detectors (``mediapipe``, ``openface:out.csv``) and VLM families (``qwen2_5_vl``) are each one
:class:`Registry`. Adding a kind is one decorator::

    from tagfer.data.sources import READERS

    @READERS.register("mydata", aliases=("md",), help="my CSV layout")
    def read_mydata(path, split, *, stats=None, include_excluded=False, **opts): ...

    open_source("mydata:/d/x.csv?fold=2")   # now works everywhere a source spec is accepted

API (stable)
------------
``Registry(name, *, usage="KIND:TARGET", default=None, options=True, error=SpecError)``
    ``name`` names the registry in messages (``"data source"``); ``default``: the kind a spec
    without a known ``KIND:`` prefix means (a bare path), None: such a spec is an error;
    ``options``: whether ``?k=v&k2=v2`` after the target are parsed into :attr:`Spec.options`;
    ``error``: the exception class raised for a bad spec (a ``ValueError`` subclass by default).
``register(kind, obj=None, *, aliases=(), help="", needs_target=True, usage="", claims=())``
    Adds ``obj`` under ``kind`` (lower-case, 2+ characters); without ``obj`` it returns a
    decorator (which returns the object unchanged). ``needs_target=False``: ``KIND`` alone is a
    whole spec (``facs``, ``mediapipe``); ``claims``: prefixes that are not kinds but whose
    whole spec belongs to this kind as its target (``http``/``https`` → ``openai``).
    Re-registering a kind replaces it (with a ``RuntimeWarning`` if the object differs).
``parse(spec) -> Spec(kind, target, options)``
    Splits on the first ``:``. A head of one character is a drive letter (``C:\\x`` is a path);
    a head that is not a known kind or alias but looks like one (a word of 2+ characters) raises
    :attr:`error` listing the valid kinds, with "did you mean X?" — unless the whole spec is an
    existing path and a ``default`` kind is set. Options: ``?k=v&k2=v2`` (percent-decoded).
``get(kind) -> obj`` (also ``registry[kind]``); ``entry(kind) -> Entry``; ``kind in registry``
(aliases included)
``create(spec, *args, **kw)``
    ``obj(target, *args, **{**options, **kw})`` for the parsed spec (keyword arguments win over
    spec options); an option a builder without ``**kwargs`` does not take raises :attr:`error`
    naming those it takes. A registry whose objects are not builders just uses :meth:`get`.
``load_plugins()``
    Imports the modules named in ``$TAGFER_PLUGINS`` (comma-separated module names or ``.py``
    paths), once; a registry does it by itself before it calls a kind unknown, and before
    listing. This is how a kind registered in the user's own module reaches the ``tagfer`` CLI
    and worker processes: ``TAGFER_PLUGINS=my_detectors tagfer au --detector graphau:x.csv``.
``list(pattern=None) -> list[str]``
    Kind names (no aliases), sorted, filtered by an fnmatch ``pattern``. ``usages()`` gives the
    spec forms (``"openface:CSV"``) for help texts; ``str(Spec)`` writes a spec back.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import quote, unquote

__all__ = ["Registry", "Spec", "Entry", "SpecError", "KIND_WORD", "load_plugins", "PLUGINS_ENV"]

#: Environment variable naming the plugin modules (comma-separated names or ``.py`` paths).
PLUGINS_ENV = "TAGFER_PLUGINS"
_loaded: set[str] = set()


def load_plugins(names: str | None = None) -> list[str]:
    """Import each plugin module of ``names`` (default ``$TAGFER_PLUGINS``) not imported yet; returns
    the ones imported now. A module that fails to import raises ``ImportError`` naming it."""
    text = os.environ.get(PLUGINS_ENV, "") if names is None else names
    done = []
    for name in (n.strip() for n in text.split(",")):
        if not name or name in _loaded:
            continue
        _loaded.add(name)
        try:
            if name.endswith(".py"):
                mod_name = "tagfer_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(name))[0])
                spec = importlib.util.spec_from_file_location(mod_name, name)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {name}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except Exception as e:
            _loaded.discard(name)
            raise ImportError(f"tagfer plugin {name!r} (from ${PLUGINS_ENV}) failed to import: {e}") from e
        done.append(name)
    return done


class SpecError(ValueError):
    """A ``KIND:TARGET`` spec that no registry entry accepts (unknown kind, missing target)."""


#: What a kind looks like: a letter then 1+ of letters, digits, ``_ + . -`` (so ``C:`` is a drive).
KIND_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]+")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``kind`` (canonical, aliases resolved), ``target`` (may be empty), ``options``."""

    kind: str
    target: str = ""
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        s = f"{self.kind}:{self.target}" if self.target else self.kind
        if self.options:
            s += "?" + "&".join(f"{quote(k, safe='')}={quote(str(v), safe='')}" for k, v in self.options.items())
        return s


@dataclass(frozen=True)
class Entry:
    """One registered kind."""

    name: str
    obj: Any
    aliases: tuple[str, ...] = ()
    help: str = ""
    needs_target: bool = True
    usage: str = ""
    claims: tuple[str, ...] = ()


def _check_kind(kind: str) -> str:
    k = str(kind).strip().lower()
    if not KIND_WORD.fullmatch(k):
        raise ValueError(f"a kind is a word of 2+ characters starting with a letter (got {kind!r})")
    return k


class Registry:
    """Kinds of one pluggable part (see the module docstring for the full API)."""

    def __init__(self, name: str, *, usage: str = "KIND:TARGET", default: str | None = None, options: bool = True,
                 error: type[Exception] = SpecError):
        self.name = name
        self.usage = usage
        self.default = default
        self.options = options
        self.error = error
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._claims: dict[str, str] = {}

    # -- registering ------------------------------------------------------------------------
    def register(self, kind: str, obj: Any = None, *, aliases: Iterable[str] = (), help: str = "",
                 needs_target: bool = True, usage: str = "", claims: Iterable[str] = ()) -> Any:
        """Add ``obj`` as ``kind``; without ``obj``, a decorator that does so and returns its argument."""
        if obj is None:
            def deco(o: Any) -> Any:
                self.register(kind, o, aliases=aliases, help=help, needs_target=needs_target, usage=usage, claims=claims)
                return o
            return deco
        k = _check_kind(kind)
        al = tuple(_check_kind(a) for a in aliases)
        cl = tuple(str(c).lower() for c in claims)
        old = self._entries.get(k)
        if old is not None and old.obj is not obj:
            warnings.warn(f"{self.name} kind {k!r} re-registered: {old.obj!r} replaced by {obj!r}", RuntimeWarning,
                          stacklevel=2)
        if old is not None:
            self._drop(k)
        self._aliases.pop(k, None)
        self._entries[k] = Entry(k, obj, al, help, needs_target,
                                 usage or (f"{k}:TARGET" if needs_target else k), cl)
        for a in al:
            if a != k:
                self._aliases[a] = k
        for c in cl:
            self._claims[c] = k
        return obj

    def _drop(self, k: str) -> None:
        self._entries.pop(k, None)
        for d in (self._aliases, self._claims):
            for a in [a for a, t in d.items() if t == k]:
                del d[a]

    def unregister(self, kind: str) -> None:
        """Remove ``kind`` (and its aliases); a no-op if it is not registered."""
        self._drop(self._aliases.get(kind.lower(), kind.lower()))

    # -- looking up -------------------------------------------------------------------------
    def canonical(self, kind: str) -> str | None:
        """The registered name of ``kind`` or of the alias ``kind``; None if neither (after loading
        the ``$TAGFER_PLUGINS`` modules not loaded yet)."""
        k = str(kind).strip().lower()
        if self._aliases.get(k, k) not in self._entries:
            load_plugins()  # a plugin may register it
        k = self._aliases.get(k, k)
        return k if k in self._entries else None

    def __contains__(self, kind: object) -> bool:
        return isinstance(kind, str) and self.canonical(kind) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, kind: str) -> Entry:
        """The :class:`Entry` of ``kind`` (an alias works); :attr:`error` with suggestions if unknown."""
        k = self.canonical(kind)
        if k is None:
            raise self.error(self._unknown(kind, kind))
        return self._entries[k]

    def get(self, kind: str) -> Any:
        """The object registered as ``kind`` (an alias works)."""
        return self.entry(kind).obj

    __getitem__ = get

    def list(self, pattern: str | None = None) -> list[str]:
        """Kind names (aliases left out), sorted; ``pattern``: an fnmatch filter (``"open*"``)."""
        load_plugins()
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern.lower())] if pattern else names

    def usages(self) -> list[str]:
        """The spec form of every kind (``"openface:CSV"``), for help texts and errors."""
        return [self._entries[n].usage for n in self.list()]

    def _unknown(self, head: str, spec: str) -> str:
        known = list(self._entries) + list(self._aliases)
        close = difflib.get_close_matches(str(head).lower(), known, n=1, cutoff=0.6)
        where = "" if str(head) == str(spec) else f" in {spec!r}"
        parts = [f"unknown {self.name} kind {head!r}{where}"]
        if close:
            parts.append(f"did you mean {self._aliases.get(close[0], close[0])!r}?")
        parts.append(f"valid kinds: {', '.join(self.usages()) or '(none registered)'}"
                     + (f" (a bare path means {self.default})" if self.default else ""))
        return "; ".join(parts)

    # -- specs ------------------------------------------------------------------------------
    def _split_options(self, target: str, spec: str) -> tuple[str, dict[str, str]]:
        if not self.options or "?" not in target:
            return target, {}
        target, _, q = target.partition("?")
        opts: dict[str, str] = {}
        for part in q.split("&"):
            if not part:
                continue
            key, _, val = part.partition("=")
            key = unquote(key).strip()
            if not key:
                raise self.error(f"{self.name} spec {spec!r}: option {part!r} has no name (use ?key=value&key2=value2)")
            opts[key] = unquote(val).strip()
        return target, opts

    def parse(self, spec: str) -> Spec:
        """``"KIND:TARGET?k=v"`` → :class:`Spec` (see the module docstring for the rules)."""
        if isinstance(spec, Spec):
            return spec
        s = str(spec).strip()
        if not s:
            raise self.error(f"empty {self.name} spec; use one of: {', '.join(self.usages())}")
        head, sep, rest = s.partition(":")
        low = head.lower()
        if sep and low in self._claims:
            kind = self._claims[low]
            target, opts = self._split_options(s, s)
            return Spec(kind, target, opts)
        kind = self.canonical(low) if KIND_WORD.fullmatch(head) else None
        if kind is not None:
            e = self._entries[kind]
            if sep or not e.needs_target:
                target, opts = self._split_options(rest.strip(), s) if sep else ("", {})
                if e.needs_target and not target:
                    raise self.error(f"{self.name} spec {s!r} has nothing after '{head}:' (use {e.usage})")
                return Spec(kind, target, opts)
        if self.default is not None:
            if sep and KIND_WORD.fullmatch(head) and not os.path.exists(s.partition("?")[0]):
                raise self.error(self._unknown(head, s))
            target, opts = self._split_options(s, s)
            if not target:
                raise self.error(f"{self.name} spec {s!r} has no path")
            return Spec(self.default, target, opts)
        raise self.error(self._unknown(head, s))

    def create(self, spec: str | Spec, *args: Any, **kw: Any) -> Any:
        """``obj(target, *args, **options, **kw)`` for the kind of ``spec`` (``kw`` overrides spec options).

        A builder without ``**kwargs`` that does not take an option gets no call: :attr:`error`
        names the options it takes (a typo in ``?vote=`` is not a ``TypeError`` deep inside)."""
        p = self.parse(spec)
        obj = self._entries[p.kind].obj
        merged = {**p.options, **kw}
        self._check_options(p.kind, obj, 1 + len(args), merged)
        return obj(p.target, *args, **merged)

    def _check_options(self, kind: str, obj: Any, n_positional: int, options: Mapping[str, Any]) -> None:
        try:
            params = list(inspect.signature(obj).parameters.values())
        except (TypeError, ValueError):  # not introspectable: let the call decide
            return
        if any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params):
            return
        named = [q for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
        takes = [q.name for q in named if q.kind is q.KEYWORD_ONLY or params.index(q) >= n_positional]
        bad = sorted(set(options) - set(takes))
        if bad:
            raise self.error(f"{self.name} kind {kind!r} has no option {', '.join(map(repr, bad))}; "
                             f"it takes: {', '.join(takes) or 'none'}")

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, kinds={self.list()})"
