"""Where a run's data is: one spec shared by train, distill, cache, compare and eval.

A COCO tree (``--data``: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``), a
YOLO data set (``--data``: its ``data.yaml`` or the folder holding it, :mod:`kd_detr.data.yolo`) or
explicit annotation/image paths per split (``--train-ann/--train-images``, ``--val-ann/--val-images``: they
win over the tree), the image-size preset and the label-map mode.

The data sets it builds check that every image file exists when they are created (``check_files=True``),
so a run fails before training or evaluation starts, not at iteration N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .coco import CocoDetection, coco_paths
from .label_map import LabelMap
from .transforms import make_policy
from .yolo import YoloSplit, yolo_data_yaml

__all__ = ["DataSpec", "LABEL_MAP_MODES", "label_map_mode"]

# ``--label-map`` names -> CocoDetection's label-map modes.
LABEL_MAP_MODES = {"contiguous": "contiguous", "coco91": "raw_ids"}


def label_map_mode(name: str) -> str:
    if name not in LABEL_MAP_MODES:
        raise ValueError(f"--label-map must be one of {sorted(LABEL_MAP_MODES)}, got {name!r}")
    return LABEL_MAP_MODES[name]


@dataclass
class DataSpec:
    """A run's data: paths, image-size preset (``None``: official sizes), label map (``contiguous`` |
    ``coco91``; ``None``: not given, the default ``contiguous`` or a recipe's) and, for a YOLO data set,
    whether bad label lines are skipped (counted) instead of refused."""

    data: Optional[str] = None
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    image_size: Optional[int] = None
    label_map: Optional[str] = None
    skip_bad_labels: bool = False

    @classmethod
    def of(cls, obj: Any) -> "DataSpec":
        """The data fields of any object that has them (a ``TrainConfig``, a ``CompareConfig``)."""
        return cls(**{f: getattr(obj, f, None) for f in cls.__dataclass_fields__})

    def paths(self) -> dict[str, Optional[str]]:
        """The path fields, as keyword arguments of ``TrainConfig``."""
        return {k: getattr(self, k) for k in ("data", "train_ann", "train_images", "val_ann", "val_images")}

    def files(self, split: str) -> tuple[Any, str]:
        """The (annotation source, image folder) of ``split`` (``train`` | ``val``): explicit paths win over
        ``--data``. The source is a COCO JSON path, or for a YOLO data set a :class:`YoloSplit`."""
        ann, img = (self.train_ann, self.train_images) if split == "train" else (self.val_ann, self.val_images)
        if ann and img:
            return ann, img
        if self.data is None:
            raise ValueError(f"no {split} data: give --data DIR (a COCO tree or a YOLO data set) or --{split}-ann "
                             f"and --{split}-images")
        yaml = yolo_data_yaml(self.data)
        if yaml is not None:
            source = YoloSplit(str(yaml.absolute()), split, bool(self.skip_bad_labels))
            return (ann or source), str(img or source.image_dir())
        a, i = coco_paths(self.data, split)
        return str(ann or a), str(img or i)

    def label_map_mode(self) -> str:
        return label_map_mode(self.label_map or "contiguous")

    def train_set(self, augment: bool = True, seed: int = 0, log_report: bool = True) -> CocoDetection:
        """The training split with DETR augmentation (or the eval resize) at this spec's preset; every
        image file is checked to exist (one :class:`~kd_detr.data.DatasetError` listing the missing ones)."""
        ann, img = self.files("train")
        return CocoDetection(img, ann, transforms=make_policy(augment, self.image_size),
                             label_map=self.label_map_mode(), seed=seed, check_files=True, log_report=log_report)

    def train_label_map(self) -> LabelMap:
        """The label map of the training split (what a model trained on it predicts), without transforms."""
        ann, img = self.files("train")
        return CocoDetection(img, ann, label_map=self.label_map_mode(), check_files=False, log_report=False).label_map

    def val_set(self, label_map: LabelMap, log_report: bool = True) -> CocoDetection:
        """The validation split with the eval resize, indexed by ``label_map`` (the training split's); every
        image file is checked to exist."""
        ann, img = self.files("val")
        return CocoDetection(img, ann, transforms=make_policy(False, self.image_size), label_map=label_map,
                             check_files=True, log_report=log_report)
