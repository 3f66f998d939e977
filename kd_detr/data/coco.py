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

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .annotations import annotations_sha256, coco_paths, load_annotations, load_coco_json, make_coco, read_categories
from .dataset_error import DatasetError, one_line
from .images import (_WARNED_HIGH_BIT, bomb_message, oriented_size, read_image, read_rgb,  # noqa: F401
                     warn_high_bit)
from .label_map import LabelMap, LabelMapError
from .transforms import HIGH_BIT_DEPTH_MODES, AugmentationPolicy, View, apply_view, view_generator
from .yolo import YoloSplit

__all__ = ["CocoDetection", "DatasetError", "DatasetReport", "coco_paths", "load_coco_json", "read_categories",
           "read_image"]

# data/view_plan.py imports one_line from here as _one_line; the tests reset _WARNED_HIGH_BIT through this module
_one_line = one_line

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
        ann_file: COCO JSON, or a :class:`~kd_detr.data.yolo.YoloSplit` (a YOLO data set's split, read as COCO
            annotations built in memory; evaluation then uses them as its ground truth).
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
        ann_file: str | os.PathLike | YoloSplit,
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
        self.ann_file = ann_file if isinstance(ann_file, YoloSplit) else Path(ann_file)
        if not self.img_dir.is_dir():
            raise DatasetError(f"image directory {self.img_dir} does not exist (annotations: {self.ann_file})")
        if transforms is not None and not isinstance(transforms, AugmentationPolicy):
            raise TypeError(f"transforms must be an AugmentationPolicy or None, got {type(transforms).__name__}")
        self.transforms = transforms
        self.seed = int(seed)
        self.epoch = 0
        self.strict = strict

        data = load_annotations(self.ann_file)
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
        self.coco = make_coco(data, self.ann_file)
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
            warn_high_bit(str(self.ann_file), path, mode)

    def _check_file(self, r: _Record) -> bool:
        path = self.img_dir / r.file_name
        if not path.is_file():
            self.report.add("missing_file", str(path))
            return False
        try:
            with Image.open(path) as im:
                mode = im.mode
                im.verify()  # decodes enough to catch truncated / corrupt files cheaply
            size = oriented_size(path)  # after its EXIF orientation, as it is read (verify() leaves im unusable)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            self.report.add("unreadable_file", bomb_message(path, e, ""))
            return False
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
            self.report.add("unreadable_file", f"{path}: {one_line(e)}")
            return False
        if size != (r.width, r.height):
            self.report.add("size_mismatch", f"{path}: file {size[0]}x{size[1]} vs JSON {r.width}x{r.height}")
            return False
        if mode in HIGH_BIT_DEPTH_MODES:
            self.report.add("high_bit_depth", f"{path}: mode {mode}")
            warn_high_bit(str(self.ann_file), path, mode)
        return True

    # -- access -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def annotations_sha256(self) -> str:
        """SHA-256 of the annotations this data set was built from (the JSON file, or a YOLO split's)."""
        return annotations_sha256(self.ann_file)

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
        image, mode = read_rgb(path, f" (image id {r.image_id}, {self.ann_file})")
        if mode is not None:
            warn_high_bit(str(self.ann_file), path, mode)
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
            raise DatasetError(f"cannot transform image file {self._where(index)}: {one_line(e)}") from e

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
            raise DatasetError(f"cannot load item {index}, image file {self._where(index)}: {one_line(e)}") from e

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.ann_file}, images={len(self)}, classes={self.label_map.num_classes}, "
            f"transforms={self.transforms}, seed={self.seed}, epoch={self.epoch})"
        )
