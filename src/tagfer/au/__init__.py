"""AU grounding (paper §3.1): face landmarks → Action Unit scores and canvas boxes, the
detectors, the `tagfer au` job, overlays, the FACS-prototype engine, and videos.

Modules: :mod:`.faces`, :mod:`.aus`, :mod:`.detectors`, :mod:`.grounding`, :mod:`.overlay`,
:mod:`.facs`, :mod:`.video`, :mod:`.video_render`.

Nothing is imported here: ``import tagfer.au`` stays cheap; import the modules.
"""
