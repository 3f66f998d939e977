"""kd_detr.data.synth: deterministic, valid and varied synthetic COCO data, written atomically."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch

from kd_detr.data import CATEGORY_NAMES, CocoDetection, coco_paths, generate_synthetic, make_policy
from kd_detr.data import synth


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    a = generate_synthetic(base / "a", 24, 8, 128, seed=3, progress=False)
    b = generate_synthetic(base / "b", 24, 8, 128, seed=3, progress=False)
    c = generate_synthetic(base / "c", 24, 8, 128, seed=4, progress=False)
    big = generate_synthetic(base / "big", 150, 0, 128, seed=0, progress=False)
    return a, b, c, big


def test_layout_and_determinism(datasets):
    a, b, c, _ = datasets
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert "annotations/instances_train2017.json" in fa and "annotations/instances_val2017.json" in fa
    assert sum(k.startswith("train2017/") and k.endswith(".png") for k in fa) == 24
    assert sum(k.startswith("val2017/") and k.endswith(".png") for k in fa) == 8
    assert fa == fb  # same seed: identical bytes, JSON and images
    assert fa.keys() == fc.keys()
    assert fa["annotations/instances_train2017.json"] != fc["annotations/instances_train2017.json"]
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".png"))
    assert not list(a.parent.glob(".*partial*"))


def test_image_i_does_not_depend_on_dataset_size(datasets, tmp_path):
    a, *_ = datasets
    small = generate_synthetic(tmp_path / "s", 5, 0, 128, seed=3, progress=False)
    for p in sorted((small / "train2017").iterdir()):
        assert p.read_bytes() == (a / "train2017" / p.name).read_bytes()


def test_valid_for_pycocotools_gt_as_predictions_is_ap_1(datasets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    a, *_ = datasets
    for split in ("train", "val"):
        ann_file, img_dir = coco_paths(a, split)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ann_file))
            dets = [
                {"image_id": x["image_id"], "category_id": x["category_id"], "bbox": x["bbox"], "score": 1.0}
                for x in gt.dataset["annotations"]
            ]
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)
        assert ev.stats[1] == pytest.approx(1.0)
        for img in gt.dataset["images"]:
            assert (img_dir / img["file_name"]).is_file() and (img["width"], img["height"]) == (128, 128)
        for x in gt.dataset["annotations"]:
            bx, by, bw, bh = x["bbox"]
            assert x["iscrowd"] == 0 and x["area"] == bw * bh and bw > 0 and bh > 0
            assert bx >= 0 and by >= 0 and bx + bw <= 128 and by + bh <= 128
        assert "info" in gt.dataset and "licenses" in gt.dataset


def test_variety(datasets):
    *_, big = datasets
    d = json.loads((big / "annotations" / "instances_train2017.json").read_text())
    anns = d["annotations"]
    assert [c["name"] for c in d["categories"]] == list(CATEGORY_NAMES)
    cats = Counter(a["category_id"] for a in anns)
    assert set(cats) == set(range(1, 7)) and min(cats.values()) >= 0.5 * max(cats.values())
    area = np.array([a["area"] for a in anns])
    small, medium, large = (area < 32**2).sum(), ((area >= 32**2) & (area < 96**2)).sum(), (area >= 96**2).sum()
    assert small >= 0.2 * len(anns) and medium >= 0.2 * len(anns) and large >= 5
    aspect = np.array([a["bbox"][2] / a["bbox"][3] for a in anns])
    assert aspect.min() < 0.6 and aspect.max() > 1.7
    per_image = Counter(a["image_id"] for a in anns)
    counts = Counter(per_image.get(im["id"], 0) for im in d["images"])
    assert counts[0] >= 1 and max(counts) >= 7 and len(counts) >= 7
    # colour is not informative: mean object colour per category is close to the overall mean
    ds = CocoDetection(*coco_paths(big, "train")[::-1], log_report=False)
    means = {k: [] for k in range(6)}
    for i in range(60):
        img, t = ds.load(i)
        arr = np.asarray(img, dtype=np.float32)
        for (x0, y0, x1, y1), lab in zip(t["boxes"].round().int().tolist(), t["labels"].tolist()):
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            means[lab].append(arr[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2].reshape(-1, 3).mean(0))
    per_cat = np.array([np.mean(v, 0) for v in means.values()])
    assert np.abs(per_cat - per_cat.mean(0)).max() < 45  # RGB range 0..255; colours are uniform


def test_loads_cleanly_as_dataset(datasets):
    a, *_ = datasets
    ann_file, img_dir = coco_paths(a, "val")
    ds = CocoDetection(img_dir, ann_file, make_policy(True, 128), log_report=False, validate_files=True)
    assert ds.report.num_problems == 0 and len(ds) == 8
    assert ds.image_ids[0] == 1_000_001
    img, t = ds[0]
    assert img.shape[0] == 3 and t["boxes"].dtype == torch.float32


def test_no_partial_files_on_failure(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth.render_image

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kw)

    monkeypatch.setattr(synth, "render_image", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_synthetic(tmp_path / "out", 4, 4, 64, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output(tmp_path):
    out = generate_synthetic(tmp_path / "d", 3, 2, 64, seed=1, progress=False)
    before = _files(out)
    assert generate_synthetic(tmp_path / "d", 3, 2, 64, seed=1, progress=False) == out  # same params: reused
    assert _files(out) == before
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_synthetic(tmp_path / "d", 3, 2, 64, seed=2, progress=False)
    generate_synthetic(tmp_path / "d", 3, 2, 64, seed=2, overwrite=True, progress=False)
    assert _files(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_options(tmp_path):
    out = generate_synthetic(tmp_path / "o", 20, 0, 64, seed=0, num_categories=3, objects_per_image=(2, 3),
                             empty_prob=0.0, clutter=0.0, progress=False)
    d = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in d["categories"]] == [1, 2, 3]
    assert {a["category_id"] for a in d["annotations"]} <= {1, 2, 3}
    per_image = Counter(a["image_id"] for a in d["annotations"])
    assert all(1 <= per_image[im["id"]] <= 3 for im in d["images"])
    assert d["info"]["generator_params"]["num_categories"] == 3
    with pytest.raises(ValueError, match="num_categories"):
        generate_synthetic(tmp_path / "x", 1, 1, 64, num_categories=7)


def test_class_colours_paint_each_category_in_its_own_colour(tmp_path):
    """The quickstart's task: the category is readable from the colour (and shape); the default is not."""
    out = generate_synthetic(tmp_path / "cc", 12, 0, 128, seed=1, objects_per_image=(1, 4), clutter=0.3,
                             min_object_size=20, class_colours=True, progress=False)
    doc = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    assert doc["info"]["generator_params"]["class_colours"] is True
    assert "colour = category" in doc["info"]["description"]
    from PIL import Image

    hits = {}
    for ann in doc["annotations"]:
        img = np.asarray(Image.open(out / "train2017" / f"{ann['image_id']:012d}.png"), dtype=np.float64)
        x, y, w, h = ann["bbox"]
        patch = img[y:y + h, x:x + w].reshape(-1, 3)
        # fraction of box pixels within the jitter (+-20 per channel) of each category's colour
        close = [(np.abs(patch - c).max(1) <= 21).mean() for c in synth._CLASS_COLOURS[:6]]
        hits.setdefault(ann["category_id"], []).append(int(np.argmax(close)) + 1)
        assert max(close) > 0.15
    assert sum(v == k for k, vs in hits.items() for v in vs) >= 0.9 * len(doc["annotations"])
    # the default data set records no class_colours key, so data sets written before the option still match
    plain = generate_synthetic(tmp_path / "plain", 2, 0, 64, seed=1, progress=False)
    params = json.loads((plain / "annotations" / "instances_train2017.json").read_text())["info"]["generator_params"]
    assert "class_colours" not in params
