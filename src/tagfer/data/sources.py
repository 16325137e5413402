"""Dataset sources: a ``KIND:PATH?key=value`` spec → a stream of :class:`SourceRecord`.

The entry point of the data layer's input side. :func:`open_source` opens a spec through
:data:`READERS`, the one registry of dataset readers (:class:`tagfer.core.registry.Registry`);
add a reader with ``@READERS.register("mydata")`` (docs/data.md).

The parts, one module each:

* :mod:`tagfer.data.source_record` — the record type (:class:`SourceRecord`), its counters
  (:class:`SourceStats`), split names (:func:`canonical_split`) and the counting/exclusion rule
  every reader applies (``_emit``);
* :mod:`tagfer.data.readers` — the built-in readers, RAF-DB, FERPlus (with its vote policy),
  AffectNet and a generic CSV / ImageFolder; their module docstring lists which official split
  each canonical split name means and how labels are mapped or excluded;
* this module — the registry, spec parsing and :func:`open_source`.

Every public name of the two other modules is importable from here as well
(``from tagfer.data.sources import read_rafdb, SourceRecord``).
"""

from __future__ import annotations

from typing import Any, Iterator

from tagfer.core.registry import Registry
from tagfer.data.readers import (AFFECTNET_CODES, FERPLUS_COLUMNS, RAFDB_CODES, ferplus_vote, read_affectnet, read_ferplus,
                                 read_generic, read_rafdb)
# _emit: the counting rule a user's own reader calls (docs/data.md imports it from here).
from tagfer.data.source_record import SourceRecord, SourceStats, _emit, canonical_split

__all__ = [
    "SourceRecord",
    "SourceStats",
    "READERS",
    "source_kinds",
    "RAFDB_CODES",
    "AFFECTNET_CODES",
    "FERPLUS_COLUMNS",
    "canonical_split",
    "read_rafdb",
    "read_ferplus",
    "read_affectnet",
    "read_generic",
    "parse_source_spec",
    "open_source",
    "ferplus_vote",
]

#: The dataset readers, one :class:`tagfer.core.registry.Registry`: a spec ``KIND:PATH?k=v``
#: (a bare path is ``generic``). A reader is ``reader(path, split, *, stats=None,
#: include_excluded=False, **options)`` yielding :class:`SourceRecord`; add one with
#: ``@READERS.register("mydata")`` (see docs/data.md).
READERS = Registry("data source", usage="KIND:PATH[?key=value&...]", default="generic")
READERS.register("rafdb", read_rafdb, aliases=("raf-db", "raf"), usage="rafdb:DIR[?variant=aligned|original]",
                 help="RAF-DB basic (EmoLabel/list_patition_label.txt)")
READERS.register("ferplus", read_ferplus, aliases=("fer+",), usage="ferplus:DIR[?vote=plurality|majority&ties=exclude|first]",
                 help="FERPlus (fer2013.csv + fer2013new.csv, or the image folders)")
READERS.register("affectnet", read_affectnet, usage="affectnet:DIR", help="AffectNet (CSV lists or train_set/val_set)")
READERS.register("generic", read_generic, aliases=("csv", "folder", "imagefolder"), usage="generic:CSV|DIR[?source=NAME]",
                 help="a path,label CSV or an ImageFolder")


def source_kinds() -> list[str]:
    """The registered reader kinds (built-in and user-added)."""
    return READERS.list()


def parse_source_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"rafdb:/data/RAF-DB"`` → ``("rafdb", "/data/RAF-DB", {})`` (:meth:`READERS.parse <tagfer.core.registry.Registry.parse>`).

    Kinds: rafdb, ferplus, affectnet, generic (aliases raf-db, fer+, csv, folder) and any
    registered with :data:`READERS`. Reader options may follow after ``?``:
    ``"ferplus:/data/FERPlus?vote=majority&ties=first"``, ``"rafdb:/d?variant=original"``,
    ``"generic:/d/x.csv?source=mydata"``. A bare path is a generic source; Windows drive
    letters (``C:\\...``) are not kinds; ``word:...`` with an unknown word (and no such file)
    is a ``ValueError`` that lists the kinds.
    """
    s = READERS.parse(spec)
    return s.kind, s.target, dict(s.options)


def open_source(
    spec: str,
    split: str = "train",
    *,
    stats: SourceStats | None = None,
    include_excluded: bool = False,
    **options: Any,
) -> Iterator[SourceRecord]:
    """Stream the records of ``spec`` (see :func:`parse_source_spec`) for ``split``.

    ``options`` are passed to the reader (they override options in the spec); an option the
    reader does not take is a ``ValueError`` naming the ones it does
    (:meth:`tagfer.core.registry.Registry.create`).
    Example: ``for rec in open_source("rafdb:/data/RAF-DB", split="test"): ...``
    """
    return READERS.create(spec, split, stats=stats, include_excluded=include_excluded, **options)
