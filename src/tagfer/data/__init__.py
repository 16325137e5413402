"""Building TAG data (paper §4, Algorithm 1): dataset readers, the teacher's prompts and
checks, the builder, exports for the training frameworks, statistics.

Modules: :mod:`.sources`, :mod:`.teacher`, :mod:`.build`, :mod:`.export`, :mod:`.stats`.

Nothing is imported here: ``import tagfer.data`` stays cheap; import the modules.
"""
