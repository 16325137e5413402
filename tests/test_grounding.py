import json
import shutil

import pytest
from PIL import Image

from tagfer.detectors import DetectorSpec
from tagfer.grounding import GroundingConfig, ground_image, iter_images, overlay_name, run_grounding
from tagfer.jsonl import JsonlWriter, read_jsonl


@pytest.fixture()
def image_dir(tmp_path, astronaut_path, grace_path, face_crop_path, bad_inputs, two_faces_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    shutil.copy(astronaut_path, d / "a_astronaut.png")
    shutil.copy(grace_path, d / "sub" / "b_grace.jpg")
    shutil.copy(face_crop_path, d / "c_crop.jpg")
    shutil.copy(two_faces_path, d / "d_two.png")
    for kind in ("corrupt", "not_an_image", "empty_file", "too_small", "no_face"):
        shutil.copy(bad_inputs[kind], d / f"e_{kind}{bad_inputs[kind].suffix}")
    (d / "notes.txt").write_text("ignored: not an image extension")
    return d


def _records(path):
    return list(read_jsonl(path))


def test_iter_images_streams_sorted_and_filters(image_dir):
    got = list(iter_images([image_dir]))
    names = [p.rsplit("/", 1)[-1] for p in got]
    assert "notes.txt" not in names and len(got) == 9
    assert names[0] == "a_astronaut.png" and names[-1] == "b_grace.jpg"  # files before sub/ (sorted), recursive
    gen = iter_images([image_dir])
    assert next(gen).endswith("a_astronaut.png")  # lazy


def test_batch_records_errors_and_faces(image_dir, tmp_path):
    out = tmp_path / "au.jsonl"
    s = run_grounding([image_dir, tmp_path / "missing.jpg"], out, DetectorSpec(), GroundingConfig())
    recs = {r["image"].rsplit("/", 1)[-1]: r for r in _records(out)}
    assert len(recs) == 10 and s.processed == 10
    kinds = {n: r["error"]["kind"] for n, r in recs.items() if r["error"]}
    assert kinds == {
        "e_corrupt.jpg": "corrupt",
        "e_not_an_image.jpg": "not_an_image",
        "e_empty_file.png": "empty_file",
        "e_too_small.png": "too_small",
        "e_no_face.jpg": "no_face",
        "missing.jpg": "not_found",
    }
    assert s.failed == 6 and s.errors["no_face"] == 1
    ok = recs["a_astronaut.png"]
    assert ok["error"] is None and ok["canvas"] == 512 and len(ok["faces"]) == 1
    assert 12 in ok["faces"][0]["top"] and ok["faces"][0]["au_list"].startswith("AU")
    two = recs["d_two.png"]
    assert two["n_faces"] == 2 and len(two["faces"]) == 1
    # default keeps the largest face: Grace (right) is bigger than the astronaut crop
    assert two["faces"][0]["bbox"][0] > 200


def test_all_faces_left_to_right(two_faces_path, tmp_path):
    out = tmp_path / "au.jsonl"
    run_grounding([two_faces_path], out, DetectorSpec(), GroundingConfig(all_faces=True))
    (rec,) = _records(out)
    xs = [f["bbox"][0] for f in rec["faces"]]
    assert len(xs) == 2 and xs == sorted(xs)


def test_resume_after_interruption_no_duplicates_no_gaps(image_dir, tmp_path):
    out = tmp_path / "au.jsonl"

    class Stop(Exception):
        pass

    seen = []

    def stop_after_3(rec):
        seen.append(rec["image"])
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        run_grounding([image_dir], out, on_record=stop_after_3)
    assert len(_records(out)) == 3
    with open(out, "a") as f:  # a write cut off mid-line by a crash
        f.write('{"image": "/half/written.jpg", "faces": [')
    s = run_grounding([image_dir], out)
    assert s.skipped == 3 and s.processed == 6 and s.repaired_bytes > 0
    keys = [r["image"] for r in _records(out)]
    assert len(keys) == len(set(keys)) == 9
    assert keys == list(iter_images([image_dir]))  # input order preserved across the restart
    again = run_grounding([image_dir], out)
    assert again.processed == 0 and again.skipped == 9


def test_retry_errors_rewrites_without_duplicates(image_dir, tmp_path):
    out = tmp_path / "au.jsonl"
    run_grounding([image_dir], out)
    s = run_grounding([image_dir], out, retry_errors=True)
    assert s.retried_errors == 5 and s.processed == 5
    keys = [r["image"] for r in _records(out)]
    assert len(keys) == len(set(keys)) == 9


def test_two_workers_match_one_worker(image_dir, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run_grounding([image_dir], one, workers=1)
    run_grounding([image_dir], two, workers=2, max_in_flight=3)
    assert _records(one) == _records(two)


def test_overlays_written(face_crop_path, tmp_path):
    out = tmp_path / "au.jsonl"
    run_grounding([face_crop_path], out, config=GroundingConfig(overlays=str(tmp_path / "ov")))
    (rec,) = _records(out)
    p = tmp_path / "ov" / overlay_name(rec["image"])
    assert rec["overlay"] == str(p) and p.exists()
    im = Image.open(p)
    assert im.format == "PNG" and min(im.size) >= 512


def test_unexpected_exception_is_recorded(astronaut_path):
    class Boom:
        name = "boom"

        def detect(self, image, key=None):
            raise RuntimeError("detector exploded")

        def close(self):
            pass

    rec = ground_image(Boom(), str(astronaut_path))
    assert rec["error"]["kind"] == "internal" and "exploded" in rec["error"]["message"]


def test_jsonl_writer_repairs_partial_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    with JsonlWriter(p) as w:
        w.write({"a": 4})
    assert [r["a"] for r in read_jsonl(p)] == [1, 2, 4]
    assert p.read_text().endswith('{"a":4}\n')
    q = tmp_path / "y.jsonl"
    q.write_text('{"only": "partial"')
    with JsonlWriter(q) as w:
        assert w.repaired_bytes == len('{"only": "partial"')
    assert q.read_text() == ""
    assert json.loads('{"a":4}') == {"a": 4}
