"""The one progress display of every long command (rich), driven by the job events of
:mod:`tagfer.core.jobs` (``Started`` / ``Progress`` / ``Skipped`` / ``Done``).

A job hands each event to :class:`JobProgress` (it is the job's ``on_event``); the bar knows
its total as soon as the job does (``Started(total)``), counts failures from the same events the
job's :class:`tagfer.core.jobs.JobResult` is folded from, and draws nothing when disabled
(``--no-progress``). Library modules never draw: this is the only place that does.
"""

from __future__ import annotations

from typing import Any

from tagfer.cli._app import console as _console

__all__ = ["JobProgress"]


class JobProgress:
    """A rich progress bar for one job: ``with JobProgress("au") as bar: run(..., on_event=bar)``.

    ``label``: the text before the bar; ``unit``: what an item is (shown after the count);
    ``total``: known before the job starts (else ``Started`` sets it). :meth:`note` sets a short
    live text after the counts (eval's running accuracy, build's accepted/rejected).
    """

    def __init__(self, label: str, *, enabled: bool = True, total: int | None = None, unit: str = "",
                 console: Any = None):
        self.label, self.unit, self.enabled = label, unit, enabled
        self.console = console or _console
        self.failed = 0
        self._total = total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "JobProgress":
        if self.enabled:
            # lazy (start-up time): rich.progress
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}{task.fields[failed]}{task.fields[note]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self._total, unit=self._unit_text(), failed="", note="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            if self._total is None:  # an open-ended job: the bar ends full, at what was done
                self._update(total=self._bar.tasks[0].completed)
            self._bar.__exit__(*exc)
            self._bar = None

    def _unit_text(self) -> str:
        return self.unit

    def _update(self, **kw: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, **kw)

    def __call__(self, event: Any) -> None:
        """Take one job event (the job's ``on_event``)."""
        from tagfer.core.jobs import Done, Progress, Started  # lazy: keeps `tagfer --help` fast

        if isinstance(event, Started):
            self._total = event.total
            self._update(total=event.total)
        elif isinstance(event, Progress):
            self.failed += event.error is not None or event.status == "failed"
            self._update(advance=1, failed=f", {self.failed} failed" if self.failed else "")
        elif isinstance(event, Done) and self._bar is not None and self._total is None:
            self._total = self._bar.tasks[0].completed  # an open-ended job: the bar ends full
            self._update(total=self._total)

    def note(self, text: str) -> None:
        """A short live text after the counts (e.g. ``acc 71.2%``)."""
        self._update(note=f"  {text}" if text else "")
