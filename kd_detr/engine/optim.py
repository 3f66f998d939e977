"""The optimizer and learning-rate schedule of a run: AdamW over the student's parameter groups and the
methods' modules, linear warm-up then a step drop, at iteration granularity."""

from __future__ import annotations

from typing import Mapping

import torch

from .train_config import TrainConfig

__all__ = ["param_groups", "lr_lambda", "build_optimizer", "build_scheduler"]


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, weight_decay: float) -> list[dict]:
    """Official Conditional DETR groups: backbone parameters at ``lr_backbone``, the rest at ``lr``."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "transformer"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr_backbone, "name": "backbone"})
    for g in groups:
        g["weight_decay"] = weight_decay
    return groups


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


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module,
                    method_modules: Mapping[str, torch.nn.Module]) -> torch.optim.Optimizer:
    """AdamW over the student's groups plus one group per method module (at the transformer's rate)."""
    groups = param_groups(model, cfg.lr, cfg.lr_backbone, cfg.weight_decay)
    for name, mod in method_modules.items():
        params = [p for p in mod.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": name})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    iters_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``--warmup-iters`` then x0.1 after ``--lr-drop-iter`` (or ``--lr-drop`` epochs)."""
    drop = cfg.lr_drop_iter
    if drop is None and cfg.lr_drop is not None:
        drop = cfg.lr_drop * iters_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_iters, drop))
