"""Building TAG data (paper §4, Algorithm 1): dataset readers, the teacher's prompts and
checks, the builder, exports for the training frameworks, statistics.

Modules: :mod:`.source_record` (what a reader yields, split names), :mod:`.readers` (RAF-DB,
FERPlus, AffectNet, generic CSV/ImageFolder), :mod:`.sources` (the reader registry and
``KIND:PATH`` specs; re-exports the two before), :mod:`.teacher`, :mod:`.build`, :mod:`.export`,
:mod:`.stats`.

Nothing is imported here: ``import tagfer.data`` stays cheap; import the modules.
"""
