"""Resolving ``--teacher`` (a card name, or a model name plus ``--teacher-checkpoint``), loading the
teacher's weights and refusing teachers that do not fit the student and the data.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kd_detr.data import COCO_CATEGORIES, LabelMap
from kd_detr.models import ModelConfig, config_from_dict, get_config, load_model, model_from_official
from kd_detr.models.hf.config import HF_PREFIX

from .card import TeacherCard, find_card, load_card
from .inprocess import check_precision

log = logging.getLogger("kd_detr.teacher")

__all__ = ["TeacherSpec", "teacher_weights_sha256", "teacher_family_record", "resolve_teacher", "load_teacher", "check_teacher_fits", "teacher_config", "spec_to_dict",
           "spec_from_dict", "describe_teacher"]


@dataclass
class TeacherSpec:
    """Where a teacher comes from: architecture, checkpoint file and what is known about it."""

    name: str  # card name or model name, for logs and metadata
    model: str
    checkpoint: Path
    format: str = "auto"  # auto | safetensors | official | hf (HF Conditional DETR weights) | hf_folder (hf:DIR)
    num_classes: Optional[int] = None
    label_map: Optional[str] = None  # coco91 | contiguous (official/HF files carry none)
    image_size: Optional[int] = None  # training image-size preset (None: official sizes)
    image_size_known: bool = False
    known_ap: Optional[float] = None
    card: Optional[str] = None  # card file
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # --allow-partial-weights: an hf:DIR teacher may load with tensors missing or mis-shaped (random values,
    # warned); kd-detr and official files always load strictly
    allow_partial_weights: bool = False
    # teacher.precision (--teacher-precision): the dtype the teacher's forward runs at, in every source
    # (kd_detr.teacher.inprocess.PRECISIONS); a teacher cache records it
    precision: str = "float32"

    def __post_init__(self) -> None:
        check_precision(self.precision, "--teacher-precision")

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "model": self.model, "checkpoint": str(self.checkpoint), "format": self.format,
             "card": self.card, "known_ap": self.known_ap, "image_size": self.image_size,
             "precision": self.precision}
        if self.allow_partial_weights:
            d["allow_partial_weights"] = True
        return d


def spec_to_dict(spec: TeacherSpec) -> dict[str, Any]:
    """Every field of a :class:`TeacherSpec` as plain data, for other processes (``TeacherSpec.to_dict`` is
    a lossy summary for run records)."""
    d = dataclasses.asdict(spec)
    # absolute: the other process may run elsewhere (a Ray worker runs in the directory of `ray start`)
    d["checkpoint"] = str(Path(spec.checkpoint).absolute()) if spec.checkpoint else spec.checkpoint
    return d


def spec_from_dict(d: dict[str, Any]) -> TeacherSpec:
    """Inverse of :func:`spec_to_dict`."""
    return TeacherSpec(**{**d, "checkpoint": Path(d["checkpoint"])})


def _is_kd_detr_file(path: Path) -> bool:
    """A kd-detr ``.safetensors`` model file (its metadata says so)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from kd_detr.models.checkpoint import read_model_metadata

    try:
        read_model_metadata(path)
    except (ValueError, OSError):
        return False
    return True


def teacher_weights_sha256(spec: TeacherSpec) -> str:
    """SHA-256 of the teacher's weights: its checkpoint file, or for ``hf:DIR`` the folder's ``config.json``
    and weight files (each hashed, in name order)."""
    import hashlib

    from kd_detr.models.checkpoint import file_sha256 as file_sha

    path = Path(spec.checkpoint)
    if not path.is_dir():
        return file_sha(path)
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.bin"), path / "config.json"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha(f).encode())
    return h.hexdigest()


def teacher_family_record(spec: TeacherSpec) -> dict[str, Any]:
    """What a cache records of a transformers teacher beyond its weights: the family, a hash of its config
    and the transformers version (another version may compute other numbers)."""
    config = get_config(spec.model) if spec.format == "hf_folder" else None
    if config is None or not hasattr(config, "family"):
        return {}
    import hashlib
    import json

    import transformers

    blob = json.dumps(config.hf_config, sort_keys=True, default=str).encode()
    record = {"family": config.family, "config_sha256": hashlib.sha256(blob).hexdigest(),
              "transformers_version": transformers.__version__}
    if config.hub:  # a Hub id: the repository, revision, commit and weight files' hashes
        record["hub"] = config.hub
    return record


def _check_card_classes(spec: TeacherSpec, checkpoint_classes: int) -> None:
    """Refuse a card whose ``num_classes`` is not its checkpoint's (its label map would be read wrong)."""
    if spec.num_classes is None or int(spec.num_classes) == int(checkpoint_classes):
        return
    where = f"teacher card {spec.card}" if spec.card else f"teacher {spec.name}"
    raise ValueError(f"{where} says num_classes = {spec.num_classes} but its checkpoint {spec.checkpoint} has "
                     f"{checkpoint_classes} classes: fix num_classes in the card, or point it at the right checkpoint")


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "safetensors" if path.suffix == ".safetensors" else "official"


def resolve_teacher(teacher: str, checkpoint: Optional[str] = None,
                    allow_partial_weights: bool = False, precision: str = "float32") -> TeacherSpec:
    """``--teacher`` / ``--teacher-checkpoint`` -> :class:`TeacherSpec`.

    A name with a card in ``teachers/`` (or a path to a card ``.toml``) uses the card; its checkpoint
    may be replaced by ``--teacher-checkpoint``. Otherwise ``teacher`` must be a registered model
    name and ``--teacher-checkpoint`` is required.

    A card's checkpoint replaced by a kd-detr ``.safetensors`` file: that file is another teacher of the
    card's architecture, so its own metadata (image size, label map, number of classes) wins over the
    card, and the card's known AP no longer applies. A replacement official/HF file carries no metadata:
    the card's class space and image size still describe it.

    ``allow_partial_weights`` (``--allow-partial-weights``) is recorded on the spec; only a transformers folder
    (``hf:DIR``) can use it. ``precision`` (``--teacher-precision``): the dtype the teacher runs at.
    """
    spec = _resolve_teacher(teacher, checkpoint)
    return dataclasses.replace(spec, allow_partial_weights=bool(allow_partial_weights), precision=precision)


def _resolve_teacher(teacher: str, checkpoint: Optional[str]) -> TeacherSpec:
    if teacher.startswith(HF_PREFIX):
        if checkpoint:
            raise ValueError(f"--teacher {teacher} is a transformers folder with its own weights: drop "
                             "--teacher-checkpoint")
        from kd_detr.models.hf.registry import hf_config

        config = hf_config(teacher)  # checks config.json, the family and the weights file
        # a Hub id is pinned to the commit it resolved to: Ray actors and resumed runs load the same files
        model = f"{HF_PREFIX}{config.hub['repo_id']}@{config.hub['commit']}" if config.hub else teacher
        return TeacherSpec(name=teacher, model=model, checkpoint=Path(config.source), format="hf_folder")
    card_path = Path(teacher) if teacher.endswith(".toml") else find_card(teacher)
    if card_path is not None:
        card: TeacherCard = load_card(str(card_path))
        ckpt = Path(checkpoint) if checkpoint else card.require_checkpoint()
        if not ckpt.exists():
            raise FileNotFoundError(f"--teacher-checkpoint {ckpt} does not exist")
        spec = TeacherSpec(name=card.name, model=card.model, checkpoint=ckpt, format=card.format if not checkpoint
                           else ("hf" if card.format == "hf" else "auto"), num_classes=card.num_classes,
                           label_map=card.label_map, image_size=card.image_size_preset, image_size_known=True,
                           known_ap=card.known_ap, card=str(card.source), model_overrides=dict(card.model_overrides))
        if checkpoint and _is_kd_detr_file(ckpt):
            log.info("teacher card %s: its checkpoint %s is replaced by --teacher-checkpoint %s, a kd-detr file: "
                     "its own image size, label map and classes are used, not the card's (nor its known AP)",
                     card.source, card.checkpoint_path(), ckpt)
            spec = dataclasses.replace(spec, format="safetensors", num_classes=None, label_map=None, image_size=None,
                                       image_size_known=False, known_ap=None)
        elif checkpoint:
            log.info("teacher card %s: its checkpoint %s is replaced by --teacher-checkpoint %s (the card's class "
                     "space and image size still apply)", card.source, card.checkpoint_path(), ckpt)
        return spec
    try:
        get_config(teacher)
    except ValueError as e:
        raise ValueError(f"--teacher {teacher!r} is neither a teacher card (teachers/*.toml) nor a registered "
                         f"model ({e})") from e
    if not checkpoint:
        raise ValueError(f"--teacher {teacher} is a model name without a teacher card: give its weights with "
                         "--teacher-checkpoint PATH (kd-detr .safetensors or official .pth)")
    ckpt = Path(checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"--teacher-checkpoint {ckpt} does not exist")
    return TeacherSpec(name=teacher, model=teacher, checkpoint=ckpt)


def teacher_config(spec: TeacherSpec, data_label_map: Optional[LabelMap] = None) -> dict[str, Any]:
    """The teacher's :class:`ModelConfig` as a dict, without loading its weights (a cache records it so
    that distilling from the cache needs no teacher model). A transformers folder's comes with its classes
    mapped onto ``data_label_map``'s (what the cached logits hold)."""
    if spec.format == "hf_folder" and data_label_map is not None:
        return _hf_folder_teacher(spec, data_label_map).to_dict()
    if _file_format(spec.checkpoint, spec.format) == "safetensors":
        from kd_detr.models.checkpoint import read_model_metadata

        return read_model_metadata(spec.checkpoint)["config"]
    if spec.format == "hf_folder":
        return get_config(spec.model).to_dict()
    overrides = dict(spec.model_overrides)
    if spec.num_classes is not None:
        overrides["num_classes"] = spec.num_classes
    return get_config(spec.model).replace(**overrides).to_dict()


def _official_label_map(spec: TeacherSpec, num_classes: int, data_label_map: Optional[LabelMap]) -> LabelMap:
    """Official and Hugging Face files carry no label map: the card says which (``coco91``: slot = COCO id)."""
    if spec.label_map in (None, "coco91"):
        return LabelMap.raw_ids([c for c in COCO_CATEGORIES if c["id"] < num_classes], num_classes=num_classes)
    if data_label_map is None:
        raise ValueError(f"teacher {spec.name}: its card says label_map = \"contiguous\"; the data's label map "
                         "is needed to load it")
    return data_label_map  # contiguous: the card says the slots are the data's categories in order


def describe_teacher(spec: TeacherSpec, data_label_map: Optional[LabelMap]) -> tuple[ModelConfig, LabelMap, Optional[int]]:
    """``(its ModelConfig, its label map, its training image-size preset)`` without loading the weights
    (what the checks and the methods need when the teacher runs elsewhere: Ray actors, a cache)."""
    fmt = _file_format(spec.checkpoint, spec.format)
    if fmt == "hf_folder":
        return _hf_folder_teacher(spec, data_label_map), data_label_map, None
    if fmt == "safetensors":
        from kd_detr.models.checkpoint import read_model_metadata

        meta = read_model_metadata(spec.checkpoint)
        if meta["model_name"] != spec.model:
            raise ValueError(f"teacher {spec.name}: {spec.checkpoint} holds a {meta['model_name']}, not a {spec.model}")
        _check_card_classes(spec, config_from_dict(meta["config"]).num_classes)
        if meta.get("label_map") is None:
            raise ValueError(f"teacher checkpoint {spec.checkpoint} records no label map; it cannot be checked "
                             "against the data")
        image_size = spec.image_size if spec.image_size_known else (meta.get("extra_metadata") or {}).get("image_size")
        return config_from_dict(meta["config"]), LabelMap.from_dict(meta["label_map"]), image_size
    if fmt not in ("official", "hf"):
        raise ValueError(f"teacher {spec.name}: unknown checkpoint format {fmt!r}")
    config = ModelConfig.from_dict(teacher_config(spec))
    return config, _official_label_map(spec, config.num_classes, data_label_map), spec.image_size


def _hf_folder_teacher(spec: TeacherSpec, data_label_map: Optional[LabelMap]):
    """The :class:`HFModelConfig` of an ``hf:DIR`` teacher with its classes mapped onto the data's by name."""
    import dataclasses as dc

    from kd_detr.models.hf.labels import class_map_by_name
    from kd_detr.models.hf.registry import hf_config

    config = hf_config(spec.model)
    if data_label_map is None:
        raise ValueError(f"teacher {spec.name}: the data's label map is needed to map its classes")
    class_map = class_map_by_name(config.id2label, data_label_map, f"teacher {spec.name}")
    return dc.replace(config, class_map=class_map, allow_partial_weights=bool(spec.allow_partial_weights))


def load_teacher(spec: TeacherSpec, data_label_map: Optional[LabelMap]
                 ) -> tuple[torch.nn.Module, LabelMap, Optional[int]]:
    """Load the teacher's weights. Returns ``(model, its label map, its training image-size preset)``.

    kd-detr ``.safetensors`` files carry their architecture, label map and image size; official and
    Hugging Face files carry none, so they come from the card (``coco91``: class slot = COCO id).
    A card whose ``num_classes`` differs from its checkpoint's is refused (naming both).

    The global RNG is left as it was (building the model would draw initial weights from it): loading a
    teacher must not change what a run draws next, or an in-process teacher would give a run other numbers
    (e.g. another init of a method's projection) than a cached or Ray-served one.
    """
    with torch.random.fork_rng(devices=[]):
        return _load_teacher(spec, data_label_map)


def _load_teacher(spec: TeacherSpec, data_label_map: Optional[LabelMap]
                  ) -> tuple[torch.nn.Module, LabelMap, Optional[int]]:
    fmt = _file_format(spec.checkpoint, spec.format)
    if fmt == "hf_folder":
        from kd_detr.models.hf.adapter import HFDetector

        return HFDetector(_hf_folder_teacher(spec, data_label_map), role="teacher"), data_label_map, None
    if fmt == "safetensors":
        _, label_map, image_size = describe_teacher(spec, data_label_map)  # checks name, classes, label map first
        model, _ = load_model(spec.checkpoint)
    elif fmt in ("official", "hf"):
        # built with the file's own number of classes (read from class_embed), then compared with the card's
        overrides = {k: v for k, v in spec.model_overrides.items() if k != "num_classes"}
        model = model_from_official(spec.checkpoint, spec.model, None, fmt=fmt, **overrides)
        _check_card_classes(spec, model.config.num_classes)
        label_map, image_size = _official_label_map(spec, model.config.num_classes, data_label_map), spec.image_size
    else:
        raise ValueError(f"teacher {spec.name}: unknown checkpoint format {fmt!r}")
    return model, label_map, image_size


def check_teacher_fits(spec: TeacherSpec, teacher_label_map: LabelMap, teacher_image_size: Optional[int],
                       data_label_map: LabelMap, student_num_classes: int, image_size: Optional[int],
                       check_image_size: bool = True) -> None:
    """Refuse a teacher whose classes or training image size do not match the student and the data."""
    teacher_label_map.check_compatible(data_label_map, what=f"teacher {spec.name} ({spec.checkpoint}) and the data")
    if teacher_label_map.num_classes != student_num_classes:
        raise ValueError(f"teacher {spec.name} has {teacher_label_map.num_classes} class slots and the student "
                         f"{student_num_classes}: they must share one label map (--label-map)")
    if check_image_size and spec.format == "hf_folder":
        log.info("teacher %s is a transformers folder: its training image size is not recorded (not checked); its "
                 "family's own input policy applies to each view", spec.name)
    elif check_image_size and teacher_image_size != image_size:
        def show(s):
            return "the official sizes (800, max 1333)" if s is None else f"the {s}-px preset"
        raise ValueError(f"teacher {spec.name} was trained at {show(teacher_image_size)} but this run uses "
                         f"{show(image_size)} (--image-size): its predictions would not transfer; match the image "
                         "size or set teacher_check.image_size = false")
