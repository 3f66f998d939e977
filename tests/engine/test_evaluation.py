"""PostProcess, COCO results conversion, COCOeval wrapper, model evaluation loop."""

import contextlib
import io
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from torch import nn

from kd_detr.criterion import compute_num_boxes
from kd_detr.evaluation import (
    METRIC_NAMES,
    evaluate,
    evaluate_model,
    evaluate_results,
    format_per_class_table,
    to_coco_results,
    write_eval_outputs,
    write_json_atomic,
)
from kd_detr.postprocess import PostProcess

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]
LABEL_MAP = SimpleNamespace(index_to_category={0: 1, 1: 3, 2: 7})  # non-contiguous ids
IMAGES = [
    {"id": 10, "width": 640, "height": 480, "file_name": "a.jpg"},
    {"id": 11, "width": 320, "height": 400, "file_name": "b.jpg"},
    {"id": 12, "width": 500, "height": 500, "file_name": "c.jpg"},
]
# (image_id, category_id, [x, y, w, h]): small (< 32^2), medium and large boxes.
BOXES = [
    (10, 1, [10.0, 20.0, 20.0, 15.0]),  # small
    (10, 3, [100.0, 100.0, 60.0, 50.0]),  # medium
    (10, 7, [200.0, 150.0, 300.0, 250.0]),  # large
    (11, 1, [50.0, 60.0, 120.0, 200.0]),  # large
    (11, 7, [5.0, 5.0, 25.0, 20.0]),  # small
    (12, 3, [250.0, 250.0, 80.0, 90.0]),  # medium
    (12, 3, [20.0, 300.0, 150.0, 180.0]),  # large
]


def _coco(tmp_path):
    anns = [
        {"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, (im, c, b) in enumerate(BOXES)
    ]
    # A crowd region: ignored by COCOeval, so unmatched it must not lower recall.
    anns.append({"id": 100, "image_id": 12, "category_id": 1, "bbox": [0.0, 0.0, 40.0, 40.0],
                 "area": 1600.0, "iscrowd": 1})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": IMAGES, "annotations": anns, "categories": CATEGORIES}))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _gt_results():
    return [{"image_id": im, "category_id": c, "bbox": list(b), "score": 0.9} for im, c, b in BOXES]


# ----------------------------------------------------------------------------- PostProcess
def test_postprocess_topk_labels_queries_and_absolute_boxes():
    logits = torch.full((2, 3, 4), -6.0)
    logits[0, 2, 1] = 3.0  # best of image 0: query 2, class 1
    logits[0, 0, 3] = 1.0  # second: query 0, class 3
    logits[1, 1, 0] = 2.0
    boxes = torch.tensor([
        [[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]],
        [[0.95, 0.5, 0.2, 0.2], [0.95, 0.5, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]],
    ])
    sizes = torch.tensor([[100, 200], [50, 80]])  # (h, w)
    out = PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert len(out) == 2 and out[0]["scores"].shape == (2,)
    assert out[0]["query"].tolist() == [2, 0] and out[0]["labels"].tolist() == [1, 3]
    assert out[0]["scores"][0].item() == pytest.approx(1 / (1 + math.exp(-3.0)))
    # query 2: cx 0.25*200=50, cy 0.75*100=75, w 100, h 50 -> (0, 50, 100, 100)
    assert out[0]["boxes"][0].tolist() == pytest.approx([0.0, 50.0, 100.0, 100.0])
    # query 0: cx 100, cy 50, w 40, h 40 -> (80, 30, 120, 70)
    assert out[0]["boxes"][1].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])
    # image 1, query 1: x from (0.95-0.1)*80 = 68 to 1.05*80 = 84 > w: not clipped (official)
    assert out[1]["query"][0].item() == 1 and out[1]["labels"][0].item() == 0
    assert out[1]["boxes"][0].tolist() == pytest.approx([68.0, 20.0, 84.0, 30.0])
    assert out[0]["labels"].dtype == torch.int64 and out[0]["query"].dtype == torch.int64
    # k = min(num_select, Q * C)
    allk = PostProcess(100)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert allk[0]["scores"].shape == (12,)
    assert torch.all(allk[0]["scores"][:-1] >= allk[0]["scores"][1:])


# ----------------------------------------------------------------------------- conversion
def test_to_coco_results_maps_labels_and_converts_boxes():
    preds = {
        10: {"scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([2, 0, 5]),
             "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.5, 1.0, 2.5, 4.0], [0.0, 0.0, 1.0, 1.0]])},
        torch.tensor(11).item(): {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                                  "boxes": torch.zeros(0, 4)},
    }
    res = to_coco_results(preds, LABEL_MAP)
    assert len(res) == 2  # label 5 has no category: dropped
    assert res[0] == {"image_id": 10, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)}
    assert res[1]["category_id"] == 1 and res[1]["bbox"] == [0.5, 1.0, 2.0, 3.0]
    assert to_coco_results(preds, {0: 5, 2: 9})[0]["category_id"] == 9  # plain mapping accepted
    with pytest.raises(TypeError):
        to_coco_results(preds, None)


# ----------------------------------------------------------------------------- COCOeval
def test_ground_truth_as_predictions_scores_ap_one(tmp_path):
    coco = _coco(tmp_path)
    r = evaluate_results(coco, _gt_results())
    assert r.stats[0] == pytest.approx(1.0)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert r.metrics[name] == pytest.approx(1.0), name
    assert list(r.metrics) == list(METRIC_NAMES)
    lines = r.summary_text.splitlines()
    assert len(lines) == 12
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]")
    assert lines[0].endswith("= 1.000")
    assert [c["category_id"] for c in r.per_class] == [1, 3, 7]
    assert [c["name"] for c in r.per_class] == ["cat", "dog", "bird"]
    assert all(c["AP"] == pytest.approx(1.0) for c in r.per_class)
    assert r.num_images == 3 and r.num_detections == len(BOXES) and r.note == ""


def test_partial_detections_and_image_subset(tmp_path):
    coco = _coco(tmp_path)
    res = [d for d in _gt_results() if not (d["image_id"] == 12 and d["bbox"][0] == 20.0)]
    r = evaluate_results(coco, res)
    assert r.stats[0] < 1.0 and r.metrics["APl"] < 1.0
    dog = next(c for c in r.per_class if c["name"] == "dog")
    assert dog["AP"] < 1.0
    # Restricted to image 10 the missing box does not count; cats and birds only appear there once each
    r10 = evaluate_results(coco, res, image_ids=[10])
    assert r10.stats[0] == pytest.approx(1.0) and r10.num_images == 1 and r10.num_detections == 3
    with pytest.raises(ValueError, match="absent"):
        evaluate_results(coco, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    before = [dict(d) for d in res]
    evaluate_results(coco, res)
    assert res == before  # pycocotools' loadRes mutates its input; ours must not


def test_empty_results_do_not_crash(tmp_path):
    coco = _coco(tmp_path)
    r = evaluate_results(coco, [])
    assert r.stats[0] == 0.0 and r.metrics["AR100"] == 0.0
    assert len(r.summary_text.splitlines()) == 12
    assert "no detections" in r.note and r.num_detections == 0
    assert all(c["AP"] == 0.0 for c in r.per_class)
    json.dumps(r.to_dict(), allow_nan=False)


def test_per_class_table_and_json_outputs(tmp_path):
    coco = _coco(tmp_path)
    r = evaluate_results(coco, _gt_results(), image_ids=[11])  # dog has no GT in image 11 -> NaN
    dog = next(c for c in r.per_class if c["name"] == "dog")
    assert math.isnan(dog["AP"])
    table = format_per_class_table(r.per_class, num_columns=2)
    lines = table.splitlines()
    assert lines[0].count("category") == 2 and len(lines) == 2 + 2
    assert "| cat " in table and "100.000" in table and "nan" in table

    out = tmp_path / "out"
    write_json_atomic(out / "x.json", {"a": 1})
    write_json_atomic(out / "x.json", {"a": 2})  # replaces
    assert json.loads((out / "x.json").read_text()) == {"a": 2}
    write_json_atomic(out / "x.json", {"a": [float("nan"), 1.5, float("inf")]})
    assert json.loads((out / "x.json").read_text()) == {"a": [None, 1.5, None]}  # strict JSON
    res_path, met_path = write_eval_outputs(out, r, _gt_results())
    assert json.loads(res_path.read_text()) == _gt_results()
    met = json.loads(met_path.read_text())
    assert met["metrics"]["AP"] == pytest.approx(r.stats[0]) and len(met["stats"]) == 12
    assert next(c for c in met["per_class"] if c["name"] == "dog")["AP"] is None
    assert sorted(os.listdir(out)) == ["metrics.json", "results.json", "x.json"]  # no temp files left


# ----------------------------------------------------------------------------- model loop
class _OracleModel(nn.Module):
    """Predicts each image's ground truth; the image id is encoded in pixel [0, 0, 0]."""

    def __init__(self, num_queries=4):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.table = {}
        sizes = {im["id"]: (im["height"], im["width"]) for im in IMAGES}
        cat_to_idx = {v: k for k, v in LABEL_MAP.index_to_category.items()}
        for im in IMAGES:
            logits = torch.full((num_queries, 3), -8.0)
            boxes = torch.full((num_queries, 4), 0.5)
            h, w = sizes[im["id"]]
            for q, (_, c, (x, y, bw, bh)) in enumerate(b for b in BOXES if b[0] == im["id"]):
                logits[q, cat_to_idx[c]] = 6.0
                boxes[q] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
            self.table[im["id"]] = (logits, boxes)

    def forward(self, images, mask):
        assert not self.training
        ids = [int(i) for i in images[:, 0, 0, 0]]
        return {
            "pred_logits": torch.stack([self.table[i][0] for i in ids]) + self.dummy,
            "pred_boxes": torch.stack([self.table[i][1] for i in ids]),
        }


def _loader(image_ids, batch_size=2):
    by_id = {im["id"]: im for im in IMAGES}
    for s in range(0, len(image_ids), batch_size):
        ids = image_ids[s : s + batch_size]
        images = torch.zeros(len(ids), 3, 8, 8)
        images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float)
        targets = [{"image_id": torch.tensor(i), "orig_size": torch.tensor([by_id[i]["height"], by_id[i]["width"]])}
                   for i in ids]
        yield images, torch.zeros(len(ids), 8, 8, dtype=torch.bool), targets


def test_evaluate_model_with_oracle(tmp_path):
    coco = _coco(tmp_path)
    model = _OracleModel().train()
    result, results = evaluate_model(model, list(_loader([10, 11, 12])), coco, LABEL_MAP, "cpu", progress=False)
    assert model.training  # mode restored
    assert result.stats[0] == pytest.approx(1.0)
    assert result.num_images == 3 and len(results) == 3 * 12  # k = min(100, Q * C = 12)
    # Only the loader's images are evaluated (subset run).
    sub = evaluate(model, list(_loader([11])), coco, LABEL_MAP, "cpu", output_dir=tmp_path / "ev", progress=False)
    assert sub.num_images == 1 and sub.stats[0] == pytest.approx(1.0)
    assert {"results.json", "metrics.json"} <= set(os.listdir(tmp_path / "ev"))


def _dist_worker(rank, world_size, init_file, gt_path, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(gt_path)
        # A padding sampler repeats image 10 on rank 1: it must be counted once.
        ids = [10, 12] if rank == 0 else [11, 10]
        result, results = evaluate_model(_OracleModel(), _loader(ids), coco, LABEL_MAP, "cpu", progress=False)
        n = compute_num_boxes([{"labels": torch.zeros(1 + 3 * rank)}], "cpu")  # (1 + 4) / 2
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"ap": result.stats[0], "n_img": result.num_images, "n_res": len(results),
                       "num_boxes": n}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_gather_and_num_boxes(tmp_path):
    _coco(tmp_path)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "gt.json"), str(tmp_path)), nprocs=2)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == {"ap": pytest.approx(1.0), "n_img": 3, "n_res": 36, "num_boxes": 2.5}
    assert r1 == {"ap": pytest.approx(1.0), "n_img": 3, "n_res": 0, "num_boxes": 2.5}
