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
"""

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

