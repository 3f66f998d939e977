"""The student of a run and its ground-truth criterion: built from ``--model`` / ``--model-opt``, or started
from ``--init-checkpoint`` (a kd-detr model or an official ``.pth``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kd_detr.criterion import FamilyLossCriterion, SetCriterion
from kd_detr.matcher import HungarianMatcher
from kd_detr.models import build_model, get_config, load_model

from .train_config import TrainConfig

__all__ = ["build_student", "build_criterion", "load_init_checkpoint"]


def build_student(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The student detector, on the CPU."""
    if cfg.init_checkpoint:
        return load_init_checkpoint(cfg.init_checkpoint, cfg.model, num_classes, cfg.model_overrides)
    return build_model(cfg.model, num_classes=num_classes, backbone_weights=cfg.backbone_weights,
                       **cfg.model_overrides)


def build_criterion(cfg: TrainConfig, model: torch.nn.Module, num_classes: int) -> SetCriterion:
    """The student's ground-truth loss: the official Conditional DETR set criterion (with a weight per
    intermediate decoder layer under ``aux_loss``), or a transformers family's own loss."""
    matcher = HungarianMatcher(cost_class=cfg.cost_class, cost_bbox=cfg.cost_bbox, cost_giou=cfg.cost_giou,
                               focal_alpha=cfg.focal_alpha)
    if getattr(model, "own_loss", False):
        # transformers families: their own loss (matcher, focal/VFL, denoising), weighted their way
        return FamilyLossCriterion(num_classes, model.family_loss_weights, matcher=matcher,
                                   focal_alpha=cfg.focal_alpha)
    base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    weight_dict = dict(base)
    if cfg.aux_loss:  # the same weights for every intermediate decoder layer (official)
        for i in range(model.config.dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return SetCriterion(num_classes, matcher, weight_dict=weight_dict, focal_alpha=cfg.focal_alpha)


def load_init_checkpoint(path: str, model_name: str, num_classes: int, overrides: dict[str, Any]) -> torch.nn.Module:
    """Weights to start from: our safetensors (model rebuilt from its metadata) or an official ``.pth``."""
    from kd_detr.models import model_from_official

    p = Path(path)
    if p.suffix == ".safetensors":
        model, meta = load_model(p)
        _check_init_model(p, model.config, meta.get("model_name", model.config.name), model_name, overrides)
        if model.config.num_classes != num_classes:
            raise ValueError(f"{p}: the checkpoint has {model.config.num_classes} classes but the data's label "
                             f"map has {num_classes}")
        return model
    return model_from_official(p, model_name, num_classes, **overrides)


def _check_init_model(path: Path, config: Any, ckpt_name: str, model_name: str, overrides: dict[str, Any]) -> None:
    """Refuse an ``--init-checkpoint`` of another architecture than ``--model`` / ``--model-opt`` ask for (the
    checkpoint's model would silently replace them and ``config.json`` would contradict itself)."""
    opts = "".join(f" --model-opt {k}={v}" for k, v in overrides.items())
    if ckpt_name != model_name:
        have = config.to_dict()
        try:
            want = get_config(model_name).replace(**overrides).to_dict()
        except ValueError:
            want = {}
        diff = [k for k in have if k not in ("name", "description", "num_classes", "freeze_stem")
                and k in want and have[k] != want[k]]

        def shown(cfg: dict[str, Any]) -> str:
            return ", ".join(f"{k}={cfg[k]}" for k in diff[:4]) + (", ..." if len(diff) > 4 else "")

        raise ValueError(f"--init-checkpoint {path} holds a {ckpt_name}{f' ({shown(have)})' if diff else ''}, but "
                         f"--model {model_name}{opts} builds a {model_name}{f' ({shown(want)})' if diff else ''}: "
                         f"pass --model {ckpt_name} or another checkpoint")
    for key, value in overrides.items():
        if key == "num_classes":  # checked against the data's label map by the caller
            continue
        have = getattr(config, key, None)
        if have != value:
            raise ValueError(f"--init-checkpoint {path} holds a {ckpt_name} with {key}={have}, but --model-opt "
                             f"{key}={value} was given: pass --model-opt {key}={have} (or leave it out) or another "
                             "checkpoint")
