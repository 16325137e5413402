import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from tagfer.au.detectors import DetectorSpec
from tagfer.au.grounding import GroundingConfig, ground_image, iter_images, overlay_name, run_grounding
from tagfer.core.jsonl import JsonlWriter, read_jsonl


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
    assert s.skipped == 3 and s.processed == 6 and s.metric("repaired_bytes") > 0
    keys = [r["image"] for r in _records(out)]
    assert len(keys) == len(set(keys)) == 9
    assert keys == list(iter_images([image_dir]))  # input order preserved across the restart
    again = run_grounding([image_dir], out)
    assert again.processed == 0 and again.skipped == 9


def test_retry_errors_rewrites_without_duplicates(image_dir, tmp_path):
    out = tmp_path / "au.jsonl"
    run_grounding([image_dir], out)
    s = run_grounding([image_dir], out, retry_errors=True)
    assert s.metric("retried_errors") == 5 and s.processed == 5
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


@pytest.mark.timeout(60)
def test_fifo_device_and_link_loop_are_recorded_and_the_batch_goes_on(tmp_path, face_crop_path):
    import os

    d = tmp_path / "walk"
    d.mkdir()
    shutil.copy(face_crop_path, d / "b_good.jpg")
    os.mkfifo(d / "a_fifo.jpg")  # inside a walked folder: would block the reader forever
    os.symlink(d / "c_loop.jpg", d / "c_loop.jpg")
    arg_fifo = tmp_path / "arg.png"
    os.mkfifo(arg_fifo)
    out = tmp_path / "au.jsonl"
    for workers in (1, 2):
        s = run_grounding([arg_fifo, d, "/dev/zero"], out, workers=workers, resume=False)
        recs = {r["image"].rsplit("/", 1)[-1]: r for r in _records(out)}
        assert list(recs) == ["arg.png", "a_fifo.jpg", "b_good.jpg", "c_loop.jpg", "zero"]
        kinds = {n: (r["error"] or {}).get("kind") for n, r in recs.items()}
        assert kinds == {"arg.png": "unreadable", "a_fifo.jpg": "unreadable", "b_good.jpg": None, "c_loop.jpg": "unreadable", "zero": "unreadable"}
        assert "FIFO" in recs["a_fifo.jpg"]["error"]["message"] and "loop" in recs["c_loop.jpg"]["error"]["message"]
        assert s.failed == 4 and s.errors == {"unreadable": 4}


def test_rerun_keeps_counting_earlier_failures(tmp_path, face_crop_path, bad_inputs):
    out = tmp_path / "au.jsonl"
    bad, good = bad_inputs["not_an_image"], face_crop_path
    first = run_grounding([bad, good], out)
    assert first.failed == 1 and first.failed_before == 0 and first.any_failed
    again = run_grounding([bad, good, bad], out)  # everything done already, the bad one asked twice
    assert (again.processed, again.skipped, again.failed, again.failed_before) == (0, 3, 0, 1) and again.any_failed
    only_good = run_grounding([good], out)
    assert only_good.skipped == 1 and not only_good.any_failed
    retried = run_grounding([bad], out, retry_errors=True)  # still bad: failed now, not "before"
    assert (retried.processed, retried.failed, retried.failed_before) == (1, 1, 0)


_ORPHAN_PARENT = r"""
import multiprocessing as mp, sys, time
sys.path.insert(0, sys.argv[1])
from tagfer.au.grounding import exit_with_parent

def child(parent, use_prctl, q):
    q.put(exit_with_parent(parent, poll_s=0.2, use_prctl=use_prctl))
    time.sleep(600)

if __name__ == "__main__":
    import os
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=child, args=(os.getpid(), sys.argv[2] == "prctl", q))
    p.start()
    print(p.pid, q.get(timeout=60), flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaps is dead too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["prctl", "watchdog"])
def test_worker_exits_when_its_parent_is_killed(tmp_path, how):
    import signal
    import subprocess
    import time

    import tagfer

    src = str(Path(tagfer.__file__).resolve().parents[1])
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_PARENT, src, how], stdout=subprocess.PIPE, text=True)
    try:
        pid_s, used = parent.stdout.readline().split()
        child = int(pid_s)
        assert used == how and not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), f"worker {child} outlived its parent ({how})"
    finally:
        parent.kill()
        if "child" in locals() and not _gone(child):
            os.kill(child, signal.SIGKILL)
