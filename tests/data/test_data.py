"""kd_detr.data: COCO dataset validation, label maps, replayable augmentation, collation."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from kd_detr.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationPolicy,
    CocoDetection,
    DatasetError,
    LabelMap,
    LabelMapError,
    View,
    apply_view,
    coco_paths,
    collate_fn,
    make_policy,
    read_categories,
    resize_size,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny per-image tensor ops are dominated by OpenMP hand-off with several threads on small CPUs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CATS = [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 7, "name": "bird"}]


def _write_images(img_dir, specs):
    """specs: {file_name: (h, w)} -> random RGB PNGs."""
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in specs.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / name)


def _dataset_dict(images, annotations, categories=CATS):
    d = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    return copy.deepcopy(d)  # tests mutate records; keep the module-level ones intact


def _img(i, h=30, w=40):
    return {"id": i, "file_name": f"{i}.png", "height": h, "width": w}


def _ann(i, image_id, bbox, cat=1, **kw):
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": cat, **kw}


def _make(tmp_path, images, annotations, categories=CATS, write=None, **kw):
    img_dir = tmp_path / "images"
    specs = {im["file_name"]: (im["height"], im["width"]) for im in images}
    if write is not None:
        specs = {k: v for k, v in specs.items() if k in write}
    _write_images(img_dir, specs)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(_dataset_dict(images, annotations, categories)))
    return CocoDetection(img_dir, ann_file, **kw)


# ------------------------------------------------------------------------------------------------
# dataset items
# ------------------------------------------------------------------------------------------------
def test_item_shapes_dtypes_and_box_convention(tmp_path):
    images = [_img(1, 30, 40), _img(2, 50, 20)]
    anns = [_ann(1, 1, [4, 2, 10, 10], 3), _ann(2, 1, [20, 10, 15, 20], 7), _ann(3, 2, [0, 0, 20, 50], 1)]
    ds = _make(tmp_path, images, anns, transforms=make_policy(True, 32), seed=1)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, t = ds[i]
            assert img.dtype == torch.float32 and img.dim() == 3 and img.shape[0] == 3
            assert t["size"].tolist() == list(img.shape[1:])
            assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
            assert t["labels"].dtype == torch.int64 and t["labels"].shape == t["boxes"].shape[:1]
            assert t["image_id"].dtype == torch.int64 and t["image_id"].dim() == 0
            assert t["orig_size"].tolist() == [images[i]["height"], images[i]["width"]]
            assert t["area"].shape == t["iscrowd"].shape == t["labels"].shape
            b = t["boxes"]
            # normalised cxcywh: the corners lie inside [0, 1] and sizes are positive
            x0, y0, x1, y1 = b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2
            assert (b[:, 2:] > 0).all()
            assert (x0 >= -1e-6).all() and (y0 >= -1e-6).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()

    # no transform: exact normalised cxcywh of the JSON box and exact ImageNet normalisation
    ds = _make(tmp_path / "plain", images, anns)
    img, t = ds[0]
    assert t["boxes"][0].tolist() == pytest.approx([9 / 40, 7 / 30, 10 / 40, 10 / 30])
    assert t["labels"].tolist() == [1, 2]  # contiguous: ids (1, 3, 7) -> 0, 1, 2
    raw = torch.from_numpy(np.array(Image.open(tmp_path / "plain" / "images" / "1.png"))).permute(2, 0, 1) / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(img, (raw - mean) / std, atol=1e-5)

    # eval policy: DETR's fixed shorter-side resize capped by max_size
    ds = _make(tmp_path / "eval", images, anns, transforms=make_policy(False, 32))
    assert ds[0][0].shape[1:] == resize_size((30, 40), 32, make_policy(False, 32).max_size) == (32, 42)
    assert ds[1][0].shape[1:] == resize_size((50, 20), 32, 53) == (52, 21)  # 80 > 53: capped


def test_coco_paths(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        coco_paths(tmp_path / "nope", "train")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DatasetError) as e:
        coco_paths(tmp_path, "val")
    assert "instances_val2017.json" in str(e.value) and "val2017" in str(e.value)
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"missing .*val2017$|missing .*val2017 "):
        coco_paths(tmp_path, "val")
    (tmp_path / "val2017").mkdir()
    assert coco_paths(tmp_path, "val") == (tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")


# ------------------------------------------------------------------------------------------------
# LabelMap
# ------------------------------------------------------------------------------------------------
def test_label_map_contiguous_raw_and_round_trip():
    lm = LabelMap.contiguous(CATS)
    assert lm.num_classes == 3
    assert lm.index_to_category == {0: 1, 1: 3, 2: 7}
    assert lm.category_to_index == {1: 0, 3: 1, 7: 2}
    assert lm.names == {1: "dog", 3: "cat", 7: "bird"}
    assert lm.name_of_index(2) == "bird" and lm.to_index(7) == 2 and lm.to_category(1) == 3

    raw = LabelMap.raw_ids(CATS)
    assert raw.num_classes == 91 and raw.index_to_category == {1: 1, 3: 3, 7: 7}
    assert raw.to_index(7) == 7
    with pytest.raises(KeyError, match="category id 2"):
        raw.to_index(2)
    with pytest.raises(LabelMapError, match="cannot hold category ids"):
        LabelMap.raw_ids([{"id": 95, "name": "x"}])

    for m in (lm, raw):
        d = json.loads(json.dumps(m.to_dict()))  # JSON-safe
        back = LabelMap.from_dict(d)
        assert back == m and back.category_to_index == m.category_to_index and back.names == m.names
        m.check_compatible(back)
    assert lm != raw
    with pytest.raises(LabelMapError, match="num_classes 3 .* vs 91") as e:
        lm.check_compatible(raw, "teacher vs student")
    assert "teacher vs student" in str(e.value)
    swapped = LabelMap(3, {0: 3, 1: 1, 2: 7}, names=lm.names)
    with pytest.raises(LabelMapError, match="index 0: category 1 vs 3"):
        lm.check_compatible(swapped)
    with pytest.raises(LabelMapError, match="duplicate category id"):
        LabelMap.contiguous([{"id": 1}, {"id": 1}])
    assert LabelMap.raw_ids(range(1, 91)).index_to_category[90] == 90  # bare ids are accepted


def test_read_categories(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"categories": CATS}))
    assert read_categories(f) == CATS
    f.write_text(json.dumps({"categories": [{"id": 1}, {"id": 1}]}))
    with pytest.raises(DatasetError, match=r"categories\[1\] repeats category id 1"):
        read_categories(f)


def test_dataset_label_map_raw_ids(tmp_path):
    ds = _make(tmp_path, [_img(1)], [_ann(1, 1, [1, 1, 5, 5], 7)], label_map="raw_ids")
    assert ds.label_map.num_classes == 91 and ds[0][1]["labels"].tolist() == [7]
    # a user map that lacks category 7: that annotation counts as an unknown category
    ds = _make(tmp_path / "b", [_img(1)], [_ann(1, 1, [1, 1, 5, 5], 7)],
               label_map=LabelMap.contiguous([{"id": 1}, {"id": 3}]), log_report=False)
    assert ds.report["unknown_category"] == 1 and len(ds[0][1]["labels"]) == 0


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_malformed_json_names_file_and_position(tmp_path):
    (tmp_path / "images").mkdir()
    f = tmp_path / "broken.json"
    f.write_text('{"images": [],\n  "annotations": [1, 2,\n')
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path / "images", f)
    msg = str(e.value)
    assert str(f) in msg and "malformed JSON at line 3 column 1" in msg


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d.pop("categories"), "missing required top-level key 'categories'"),
        (lambda d: d.pop("images"), "missing required top-level key 'images'"),
        (lambda d: d["images"][1].pop("file_name"), "images[1] is missing required key 'file_name'"),
        (lambda d: d["images"][0].pop("height"), "images[0] is missing required key 'height'"),
        (lambda d: d["images"][1].pop("id"), "images[1] is missing required key 'id'"),
        (lambda d: d["annotations"][2].pop("bbox"), "annotations[2] is missing required key 'bbox'"),
        (lambda d: d["annotations"][0].pop("image_id"), "annotations[0] is missing required key 'image_id'"),
        (lambda d: d["annotations"][1].pop("category_id"), "annotations[1] is missing required key 'category_id'"),
        (lambda d: d["annotations"][1].__setitem__("bbox", [1, 2, 3]), "annotations[1] 'bbox' must be"),
        (lambda d: d["categories"][0].pop("id"), "categories[0] is missing required key 'id'"),
        (lambda d: d["images"][0].__setitem__("width", 0), "images[0] (id 1) has invalid width 0"),
    ],
)
def test_missing_keys_name_key_file_and_record(tmp_path, mutate, expect):
    d = _dataset_dict([_img(1), _img(2)], [_ann(i + 1, 1, [1, 1, 4, 4]) for i in range(3)])
    mutate(d)
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(d))
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path / "images", f)
    assert expect in str(e.value) and str(f) in str(e.value)


def test_box_problems_counted_exactly(tmp_path, caplog):
    images = [_img(1, 30, 40), _img(2, 30, 40), _img(3, 30, 40)]
    anns = [
        _ann(1, 1, [5, 5, 10, 10], 1),       # fine
        _ann(2, 1, [5, 5, 0, 10], 1),        # zero width -> degenerate
        _ann(3, 1, [5, 5, 10, -3], 3),       # negative height -> degenerate
        _ann(4, 1, [30, 20, 20, 20], 3, area=400.0),  # partly outside -> clipped to [30,20,40,30]
        _ann(5, 1, [-4, -6, 10, 10], 7),     # partly outside (top-left) -> clipped to [0,0,6,4]
        _ann(6, 1, [50, 5, 10, 10], 1),      # fully outside (right)
        _ann(7, 1, [5, -20, 10, 10], 1),     # fully outside (above)
        _ann(8, 1, [5, 5, 10, 10], 42),      # unknown category
        _ann(9, 1, [2, 2, 20, 20], 1, iscrowd=1),  # crowd
        _ann(10, 99, [2, 2, 5, 5], 1),       # unknown image
        _ann(11, 2, [1, 2, 3, 4], 7),        # image 2: one fine box
    ]                                        # image 3: no annotations, kept
    with caplog.at_level(logging.INFO, logger="kd_detr.data.coco"):
        ds = _make(tmp_path, images, anns)
    r = ds.report
    assert dict(r.counts) == {
        "degenerate_box": 2, "clipped_box": 2, "outside_box": 2, "unknown_category": 1,
        "crowd": 1, "unknown_image": 1, "image_without_annotations": 1,
    }
    assert r.num_problems == 8 and r.num_images == 3 and r.num_annotations == 11
    assert r.num_kept_images == 3 and r.num_kept_annotations == 4
    assert "annotations[7]" in " ".join(r.examples["unknown_category"])
    logged = [rec for rec in caplog.records if "dataset report" in rec.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING

    _, t = ds.load(0)
    assert t["boxes"].tolist() == [[5, 5, 15, 15], [30, 20, 40, 30], [0, 0, 6, 4]]
    assert t["labels"].tolist() == [0, 1, 2]
    assert t["area"].tolist() == [100.0, 100.0, 24.0]  # JSON area scaled to the visible part
    assert len(ds) == 3
    img, t = ds[2]  # image without annotations is kept with empty targets
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and img.shape == (3, 30, 40)
    _, t = ds[0]
    assert (t["iscrowd"] == 0).all() and len(t["labels"]) == 3  # crowd dropped from training targets

    with pytest.raises(DatasetError, match=r"annotations\[7\] .*category_id 42"):
        _make(tmp_path / "strict", images, anns, strict=True)


def test_missing_and_unreadable_images(tmp_path):
    images = [_img(1), _img(2), _img(3), _img(4)]
    anns = [_ann(i, i, [1, 1, 5, 5]) for i in range(1, 5)]
    ds = _make(tmp_path, images, anns, write={"1.png", "3.png", "4.png"})
    (tmp_path / "images" / "3.png").write_bytes(b"not a png at all")
    Image.new("RGB", (41, 30)).save(tmp_path / "images" / "4.png")  # size differs from the JSON
    assert len(ds) == 4 and ds[0][0].shape == (3, 30, 40)
    with pytest.raises(DatasetError, match=r"image file .*2\.png .*does not exist"):
        ds[1]
    with pytest.raises(DatasetError, match=r"cannot read image file .*3\.png"):
        ds[2]
    with pytest.raises(DatasetError, match=r"4\.png is 41x30 but .* says 40x30"):
        ds[3]

    checked = CocoDetection(tmp_path / "images", tmp_path / "ann.json", validate_files=True, log_report=False)
    assert len(checked) == 1 and checked.image_ids == [1]
    r = checked.report
    assert (r["missing_file"], r["unreadable_file"], r["size_mismatch"]) == (1, 1, 1)
    assert r.num_kept_images == 1 and r.num_kept_annotations == 1


# ------------------------------------------------------------------------------------------------
# apply_view
# ------------------------------------------------------------------------------------------------
def _hand_case():
    image = torch.arange(20 * 40, dtype=torch.float32).reshape(1, 20, 40).repeat(3, 1, 1) / 800
    target = {
        "boxes": torch.tensor([[4.0, 2.0, 14.0, 12.0], [30.0, 16.0, 38.0, 19.0]]),
        "labels": torch.tensor([5, 9]),
        "area": torch.tensor([100.0, 24.0]),
        "iscrowd": torch.zeros(2, dtype=torch.int64),
        "image_id": torch.tensor(7),
        "orig_size": torch.tensor([20, 40]),
    }
    return image, target


def _close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), atol=1e-4)


def _xyxy(t):
    b, (h, w) = t["boxes"], t["size"].tolist()
    return torch.stack([(b[:, 0] - b[:, 2] / 2) * w, (b[:, 1] - b[:, 3] / 2) * h,
                        (b[:, 0] + b[:, 2] / 2) * w, (b[:, 1] + b[:, 3] / 2) * h], 1)


def test_apply_view_flip_exact():
    image, target = _hand_case()
    img, t = apply_view(image, target, View(source_size=(20, 40), flip=True), normalize=False)
    assert torch.equal(img, image.flip(-1))
    assert t["boxes"][0].tolist() == pytest.approx([31 / 40, 7 / 20, 10 / 40, 10 / 20])
    assert _close(_xyxy(t), [[26, 2, 36, 12], [2, 16, 10, 19]])
    assert t["labels"].tolist() == [5, 9] and t["size"].tolist() == [20, 40]
    assert t["image_id"].item() == 7 and t["orig_size"].tolist() == [20, 40]


def test_apply_view_resize_exact():
    image, target = _hand_case()
    img, t = apply_view(image, target, View(resize=(40, 60)), normalize=False)
    assert img.shape == (3, 40, 60) and t["size"].tolist() == [40, 60]
    assert _close(_xyxy(t), [[6, 4, 21, 24], [45, 32, 57, 38]])
    assert t["area"].tolist() == pytest.approx([300.0, 72.0])  # scaled by (40/20) * (60/40)


def test_apply_view_crop_clips_and_removes():
    image, target = _hand_case()
    view = View(source_size=(20, 40), crop=(5, 10, 10, 20))
    img, t = apply_view(image, target, view, normalize=False)
    assert torch.equal(img, image[:, 5:15, 10:30])
    # box 0 [4,2,14,12] -> shifted [-6,-3,4,7] -> clipped [0,0,4,7]; box 1 lies outside the crop
    assert _close(_xyxy(t), [[0, 0, 4, 7]])
    assert t["labels"].tolist() == [5] and t["iscrowd"].tolist() == [0]
    assert t["area"].tolist() == [28.0]

    # resize -> crop -> resize, as in the DETR crop branch
    view = View(source_size=(20, 40), flip=True, resize=(40, 80), crop=(10, 20, 20, 40), resize2=(10, 20))
    _, t = apply_view(image, target, view, normalize=False)
    # flip: [26,2,36,12],[2,16,10,19]; x2: [52,4,72,24],[4,32,20,38]; crop: [32,0,40,14], gone; /2
    assert _close(_xyxy(t), [[16, 0, 20, 7]])
    assert t["labels"].tolist() == [5]

    with pytest.raises(ValueError, match="sampled for an image of size"):
        apply_view(image, target, View(source_size=(21, 40)))
    with pytest.raises(ValueError, match="exceeds the resized image"):
        apply_view(image, target, View(crop=(15, 0, 10, 10)))


def test_apply_view_empty_target_and_pil_input():
    pil = Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8))
    img, t = apply_view(pil, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
                        View(flip=True, resize=(20, 24), crop=(2, 2, 10, 10), resize2=(5, 5)))
    assert img.shape == (3, 5, 5) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert torch.allclose(img[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


def test_view_and_policy_round_trip_and_sampling():
    v = View(source_size=(20, 40), flip=True, resize=(40, 80), crop=(1, 2, 3, 4), resize2=(5, 6))
    assert View.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert v.output_size == (5, 6)
    pol = make_policy(True, 128)
    assert AugmentationPolicy.from_dict(json.loads(json.dumps(pol.to_dict()))) == pol

    official = make_policy(True)
    assert official.scales == tuple(range(480, 801, 32)) and official.max_size == 1333
    assert (official.crop_min, official.crop_max, official.crop_resize_sizes) == (384, 600, (400, 500, 600))
    assert make_policy(False).sample(None, (480, 640)) == View(source_size=(480, 640), resize=(800, 1066))
    assert resize_size((480, 2000), 800, 1333) == (320, 1333)  # max_size caps the longer side
    assert pol.scales[0] == 77 and pol.scales[-1] == 128 and pol.max_size == 213
    assert (pol.crop_min, pol.crop_max, pol.crop_resize_sizes) == (61, 96, (64, 80, 96))

    seen_crop = seen_plain = seen_flip = 0
    for gen in (torch.Generator().manual_seed(0), np.random.default_rng(0)):
        for _ in range(200):
            v = pol.sample(gen, (128, 100))
            assert min(v.output_size) in pol.scales or max(v.output_size) == pol.max_size
            seen_flip += v.flip
            if v.crop is None:
                seen_plain += 1
                assert v.resize2 is None
            else:
                seen_crop += 1
                top, left, h, w = v.crop
                assert top + h <= v.resize[0] and left + w <= v.resize[1]
                assert min(pol.crop_min, v.resize[0]) <= h <= pol.crop_max
                assert min(v.resize) in pol.crop_resize_sizes
    assert seen_crop > 100 and seen_plain > 100 and 100 < seen_flip < 300
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [pol.sample(g1, (64, 64)) for _ in range(5)] == [pol.sample(g2, (64, 64)) for _ in range(5)]


def test_same_seed_epoch_index_same_sample_regardless_of_order(tmp_path):
    images = [_img(i, 30 + i, 40) for i in range(1, 7)]
    anns = [_ann(i, i, [2, 3, 10 + i, 8]) for i in range(1, 7)]
    a = _make(tmp_path / "a", images, anns, transforms=make_policy(True, 32), seed=11, log_report=False)
    b = _make(tmp_path / "b", images, anns, transforms=make_policy(True, 32), seed=11, log_report=False)
    a.set_epoch(2)
    b.set_epoch(2)
    forward = {i: a[i] for i in range(len(a))}
    backward = {i: b[i] for i in reversed(range(len(b)))}
    b[3]  # extra access must not disturb anything
    for i in forward:
        assert torch.equal(forward[i][0], backward[i][0])
        assert torch.equal(forward[i][1]["boxes"], backward[i][1]["boxes"])
        assert torch.equal(b[i][0], forward[i][0])
        view = a.sample_view(i)
        assert View.from_dict(json.loads(json.dumps(view.to_dict()))) == view
        assert torch.equal(a.get_view(i, view)[0], forward[i][0])  # replay
        assert torch.equal(a[(i, view.to_dict())][0], forward[i][0])
    assert [a.sample_view(i, epoch=3) for i in range(6)] != [a.sample_view(i) for i in range(6)]
    c = _make(tmp_path / "c", images, anns, transforms=make_policy(True, 32), seed=12, log_report=False)
    c.set_epoch(2)
    assert [c.sample_view(i) for i in range(6)] != [a.sample_view(i) for i in range(6)]


# ------------------------------------------------------------------------------------------------
# collate
# ------------------------------------------------------------------------------------------------
def test_collate_padding_and_mask_exact():
    im1 = torch.full((3, 2, 3), 1.0)
    im2 = torch.full((3, 4, 2), 2.0)
    t1, t2 = {"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 3])}
    images, mask, targets = collate_fn([(im1, t1), (im2, t2)])
    assert images.shape == (2, 3, 4, 3) and mask.shape == (2, 4, 3) and mask.dtype == torch.bool
    assert targets[0] is t1 and targets[1] is t2
    assert mask[0].tolist() == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    assert mask[1].tolist() == [[False, False, True]] * 4
    assert torch.equal(images[0, :, :2, :3], im1) and images[0, :, 2:].abs().sum() == 0
    assert torch.equal(images[1, :, :, :2], im2) and images[1, :, :, 2].abs().sum() == 0


def test_dataloader_worker_count_does_not_change_samples(tmp_path):
    images = [_img(i, 30, 40) for i in range(1, 5)]
    anns = [_ann(i, i, [2, 3, 10 + i, 8]) for i in range(1, 5)]
    ds = _make(tmp_path, images, anns, transforms=make_policy(True, 32), seed=5, log_report=False)
    ds.set_epoch(1)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_fn)
        batches.append(list(loader))
    for (i0, m0, t0), (i1, m1, t1) in zip(*batches):
        assert torch.equal(i0, i1) and torch.equal(m0, m1)
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(t0, t1))
