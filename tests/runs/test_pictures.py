"""Pictures of detections: boxes drawn where the detections are (kd_detr/runs/pictures.py), `kd-detr predict
--draw`, and the gallery's layout (`kd-detr compare` writing it: tests/runs/test_compare.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kd_detr.cli import main
from kd_detr.runs.pictures import class_colour, draw_detections, write_gallery
from tests.support.runs import save_teacher


def test_boxes_are_drawn_in_their_class_colour_above_the_threshold():
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    dets = [{"box": [20, 30, 120, 150], "label": 2, "name": "car", "score": 0.9},
            {"box": [200, 20, 280, 100], "label": 5, "name": "dog", "score": 0.1}]
    out = np.asarray(draw_detections(image, dets, score_threshold=0.5, min_side=0))
    assert out.shape == (200, 300, 3)
    assert tuple(out[100, 20]) == class_colour(2)  # the kept box's left edge
    assert tuple(out[100, 70]) == (0, 0, 0)  # its inside is untouched
    assert not out[:, 190:].any()  # the box below the threshold is not drawn
    # ground truth (no score) is always drawn; a small image is scaled up, boxes with it
    small = np.asarray(draw_detections(Image.new("RGB", (64, 32)), [{"box": [8, 8, 24, 24], "label": 0}]))
    assert small.shape == (256, 512, 3) and tuple(small[100, 64]) == class_colour(0)  # x 8 -> 64
    assert class_colour(2) != class_colour(3)


def test_a_gallery_has_a_row_per_image_and_a_column_per_model(tmp_path):
    images = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(3)]
    gt = [[{"box": [4, 4, 30, 30], "label": 0}]] * 3
    path = write_gallery(tmp_path / "g.png", images, [("ground truth", gt), ("model", [None, [], gt[0]])], 0.3)
    with Image.open(path) as im:
        w, h = im.size
    assert (w, h) == (520, 780)  # 2.6 inches per column and per row at 100 dpi
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.fixture(scope="module")
def student_checkpoint(synth_data, tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("student"), synth_data)


def test_predict_draw_writes_each_image_with_its_boxes(synth_data, student_checkpoint, tmp_path):
    img = sorted((synth_data / "val2017").iterdir())[0]
    other = tmp_path / "x" / img.name  # a second image with the same stem gets its own picture
    other.parent.mkdir()
    other.write_bytes(img.read_bytes())
    res = CliRunner().invoke(main, ["predict", "--checkpoint", str(student_checkpoint), "--image", str(img),
                                    "--image", str(other), "--output", str(tmp_path / "p.json"),
                                    "--draw", str(tmp_path / "drawn"), "--score-threshold", "0"])
    assert res.exit_code == 0, res.output
    entries = json.loads((tmp_path / "p.json").read_text())
    pictures = sorted((tmp_path / "drawn").iterdir())
    assert [p.name for p in pictures] == [f"{img.stem}.png", f"{img.stem}_2.png"]
    with Image.open(pictures[0]) as drawn, Image.open(img) as original:
        assert drawn.size == original.size
        changed = (np.asarray(drawn.convert("RGB")).astype(int) != np.asarray(original.convert("RGB"))).any(-1)
    assert entries[0]["detections"] and changed.any()  # threshold 0: every detection drawn
    # a threshold above every score draws nothing
    res = CliRunner().invoke(main, ["predict", "--checkpoint", str(student_checkpoint), "--image", str(img),
                                    "--output", str(tmp_path / "q.json"), "--draw", str(tmp_path / "none"),
                                    "--score-threshold", "1"])
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "none" / f"{img.stem}.png") as drawn, Image.open(img) as original:
        assert (np.asarray(drawn.convert("RGB")) == np.asarray(original.convert("RGB"))).all()
