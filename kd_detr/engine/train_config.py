"""What a training run depends on: :class:`TrainConfig`, saved (resolved) as ``config.json`` in the
output dir. The command line and a recipe's ``[train]`` table both fill it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved (resolved) as ``config.json`` in the output dir."""

    # model
    model: str = "cond_detr_r18_tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    init_checkpoint: str | None = None  # start from these weights (safetensors or official .pth)
    # data
    data: str | None = None  # COCO-style root (annotations/instances_{train,val}2017.json + folders)
    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    image_size: int | None = None  # None: official DETR sizes (800/1333); else small-image preset
    label_map: str = "contiguous"  # contiguous | coco91
    skip_bad_labels: bool = False  # YOLO data: skip (and count) bad label lines instead of stopping
    augment: bool = True  # False: training images get the eval resize only (overfitting, debugging)
    num_workers: int = 2
    # optimisation. None: the training preset's value (engine/presets.py; official = Conditional DETR's
    # 1e-4 / 1e-5 / 1e-4 / clip 0.1 / x0.1 after epoch 40, no EMA); a value given here wins over the preset
    preset: str = "auto"  # auto (the student family's) | official | rt_detr | rt_detr_v2 | d_fine | deimv2 | lw_detr
    batch_size: int = 2
    lr: float | None = None
    lr_backbone: float | None = None
    weight_decay: float | None = None
    clip_max_norm: float | None = None
    epochs: int = 50
    max_iters: int | None = None  # overrides epochs when set
    lr_drop: int | None = None  # epoch after which lr is multiplied by 0.1 (schedule step)
    lr_drop_iter: int | None = None  # the same in iterations (wins over lr_drop)
    warmup_iters: int | None = None
    schedule: str | None = None  # step | flat_cosine
    flat_fraction: float | None = None  # flat_cosine: the lr stays flat until this fraction of the run
    no_aug_fraction: float | None = None  # the last fraction of the run at the final lr, without augmentation
    lr_min_factor: float | None = None  # flat_cosine: the final lr is lr * lr_min_factor
    amp: bool = False
    # exponential moving average of the weights (engine/ema.py): evaluated, saved and exported instead of them
    ema: bool | None = None
    ema_decay: float | None = None  # RT-DETR / D-FINE / DEIM: 0.9999
    ema_warmup: int | None = None  # updates; the ramp decay * (1 - exp(-updates / ema_warmup))
    # loss (official)
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    aux_loss: bool = True
    # run
    output_dir: str = "runs/train"
    seed: int = 42
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500  # iterations; a checkpoint is also written at every epoch end
    keep_checkpoints: int = 2
    eval_every_epochs: int = 1
    eval_every_iters: int | None = None
    eval_batch_size: int = 2
    eval_max_images: int | None = None
    resume: str | None = None  # auto | path
    deterministic: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse counts that cannot work (a zero ``log_every`` divides by zero after the first step, a zero
        ``max_iters`` "succeeds" without training), naming the option as typed on the command line; a recipe's
        ``[train]`` values go through here too."""
        def check(name: str, value: Any, minimum: int, optional: bool = False, note: str = "") -> None:
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                option = "--" + name.replace("_", "-")
                raise ValueError(f"{option} must be {'an integer ' if not isinstance(value, int) else ''}"
                                 f">= {minimum}{note}, got {value!r} (in a recipe: train.{name})")

        check("batch_size", self.batch_size, 1)
        check("epochs", self.epochs, 1)
        check("max_iters", self.max_iters, 1, optional=True)
        check("warmup_iters", self.warmup_iters, 0, optional=True)
        check("log_every", self.log_every, 1)
        check("checkpoint_every", self.checkpoint_every, 1)
        check("keep_checkpoints", self.keep_checkpoints, 0, note=" (0 keeps every checkpoint)")
        check("eval_every_epochs", self.eval_every_epochs, 0, note=" (0: evaluate at the end only)")
        check("eval_every_iters", self.eval_every_iters, 1, optional=True)
        check("eval_batch_size", self.eval_batch_size, 1)
        check("eval_max_images", self.eval_max_images, 1, optional=True)
        check("num_workers", self.num_workers, 0)
        check("lr_drop", self.lr_drop, 0, optional=True)
        check("lr_drop_iter", self.lr_drop_iter, 0, optional=True)
        check("ema_warmup", self.ema_warmup, 0, optional=True)
        for name, low, high, closed in (("ema_decay", 0.0, 1.0, False), ("flat_fraction", 0.0, 1.0, True),
                                        ("no_aug_fraction", 0.0, 1.0, True), ("lr_min_factor", 0.0, 1.0, True)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    low <= value <= high if closed else low <= value < high):
                raise ValueError(f"--{name.replace('_', '-')} must be in [{low:g}, {high:g}{']' if closed else ')'}, "
                                 f"got {value!r} (in a recipe: train.{name})")
        if self.schedule not in (None, "step", "flat_cosine"):
            raise ValueError(f"train.schedule must be step or flat_cosine, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
