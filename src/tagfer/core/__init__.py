"""Shared ground of every stage: the 512 canvas, the 7 labels, the training-sample record,
image and JSON Lines I/O, per-item errors, the job runner, sample faces, trusted hosts.

Modules: :mod:`.canvas`, :mod:`.labels`, :mod:`.records`, :mod:`.errors`, :mod:`.imageio`,
:mod:`.jsonl`, :mod:`.jobs`, :mod:`.samples`, :mod:`.trusted_hosts`.

Nothing is imported here: ``import tagfer.core`` stays cheap; import the modules.
"""
