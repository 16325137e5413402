"""Calling a model: prompt templates, VLM loading and generation, the tiny test model, the
OpenAI-compatible client and the one inference interface (backends) over all of them.

Modules: :mod:`.prompts`, :mod:`.vlm`, :mod:`.families`, :mod:`.tiny`, :mod:`.openai_client`,
:mod:`.backends`.

Nothing is imported here: ``import tagfer.models`` stays cheap; import the modules.
"""
