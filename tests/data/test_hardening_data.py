"""Hardening of the data layer: every bad input is a one-line error naming the file / record, or a counted skip."""

from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kd_detr.data import CocoDetection, DataSpec, DatasetError, View, collate_fn, load_coco_json, make_policy
from kd_detr.data import coco as coco_mod
from kd_detr.data.coco import read_image
from kd_detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_rgb
from kd_detr.data.view_plan import PlanViews, ViewPlan

CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    coco_mod._WARNED_HIGH_BIT.clear()
    yield
    coco_mod._WARNED_HIGH_BIT.clear()


def _img(i, h=30, w=40, name=None):
    return {"id": i, "file_name": name or f"{i}.png", "height": h, "width": w}


def _ann(i, image_id, bbox=(2, 2, 10, 10), cat=1):
    return {"id": i, "image_id": image_id, "bbox": list(bbox), "category_id": cat}


def _write_json(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATS}))
    return path


def _rgb_png(path, h=30, w=40, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _setup(tmp_path, n=3, write=None):
    """n images (all written unless ``write`` lists the names to write), one box each."""
    images = [_img(i) for i in range(1, n + 1)]
    for im in images:
        if write is None or im["file_name"] in write:
            _rgb_png(tmp_path / "images" / im["file_name"])
    (tmp_path / "images").mkdir(exist_ok=True)
    ann = _write_json(tmp_path / "ann.json", images, [_ann(i, i) for i in range(1, n + 1)])
    return tmp_path / "images", ann


# ------------------------------------------------------------------------------------------------
# 1. duplicate ids
# ------------------------------------------------------------------------------------------------
def test_duplicate_annotation_ids_refused_naming_file_ids_and_count(tmp_path):
    img_dir, _ = _setup(tmp_path, n=2)
    # two merged files, each numbered from 1
    anns = [_ann(1, 1), _ann(2, 1), _ann(1, 2), _ann(2, 2), _ann(3, 2)]
    f = _write_json(tmp_path / "merged.json", [_img(1), _img(2)], anns)
    with pytest.raises(DatasetError) as e:
        CocoDetection(img_dir, f, log_report=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(f) in msg
    assert "2 annotations repeat an id" in msg and "duplicated ids: 1, 2" in msg
    assert "annotations[0] and annotations[2]" in msg and "renumber the annotations" in msg
    with pytest.raises(DatasetError, match="duplicated ids: 1"):
        load_coco_json(f)

    # the minimal case: two annotations share id 1
    f2 = _write_json(tmp_path / "two.json", [_img(1), _img(2)], [_ann(1, 1), _ann(1, 2)])
    with pytest.raises(DatasetError, match=r"1 annotations repeat an id .*duplicated ids: 1;.*renumber"):
        CocoDetection(img_dir, f2, log_report=False)

    # id-less annotations still get fresh unique ids
    f3 = _write_json(tmp_path / "noid.json", [_img(1)], [{"image_id": 1, "bbox": [1, 1, 4, 4], "category_id": 1}] * 2)
    assert sorted(a["id"] for a in load_coco_json(f3)["annotations"]) == [1, 2]


def test_duplicate_image_ids_refused(tmp_path):
    img_dir, _ = _setup(tmp_path, n=2)
    f = _write_json(tmp_path / "dup_img.json", [_img(1), _img(1, name="2.png"), _img(2)], [_ann(1, 1)])
    with pytest.raises(DatasetError) as e:
        CocoDetection(img_dir, f, log_report=False)
    msg = str(e.value)
    assert str(f) in msg and "1 images repeat an id" in msg and "duplicated ids: 1;" in msg
    assert "images[0] and images[1]" in msg and "unique 'id'" in msg


# ------------------------------------------------------------------------------------------------
# 2. 16-bit images
# ------------------------------------------------------------------------------------------------
def test_16bit_png_converted_not_white(tmp_path, caplog):
    h, w = 30, 40
    v16 = np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name in ("1.png", "2.png"):
        Image.fromarray(v16).save(img_dir / name)
    assert Image.open(img_dir / "1.png").mode in ("I;16", "I")  # what Pillow makes of a 16-bit grayscale PNG
    ann = _write_json(tmp_path / "ann.json", [_img(1), _img(2)], [_ann(1, 1)])

    with caplog.at_level(logging.WARNING, logger="kd_detr.data.coco"):
        ds = CocoDetection(img_dir, ann, log_report=False)
        img0, _ = ds[0]
        img1, _ = ds[1]
    expect8 = ((v16.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 16-bit -> 8-bit
    raw = torch.from_numpy(expect8).float()[None].repeat(3, 1, 1) / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert img0.std() > 0.5  # not a constant (all-white) image
    assert torch.allclose(img0, (raw - mean) / std, atol=1e-5)
    assert torch.equal(img0, img1)
    # one warning per data set, naming the first such file
    warned = [r.getMessage() for r in caplog.records if "high bit depth" in r.getMessage()]
    assert len(warned) == 1 and "1.png" in warned[0] and str(ann) in warned[0]

    # the predict path's reader gives the same pixels
    assert np.array_equal(np.asarray(read_image(img_dir / "2.png"))[..., 0], expect8)
    # validate_files counts them
    checked = CocoDetection(img_dir, ann, validate_files=True, log_report=False)
    assert checked.report["high_bit_depth"] == 2 and len(checked) == 2


def test_to_rgb_modes():
    v = np.array([[0, 257, 65535]], dtype=np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(v)))[0, :, 0].tolist() == [0, 1, 255]
    i32 = Image.fromarray(v.astype(np.int32))  # mode "I", values within 16 bits
    assert i32.mode == "I" and np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 1, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255]
    assert to_rgb(Image.new("L", (3, 2), 7)).mode == "RGB"


# ------------------------------------------------------------------------------------------------
# 3. decompression bombs and other PIL errors
# ------------------------------------------------------------------------------------------------
def test_decompression_bomb_names_file_pixels_and_limit(tmp_path, monkeypatch):
    img_dir, ann = _setup(tmp_path, n=1)
    ds = CocoDetection(img_dir, ann, log_report=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 30x40 = 1200 > 2 * 100: PIL's error
    with pytest.raises(DatasetError) as e:
        ds[0]
    msg = str(e.value)
    assert "\n" not in msg and str(img_dir / "1.png") in msg
    assert "1,200 pixels" in msg and "limit of 200" in msg and "MAX_IMAGE_PIXELS" in msg
    with pytest.raises(DatasetError, match=r"1\.png.*MAX_IMAGE_PIXELS"):
        read_image(img_dir / "1.png")

    # between 1x and 2x the limit PIL only warns; with warnings as errors it is the same one-line error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DatasetError, match=r"1\.png.*1,200 pixels"):
            ds[0]

    # validate_files: counted and skipped, not a traceback
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    checked = CocoDetection(img_dir, ann, validate_files=True, log_report=False)
    assert len(checked) == 0 and checked.report["unreadable_file"] == 1
    assert "MAX_IMAGE_PIXELS" in checked.report.examples["unreadable_file"][0]


def test_other_errors_in_getitem_name_the_file(tmp_path):
    img_dir, ann = _setup(tmp_path, n=1)
    ds = CocoDetection(img_dir, ann, log_report=False)
    with pytest.raises(DatasetError) as e:
        ds[(0, View(source_size=(5, 5)))]  # a view sampled for another image
    assert str(img_dir / "1.png") in str(e.value) and "image id 1" in str(e.value)
    with pytest.raises(IndexError):
        ds[3]


# ------------------------------------------------------------------------------------------------
# 4. missing files checked at load
# ------------------------------------------------------------------------------------------------
def test_missing_files_found_at_load(tmp_path):
    names = [f"{i}.png" for i in range(1, 9)]
    img_dir, ann = _setup(tmp_path, n=8, write={"1.png", "4.png"})
    with pytest.raises(DatasetError) as e:
        CocoDetection(img_dir, ann, check_files=True, log_report=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"6 of 8 image files listed in {ann} do not exist under {img_dir}" in msg
    assert str(img_dir / "2.png") in msg and str(img_dir / "7.png") in msg and "8.png" not in msg  # first 5
    assert "1.png" not in msg and ", ..." in msg

    # validate_files wins: counted and skipped
    checked = CocoDetection(img_dir, ann, check_files=True, validate_files=True, log_report=False)
    assert len(checked) == 2 and checked.report["missing_file"] == 6
    # without the check the file is reported when read (one line, naming it)
    lazy = CocoDetection(img_dir, ann, log_report=False)
    with pytest.raises(DatasetError, match=r"2\.png .*does not exist"):
        lazy[1]

    # the run entry points check: train and val sets fail before training starts
    spec = DataSpec(train_ann=str(ann), train_images=str(img_dir), val_ann=str(ann), val_images=str(img_dir))
    with pytest.raises(DatasetError, match="6 of 8 image files"):
        spec.train_set()
    with pytest.raises(DatasetError, match="6 of 8 image files"):
        spec.val_set(lazy.label_map)
    for n in names:
        if not (img_dir / n).exists():
            _rgb_png(img_dir / n)
    assert len(spec.train_set(log_report=False)) == 8


def test_file_check_handles_sub_folders(tmp_path):
    img_dir = tmp_path / "images"
    _rgb_png(img_dir / "a" / "1.png")
    ann = _write_json(tmp_path / "ann.json", [_img(1, name="a/1.png"), _img(2, name="b/2.png")], [_ann(1, 1)])
    with pytest.raises(DatasetError) as e:
        CocoDetection(img_dir, ann, check_files=True, log_report=False)
    assert "1 of 2" in str(e.value) and str(img_dir / "b" / "2.png") in str(e.value)
    assert "a/1.png" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# 5. errors inside DataLoader workers stay one line
# ------------------------------------------------------------------------------------------------
def _truncated_jpeg(path, h=30, w=40):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_worker_error_is_one_line_naming_the_file(tmp_path):
    img_dir, _ = _setup(tmp_path, n=2)
    _truncated_jpeg(img_dir / "bad.jpg")
    ann = _write_json(tmp_path / "ann.json", [_img(1), _img(2, name="bad.jpg")], [_ann(1, 1), _ann(2, 2)])
    ds = CocoDetection(img_dir, ann, transforms=make_policy(False, 32), check_files=True, log_report=False)
    batches = iter(DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_fn))
    with pytest.raises(DatasetError) as e:
        for _ in batches:
            pass
    # the re-raised error's traceback holds the iterator in a reference cycle: left to the garbage collector, its
    # worker shutdown waits 5 s (in whichever later test the collector runs); shut it down now
    batches._shutdown_workers()
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"cannot read image file {img_dir / 'bad.jpg'} (image id 2, {ann}): OSError")
    assert "truncated" in msg
    # the worker traceback is kept for debugging (shown with -v), not in the message
    assert "DataLoader worker process 0" in e.value.worker_traceback
    assert "Traceback" in e.value.worker_traceback


def test_plan_views_errors_name_the_view_in_workers(tmp_path):
    img_dir, ann = _setup(tmp_path, n=4)
    ds = CocoDetection(img_dir, ann, transforms=make_policy(True, 32), log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=2)

    class BrokenCache:
        root = tmp_path / "cache"

        def view_outputs(self, i, k):
            raise OSError(f"shard {self.root}/shard-00000.safetensors: unexpected end of file\nmore detail")

    # a cached teacher entry that cannot be read names the view, the image and the cache, in one line
    batches = iter(DataLoader(PlanViews(ds, plan, BrokenCache()), batch_sampler=[[(0, 1), (2, 0)]],
                              collate_fn=PlanViews.collate, num_workers=1))
    with pytest.raises(DatasetError) as e:
        next(batches)
    batches._shutdown_workers()  # now, not in a later test (see test_worker_error_is_one_line_naming_the_file)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot read teacher outputs of view 1 of image 0 of {tmp_path / 'cache'}: OSError")
    assert "shard-00000.safetensors: unexpected end of file" in msg
    assert "DataLoader worker process 0" in e.value.worker_traceback

    # a source without a root is named by its type
    class NoRoot:
        def view_outputs(self, i, k):
            raise KeyError((i, k))

    with pytest.raises(DatasetError, match=r"^cannot read teacher outputs of view 0 of image 3 \(NoRoot\): KeyError"):
        PlanViews(ds, plan, NoRoot())[(3, 0)]

    # a view the plan does not record names the view and the image
    with pytest.raises(DatasetError, match=r"^cannot build view 2 of image 1: IndexError: view 2 outside \[0, 2\)"):
        PlanViews(ds, plan)[(1, 2)]

    # a bad image in a batch of views names the image file, also through a worker
    _truncated_jpeg(img_dir / "1.png")
    with pytest.raises(DatasetError, match=r"cannot read image file .*1\.png \(image id 1"):
        PlanViews(ds, plan)[(0, 1)]
    batches = iter(DataLoader(PlanViews(ds, plan), batch_sampler=[[(1, 0), (0, 1)]], collate_fn=PlanViews.collate,
                              num_workers=1))
    with pytest.raises(DatasetError) as e:
        next(batches)
    batches._shutdown_workers()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot read image file {img_dir / '1.png'} (image id 1, {ann})")
    # the other images still load
    images, mask, targets = PlanViews.collate([PlanViews(ds, plan)[(i, 1)] for i in (1, 2, 3)])
    assert images.shape[0] == 3 and [int(t["image_id"]) for t in targets] == [2, 3, 4]


def test_reraised_dataset_error_keeps_one_line():
    # what torch's ExceptionWrapper.reraise does with a worker exception: exc_type(long message)
    from torch._utils import ExceptionWrapper

    try:
        raise DatasetError("cannot read image file /x/y.jpg (image id 3, ann.json): OSError: broken")
    except DatasetError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(DatasetError) as e:
        wrapper.reraise()
    assert str(e.value) == "cannot read image file /x/y.jpg (image id 3, ann.json): OSError: broken"
    assert e.value.worker_traceback.startswith("Caught DatasetError in DataLoader worker process 3.")
    # plain construction and pickling are unchanged
    import pickle

    err = pickle.loads(pickle.dumps(DatasetError("a message")))
    assert str(err) == "a message" and err.worker_traceback is None
