"""COCO annotation files: where a COCO tree keeps them (:func:`coco_paths`), reading and structurally
validating one (:func:`load_coco_json`, :func:`read_categories`), and the pycocotools index of a
validated dict (:func:`make_coco`). Every problem is one :class:`DatasetError` naming the file, the key
and the record."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kd_detr.download import sha256_file

from .dataset_error import DatasetError

__all__ = ["coco_paths", "load_coco_json", "load_annotations", "annotations_sha256", "read_categories", "make_coco"]


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(ann_file, img_dir)`` of the standard tree ``annotations/instances_{split}2017.json`` + ``{split}2017/``.

    ``split`` is ``"train"`` or ``"val"`` (a full name such as ``"val2017"`` is accepted too). Raises
    :class:`DatasetError` listing every missing path.
    """
    root = Path(root)
    name = split if split.endswith("2017") else f"{split}2017"
    ann_file = root / "annotations" / f"instances_{name}.json"
    img_dir = root / name
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a directory")
    missing = [str(p) for p, ok in ((ann_file, ann_file.is_file()), (img_dir, img_dir.is_dir())) if not ok]
    if missing:
        raise DatasetError(
            f"COCO tree under {root} is incomplete for split {split!r}: missing {', '.join(missing)} "
            f"(expected annotations/instances_{name}.json and {name}/)"
        )
    return ann_file, img_dir


def _require(record: Any, keys: tuple[str, ...], where: str, ann_file: Path) -> None:
    if not isinstance(record, Mapping):
        raise DatasetError(f"{ann_file}: {where} must be a JSON object, got {type(record).__name__}")
    for k in keys:
        if k not in record:
            raise DatasetError(f"{ann_file}: {where} is missing required key {k!r}")


def _read_json(ann_file: Path) -> dict[str, Any]:
    try:
        text = ann_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"annotation file {ann_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {ann_file}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{ann_file}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be a JSON object, got {type(data).__name__}")
    return data


def _check_categories(data: dict[str, Any], ann_file: Path) -> None:
    seen_cats: set[Any] = set()
    for i, cat in enumerate(data["categories"]):
        _require(cat, ("id",), f"categories[{i}]", ann_file)
        if isinstance(cat["id"], bool) or not isinstance(cat["id"], int):
            raise DatasetError(f"{ann_file}: categories[{i}] 'id' must be an integer, got {cat['id']!r}")
        if cat["id"] in seen_cats:
            raise DatasetError(f"{ann_file}: categories[{i}] repeats category id {cat['id']!r}")
        seen_cats.add(cat["id"])


def read_categories(ann_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The validated ``categories`` list of a COCO JSON (to build a :class:`LabelMap` without a dataset)."""
    ann_file = Path(ann_file)
    data = _read_json(ann_file)
    if not isinstance(data.get("categories"), list):
        raise DatasetError(f"{ann_file}: missing required top-level key 'categories' (a list)")
    _check_categories(data, ann_file)
    return data["categories"]


def _check_unique_ids(records: list[Any], key: str, ann_file: Path, effect: str, fix: str) -> None:
    """One :class:`DatasetError` for every repeated ``id`` of ``records`` (count, first ids and records)."""
    counts = Counter(r["id"] for r in records if "id" in r)
    dups = [i for i, n in counts.items() if n > 1]
    if not dups:
        return
    extra = sum(counts[i] - 1 for i in dups)
    first = dups[0]
    at = [f"{key}[{j}]" for j, r in enumerate(records) if r.get("id") == first][:2]
    shown = ", ".join(repr(i) for i in dups[:5]) + (", ..." if len(dups) > 5 else "")
    raise DatasetError(
        f"{ann_file}: {extra} {key} repeat an id already used in '{key}' ({len(dups)} duplicated ids: {shown}; "
        f"id {first!r} at {' and '.join(at)}); pycocotools indexes {key} by id, so duplicates silently "
        f"corrupt {effect} -- {fix}"
    )


def load_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read and structurally validate a COCO detection JSON.

    Checks that ``images``, ``annotations`` and ``categories`` exist and are lists, every image has
    ``id/file_name/width/height``, every annotation ``image_id/bbox/category_id`` (``bbox`` a list of 4
    numbers) and every category ``id``, and that image, annotation and category ids are unique (two merged
    files each numbered from 1 would otherwise corrupt pycocotools' id-keyed index and the AP). Raises
    :class:`DatasetError` naming the file, key and record (for duplicates: the count and the first ids).
    """
    ann_file = Path(ann_file)
    data = _read_json(ann_file)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{ann_file}: missing required top-level key {key!r}")
        if not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: {key!r} must be a list, got {type(data[key]).__name__}")
    for i, img in enumerate(data["images"]):
        _require(img, ("id", "file_name", "width", "height"), f"images[{i}]", ann_file)
        if isinstance(img["id"], bool) or not isinstance(img["id"], int):
            raise DatasetError(f"{ann_file}: images[{i}] 'id' must be an integer, got {img['id']!r}")
        for k in ("width", "height"):
            v = img[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise DatasetError(f"{ann_file}: images[{i}] (id {img['id']}) has invalid {k} {v!r}")
    for i, ann in enumerate(data["annotations"]):
        _require(ann, ("image_id", "bbox", "category_id"), f"annotations[{i}]", ann_file)
        for k in ("image_id", "category_id"):
            if isinstance(ann[k], bool) or not isinstance(ann[k], int):
                raise DatasetError(f"{ann_file}: annotations[{i}] {k!r} must be an integer, got {ann[k]!r}")
        b = ann["bbox"]
        if (
            not isinstance(b, list)
            or len(b) != 4
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in b)
        ):
            raise DatasetError(f"{ann_file}: annotations[{i}] 'bbox' must be [x, y, w, h] numbers, got {b!r}")
        if "id" in ann and isinstance(ann["id"], (list, dict)):
            raise DatasetError(f"{ann_file}: annotations[{i}] 'id' must be an integer, got {ann['id']!r}")
    _check_categories(data, ann_file)
    _check_unique_ids(data["images"], "images", ann_file, "training targets and evaluation (AP)",
                      "give every image a unique 'id' and point each annotation's 'image_id' at the right one")
    _check_unique_ids(data["annotations"], "annotations", ann_file, "evaluation (AP)",
                      "renumber the annotations with unique ids (e.g. 1..N in order)")
    # pycocotools indexes annotations by 'id'; give id-less records unique ids instead of crashing there
    used = {a["id"] for a in data["annotations"] if "id" in a}
    next_id = max((x for x in used if isinstance(x, int)), default=0) + 1
    for a in data["annotations"]:
        if "id" not in a:
            a["id"] = next_id
            next_id += 1
    data.setdefault("info", {})
    data.setdefault("licenses", [])
    return data


def make_coco(data: dict[str, Any], ann_file: str | os.PathLike | None = None):
    """pycocotools ``COCO`` from an already-parsed dict, without its "creating index..." prints; with
    ``ann_file``, its path as ``coco.kd_detr_ann_file`` (evaluation names the file in what it logs)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    if ann_file is not None:
        coco.kd_detr_ann_file = str(ann_file)
    return coco


def load_annotations(source: Any) -> dict[str, Any]:
    """The validated COCO dict of an annotation source: a COCO JSON path, or a
    :class:`~kd_detr.data.yolo.YoloSplit` (a YOLO data set's split, converted in memory)."""
    from .yolo import YoloSplit

    if isinstance(source, YoloSplit):
        return source.load()
    return load_coco_json(source)


def annotations_sha256(source: Any) -> str:
    """SHA-256 of an annotation source: the JSON file's bytes, or a YOLO split's converted annotations
    (:meth:`~kd_detr.data.yolo.YoloSplit.sha256`). A cache records it to refuse other annotations."""
    from .yolo import YoloSplit

    if isinstance(source, YoloSplit):
        return source.sha256()
    return sha256_file(source)
