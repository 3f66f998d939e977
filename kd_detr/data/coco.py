"""COCO-format detection dataset with up-front validation and counted skips.

Problem handling (each kind is counted in :class:`DatasetReport`, logged once at construction):

==============================  =================================================================
problem                         handling
==============================  =================================================================
malformed JSON                  :class:`DatasetError` naming the file, line, column and position
missing required key            :class:`DatasetError` naming the key, the file and the record index
bad record types / values       :class:`DatasetError` (non-list ``bbox``, non-positive image size,
                                duplicate category ids)
duplicate image / annotation    :class:`DatasetError` naming the file, the count and the first ids:
ids                             pycocotools indexes by id, duplicates silently corrupt evaluation
box with zero/negative size     annotation dropped, counted ``degenerate_box`` (also NaN/inf)
box partly outside the image    box clipped to the image, counted ``clipped_box``
box fully outside the image     annotation dropped, counted ``outside_box``
unknown category id             dropped, counted ``unknown_category``; ``strict=True`` raises
annotation of unknown image id  dropped, counted ``unknown_image``; ``strict=True`` raises
crowd annotation                dropped from training targets, counted ``crowd`` (not a problem:
                                pycocotools handles crowd regions in evaluation from the JSON)
image without annotations       kept (empty ``boxes [0,4]``), counted ``image_without_annotations``
missing image file              ``check_files=True``: one :class:`DatasetError` at construction with the
                                count and the first paths; otherwise at ``__getitem__``
unreadable / corrupt image,     :class:`DatasetError` naming the file at ``__getitem__`` (decompression
decompression bomb              bomb: pixel count, limit and how to raise it)
``validate_files=True``         every image opened up front; missing / unreadable ones skipped and
                                counted ``missing_file`` / ``unreadable_file`` / ``size_mismatch``
image size differs from JSON    :class:`DatasetError` at ``__getitem__`` (boxes would be wrong)
16-bit / 32-bit grayscale       converted to 8-bit RGB (:func:`~kd_detr.data.transforms.to_rgb`), one
                                warning per data set and process; counted ``high_bit_depth`` by
                                ``validate_files=True``
any error while reading or      :class:`DatasetError`, one line naming the file and the cause, also when
transforming an item            raised in a DataLoader worker (see :class:`DatasetError`)
==============================  =================================================================
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kd_detr.errors import UserError
from .label_map import LabelMap, LabelMapError
from .transforms import HIGH_BIT_DEPTH_MODES, AugmentationPolicy, View, apply_view, to_rgb, view_generator

__all__ = ["CocoDetection", "DatasetError", "DatasetReport", "coco_paths", "load_coco_json", "read_categories",
           "read_image"]

logger = logging.getLogger(__name__)

PROBLEM_KINDS = (
    "degenerate_box",
    "clipped_box",
    "outside_box",
    "unknown_category",
    "unknown_image",
    "missing_file",
    "unreadable_file",
    "size_mismatch",
)
INFO_KINDS = ("crowd", "image_without_annotations", "high_bit_depth")


def _last_exception_line(text: str, name: str) -> str | None:
    """The message of the last ``[module.]name: message`` line of a formatted traceback."""
    pat = re.compile(rf"^(?:[\w.]+\.)?{re.escape(name)}: (.*\S)\s*$")
    for line in reversed(text.splitlines()):
        m = pat.match(line)
        if m:
            return m.group(1)
    return None


class DatasetError(UserError, ValueError):
    """Invalid dataset input; the message is one line naming the file and, where relevant, the record and key.

    A DataLoader worker's exception reaches the main process as ``DatasetError(text)`` where ``text`` is
    torch's "Caught DatasetError in DataLoader worker process N. Original Traceback ..." (the whole
    worker traceback). The constructor recognises that text and keeps only the original one-line
    message as ``str(error)`` (what the CLI prints); the worker traceback stays available as
    ``error.worker_traceback`` (and as an exception note, shown in full tracebacks with ``-v``).
    """

    def __init__(self, message: Any = "", *args: Any) -> None:
        text = message if isinstance(message, str) else str(message)
        worker_traceback = None
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            line = _last_exception_line(text, type(self).__name__)
            if line is not None:
                worker_traceback, message = text, line
        super().__init__(message, *args)
        self.worker_traceback = worker_traceback
        if worker_traceback is not None and hasattr(self, "add_note"):  # Python >= 3.11
            self.add_note(worker_traceback.rstrip())


def _one_line(e: BaseException) -> str:
    """``Type: message`` of an exception, whitespace (newlines included) collapsed, at most 300 characters."""
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _bomb_message(path: Path, e: BaseException, where: str) -> str:
    m = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(e))
    size = f"{int(m.group(1)):,} pixels, over PIL's decompression-bomb limit of {int(m.group(2)):,}" if m else str(e)
    return (f"image file {path}{where} is too large to open safely: {size} (PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS}; PIL refuses twice that and warns above it); if the file is trusted, "
            f"raise the limit before loading (e.g. `PIL.Image.MAX_IMAGE_PIXELS = None` to disable it) or "
            f"downscale the image")


def _read_rgb(path: Path, where: str = "") -> tuple[Image.Image, str | None]:
    """``(8-bit RGB image, source mode if it was high-bit-depth else None)``; any failure is a
    :class:`DatasetError` naming ``path`` (``where``: extra context such as " (image id 3, ann.json)")."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            image = to_rgb(im)
    except FileNotFoundError:
        raise DatasetError(f"image file {path}{where} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(_bomb_message(path, e, where)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise DatasetError(f"cannot read image file {path}{where}: {_one_line(e)}") from e
    return image, (mode if mode in HIGH_BIT_DEPTH_MODES else None)


_WARNED_HIGH_BIT: set[str] = set()  # data sets (or folders) already warned about, per process


def _warn_high_bit(key: str, path: Path, mode: str) -> None:
    if key in _WARNED_HIGH_BIT:
        return
    _WARNED_HIGH_BIT.add(key)
    how = ("16-bit values divided by 257" if mode.startswith("I;16") else
           "values scaled to 0..255 (see kd_detr.data.transforms.to_rgb)")
    logger.warning("%s: image %s is %s (high bit depth): converting such images to 8-bit RGB, %s; "
                   "no further warning for this data set", key, path, mode, how)


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file as an 8-bit RGB PIL image, as the data sets read it.

    16-bit and other high-bit-depth grayscale files are scaled to 8 bits (:func:`~kd_detr.data.transforms.to_rgb`)
    with one warning per folder and process; a missing, corrupt or too large (decompression bomb) file
    is a one-line :class:`DatasetError` naming it.
    """
    path = Path(path)
    image, mode = _read_rgb(path)
    if mode is not None:
        _warn_high_bit(str(path.parent), path, mode)
    return image


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


def _make_coco(data: dict[str, Any], ann_file: str | os.PathLike | None = None):
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


@dataclass
class DatasetReport:
    """Counts per problem kind found while loading a dataset (see the module docstring).

    Attributes:
        ann_file: the annotation file.
        num_images: images in the JSON; num_kept_images: images the dataset serves.
        num_annotations: annotations in the JSON; num_kept_annotations: boxes kept for training.
        counts: ``Counter`` over the kinds in ``PROBLEM_KINDS`` and ``INFO_KINDS``.
        examples: up to 3 example messages per kind (record index, file, values).
    """

    ann_file: str = ""
    num_images: int = 0
    num_kept_images: int = 0
    num_annotations: int = 0
    num_kept_annotations: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str, n: int = 1) -> None:
        self.counts[kind] += n
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 3:
            ex.append(example)

    def __getitem__(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    @property
    def num_problems(self) -> int:
        return sum(self.counts.get(k, 0) for k in PROBLEM_KINDS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ann_file": self.ann_file,
            "num_images": self.num_images,
            "num_kept_images": self.num_kept_images,
            "num_annotations": self.num_annotations,
            "num_kept_annotations": self.num_kept_annotations,
            "counts": dict(self.counts),
        }

    def summary(self) -> str:
        head = (
            f"{self.ann_file}: {self.num_kept_images}/{self.num_images} images, "
            f"{self.num_kept_annotations}/{self.num_annotations} annotations kept"
        )
        parts = [f"{k}={self.counts[k]}" for k in (*PROBLEM_KINDS, *INFO_KINDS) if self.counts.get(k)]
        lines = [head + (" (" + ", ".join(parts) + ")" if parts else "")]
        for k in PROBLEM_KINDS:
            for ex in self.examples.get(k, []):
                lines.append(f"  {k}: {ex}")
        return "\n".join(lines)

    def log(self, log: logging.Logger = logger) -> None:
        (log.warning if self.num_problems else log.info)("dataset report: %s", self.summary())


@dataclass
class _Record:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # [N,4] float32 absolute xyxy, clipped to (width, height)
    labels: np.ndarray  # [N] int64 model indices
    area: np.ndarray  # [N] float32 (JSON 'area' if present, else box area)


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset (annotation JSON + image folder).

    ``dataset[i] -> (image [3,H,W] float32 ImageNet-normalised, target)`` with ``target`` holding
    ``boxes [N,4]`` float32 normalised cxcywh w.r.t. the transformed image, ``labels [N]`` int64 model
    indices, ``image_id`` int64 scalar, ``orig_size [2]`` int64 (h, w) of the file, ``size [2]`` int64
    (h, w) after the transform, ``area [N]`` float32, ``iscrowd [N]`` int64 (always 0: crowd boxes are
    dropped).

    Augmentation is replayable: item ``i`` in epoch ``e`` uses the view
    ``transforms.sample(view_generator(seed, e, i), (h, w))``; :meth:`get_view` serves an item under an
    explicit :class:`View`, and ``dataset[(i, view)]`` does the same through indexing (for samplers that
    yield fixed views, e.g. a teacher cache).

    Args:
        img_dir: folder holding the ``file_name`` of each image.
        ann_file: COCO JSON.
        transforms: an :class:`AugmentationPolicy` (``None``: no resize / flip, only normalisation).
        label_map: a :class:`LabelMap`, ``"contiguous"`` (default, from the JSON categories) or
            ``"raw_ids"`` (91 slots, official COCO checkpoints). Categories outside it count as unknown.
        seed: base seed of the per-sample augmentation generators.
        strict: raise instead of dropping annotations with unknown category or image ids.
        check_files: check at construction that every image file exists (one listing of ``img_dir``
            plus a stat for names in sub-folders: measured 10 ms per 10k images with the listing, 80 ms
            per 10k with a stat each, local disk, warm cache) and raise one
            :class:`DatasetError` with the count and the first missing paths. ``False`` (default): a
            missing file is found when it is read. Run entry points (:class:`~kd_detr.data.DataSpec`)
            pass ``True`` so that training never meets a missing file at iteration N.
        validate_files: open every image up front and skip (counting) missing/unreadable ones (wins over
            ``check_files``).
        log_report: log the :class:`DatasetReport` once after loading.

    Note: with ``persistent_workers=True`` a DataLoader keeps the dataset copy from its first epoch;
    call :meth:`set_epoch` before creating the iterator and keep workers non-persistent (the default)
    so workers see the new epoch.
    """

    def __init__(
        self,
        img_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: AugmentationPolicy | None = None,
        label_map: LabelMap | str | None = None,
        *,
        seed: int = 0,
        strict: bool = False,
        check_files: bool = False,
        validate_files: bool = False,
        log_report: bool = True,
    ) -> None:
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        if not self.img_dir.is_dir():
            raise DatasetError(f"image directory {self.img_dir} does not exist (annotations: {self.ann_file})")
        if transforms is not None and not isinstance(transforms, AugmentationPolicy):
            raise TypeError(f"transforms must be an AugmentationPolicy or None, got {type(transforms).__name__}")
        self.transforms = transforms
        self.seed = int(seed)
        self.epoch = 0
        self.strict = strict

        data = load_coco_json(self.ann_file)
        if isinstance(label_map, str) or label_map is None:
            if not data["categories"]:
                raise DatasetError(f"{self.ann_file}: 'categories' is empty")
            try:
                if label_map in (None, "contiguous"):
                    label_map = LabelMap.contiguous(data["categories"])
                elif label_map in ("raw", "raw_ids"):
                    label_map = LabelMap.raw_ids(data["categories"])
            except LabelMapError as e:
                raise DatasetError(f"{self.ann_file}: {e}") from None
        if not isinstance(label_map, LabelMap):
            raise TypeError(f"label_map must be a LabelMap, 'contiguous' or 'raw_ids', got {label_map!r}")
        self.label_map: LabelMap = label_map
        self.coco = _make_coco(data, self.ann_file)
        self.report = DatasetReport(
            ann_file=str(self.ann_file), num_images=len(data["images"]), num_annotations=len(data["annotations"])
        )
        self._records = self._build_records(data)
        if validate_files:
            self._records = [r for r in self._records if self._check_file(r)]
        elif check_files:
            self._raise_missing_files()
        self._probe_bit_depth()
        self.report.num_kept_images = len(self._records)
        self.report.num_kept_annotations = int(sum(len(r.labels) for r in self._records))
        if log_report:
            self.report.log()

    # -- loading ----------------------------------------------------------------------------------
    def _build_records(self, data: dict[str, Any]) -> list[_Record]:
        rep, f = self.report, self.ann_file
        images = {img["id"]: img for img in data["images"]}
        known_cats = {c["id"] for c in data["categories"]}
        per_image: dict[Any, list[tuple[list[float], int, float]]] = {k: [] for k in images}
        for i, ann in enumerate(data["annotations"]):
            img = images.get(ann["image_id"])
            where = f"annotations[{i}] (id {ann['id']}, image_id {ann['image_id']})"
            if img is None:
                if self.strict:
                    raise DatasetError(f"{f}: {where} refers to an image id not in 'images'")
                rep.add("unknown_image", where)
                continue
            cid = ann["category_id"]
            if cid not in known_cats or cid not in self.label_map:
                if self.strict:
                    raise DatasetError(
                        f"{f}: {where} has category_id {cid!r} not in "
                        + ("'categories'" if cid not in known_cats else "the label map")
                    )
                rep.add("unknown_category", f"{where}: category_id {cid!r}")
                continue
            if ann.get("iscrowd", 0):
                rep.add("crowd", where)
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                rep.add("degenerate_box", f"{where}: bbox {ann['bbox']}")
                continue
            W, H = float(img["width"]), float(img["height"])
            x0, y0, x1, y1 = x, y, x + w, y + h
            cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, W), min(y1, H)
            if cx1 <= cx0 or cy1 <= cy0:
                rep.add("outside_box", f"{where}: bbox {ann['bbox']} vs image {W:g}x{H:g}")
                continue
            area = float(ann["area"]) if isinstance(ann.get("area"), (int, float)) else w * h
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                rep.add("clipped_box", f"{where}: bbox {ann['bbox']} vs image {W:g}x{H:g}")
                # the JSON area describes the unclipped object; scale it to the visible part
                area *= (cx1 - cx0) * (cy1 - cy0) / (w * h)
            per_image[ann["image_id"]].append(([cx0, cy0, cx1, cy1], self.label_map.to_index(cid), area))

        records: list[_Record] = []
        for img_id, img in images.items():
            anns = per_image[img_id]
            if not anns:
                rep.add("image_without_annotations", f"image id {img_id} ({img['file_name']})")
            records.append(
                _Record(
                    image_id=int(img_id),
                    file_name=str(img["file_name"]),
                    height=int(img["height"]),
                    width=int(img["width"]),
                    boxes=np.asarray([a[0] for a in anns], dtype=np.float32).reshape(-1, 4),
                    labels=np.asarray([a[1] for a in anns], dtype=np.int64),
                    area=np.asarray([a[2] for a in anns], dtype=np.float32),
                )
            )
        return records

    def _raise_missing_files(self) -> None:
        """One :class:`DatasetError` listing the image files of the JSON that do not exist."""
        try:
            listed = set(os.listdir(self.img_dir))  # one listing instead of a stat per image
        except OSError:
            listed = set()
        base = os.fspath(self.img_dir)
        # a plain name found in the listing exists; others (sub-folders, not listed) get a stat
        missing = [
            r.file_name for r in self._records
            if r.file_name not in listed and not os.path.isfile(os.path.join(base, r.file_name))
        ]
        if missing:
            shown = ", ".join(str(self.img_dir / m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DatasetError(
                f"{len(missing)} of {len(self._records)} image files listed in {self.ann_file} do not exist "
                f"under {self.img_dir}: {shown}; restore them, fix 'file_name' (relative to the image "
                f"folder) or the image folder, or remove those images from the JSON"
            )

    def _probe_bit_depth(self) -> None:
        """Warn now (in the main process, before loader workers start) if the first image is high-bit-depth."""
        if not self._records:
            return
        path = self.img_dir / self._records[0].file_name
        try:
            with Image.open(path) as im:  # reads the header only
                mode = im.mode
        except Exception:  # a bad file is reported when it is read
            return
        if mode in HIGH_BIT_DEPTH_MODES:
            _warn_high_bit(str(self.ann_file), path, mode)

    def _check_file(self, r: _Record) -> bool:
        path = self.img_dir / r.file_name
        if not path.is_file():
            self.report.add("missing_file", str(path))
            return False
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
                im.verify()  # decodes enough to catch truncated / corrupt files cheaply
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            self.report.add("unreadable_file", _bomb_message(path, e, ""))
            return False
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            self.report.add("unreadable_file", f"{path}: {_one_line(e)}")
            return False
        if size != (r.width, r.height):
            self.report.add("size_mismatch", f"{path}: file {size[0]}x{size[1]} vs JSON {r.width}x{r.height}")
            return False
        if mode in HIGH_BIT_DEPTH_MODES:
            self.report.add("high_bit_depth", f"{path}: mode {mode}")
            _warn_high_bit(str(self.ann_file), path, mode)
        return True

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [r.image_id for r in self._records]

    @property
    def categories(self) -> list[dict[str, Any]]:
        """COCO category dicts of the JSON."""
        return list(self.coco.dataset["categories"])

    def image_size(self, index: int) -> tuple[int, int]:
        """``(h, w)`` of item ``index`` from the JSON (no file access)."""
        r = self._records[index]
        return (r.height, r.width)

    def load(self, index: int) -> tuple[Image.Image, dict[str, torch.Tensor]]:
        """Untransformed item: RGB PIL image and target with absolute ``xyxy`` boxes (clipped)."""
        r = self._records[index]
        path = self.img_dir / r.file_name
        image, mode = _read_rgb(path, f" (image id {r.image_id}, {self.ann_file})")
        if mode is not None:
            _warn_high_bit(str(self.ann_file), path, mode)
        if image.size != (r.width, r.height):
            raise DatasetError(
                f"image file {path} is {image.size[0]}x{image.size[1]} but {self.ann_file} says "
                f"{r.width}x{r.height} (image id {r.image_id})"
            )
        n = len(r.labels)
        target = {
            "boxes": torch.from_numpy(r.boxes.copy()),
            "labels": torch.from_numpy(r.labels.copy()),
            "image_id": torch.tensor(r.image_id, dtype=torch.int64),
            "orig_size": torch.tensor([r.height, r.width], dtype=torch.int64),
            "area": torch.from_numpy(r.area.copy()),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }
        return image, target

    def sample_view(self, index: int, epoch: int | None = None) -> View:
        """The view item ``index`` gets in ``epoch`` (default: the current epoch); no file access."""
        hw = self.image_size(index)
        if self.transforms is None:
            return View(source_size=hw)
        if not self.transforms.train:
            return self.transforms.sample(None, hw)
        e = self.epoch if epoch is None else int(epoch)
        return self.transforms.sample(view_generator(self.seed, e, index), hw)

    def get_view(self, index: int, view: View | dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Item ``index`` transformed by an explicit ``view`` (replay of a cached augmentation).

        Any failure is a one-line :class:`DatasetError` naming the image file and the cause.
        """
        image, target = self.load(index)  # raises DatasetError naming the file
        try:
            return apply_view(image, target, view)
        except Exception as e:
            raise DatasetError(f"cannot transform image file {self._where(index)}: {_one_line(e)}") from e

    def _where(self, index: int) -> str:
        r = self._records[index]
        return f"{self.img_dir / r.file_name} (image id {r.image_id}, {self.ann_file})"

    def __getitem__(self, index):
        if isinstance(index, tuple):
            if len(index) != 2:
                raise TypeError("dataset[(index, view)] expects exactly an index and a View")
            index, view = int(index[0]), index[1]
        else:
            view = None
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of {len(self)} images")
        # one-line errors naming the file, also from DataLoader workers (see DatasetError)
        try:
            return self.get_view(index, self.sample_view(index) if view is None else view)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"cannot load item {index}, image file {self._where(index)}: {_one_line(e)}") from e

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.ann_file}, images={len(self)}, classes={self.label_map.num_classes}, "
            f"transforms={self.transforms}, seed={self.seed}, epoch={self.epoch})"
        )
