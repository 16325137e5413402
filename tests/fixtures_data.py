"""Session fixtures for the data tests (imported by conftest.py): tiny datasets in each official layout.

Real faces (crops of the astronaut and Grace Hopper samples, plus mirrored
copies) and synthetic images (gradients with shapes, no face) are written in
the exact file layouts of RAF-DB, FERPlus (CSV and folder), AffectNet (CSV
and folder) and the generic CSV / ImageFolder. The ``*_EXPECTED`` constants
say what a reader must yield per split (label list in file order) and which
rows are excluded, so tests (and the evaluation helper) can assert exactly.

Fixtures (session scope, each a ``Path``): ``rafdb_root``, ``ferplus_root``
(CSV layout), ``ferplus_folder_root``, ``affectnet_root`` (CSV layout),
``affectnet_folder_root``, ``generic_csv``, ``generic_folder``, and
``data_faces`` (the list of PIL face images used).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- images


def face_images(astronaut_rgb: np.ndarray, grace_rgb: np.ndarray) -> list[Image.Image]:
    """Four real face crops: astronaut, Grace Hopper, and their mirror images."""
    astro = Image.fromarray(astronaut_rgb[40:200, 145:305])  # 160 px around the face
    grace = Image.fromarray(grace_rgb[95:375, 125:405])  # 280 px around the face
    return [astro, grace, astro.transpose(Image.FLIP_LEFT_RIGHT), grace.transpose(Image.FLIP_LEFT_RIGHT)]


def synthetic_image(i: int, side: int = 100) -> Image.Image:
    """A deterministic non-face image (gradient + shapes)."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([(x * 2 + i * 17) % 256, (y * 2 + i * 31) % 256, ((x + y) + i * 7) % 256], -1).astype(np.uint8)
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    for _ in range(3):
        a, b = rng.integers(0, side // 2, 2)
        d.ellipse([a, b, a + side // 3, b + side // 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def _img(faces: list[Image.Image], k: int, side: int) -> Image.Image:
    """Image number ``k``: real faces on even k, synthetic on odd k (k % 4 == 3), else a face."""
    if k % 4 == 3:
        return synthetic_image(k, side)
    return faces[k % len(faces)].convert("RGB").resize((side, side))


# --------------------------------------------------------------------------- RAF-DB
# (name, code) rows of EmoLabel/list_patition_label.txt; codes 1–7 = surprise, fear, disgust, happiness, sadness, anger, neutral
RAFDB_ROWS = [
    ("train_00001.jpg", 4),
    ("train_00002.jpg", 1),
    ("train_00003.jpg", 2),
    ("train_00004.jpg", 3),
    ("train_00005.jpg", 5),
    ("train_00006.jpg", 6),
    ("train_00007.jpg", 7),
    ("train_00008.jpg", 4),
    ("test_0001.jpg", 4),
    ("test_0002.jpg", 7),
    ("test_0003.jpg", 5),
    ("test_0004.jpg", 1),
]
RAFDB_EXPECTED = {
    "train": ["happiness", "surprise", "fear", "disgust", "sadness", "anger", "neutral", "happiness"],
    "test": ["happiness", "neutral", "sadness", "surprise"],
}


def make_rafdb(root: Path, faces: list[Image.Image]) -> Path:
    base = root / "basic"
    (base / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (base / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
    (base / "Image" / "original").mkdir(parents=True, exist_ok=True)
    with open(base / "EmoLabel" / "list_patition_label.txt", "w") as f:
        for k, (name, code) in enumerate(RAFDB_ROWS):
            f.write(f"{name} {code}\n")
            stem = name[:-4]
            # all RAF-DB fixture images are real faces (the facs teacher test needs faces)
            face = faces[k % len(faces)].convert("RGB")
            face.resize((100, 100)).save(base / "Image" / "aligned" / f"{stem}_aligned.jpg", quality=95)
            face.resize((160, 200)).save(base / "Image" / "original" / name, quality=95)
    return root


# --------------------------------------------------------------------------- FERPlus
FERPLUS_HEADER = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF"]
# (usage, image name, votes[10], expected label under the default policy or None = excluded with reason)
FERPLUS_ROWS = [
    ("Training", "fer0000000.png", [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], "happiness"),
    ("Training", "fer0000001.png", [6, 0, 1, 3, 0, 0, 0, 0, 0, 0], "neutral"),
    ("Training", "fer0000002.png", [0, 0, 8, 0, 0, 0, 2, 0, 0, 0], "surprise"),
    ("Training", "fer0000003.png", [0, 0, 0, 0, 5, 5, 0, 0, 0, 0], "ferplus_tie"),
    ("Training", "fer0000004.png", [1, 0, 0, 0, 0, 0, 0, 0, 9, 0], "ferplus_unknown"),
    ("Training", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], "ferplus_no_face"),
    ("Training", "fer0000006.png", [2, 0, 0, 0, 0, 0, 0, 8, 0, 0], "contempt"),
    ("Training", "fer0000007.png", [0, 0, 0, 7, 1, 1, 1, 0, 0, 0], "sadness"),
    ("Training", "fer0000008.png", [0, 0, 0, 0, 4, 3, 0, 1, 0, 0], "anger"),
    ("Training", "fer0000009.png", [0, 0, 1, 0, 0, 0, 9, 0, 0, 0], "fear"),
    ("Training", "fer0000010.png", [0, 0, 0, 1, 0, 9, 0, 0, 0, 0], "disgust"),
    ("PublicTest", "fer0000011.png", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0], "neutral"),
    ("PublicTest", "fer0000012.png", [0, 3, 3, 0, 0, 0, 0, 0, 0, 4], "ferplus_no_face"),
    ("PrivateTest", "fer0000013.png", [0, 9, 1, 0, 0, 0, 0, 0, 0, 0], "happiness"),
    ("PrivateTest", "fer0000014.png", [0, 0, 0, 0, 10, 0, 0, 0, 0, 0], "anger"),
    ("PrivateTest", "fer0000015.png", [3, 0, 0, 3, 0, 0, 0, 0, 0, 0], "ferplus_tie"),
    ("PrivateTest", "fer0000016.png", [1, 0, 7, 0, 0, 0, 2, 0, 0, 0], "surprise"),
]
_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FERPLUS_EXPECTED = {
    split: [lab for u, _, _, lab in FERPLUS_ROWS if _USAGE[u] == split and "_" not in lab and lab != "contempt"]
    for split in ("train", "val", "test")
}
FERPLUS_EXCLUDED = {
    split: sorted(lab for u, _, _, lab in FERPLUS_ROWS if _USAGE[u] == split and ("_" in lab or lab == "contempt"))
    for split in ("train", "val", "test")
}
_FER2013_CODE = {"anger": 0, "disgust": 1, "fear": 2, "happiness": 3, "sadness": 4, "surprise": 5, "neutral": 6}


def _pixels(im: Image.Image) -> str:
    return " ".join(str(int(v)) for v in np.asarray(im.convert("L").resize((48, 48))).reshape(-1))


def make_ferplus(root: Path, faces: list[Image.Image]) -> Path:
    """CSV layout: ``fer2013.csv`` (emotion,pixels,Usage) + ``fer2013new.csv`` (votes)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "fer2013.csv", "w", newline="") as fo, open(root / "fer2013new.csv", "w", newline="") as fn:
        wo, wn = csv.writer(fo), csv.writer(fn)
        wo.writerow(["emotion", "pixels", "Usage"])
        wn.writerow(FERPLUS_HEADER)
        for k, (usage, name, votes, lab) in enumerate(FERPLUS_ROWS):
            wo.writerow([_FER2013_CODE.get(lab, 6), _pixels(_img(faces, k, 48)), usage])
            wn.writerow([usage, name, *votes])
    return root


def make_ferplus_folder(root: Path, faces: list[Image.Image]) -> Path:
    """Folder layout of the FERPlus authors' generate_training_data.py: FER2013{Train,Valid,Test}/label.csv + PNGs."""
    folders = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}
    writers = {}
    files = []
    try:
        for usage, folder in folders.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            fh = open(root / folder / "label.csv", "w", newline="")
            files.append(fh)
            writers[usage] = csv.writer(fh)
        for k, (usage, name, votes, _lab) in enumerate(FERPLUS_ROWS):
            if not name:
                continue  # the authors' script writes no image for rows without a name
            _img(faces, k, 48).convert("L").save(root / folders[usage] / name)
            writers[usage].writerow([name, "(0, 0, 48, 48)", *votes])
    finally:
        for fh in files:
            fh.close()
    return root


# --------------------------------------------------------------------------- AffectNet
# (relative path, expression code) per split; 0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger,
# 7 contempt, 8 none, 9 uncertain, 10 no-face
AFFECTNET_ROWS = {
    "train": [
        ("1/a0001.jpg", 1),
        ("1/a0002.jpg", 0),
        ("2/a0003.jpg", 2),
        ("2/a0004.jpg", 7),
        ("3/a0005.jpg", 3),
        ("3/a0006.jpg", 8),
        ("4/a0007.jpg", 6),
        ("4/a0008.jpg", 9),
        ("5/a0009.jpg", 4),
        ("5/a0010.jpg", 10),
        ("6/a0011.jpg", 5),
    ],
    "test": [
        ("7/v0001.jpg", 1),
        ("7/v0002.jpg", 7),
        ("8/v0003.jpg", 2),
        ("8/v0004.jpg", 0),
    ],
}
_AFF = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise", 4: "fear", 5: "disgust", 6: "anger"}
AFFECTNET_EXPECTED = {s: [_AFF[c] for _, c in rows if c in _AFF] for s, rows in AFFECTNET_ROWS.items()}
AFFECTNET_EXCLUDED = {s: sum(1 for _, c in rows if c not in _AFF) for s, rows in AFFECTNET_ROWS.items()}
AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks", "expression", "valence", "arousal"]


def make_affectnet(root: Path, faces: list[Image.Image]) -> Path:
    """Manually_Annotated layout: file lists training.csv / validation.csv + Manually_Annotated_Images/<sub>/<file>."""
    lists = root / "Manually_Annotated_file_lists"
    imgs = root / "Manually_Annotated_Images"
    lists.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, fname in (("train", "training.csv"), ("test", "validation.csv")):
        with open(lists / fname, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(AFFECTNET_HEADER)
            for rel, code in AFFECTNET_ROWS[split]:
                (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
                _img(faces, k, 128).save(imgs / rel, quality=92)
                lm = ";".join(f"{v:.2f}" for v in range(136))
                w.writerow([rel, 10, 12, 100, 100, lm, code, 0.5, -0.25])
                k += 1
    return root


def make_affectnet_folder(root: Path, faces: list[Image.Image]) -> Path:
    """train_set / val_set with images/<n>.jpg and annotations/<n>_exp.npy (string scalar, as distributed)."""
    k = 0
    for split, set_name in (("train", "train_set"), ("test", "val_set")):
        (root / set_name / "images").mkdir(parents=True, exist_ok=True)
        (root / set_name / "annotations").mkdir(parents=True, exist_ok=True)
        for n, (_rel, code) in enumerate(AFFECTNET_ROWS[split]):
            _img(faces, k, 96).save(root / set_name / "images" / f"{n}.jpg", quality=92)
            np.save(root / set_name / "annotations" / f"{n}_exp.npy", np.array(str(code)))
            np.save(root / set_name / "annotations" / f"{n}_val.npy", np.array("0.1"))
            np.save(root / set_name / "annotations" / f"{n}_aro.npy", np.array("-0.2"))
            k += 1
    return root


# --------------------------------------------------------------------------- generic
GENERIC_ROWS = [("img/a.jpg", "happy"), ("img/b.jpg", "Sad"), ("img/c.jpg", "contempt"), ("img/d.jpg", "angry"), ("img/e.jpg", "bored")]
GENERIC_EXPECTED = ["happiness", "sadness", "anger"]


def make_generic_csv(root: Path, faces: list[Image.Image]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for k, (rel, lab) in enumerate(GENERIC_ROWS):
            _img(faces, k, 112).save(root / rel, quality=92)
            w.writerow([rel, lab])
    return root / "labels.csv"


GENERIC_FOLDER = {"happy": 2, "surprise": 1, "contempt": 1, "junk": 1}
GENERIC_FOLDER_EXPECTED = ["happiness", "happiness", "surprise"]


def make_generic_folder(root: Path, faces: list[Image.Image]) -> Path:
    k = 0
    for cls, n in GENERIC_FOLDER.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _img(faces, k, 112).save(root / cls / f"{cls}_{i}.jpg", quality=92)
            k += 1
    (root / "happy" / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def data_faces(astronaut_rgb, grace_rgb) -> list[Image.Image]:
    return face_images(astronaut_rgb, grace_rgb)


@pytest.fixture(scope="session")
def rafdb_root(tmp_path_factory, data_faces) -> Path:
    return make_rafdb(tmp_path_factory.mktemp("rafdb") / "RAF-DB", data_faces)


@pytest.fixture(scope="session")
def ferplus_root(tmp_path_factory, data_faces) -> Path:
    return make_ferplus(tmp_path_factory.mktemp("ferplus") / "FERPlus", data_faces)


@pytest.fixture(scope="session")
def ferplus_folder_root(tmp_path_factory, data_faces) -> Path:
    return make_ferplus_folder(tmp_path_factory.mktemp("ferplus_folder") / "data", data_faces)


@pytest.fixture(scope="session")
def affectnet_root(tmp_path_factory, data_faces) -> Path:
    return make_affectnet(tmp_path_factory.mktemp("affectnet") / "AffectNet", data_faces)


@pytest.fixture(scope="session")
def affectnet_folder_root(tmp_path_factory, data_faces) -> Path:
    return make_affectnet_folder(tmp_path_factory.mktemp("affectnet_folder") / "AffectNet", data_faces)


@pytest.fixture(scope="session")
def generic_csv(tmp_path_factory, data_faces) -> Path:
    return make_generic_csv(tmp_path_factory.mktemp("generic_csv"), data_faces)


@pytest.fixture(scope="session")
def generic_folder(tmp_path_factory, data_faces) -> Path:
    return make_generic_folder(tmp_path_factory.mktemp("generic_folder") / "faces", data_faces)


# --------------------------------------------------------------------------- builder helpers
class FakeAUDetector:
    """A deterministic stand-in for the AU detector: ``table[key] = [(au, score, box), ...]``.

    Keys are image paths (or record ids for byte images). A key missing from the
    table (or mapped to ``None``) has no face; an empty list is a face with no
    activated AU. Every listed AU is active (score ≥ threshold 0.3 is up to the caller).
    """

    name = "fake"

    def __init__(self, table: dict[str, list | None], top_k: int = 3):
        self.table = table
        self.top_k = top_k

    def detect(self, image, key=None):
        from tagfer.au.aus import AUDetection, FaceAUs
        from tagfer.au.detectors import DetectionError

        rows = self.table.get(str(key))
        if rows is None:
            raise DetectionError("no_face", f"no face in {key}")
        aus = [AUDetection(int(a), float(s), float(s) >= 0.3, tuple(int(v) for v in b)) for a, s, b in rows]
        aus.sort(key=lambda d: -d.score)
        return [FaceAUs(None, aus, (0, 0, 511, 511), top_k=self.top_k, detector="fake")]

    def close(self) -> None:
        pass


def fake_au_rows(i: int) -> list[tuple[int, float, tuple[int, int, int, int]]]:
    """A distinct, valid AU list for item ``i`` (AU12, AU6, AU25 with boxes shifted by i)."""
    d = i % 97
    return [(12, 0.9, (150 + d, 300, 330 + d, 420)), (6, 0.7, (80, 200 + d, 430, 300 + d)), (25, 0.5, (200, 380, 320 + d, 450 + d)), (4, 0.2, (100, 100, 200, 150))]


def make_build_dataset(root: Path, labels: list[str]) -> tuple[Path, dict[str, list]]:
    """A generic CSV with one small synthetic image per label, and the fake-detector table for it."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    table: dict[str, list] = {}
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "id"])
        for i, lab in enumerate(labels):
            p = root / "img" / f"{i:04d}.png"
            synthetic_image(i, 48).save(p)
            w.writerow([str(p), lab, f"item{i:04d}"])
            table[str(p)] = fake_au_rows(i)
    return root / "labels.csv", table
