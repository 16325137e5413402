"""What a TAG answer is and how it is scored: the trace grammar (parser, format check,
conversions) and the rewards R = R_AU + R_ans + R_fmt (paper §3.3).

Modules: :mod:`.boxtags` (what a box tag is: the one definition, and the box limit),
:mod:`.convert` (texts written around a trace: the box spelling, AU_LIST, teacher tags →
SFT, the no-bbox ablation), :mod:`.trace` (the one parser, :func:`~.trace.parse_trace`;
re-exports :mod:`.convert`), :mod:`.rewards`.

Nothing is imported here: ``import tagfer.traces`` stays cheap; import the modules.
"""
