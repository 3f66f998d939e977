"""YOLO-format data sets (kd_detr/data/yolo.py): read as COCO annotations with the same AP as the COCO data
they were exported from, bad label lines named by file and line, `kd-detr data convert`, EXIF orientation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kd_detr.data import CocoDetection, DataSpec, DatasetError
from kd_detr.data.yolo import YoloSplit, convert_to_coco, label_path, read_data_yaml
from kd_detr.evaluation import evaluate_results


def export_yolo(coco_root: Path, out: Path, names_as_mapping: bool = False) -> Path:
    """The COCO tree ``coco_root`` exported in the Ultralytics layout (what Roboflow's YOLO export writes):
    images/{train,val}, labels/{train,val}/*.txt with ``class cx cy w h`` at full float precision; the class
    of a category is its position in id order. Returns the data.yaml."""
    names = None
    for split in ("train", "val"):
        coco = json.loads((coco_root / "annotations" / f"instances_{split}2017.json").read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        cls_of = {c["id"]: i for i, c in enumerate(cats)}
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        by_image = {img["id"]: [] for img in coco["images"]}
        for a in coco["annotations"]:
            by_image[a["image_id"]].append(a)
        for img in coco["images"]:
            shutil.copy(coco_root / f"{split}2017" / img["file_name"], out / "images" / split / img["file_name"])
            W, H = img["width"], img["height"]
            lines = [f"{cls_of[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / W!r} "
                     f"{(a['bbox'][1] + a['bbox'][3] / 2) / H!r} {a['bbox'][2] / W!r} {a['bbox'][3] / H!r}"
                     for a in by_image[img["id"]]]
            if lines:  # an image without objects has no label file, as Ultralytics exports it
                (out / "labels" / split / Path(img["file_name"]).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    names_yaml = ("\n".join(f"  {i}: {n}" for i, n in enumerate(names)) if names_as_mapping
                  else "\n".join(f"  - {n}" for n in names))
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names_yaml}\n")
    return out / "data.yaml"


@pytest.fixture(scope="module")
def yolo_data(synth_data, tmp_path_factory):
    return export_yolo(synth_data, tmp_path_factory.mktemp("yolo") / "ds")


def noisy_detections(coco: dict, rng: np.random.Generator) -> list[dict]:
    """Detections near the ground truth (shifted boxes, random scores, some wrong classes, some misses) keyed by
    file name and category name, so they can be scored against any numbering of the same data."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    out = []
    for a in coco["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
        name = names[a["category_id"]] if rng.random() > 0.1 else rng.choice(list(names.values()))
        out.append({"file": files[a["image_id"]], "name": name, "score": float(rng.random()),
                    "bbox": [float(v) for v in np.add([x, y, w, h], jitter)]})
    return out


def score(coco_gt, dets: list[dict]) -> dict:
    ids = {img["file_name"]: img["id"] for img in coco_gt.dataset["images"]}
    cats = {c["name"]: c["id"] for c in coco_gt.dataset["categories"]}
    results = [{"image_id": ids[d["file"]], "category_id": cats[d["name"]], "score": d["score"], "bbox": d["bbox"]}
               for d in dets]
    return evaluate_results(coco_gt, results).metrics


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_yolo_split_scores_the_same_ap_as_the_coco_data_it_was_exported_from(synth_data, yolo_data, split):
    coco_set = DataSpec(str(synth_data)).val_set(DataSpec(str(synth_data)).train_label_map()) if split == "val" \
        else DataSpec(str(synth_data)).train_set(augment=False)
    spec = DataSpec(str(yolo_data))
    yolo_set = spec.val_set(spec.train_label_map()) if split == "val" else spec.train_set(augment=False)
    assert isinstance(yolo_set.ann_file, YoloSplit) and len(yolo_set) == len(coco_set)
    assert [c["name"] for c in yolo_set.categories] == [c["name"] for c in sorted(coco_set.categories, key=lambda c: c["id"])]
    dets = noisy_detections(coco_set.coco.dataset, np.random.default_rng(0))
    expected, got = score(coco_set.coco, dets), score(yolo_set.coco, dets)
    assert 0.1 < expected["AP"] < 0.95  # a non-trivial score, so equality means something
    assert got == pytest.approx(expected, abs=1e-12)
    # the training targets are the same boxes (normalised cxcywh of the same resized image)
    for i in range(len(coco_set)):
        f = coco_set._records[i].file_name
        j = next(k for k, r in enumerate(yolo_set._records) if r.file_name == f)
        (_, t_coco), (_, t_yolo) = coco_set[i], yolo_set[j]
        np.testing.assert_allclose(t_yolo["boxes"].numpy(), t_coco["boxes"].numpy(), atol=1e-5)
        assert t_yolo["labels"].tolist() == t_coco["labels"].tolist()


def test_names_as_a_mapping_a_folder_as_data_and_missing_label_files(synth_data, tmp_path):
    yaml = export_yolo(synth_data, tmp_path / "ds", names_as_mapping=True)
    layout = read_data_yaml(yaml.parent)  # the folder finds its data.yaml
    assert layout.names[:2] == tuple(c["name"] for c in sorted(
        json.loads((synth_data / "annotations/instances_val2017.json").read_text())["categories"], key=lambda c: c["id"]))[:2]
    some = sorted((tmp_path / "ds/labels/val").glob("*.txt"))[0]
    some.unlink()  # no label file: an image without objects
    coco = YoloSplit(str(yaml), "val").load()
    img = next(i for i in coco["images"] if Path(i["file_name"]).stem == some.stem)
    assert not [a for a in coco["annotations"] if a["image_id"] == img["id"]]
    assert label_path(Path("/d/images/train/sub/a.b.jpg")) == Path("/d/labels/train/sub/a.b.txt")


def test_roboflow_layout_with_dotdot_paths(synth_data, tmp_path):
    """Roboflow's export: data.yaml beside train/ and valid/, with '../train/images' entries."""
    src = export_yolo(synth_data, tmp_path / "src").parent
    root = tmp_path / "rf"
    for split, name in (("train", "train"), ("val", "valid")):
        shutil.copytree(src / "images" / split, root / name / "images")
        shutil.copytree(src / "labels" / split, root / name / "labels")
    names = read_data_yaml(src / "data.yaml").names
    (root / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\nnc: {len(names)}\n"
                                    f"names: {json.dumps(list(names))}\n")
    ds = DataSpec(str(root)).train_set(augment=False, log_report=False)
    assert len(ds) == 24 and ds.report.num_kept_annotations == YoloSplit(str(src / "data.yaml"), "train").load()[
        "annotations"].__len__()


@pytest.mark.parametrize("line, problem", [
    ("0 0.5 0.5 0.2", "wrong field count"),
    ("7 0.5 0.5 0.2 0.2", "class out of range"),
    ("-1 0.5 0.5 0.2 0.2", "class out of range"),
    ("0.5 0.5 0.5 0.2 0.2", "class out of range"),
    ("0 1.5 0.5 0.2 0.2", "coordinates outside [0, 1]"),
    ("0 0.5 0.5 0 0.2", "zero size"),
    ("0 0.5 x 0.2 0.2", "not a number"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3", "wrong field count"),
])
def test_a_bad_label_line_is_named_by_file_and_line_or_skipped(tmp_path, line, problem):
    root = tmp_path / "ds"
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "images/train/a.png")
    (root / "labels/train/a.txt").write_text(f"0 0.5 0.5 0.5 0.5\n\n{line}\n1 0.25 0.25 0.1 0.1\n")
    (root / "data.yaml").write_text("train: images/train\nnames: [a, b, c]\n")
    with pytest.raises(DatasetError) as e:
        YoloSplit(str(root / "data.yaml"), "train").load()
    msg = str(e.value)
    assert f"{root / 'labels/train/a.txt'}:3: {problem}" in msg and "--skip-bad-labels" in msg
    coco = YoloSplit(str(root / "data.yaml"), "train", skip_bad_labels=True).load()
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2]  # the two good lines, classes 0 and 1
    assert coco["annotations"][0]["bbox"] == pytest.approx([10.0, 7.5, 20.0, 15.0])
    assert coco["images"] == [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}]


@pytest.mark.parametrize("yaml_text, expected", [
    ("train: images/train\n", "'names'"),
    ("train: images/train\nnames: {0: a, 2: b}\n", "every class index"),
    ("train: images/train\nnames: [a, a]\n", "repeats"),
    ("train: images/train\nnc: 3\nnames: [a, b]\n", "'nc' is 3"),
    ("train: images/nope\nnames: [a]\n", "does not exist"),
    ("train: [unclosed\n", "not valid YAML"),
])
def test_data_yaml_errors_name_the_file_and_field(tmp_path, yaml_text, expected):
    (tmp_path / "images/train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images/train/a.png")
    (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises(DatasetError, match=str(tmp_path / "data.yaml").replace(".", r"\.")) as e:
        read_data_yaml(tmp_path / "data.yaml")
    assert expected in str(e.value)


def test_convert_writes_a_coco_tree_with_the_same_annotations(yolo_data, tmp_path):
    from kd_detr.cli import main

    out = tmp_path / "coco"
    res = CliRunner().invoke(main, ["data", "convert", "--from", "yolo", "--to", "coco", "--data", str(yolo_data),
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "24 train, 8 val" in res.output
    for split in ("train", "val"):
        written = json.loads((out / "annotations" / f"instances_{split}2017.json").read_text())
        assert written == json.loads(json.dumps(YoloSplit(str(yolo_data), split).load()))
        assert all((out / f"{split}2017" / i["file_name"]).is_file() for i in written["images"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = CliRunner().invoke(main, ["data", "convert", "--from", "yolo", "--to", "coco", "--data", str(yolo_data),
                                      "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output


def test_a_yolo_data_set_trains_evaluates_and_rebuilds_in_a_worker(yolo_data, tmp_path):
    """`kd-detr train --data data.yaml` end to end (one iteration, evaluation included), and the data set a
    cache-building worker rebuilds from the job description is the driver's."""
    from kd_detr.cli import main
    from kd_detr.data.view_plan import ViewPlan
    from kd_detr.teacher.ray_actor import load_plan_data, plan_job

    res = CliRunner().invoke(main, [
        "train", "--model", "cond_detr_r10_tiny", "--data", str(yolo_data), "--image-size", "64", "--batch-size", "4",
        "--max-iters", "1", "--num-workers", "0", "--eval-every-iters", "1", "--output-dir", str(tmp_path / "run"),
        "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iteration"] == 1
    ds = DataSpec(str(yolo_data), image_size=64).train_set(log_report=False)
    plan = ViewPlan.for_dataset(ds, num_views=1, seed=0)
    rebuilt, _ = load_plan_data(plan_job(ds, plan))
    assert rebuilt.ann_file == ds.ann_file and rebuilt.annotations_sha256() == ds.annotations_sha256()


def test_exif_orientation_is_applied_when_images_are_read(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view), its box annotated
    on the upright 60x40 image as every viewer shows it: the data set reads it upright."""
    upright = Image.new("RGB", (60, 40), (0, 0, 0))
    upright.paste((255, 0, 0), (40, 5, 55, 20))  # a red square in the top-right corner
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 40x60
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "img").mkdir()
    stored.save(tmp_path / "img" / "a.jpg", exif=exif.tobytes(), quality=95)
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 5, 15, 15], "area": 225}],
           "categories": [{"id": 1, "name": "red"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDetection(tmp_path / "img", tmp_path / "ann.json", check_files=True, log_report=False)
    image, target = ds.load(0)
    assert image.size == (60, 40)
    assert np.asarray(image)[12, 47].tolist()[0] > 200 and np.asarray(image)[30, 10].tolist()[0] < 50
    ds_checked = CocoDetection(tmp_path / "img", tmp_path / "ann.json", validate_files=True, log_report=False)
    assert len(ds_checked) == 1 and not ds_checked.report["size_mismatch"]
    # a YOLO data set records the upright size too
    (tmp_path / "y/images/train").mkdir(parents=True)
    shutil.copy(tmp_path / "img" / "a.jpg", tmp_path / "y/images/train/a.jpg")
    (tmp_path / "y/data.yaml").write_text("train: images/train\nnames: [red]\n")
    assert YoloSplit(str(tmp_path / "y/data.yaml"), "train").load()["images"][0]["width"] == 60


def test_coco_names_get_coco_category_ids_so_official_label_maps_line_up(tmp_path):
    """names that are all COCO categories (Ultralytics' coco.yaml, a COCO subset) keep COCO's ids: with
    `--label-map coco91` class slot = COCO id, as the official checkpoints index them."""
    from kd_detr.data import LabelMap

    root = tmp_path / "ds"
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "images/train/a.png")
    (root / "labels/train/a.txt").write_text("1 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("train: images/train\nnames: [person, traffic light, dog]\n")
    coco = YoloSplit(str(root / "data.yaml"), "train").load()
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "person"), (10, "traffic light"), (18, "dog")]
    assert [a["category_id"] for a in coco["annotations"]] == [10, 18]
    raw = LabelMap.raw_ids(coco["categories"])
    assert raw.to_index(10) == 10 and raw.name_of_index(18) == "dog"
    # one name outside COCO: ids 1..N in names order
    (root / "data.yaml").write_text("train: images/train\nnames: [person, widget, dog]\n")
    assert [c["id"] for c in YoloSplit(str(root / "data.yaml"), "train").load()["categories"]] == [1, 2, 3]
