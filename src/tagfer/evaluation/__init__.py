"""Evaluation with the paper's protocol (§5): predictions and AU ground truth, metrics with
bootstrap CIs, paper-style tables, the LLM judge and the human A/B study app.

Modules: :mod:`.eval` (the run; re-exports :mod:`.predictions`, :mod:`.au_tables`,
:mod:`.scoring`), :mod:`.metrics`, :mod:`.report`, :mod:`.judge`, :mod:`.study`.

Nothing is imported here: ``import tagfer.evaluation`` stays cheap; import the modules.
"""
