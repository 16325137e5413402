"""Human A/B preference study: a small FastAPI + SQLite web app served on localhost.

``tagfer study serve --pairs PAIRS.jsonl --db study.sqlite`` shows each evaluator (who
enters a name) the image and the two anonymised responses of every pair (from
:func:`tagfer.evaluation.judge.make_pairs`), in an order drawn at random and stored per
evaluator × pair, and records A / B / tie. ``tagfer study export`` aggregates the votes
(:func:`tagfer.evaluation.study.db.export`).

Modules: :mod:`tagfer.evaluation.study.db` (schema, votes, aggregation and agreement),
:mod:`tagfer.evaluation.study.app` (the HTTP API, the page in ``static/``, a threaded server for tests).
"""

from tagfer.evaluation.study.db import StudyDB, export, fleiss_kappa, pairwise_agreement

__all__ = ["StudyDB", "export", "fleiss_kappa", "pairwise_agreement"]
