"""The explainer: a grounded, checkable explanation per face (`tagfer analyze`) and the
local web page and JSON API (`tagfer serve`, page files in `web/`).

Modules: :mod:`.analyze` (the :class:`Analyzer`), :mod:`.records` (what it returns), :mod:`.frames`,
:mod:`.overlay`, :mod:`.batch` (folders, resumable JSON Lines), :mod:`.serve`.

Nothing is imported here: ``import tagfer.explainer`` stays cheap; import the modules.
"""
