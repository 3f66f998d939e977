"""YOLO-format data sets (the Ultralytics layout that Ultralytics, Roboflow and LightlyTrain export), read as
COCO annotations built in memory.

A data set is a ``data.yaml``::

    path: .                 # the root the split paths are relative to (default: the YAML's folder)
    train: images/train     # a folder of images, a .txt file listing images, or a list of either
    val: images/val
    names: [person, car]    # or a mapping {0: person, 1: car}

Each image ``.../images/.../name.jpg`` has its labels in ``.../labels/.../name.txt`` (the last ``images``
folder of the path replaced by ``labels``, as Ultralytics pairs them): one object per line,
``class cx cy w h`` with the box normalised to the image's width and height. A missing or empty label file
is an image without objects. Split paths that start with ``../`` and do not exist are also tried below the
root, as Ultralytics does for Roboflow's exports (``train: ../train/images`` beside ``data.yaml``).

:class:`YoloSplit` names one split; :meth:`YoloSplit.load` returns the COCO dict (category ``c`` of ``names``
is named ``names[c]``, with id ``c + 1``, or its COCO id when every name is a COCO category's (:func:`category_ids`);
images numbered from 1 in path order; ``width``/``height`` of
the file as read, i.e. after its EXIF orientation), so pycocotools evaluates it exactly as a COCO
conversion of the same data (``kd-detr data convert --from yolo --to coco`` writes that conversion).
A bad label line (field count other than 5, a class outside ``names``, a value outside ``[0, 1]`` or not a
number, zero width or height) is one :class:`DatasetError` naming the file and line; with
``skip_bad_labels`` such lines are counted and skipped instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .dataset_error import DatasetError, one_line
from .images import oriented_size

__all__ = ["IMAGE_SUFFIXES", "YoloLayout", "YoloSplit", "category_ids", "convert_to_coco", "is_yolo_data",
           "label_path", "read_data_yaml", "yolo_data_yaml"]

logger = logging.getLogger("kd_detr.data.coco")

# The image files a split folder is searched for (lower case; what PIL reads among Ultralytics' IMG_FORMATS).
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def yolo_data_yaml(path: str | os.PathLike) -> Optional[Path]:
    """The ``data.yaml`` that ``path`` names: the file itself (``.yaml``/``.yml``) or the one in the folder
    (``data.yaml``, else a single ``*.yaml``); ``None`` when ``path`` is not a YOLO data set."""
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return p
    if p.is_dir() and not (p / "annotations").is_dir():
        for name in ("data.yaml", "data.yml"):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
        if len(found) == 1:
            return found[0]
    return None


def is_yolo_data(path: str | os.PathLike) -> bool:
    """Whether ``--data path`` is a YOLO data set (a ``data.yaml`` or a folder holding one, no COCO tree)."""
    return yolo_data_yaml(path) is not None


def label_path(image: Path) -> Path:
    """The label file of ``image``: its path with the last ``images`` folder replaced by ``labels`` and the
    suffix by ``.txt`` (Ultralytics' pairing); the image's own folder when the path has no ``images``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


@dataclass(frozen=True)
class YoloLayout:
    """A parsed ``data.yaml``: the file, its root, the class names (index order) and each split's sources."""

    yaml: Path
    root: Path
    names: tuple[str, ...]
    splits: dict[str, tuple[Path, ...]]

    def images(self, split: str) -> list[Path]:
        """The split's image files, sorted (folders searched recursively; .txt lists read in order)."""
        if split not in self.splits:
            raise DatasetError(f"{self.yaml}: no {split!r} split (it has {', '.join(sorted(self.splits)) or 'none'})")
        out: list[Path] = []
        for src in self.splits[split]:
            if src.is_dir():
                out.extend(sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
            elif src.suffix.lower() == ".txt":
                for line in src.read_text(encoding="utf-8").splitlines():
                    line = line.strip()
                    if line:
                        p = Path(line)
                        out.append(p if p.is_absolute() else (src.parent / p).resolve())
            else:
                out.append(src)
        if not out:
            raise DatasetError(f"{self.yaml}: the {split!r} split ({', '.join(map(str, self.splits[split]))}) "
                               f"holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return out


def _names(raw: Any, yaml_path: Path, nc: Any) -> tuple[str, ...]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DatasetError(f"{yaml_path}: 'names' must map class indices 0..N-1 to names, got keys "
                               f"{list(raw)[:5]}") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{yaml_path}: 'names' must map every class index 0..{len(keys) - 1} to a name, "
                               f"got indices {keys[:10]}")
        names = tuple(str(raw[k] if k in raw else raw[str(k)]) for k in keys)
    elif isinstance(raw, list):
        names = tuple(str(n) for n in raw)
    else:
        raise DatasetError(f"{yaml_path}: 'names' (the class names) is missing or not a list or mapping")
    if not names:
        raise DatasetError(f"{yaml_path}: 'names' is empty")
    if nc is not None and int(nc) != len(names):
        raise DatasetError(f"{yaml_path}: 'nc' is {nc} but 'names' has {len(names)} classes")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise DatasetError(f"{yaml_path}: 'names' repeats {dup[:5]}: classes are mapped by name, each must be unique")
    return names


def read_data_yaml(path: str | os.PathLike) -> YoloLayout:
    """Parse a YOLO ``data.yaml`` (or a folder holding one); every problem is a :class:`DatasetError` naming it."""
    import yaml

    yaml_path = yolo_data_yaml(path) or Path(path)
    if not yaml_path.is_file():
        raise DatasetError(f"YOLO data set {path}: no data.yaml found (expected a .yaml file or a folder holding "
                           f"data.yaml)")
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DatasetError(f"{yaml_path}: not valid YAML: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{yaml_path}: top level must be a mapping with 'names', 'train' and 'val'")
    names = _names(data.get("names"), yaml_path, data.get("nc"))
    root = Path(data["path"]) if data.get("path") else Path(".")
    if not root.is_absolute():
        root = (yaml_path.parent / root).resolve()
    splits: dict[str, tuple[Path, ...]] = {}
    for split in ("train", "val", "test"):
        value = data.get(split)
        if not value:
            continue
        entries = value if isinstance(value, list) else [value]
        resolved = []
        for entry in entries:
            p = Path(str(entry))
            p = p if p.is_absolute() else (root / p).resolve()
            if not p.exists() and str(entry).startswith("../"):  # Roboflow: '../train/images' beside data.yaml
                p = (root / str(entry)[3:]).resolve()
            if not p.exists():
                raise DatasetError(f"{yaml_path}: {split!r} entry {entry!r} resolves to {p}, which does not exist")
            resolved.append(p)
        splits[split] = tuple(resolved)
    return YoloLayout(yaml=yaml_path, root=root, names=names, splits=splits)


@dataclass(frozen=True)
class YoloSplit:
    """One split of a YOLO data set, as a source of COCO annotations (what ``CocoDetection`` takes in place
    of an annotation JSON). Picklable: Ray workers rebuild the same annotations from it."""

    yaml: str
    split: str
    skip_bad_labels: bool = False

    def __str__(self) -> str:
        return f"{self.yaml} [{self.split}]"

    def layout(self) -> YoloLayout:
        return read_data_yaml(self.yaml)

    def image_dir(self) -> Path:
        """The folder every image's ``file_name`` is relative to (the common folder of the split's images)."""
        images = self.layout().images(self.split)
        return Path(os.path.commonpath([str(p.parent) for p in images]))

    def load(self) -> dict[str, Any]:
        """The split as a COCO detection dict (see the module docstring); skipped lines are logged once."""
        layout = self.layout()
        images = layout.images(self.split)
        base = Path(os.path.commonpath([str(p.parent) for p in images]))
        coco: dict[str, Any] = {
            "info": {"description": f"YOLO data set {layout.yaml}, split {self.split}"}, "licenses": [],
            "categories": [{"id": cid, "name": n, "supercategory": ""}
                           for cid, n in zip(category_ids(layout.names), layout.names)],
            "images": [], "annotations": []}
        ids = category_ids(layout.names)
        skipped: Counter = Counter()
        examples: list[str] = []
        for image_id, path in enumerate(images, start=1):
            try:
                width, height = oriented_size(path)
            except FileNotFoundError:
                raise DatasetError(f"{layout.yaml}: image file {path} of split {self.split!r} does not exist") from None
            except Exception as e:
                raise DatasetError(f"cannot read image file {path} ({layout.yaml}, split {self.split!r}): "
                                   f"{one_line(e)}") from e
            coco["images"].append({"id": image_id, "file_name": path.relative_to(base).as_posix(),
                                   "width": width, "height": height})
            for cls, cx, cy, w, h in self._labels(label_path(path), len(layout.names), skipped, examples):
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": ids[cls],
                    "bbox": [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height],
                    "area": w * width * h * height, "iscrowd": 0})
        if skipped:
            logger.warning("%s: skipped %d bad label line(s) (--skip-bad-labels): %s; e.g. %s", self,
                           sum(skipped.values()), dict(skipped), "; ".join(examples))
        return coco

    def _labels(self, path: Path, num_classes: int, skipped: Counter, examples: list[str]):
        """``(class, cx, cy, w, h)`` of each valid line of ``path`` (none when the file does not exist)."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read label file {path}: {one_line(e)}") from None
        for lineno, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            problem, value = _check_line(fields, num_classes)
            if problem is None:
                yield value
                continue
            where = f"{path}:{lineno}: {problem} (line {line.strip()!r})"
            if not self.skip_bad_labels:
                raise DatasetError(f"{where}; fix the line or pass --skip-bad-labels to skip such lines")
            skipped[problem.split(":")[0]] += 1
            if len(examples) < 3:
                examples.append(where)

    def sha256(self) -> str:
        """A digest of the annotations this split yields (what a cache manifest records for an annotation file)."""
        text = json.dumps(self.load(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def category_ids(names: tuple[str, ...]) -> list[int]:
    """The COCO category id of each class: COCO's own ids when every name is a COCO category name (Ultralytics'
    coco.yaml and exports of COCO subsets: then ``--label-map coco91`` and official COCO checkpoints line up),
    else ``1..N`` in ``names`` order."""
    from .label_map import COCO_CATEGORIES

    coco = {c["name"]: int(c["id"]) for c in COCO_CATEGORIES}
    if all(n in coco for n in names):
        return [coco[n] for n in names]
    return list(range(1, len(names) + 1))


def _check_line(fields: list[str], num_classes: int) -> tuple[Optional[str], Any]:
    """``(None, (class, cx, cy, w, h))`` for a valid label line, else ``(problem, None)``."""
    if len(fields) != 5:
        return (f"wrong field count: {len(fields)} fields, a detection label has 5 (class cx cy w h)"
                + ("; polygon (segmentation) labels are not read" if len(fields) > 5 and len(fields) % 2 == 1 else ""),
                None)
    try:
        cls_f = float(fields[0])
        values = [float(x) for x in fields[1:]]
    except ValueError:
        return "not a number: class and coordinates must be numbers", None
    if not cls_f.is_integer() or not 0 <= cls_f < num_classes:
        return f"class out of range: {fields[0]} is not a class index 0..{num_classes - 1} of 'names'", None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        return "coordinates outside [0, 1]: YOLO boxes are normalised to the image size", None
    cx, cy, w, h = values
    if w <= 0 or h <= 0:
        return "zero size: the box has no width or no height", None
    return None, (int(cls_f), cx, cy, w, h)


def convert_to_coco(data: str | os.PathLike, out: str | os.PathLike, *, splits: tuple[str, ...] = ("train", "val"),
                    skip_bad_labels: bool = False, copy: bool = False) -> dict[str, int]:
    """Write a YOLO data set as a COCO tree: ``OUT/annotations/instances_{split}2017.json`` (the annotations
    :meth:`YoloSplit.load` builds, so AP is the same from either) and ``OUT/{split}2017/`` holding the images
    under their ``file_name`` (hard links where the file system allows, else copies; ``copy``: always copies).

    The tree is written under a temporary name beside ``out`` and renamed when complete: an interrupted
    conversion leaves no half tree. ``out`` must not exist. Splits the YAML lacks are left out (``train``
    is required). Returns the image count per split written.
    """
    import shutil
    import tempfile

    yaml_path = yolo_data_yaml(data)
    if yaml_path is None:
        raise DatasetError(f"{data}: not a YOLO data set (no data.yaml)")
    out = Path(out)
    if out.exists():
        raise DatasetError(f"{out} exists: convert into a new folder")
    layout = read_data_yaml(yaml_path)
    if "train" not in layout.splits:
        raise DatasetError(f"{yaml_path}: no 'train' split to convert")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    counts = {}
    try:
        (tmp / "annotations").mkdir()
        for split in splits:
            if split not in layout.splits:
                continue
            source = YoloSplit(str(yaml_path.absolute()), split, skip_bad_labels)
            coco = source.load()
            base = source.image_dir()
            for img in coco["images"]:
                src, dst = base / img["file_name"], tmp / f"{split}2017" / img["file_name"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    if copy:
                        raise OSError
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            (tmp / f"{split}2017").mkdir(exist_ok=True)
            (tmp / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco), encoding="utf-8")
            counts[split] = len(coco["images"])
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
