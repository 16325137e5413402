"""tagfer — TAG: Thinking with Action Unit Grounding for Facial Expression Recognition.

The light, pure parts are re-exported here (canvas math, labels, the trace grammar,
the rewards, the sample record). Heavy modules (``tagfer.vlm``, ``tagfer.train``,
``tagfer.detectors``) are imported on their own so that ``import tagfer`` stays fast.
"""

from tagfer.canvas import CANVAS, CanvasTransform, iou, iou_matrix
from tagfer.labels import EXCLUDED, LABELS, normalize_label
from tagfer.records import TAGSample
from tagfer.rewards import RewardConfig, r_ans, r_au, r_fmt, reward_breakdown, total_reward
from tagfer.trace import ParsedTrace, parse_trace

__version__ = "0.1.0"

__all__ = [
    "CANVAS", "CanvasTransform", "iou", "iou_matrix", "EXCLUDED", "LABELS", "normalize_label",
    "TAGSample", "RewardConfig", "r_ans", "r_au", "r_fmt", "reward_breakdown", "total_reward",
    "ParsedTrace", "parse_trace", "__version__",
]
