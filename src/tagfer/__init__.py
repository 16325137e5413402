"""tagfer — TAG: Thinking with Action Unit Grounding for Facial Expression Recognition."""

from tagfer.canvas import CANVAS, CanvasTransform, iou, iou_matrix
from tagfer.labels import EXCLUDED, LABELS, normalize_label

__version__ = "0.1.0"

__all__ = ["CANVAS", "CanvasTransform", "iou", "iou_matrix", "EXCLUDED", "LABELS", "normalize_label", "__version__"]
