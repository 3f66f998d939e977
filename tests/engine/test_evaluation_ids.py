"""Audit finding: annotation ids numbered from 0 silently lowered AP (pycocotools never matches a ground
truth whose id is 0); kd-detr renumbers them, says so once, and scores exactly as ids from 1."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kd_detr.evaluation import eval_ground_truth, evaluate_results

# ------------------------------------------------------------------------------- 1. annotation id 0

IMAGES = [{"id": 1, "file_name": "a.png", "width": 200, "height": 200},
          {"id": 2, "file_name": "b.png", "width": 200, "height": 200}]
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
# (image_id, category_id, [x, y, w, h]): small, medium and large boxes
BOXES = [(1, 1, [10.0, 10.0, 20.0, 15.0]), (1, 2, [60.0, 50.0, 60.0, 50.0]), (1, 1, [20.0, 100.0, 150.0, 90.0]),
         (2, 2, [5.0, 5.0, 25.0, 20.0]), (2, 1, [100.0, 100.0, 80.0, 70.0])]


def _gt_dict(first_id: int, images=IMAGES, categories=CATEGORIES, boxes=BOXES) -> dict:
    anns = [{"id": first_id + i, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (im, c, b) in enumerate(boxes)]
    return {"images": copy.deepcopy(images), "annotations": anns, "categories": copy.deepcopy(categories)}


def _coco(data: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(data)
        coco.createIndex()
    return coco


def _perfect(boxes=BOXES) -> list[dict]:
    return [{"image_id": im, "category_id": c, "bbox": list(b), "score": 0.9} for im, c, b in boxes]


def _imperfect() -> list[dict]:
    """Shifted boxes, a wrong class, a duplicate and a false positive at varied scores: AP strictly in (0, 1)."""
    dets = []
    for k, (im, c, b) in enumerate(BOXES):
        x, y, w, h = b
        dets.append({"image_id": im, "category_id": c, "bbox": [x + 0.08 * k * w, y, w, h], "score": 0.9 - 0.1 * k})
    dets.append({"image_id": 1, "category_id": 2, "bbox": [10.0, 10.0, 20.0, 15.0], "score": 0.95})  # wrong class
    dets.append({"image_id": 2, "category_id": 1, "bbox": [101.0, 99.0, 80.0, 70.0], "score": 0.3})  # duplicate
    dets.append({"image_id": 2, "category_id": 2, "bbox": [150.0, 10.0, 30.0, 30.0], "score": 0.85})  # nothing there
    return dets


def _raw_pycocotools(data: dict, dets: list[dict]) -> list[float]:
    gt = _coco(data)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


def test_annotation_ids_from_zero_score_perfect_detections_at_ap_one(caplog):
    data = _gt_dict(0)
    # the finding: plain pycocotools loses the ground truth with id 0
    raw = _raw_pycocotools(data, _perfect())
    assert raw[0] < 0.99 and raw[8] == pytest.approx((2 / 3 + 1) / 2)  # AR100: 1 of the 3 cats missed
    gt = _coco(data)
    with caplog.at_level(logging.WARNING, logger="kd_detr.evaluation"):
        first = evaluate_results(gt, _perfect())
        second = evaluate_results(gt, _perfect())
    for res in (first, second):
        assert res.stats[0] == pytest.approx(1.0) and res.metrics["AR100"] == pytest.approx(1.0)
        assert [c["AP"] for c in res.per_class] == [pytest.approx(1.0), pytest.approx(1.0)]
    said = [r.getMessage() for r in caplog.records if "renumbered" in r.getMessage()]
    assert len(said) == 1, said  # said once per ground truth, not at every evaluation
    assert "1 annotation id(s) of the ground truth are not positive integers (first: 0)" in said[0]
    assert "renumbered 1..5 in file order" in said[0] and "\n" not in said[0]
    # the caller's COCO keeps its ids
    assert [a["id"] for a in gt.dataset["annotations"]] == [0, 1, 2, 3, 4] and sorted(gt.anns) == [0, 1, 2, 3, 4]


def test_renumbered_ids_score_exactly_as_ids_from_one():
    dets = _imperfect()
    one_based = _gt_dict(1)
    reference = _raw_pycocotools(one_based, dets)
    assert 0.05 < reference[0] < 0.95  # the detections are really imperfect
    gt1 = _coco(one_based)
    assert eval_ground_truth(gt1) is gt1  # valid ids: no copy
    res1 = evaluate_results(gt1, dets)
    assert res1.stats == reference
    for first_id in (0, -2):  # from 0, and negative ids around 0
        res0 = evaluate_results(_coco(_gt_dict(first_id)), dets)
        assert res0.stats == reference and res0.per_class == res1.per_class
        assert res0.summary_text == res1.summary_text


def test_image_and_category_id_zero_need_no_renumbering(caplog):
    images = [dict(IMAGES[0], id=0), IMAGES[1]]
    categories = [{"id": 0, "name": "cat"}, {"id": 2, "name": "dog"}]
    boxes = [(0 if im == 1 else im, 0 if c == 1 else c, b) for im, c, b in BOXES]
    data = _gt_dict(1, images, categories, boxes)
    assert _raw_pycocotools(data, _perfect(boxes))[0] == pytest.approx(1.0)  # pycocotools handles id 0 there
    with caplog.at_level(logging.WARNING, logger="kd_detr.evaluation"):
        res = evaluate_results(_coco(data), _perfect(boxes))
    assert res.stats[0] == pytest.approx(1.0) and res.num_images == 2
    assert not [r for r in caplog.records if "renumbered" in r.getMessage()]


def test_dataset_with_ids_from_zero_names_its_file_and_leaves_it_untouched(synth_data, tmp_path, caplog):
    from kd_detr.data import CocoDetection

    src = json.loads((synth_data / "annotations" / "instances_val2017.json").read_text())
    for i, a in enumerate(src["annotations"]):
        a["id"] = i  # numbered from 0, as many converters do
    ann = tmp_path / "val0.json"
    ann.write_text(json.dumps(src))
    before = ann.read_bytes()
    ds = CocoDetection(synth_data / "val2017", ann, log_report=False)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in src["annotations"]]
    with caplog.at_level(logging.WARNING, logger="kd_detr.evaluation"):
        res = evaluate_results(ds.coco, perfect)
    assert res.stats[0] == pytest.approx(1.0) and res.metrics["AR100"] == pytest.approx(1.0)
    said = [r.getMessage() for r in caplog.records if "renumbered" in r.getMessage()]
    assert len(said) == 1 and f"of {ann} are not positive integers (first: 0)" in said[0]
    assert ann.read_bytes() == before
