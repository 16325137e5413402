"""Dataset readers on fixtures in each official layout (tests/fixtures_data.py)."""

from __future__ import annotations

import csv
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures_data import (
    AFFECTNET_EXCLUDED,
    AFFECTNET_EXPECTED,
    FERPLUS_EXCLUDED,
    FERPLUS_EXPECTED,
    GENERIC_EXPECTED,
    GENERIC_FOLDER_EXPECTED,
    RAFDB_EXPECTED,
)
from tiers import examples
from tagfer.core.imageio import load_image
from tagfer.core.labels import EXCLUDED, LABELS
from tagfer.data.sources import (
    FERPLUS_COLUMNS,
    SourceStats,
    canonical_split,
    ferplus_vote,
    open_source,
    parse_source_spec,
    read_affectnet,
    read_ferplus,
    read_generic,
    read_rafdb,
)


def labels(recs):
    return [r.label for r in recs]


@pytest.mark.parametrize("split", ["train", "test"])
def test_rafdb_labels_and_images(rafdb_root, split):
    st_ = SourceStats()
    recs = list(read_rafdb(rafdb_root, split, stats=st_))
    assert labels(recs) == RAFDB_EXPECTED[split]
    assert all(r.id.startswith(f"rafdb/{split}_") and r.split == split and r.source == "rafdb" for r in recs)
    assert all(r.image_path.endswith("_aligned.jpg") for r in recs)
    assert load_image(recs[0].image).width == 100
    assert st_.yielded == len(recs) and st_.n_excluded == 0
    assert sum(st_.labels.values()) == len(recs)


def test_rafdb_original_variant_and_root_forms(rafdb_root):
    recs = list(read_rafdb(rafdb_root / "basic", "test", variant="original"))
    assert [r.image_path.rsplit("/", 1)[1] for r in recs] == ["test_0001.jpg", "test_0002.jpg", "test_0003.jpg", "test_0004.jpg"]
    assert load_image(recs[0].image).size == (160, 200)
    assert recs[0].original_label == 4
    with pytest.raises(ValueError):
        list(read_rafdb(rafdb_root, "val"))
    with pytest.raises(FileNotFoundError):
        list(read_rafdb(rafdb_root / "nothing", "train"))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_ferplus_csv_votes_and_pixels(ferplus_root, split):
    st_ = SourceStats()
    recs = list(read_ferplus(ferplus_root, split, stats=st_))
    assert labels(recs) == FERPLUS_EXPECTED[split]
    assert sorted(st_.excluded.elements()) == FERPLUS_EXCLUDED[split]
    for r in recs:
        assert r.image_path is None and r.image_bytes[:8] == b"\x89PNG\r\n\x1a\n"
        img = load_image(r.image)
        assert (img.width, img.height) == (48, 48)
        assert r.label in LABELS


def test_ferplus_include_excluded_and_tie_policy(ferplus_root):
    allrecs = list(read_ferplus(ferplus_root, "train", include_excluded=True))
    reasons = {r.id: r.meta.get("excluded_reason") for r in allrecs if r.excluded}
    assert sorted(reasons.values()) == FERPLUS_EXCLUDED["train"]
    first = list(read_ferplus(ferplus_root, "train", ties="first"))
    # the anger/disgust 5–5 tie resolves to anger (first in FERPlus column order)
    assert len(first) == len(FERPLUS_EXPECTED["train"]) + 1
    assert "ferplus/fer0000003" in {r.id for r in first}
    assert [r for r in first if r.id == "ferplus/fer0000003"][0].label == "anger"


def test_ferplus_folder_layout_matches_csv(ferplus_folder_root, ferplus_root):
    for split in ("train", "val", "test"):
        recs = list(read_ferplus(ferplus_folder_root, split))
        assert labels(recs) == FERPLUS_EXPECTED[split]
        assert [r.id for r in recs] == [r.id for r in read_ferplus(ferplus_root, split)]
        assert all(r.image_path and load_image(r.image).width == 48 for r in recs)


def test_ferplus_vote_policies():
    v = [0, 0, 0, 0, 5, 5, 0, 0, 0, 0]
    assert ferplus_vote(v) == (EXCLUDED, "ferplus_tie")
    assert ferplus_vote(v, ties="first") == ("anger", None)
    assert ferplus_vote([4, 1, 1, 1, 1, 0, 0, 0, 0, 0], vote="majority") == ("neutral", None)  # single votes dropped
    assert ferplus_vote([4, 2, 2, 0, 0, 0, 0, 0, 0, 0], vote="majority") == (EXCLUDED, "ferplus_no_majority")
    assert ferplus_vote([4, 2, 2, 0, 0, 0, 0, 0, 0, 0]) == ("neutral", None)
    assert ferplus_vote([0] * 10) == (EXCLUDED, "ferplus_no_votes")
    assert ferplus_vote([1, 2]) == (EXCLUDED, "ferplus_bad_votes")


@given(st.lists(st.integers(0, 10), min_size=10, max_size=10), st.sampled_from(["plurality", "majority"]), st.sampled_from(["exclude", "first"]))
@settings(max_examples=examples(200), deadline=None)
def test_ferplus_vote_property(votes, vote, ties):
    label, reason = ferplus_vote(votes, vote, ties)
    assert (label == EXCLUDED) == (reason is not None)
    if label != EXCLUDED:
        i = FERPLUS_COLUMNS.index({"happiness": "happiness"}.get(label, label))
        assert votes[i] == max(votes)  # the winner always has the most votes
        assert i < 7  # never contempt, unknown or NF
        if vote == "majority":
            kept = [x if x > 1 else 0 for x in votes]
            assert kept[i] > 0.5 * sum(kept)


@pytest.mark.parametrize("split", ["train", "test"])
def test_affectnet_csv(affectnet_root, split):
    st_ = SourceStats()
    recs = list(read_affectnet(affectnet_root, split, stats=st_))
    assert labels(recs) == AFFECTNET_EXPECTED[split]
    assert st_.n_excluded == AFFECTNET_EXCLUDED[split]
    assert all(load_image(r.image).width == 128 for r in recs)
    assert recs[0].meta["face_box"] == [10, 12, 100, 100] and recs[0].meta["valence"] == 0.5
    # val is an alias of the official validation (= test) set
    assert [r.id for r in read_affectnet(affectnet_root, "val")] == [r.id for r in read_affectnet(affectnet_root, "test")]


def test_affectnet_excluded_reasons(affectnet_root):
    st_ = SourceStats()
    list(read_affectnet(affectnet_root, "train", stats=st_))
    assert dict(st_.excluded) == {"contempt": 1, "affectnet_none": 1, "affectnet_uncertain": 1, "affectnet_no_face": 1}
    assert st_.seen == 11


@pytest.mark.parametrize("split", ["train", "test"])
def test_affectnet_folder(affectnet_folder_root, split):
    st_ = SourceStats()
    recs = list(read_affectnet(affectnet_folder_root, split, stats=st_))
    assert labels(recs) == AFFECTNET_EXPECTED[split]
    assert st_.n_excluded == AFFECTNET_EXCLUDED[split]
    assert recs[0].meta["valence"] == pytest.approx(0.1)
    assert all(load_image(r.image).width == 96 for r in recs)
    # numeric order (0, 1, ..., 10), not lexicographic
    if split == "train":
        assert [r.id.rsplit("/", 1)[1] for r in read_affectnet(affectnet_folder_root, split, include_excluded=True)] == [str(i) for i in range(11)]


def test_generic_csv_and_folder(generic_csv, generic_folder):
    st_ = SourceStats()
    recs = list(read_generic(generic_csv, stats=st_))
    assert labels(recs) == GENERIC_EXPECTED
    assert dict(st_.excluded) == {"contempt": 1, "unknown_label": 1}
    assert all(load_image(r.image).width == 112 for r in recs)
    recs = list(read_generic(generic_folder))
    assert labels(recs) == GENERIC_FOLDER_EXPECTED
    assert all(r.image_path.endswith(".jpg") for r in recs)


def test_generic_csv_split_column(tmp_path, generic_csv):
    p = tmp_path / "s.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerow([str(generic_csv.parent / "img/a.jpg"), "happy", "train"])
        w.writerow([str(generic_csv.parent / "img/b.jpg"), "sad", "test"])
    assert labels(read_generic(p, "test")) == ["sadness"]
    assert labels(read_generic(p)) == ["happiness", "sadness"]
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="path and label"):
        list(read_generic(bad))


def test_open_source_specs(rafdb_root, ferplus_root, affectnet_root, generic_csv):
    assert parse_source_spec("rafdb:/x/y") == ("rafdb", "/x/y", {})
    assert parse_source_spec("FERPlus:/d?vote=majority&ties=first") == ("ferplus", "/d", {"vote": "majority", "ties": "first"})
    assert parse_source_spec("/plain/path.csv") == ("generic", "/plain/path.csv", {})
    assert parse_source_spec("C:\\data\\x.csv")[0] == "generic"
    with pytest.raises(ValueError):
        parse_source_spec("rafdb:")
    assert parse_source_spec("generic:/d/x.csv?source=my%20data") == ("generic", "/d/x.csv", {"source": "my data"})
    with pytest.raises(ValueError, match="did you mean 'rafdb'.*ferplus:DIR"):
        parse_source_spec("rafbd:/data/RAF-DB")  # a typo is an error, not a generic path called 'rafbd:/...'
    assert labels(open_source(f"rafdb:{rafdb_root}", split="test")) == RAFDB_EXPECTED["test"]
    assert labels(open_source(f"ferplus:{ferplus_root}?ties=first", split="test")) == ["happiness", "anger", "neutral", "surprise"]
    assert labels(open_source(f"affectnet:{affectnet_root}", split="test")) == AFFECTNET_EXPECTED["test"]
    assert labels(open_source(f"csv:{generic_csv}")) == GENERIC_EXPECTED
    assert labels(open_source(f"rafdb:{rafdb_root}?variant=original", split="train")) == RAFDB_EXPECTED["train"]


def test_ids_unique_across_splits(rafdb_root, ferplus_root, affectnet_root):
    for spec in (f"rafdb:{rafdb_root}", f"ferplus:{ferplus_root}", f"affectnet:{affectnet_root}"):
        ids = [r.id for s in ("train", "test") for r in open_source(spec, split=s, include_excluded=True)]
        assert len(ids) == len(set(ids))


def test_canonical_split():
    assert canonical_split("Training") == "train"
    assert canonical_split("PrivateTest") == "test"
    assert canonical_split("validation") == "val"
    with pytest.raises(ValueError):
        canonical_split("dev")


@pytest.mark.slow
def test_readers_stream_in_constant_memory(tmp_path):
    """A 10k-row AffectNet CSV is read lazily: memory does not grow with the rows read."""
    root = tmp_path / "big"
    (root / "Manually_Annotated_file_lists").mkdir(parents=True)
    with open(root / "Manually_Annotated_file_lists" / "training.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks", "expression", "valence", "arousal"])
        for i in range(10000):
            w.writerow([f"{i % 100}/{i:08d}.jpg", 0, 0, 10, 10, "1;2", i % 11, 0, 0])
    it = read_affectnet(root, "train")
    tracemalloc.start()
    for _ in range(1000):
        next(it)
    base = tracemalloc.get_traced_memory()[0]
    n = 1000 + sum(1 for _ in it)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert n == sum(1 for i in range(10000) if i % 11 < 7)
    assert grown < 200_000  # holding the ~5k records read would take several MB


def test_pixels_row_with_bad_length_is_excluded(tmp_path):
    d = tmp_path / "fp"
    d.mkdir()
    (d / "fer2013.csv").write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    (d / "fer2013new.csv").write_text("Usage,Image name," + ",".join(FERPLUS_COLUMNS) + "\nTraining,fer0.png,0,10,0,0,0,0,0,0,0,0\n")
    st_ = SourceStats()
    assert list(read_ferplus(d, "train", stats=st_)) == []
    assert dict(st_.excluded) == {"bad_pixels": 1}
    arr = np.arange(48 * 48) % 256
    (d / "fer2013.csv").write_text("emotion,pixels,Usage\n3," + " ".join(map(str, arr)) + ",Training\n")
    (rec,) = list(read_ferplus(d, "train"))
    assert np.array_equal(load_image(rec.image).rgb[..., 0].reshape(-1), arr.astype(np.uint8))


PLUGIN = """
from tagfer.core.labels import normalize_label
from tagfer.data.sources import READERS, SourceRecord, _emit


@READERS.register("tinyset", aliases=("tiny",), usage="tinyset:LIST[?fold=N]")
def read_tinyset(path, split="train", *, stats=None, include_excluded=False, fold="0"):
    with open(path) as fh:
        for i, line in enumerate(fh):
            name, label, line_split = line.split()
            if line_split != split or i % 2 != int(fold) % 2:
                continue
            lab = normalize_label(label)
            rec = SourceRecord(id=f"tinyset/{name}", source="tinyset", split=split, original_label=label,
                               label=lab if lab is not None else "excluded", image_path=name)
            if _emit(rec, stats, include_excluded) is not None:
                yield rec
"""


def test_user_reader_plugin_one_decorator(tmp_path, monkeypatch):
    """A dataset reader defined outside the package, found through $TAGFER_PLUGINS by the public API."""
    from tagfer.data.sources import READERS, source_kinds

    plugin = tmp_path / "tiny_reader.py"
    plugin.write_text(PLUGIN)
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg happy test\nb.jpg sad test\nc.jpg angry test\nd.jpg contempt test\ne.jpg fear train\n")
    monkeypatch.setenv("TAGFER_PLUGINS", str(plugin))
    try:
        stats = SourceStats()
        recs = list(open_source(f"tiny:{listing}?fold=0", split="test", stats=stats))
        assert [(r.id, r.label) for r in recs] == [("tinyset/a.jpg", "happiness"), ("tinyset/c.jpg", "anger")]
        assert [r.label for r in open_source(f"tinyset:{listing}", split="test", fold=1, include_excluded=True)] == [
            "sadness", "excluded"]  # keyword options override spec options
        assert stats.yielded == 2 and "tinyset" in source_kinds()
        with pytest.raises(ValueError, match="no option 'folds'.*fold"):
            list(open_source(f"tinyset:{listing}?folds=1", split="test"))
    finally:
        READERS.unregister("tinyset")
    assert "tiny" not in READERS
