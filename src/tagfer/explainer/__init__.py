"""The explainer: a grounded, checkable explanation per face (`tagfer analyze`) and the
local web page and JSON API (`tagfer serve`, page files in `web/`).

Modules: :mod:`.analyze`, :mod:`.serve`.

Nothing is imported here: ``import tagfer.explainer`` stays cheap; import the modules.
"""
