"""Data: COCO-format datasets, label maps, replayable DETR augmentation, synthetic data, collation."""

from .batch import Batch, TeacherPayload, ViewOutputsReader
from .coco import CocoDetection, DatasetError, DatasetReport, coco_paths, load_coco_json, read_categories
from .collate import collate_fn, pad_images
from .label_map import COCO_CATEGORIES, LabelMap, LabelMapError
from .spec import DataSpec, label_map_mode
from .synth import CATEGORY_NAMES, generate_synthetic
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentationPolicy,
    View,
    apply_view,
    make_policy,
    resize_size,
    view_generator,
)

__all__ = [
    "COCO_CATEGORIES",
    "CATEGORY_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentationPolicy",
    "Batch",
    "TeacherPayload",
    "ViewOutputsReader",
    "CocoDetection",
    "DataSpec",
    "DatasetError",
    "DatasetReport",
    "LabelMap",
    "LabelMapError",
    "View",
    "apply_view",
    "coco_paths",
    "collate_fn",
    "generate_synthetic",
    "label_map_mode",
    "load_coco_json",
    "make_policy",
    "pad_images",
    "read_categories",
    "resize_size",
    "view_generator",
]
