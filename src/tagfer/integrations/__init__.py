"""Adapters from :mod:`tagfer.traces.rewards` to RL trainers.

* :mod:`tagfer.integrations.trl` — reward callables for TRL's ``GRPOTrainer``.
* :mod:`tagfer.integrations.verl` — ``compute_score`` for verl's custom reward function.

Neither module imports its trainer, so both import (and are tested) without it.
"""
