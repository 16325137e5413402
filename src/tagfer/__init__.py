"""tagfer — TAG: Thinking with Action Unit Grounding for Facial Expression Recognition.

The code is grouped by the paper's flow; each subpackage imports only from those before it:

* :mod:`tagfer.core` — the canvas, labels, the training-sample record, I/O, the job runner;
* :mod:`tagfer.traces` — the trace grammar and the verifiable rewards;
* :mod:`tagfer.au` — AU grounding (faces → AUs → canvas boxes), the FACS engine, videos;
* :mod:`tagfer.models` — prompts, VLM loading, the OpenAI-compatible client, backends;
* :mod:`tagfer.data` — dataset readers, the teacher, Algorithm 1, exports, statistics;
* :mod:`tagfer.integrations`, :mod:`tagfer.train` — reward adapters; SFT and GRPO;
* :mod:`tagfer.evaluation` — predictions, metrics, tables, the judge, the human study;
* :mod:`tagfer.explainer` — ``tagfer analyze`` and ``tagfer serve``;
* :mod:`tagfer.cli` — the ``tagfer`` command line.

The light, pure parts are re-exported here (canvas math, labels, the trace grammar, the
rewards, the sample record). Heavy modules (``tagfer.models.vlm``, ``tagfer.train``,
``tagfer.au.detectors``) are imported on their own so that ``import tagfer`` stays fast.

The old flat paths (``tagfer.analyze``, ``tagfer.vlm``, …, before the subpackages) still
import: a finder at the end of this file maps each to the same module object at its new path.
"""

import importlib as _importlib
import sys as _sys
from importlib.machinery import ModuleSpec as _ModuleSpec

from tagfer.core.canvas import CANVAS, CanvasTransform, iou, iou_matrix
from tagfer.core.labels import EXCLUDED, LABELS, normalize_label
from tagfer.core.records import TAGSample
from tagfer.traces.rewards import RewardConfig, r_ans, r_au, r_fmt, reward_breakdown, total_reward
from tagfer.traces.trace import ParsedTrace, parse_trace

__version__ = "0.1.0"

__all__ = [
    "CANVAS", "CanvasTransform", "iou", "iou_matrix", "EXCLUDED", "LABELS", "normalize_label",
    "TAGSample", "RewardConfig", "r_ans", "r_au", "r_fmt", "reward_breakdown", "total_reward",
    "ParsedTrace", "parse_trace", "__version__",
]


# --- the old flat module paths --------------------------------------------------------------
# Until the modules were grouped in subpackages they sat flat in tagfer/ (``tagfer.analyze``,
# ``tagfer.vlm``, …), and user code, notebooks and configs name them. ``import tagfer.<old>`` is
# answered with the module object of its new path: the *same* object, so attributes, isinstance
# checks and monkeypatches are shared; ``tagfer.<old>`` as an attribute imports it on first use.
# Inside tagfer, and in its docs, only the new paths are used.
_MOVED_MODULES: dict[str, str] = {
    "tagfer.analyze": "tagfer.explainer.analyze",
    "tagfer.aus": "tagfer.au.aus",
    "tagfer.backends": "tagfer.models.backends",
    "tagfer.build": "tagfer.data.build",
    "tagfer.canvas": "tagfer.core.canvas",
    "tagfer.detectors": "tagfer.au.detectors",
    "tagfer.errors": "tagfer.core.errors",
    "tagfer.eval": "tagfer.evaluation.eval",
    "tagfer.export": "tagfer.data.export",
    "tagfer.faces": "tagfer.au.faces",
    "tagfer.facs": "tagfer.au.facs",
    "tagfer.families": "tagfer.models.families",
    "tagfer.grounding": "tagfer.au.grounding",
    "tagfer.imageio": "tagfer.core.imageio",
    "tagfer.jobs": "tagfer.core.jobs",
    "tagfer.jsonl": "tagfer.core.jsonl",
    "tagfer.judge": "tagfer.evaluation.judge",
    "tagfer.labels": "tagfer.core.labels",
    "tagfer.metrics": "tagfer.evaluation.metrics",
    "tagfer.openai_client": "tagfer.models.openai_client",
    "tagfer.overlay": "tagfer.au.overlay",
    "tagfer.prompts": "tagfer.models.prompts",
    "tagfer.records": "tagfer.core.records",
    "tagfer.report": "tagfer.evaluation.report",
    "tagfer.rewards": "tagfer.traces.rewards",
    "tagfer.samples": "tagfer.core.samples",
    "tagfer.serve": "tagfer.explainer.serve",
    "tagfer.sources": "tagfer.data.sources",
    "tagfer.stats": "tagfer.data.stats",
    "tagfer.study": "tagfer.evaluation.study",
    "tagfer.teacher": "tagfer.data.teacher",
    "tagfer.tiny": "tagfer.models.tiny",
    "tagfer.trace": "tagfer.traces.trace",
    "tagfer.trusted_hosts": "tagfer.core.trusted_hosts",
    "tagfer.video": "tagfer.au.video",
    "tagfer.video_render": "tagfer.au.video_render",
    "tagfer.vlm": "tagfer.models.vlm",
}


def _moved_to(name: str) -> str | None:
    if name in _MOVED_MODULES:
        return _MOVED_MODULES[name]
    head, _, tail = name.rpartition(".")
    while head:  # a module of a package that moved whole (tagfer.study.db)
        if head in _MOVED_MODULES:
            return f"{_MOVED_MODULES[head]}.{tail}"
        head, _, last = head.rpartition(".")
        tail = f"{last}.{tail}"
    return None


class _AliasLoader:
    """Loads an old path as the module of its new path (no second copy of the module)."""

    def __init__(self, new: str):
        self.new = new
        self.spec = None

    def create_module(self, spec):
        module = _importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec; the module keeps its own


class _MovedModuleFinder:
    """First on ``sys.meta_path``: old module paths only (one dict look-up for any other name)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("tagfer."):
            return None
        new = _moved_to(name)
        return None if new is None else _ModuleSpec(name, _AliasLoader(new))


def __getattr__(name: str):
    if f"tagfer.{name}" not in _MOVED_MODULES:
        raise AttributeError(f"module 'tagfer' has no attribute {name!r}")
    return _importlib.import_module(f"tagfer.{name}")  # the finder below answers it


if not any(type(f).__name__ == "_MovedModuleFinder" for f in _sys.meta_path):  # once, also on reload
    _sys.meta_path.insert(0, _MovedModuleFinder())
