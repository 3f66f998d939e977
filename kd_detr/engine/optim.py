"""The optimizer and learning-rate schedule of a run: AdamW over the student's parameter groups (the training
preset's rules, :mod:`.presets`) and the methods' modules; a step or flat-cosine schedule at iteration
granularity."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Mapping

import torch

from .presets import TrainingPreset, get_preset, grouped_parameters
from .train_config import TrainConfig

log = logging.getLogger("kd_detr.train")

__all__ = ["param_groups", "lr_lambda", "flat_cosine_lambda", "build_optimizer", "build_scheduler"]


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, weight_decay: float,
                 preset: str = "official") -> list[dict]:
    """``preset``'s parameter groups of ``model`` at these rates (for scripts and benchmarks without a
    ``TrainConfig``; official: the backbone at ``lr_backbone``, the rest at ``lr``)."""
    return grouped_parameters(model, get_preset(preset),
                              SimpleNamespace(lr=lr, lr_backbone=lr_backbone, weight_decay=weight_decay))


def lr_lambda(warmup_iters: int, drop_iter: int | None):
    """Linear warm-up from 0.001 to 1, then x0.1 after ``drop_iter`` (StepLR at iteration granularity)."""

    def f(it: int) -> float:
        factor = 1.0
        if warmup_iters > 0 and it < warmup_iters:
            factor = 0.001 + (1 - 0.001) * it / warmup_iters
        if drop_iter is not None and it >= drop_iter:
            factor *= 0.1
        return factor

    return f


def flat_cosine_lambda(total_iters: int, warmup_iters: int, flat_iters: int, no_aug_iters: int,
                       min_factor: float):
    """D-FINE's and DEIM's flat-cosine schedule as a factor of the base lr: a quadratic warm-up
    ``(it / warmup)^2``, flat until ``flat_iters``, a half cosine down to ``min_factor`` at
    ``total - no_aug_iters``, then ``min_factor`` (the epochs without strong augmentation)."""

    def f(it: int) -> float:
        if warmup_iters > 0 and it <= warmup_iters:
            return (it / warmup_iters) ** 2
        if it <= flat_iters:
            return 1.0
        if it >= total_iters - no_aug_iters:
            return min_factor
        span = max(total_iters - flat_iters - no_aug_iters, 1)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * (it - flat_iters) / span))

    return f


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, method_modules: Mapping[str, torch.nn.Module],
                    preset: TrainingPreset) -> torch.optim.Optimizer:
    """AdamW over the student's groups (the preset's rules) plus one group per method module (at ``lr``)."""
    groups = grouped_parameters(model, preset, cfg)
    for name, mod in method_modules.items():
        params = [p for p in mod.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": name})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, iters_per_epoch: int,
                    total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``step``: ``warmup_iters`` then x0.1 after ``lr_drop_iter`` (or ``lr_drop`` epochs); ``flat_cosine``:
    :func:`flat_cosine_lambda` over the run's ``total_iters``."""
    if cfg.warmup_iters > total_iters // 4:
        log.warning("the warm-up (train.warmup_iters = %d) takes more than a quarter of the run's %d iterations: "
                    "set --warmup-iters / train.warmup_iters for a run this short", cfg.warmup_iters, total_iters)
    if cfg.schedule == "flat_cosine":
        f = flat_cosine_lambda(total_iters, cfg.warmup_iters, round(cfg.flat_fraction * total_iters),
                               round(cfg.no_aug_fraction * total_iters), cfg.lr_min_factor)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    drop = cfg.lr_drop_iter
    if drop is None and cfg.lr_drop is not None:
        drop = cfg.lr_drop * iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_iters, drop))
