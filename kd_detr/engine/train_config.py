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
    augment: bool = True  # False: training images get the eval resize only (overfitting, debugging)
    num_workers: int = 2
    # optimisation (official Conditional DETR defaults)
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    epochs: int = 50
    max_iters: int | None = None  # overrides epochs when set
    lr_drop: int | None = 40  # epoch after which lr is multiplied by 0.1
    lr_drop_iter: int | None = None  # the same in iterations (wins over lr_drop)
    warmup_iters: int = 0
    amp: bool = False
    # exponential moving average of the weights (engine/ema.py): evaluated, saved and exported instead of them
    ema: bool = False
    ema_decay: float = 0.9999  # RT-DETR / D-FINE / DEIM
    ema_warmup: int = 2000  # updates; the ramp decay * (1 - exp(-updates / ema_warmup))
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
        check("warmup_iters", self.warmup_iters, 0)
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
        check("ema_warmup", self.ema_warmup, 0)
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay!r} (in a recipe: train.ema_decay)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
