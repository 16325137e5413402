"""What a TAG answer is and how it is scored: the trace grammar (parser, format check,
conversions) and the rewards R = R_AU + R_ans + R_fmt (paper §3.3).

Modules: :mod:`.trace`, :mod:`.rewards`.

Nothing is imported here: ``import tagfer.traces`` stays cheap; import the modules.
"""
