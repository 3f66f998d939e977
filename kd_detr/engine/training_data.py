"""A run's data: the training and validation sets, the resumable batch sampler and the training loader,
on a view plan when the teacher source fixes one (a cache) or ``--views`` asks for one."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

from torch.utils.data import DataLoader

from kd_detr import data as kd_data
from kd_detr.data.view_plan import PlanViews, PlanViewSampler, ViewKey, ViewPlan
from kd_detr.teacher import TeacherSource

from .distributed import DistInfo
from .runtime import loader_generator
from .sampler import ResumableBatchSampler
from .train_config import TrainConfig

log = logging.getLogger("kd_detr.train")

__all__ = ["TrainingData", "build_training_data", "plan_reads"]


@dataclass
class TrainingData:
    """``train_set``, ``val_set`` (``None``: no validation data), ``label_map``, ``sampler`` (with
    ``set_epoch`` and ``batches_per_epoch``), ``loader`` and the view ``plan`` (``None``: fresh augmentation)."""

    train_set: Any
    val_set: Any
    label_map: kd_data.LabelMap
    sampler: Any
    loader: DataLoader
    plan: Optional[ViewPlan] = None


def build_training_data(cfg: TrainConfig, dist: DistInfo, device: str, teacher: Optional[TeacherSource] = None,
                        distils: bool = False, views: Optional[int] = None, view_seed: int = 0,
                        log_report: bool = True) -> TrainingData:
    """The data of a run (``teacher``: its source, asked for a view plan and a loader hook, see
    :mod:`kd_detr.teacher.sources`; ``distils``: the recipe reads teacher outputs)."""
    if views is not None and views < 1:
        raise ValueError(f"--views must be >= 1, got {views}")
    spec = kd_data.DataSpec.of(cfg)
    train_set = spec.train_set(cfg.augment, seed=cfg.seed, log_report=log_report)
    label_map = train_set.label_map
    val_set = None
    try:
        spec.files("val")
    except (ValueError, FileNotFoundError) as e:
        log.warning("no validation data (%s): evaluation is skipped", e)
    else:
        val_set = spec.val_set(label_map, log_report=log_report)
    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    pin = device.startswith("cuda")
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=kd_data.collate_fn, generator=loader_generator(cfg.seed, dist.rank),
                        persistent_workers=False, pin_memory=pin)
    out = TrainingData(train_set, val_set, label_map, sampler, loader)
    plan = teacher.view_plan(train_set, label_map, cfg.image_size, views) if teacher is not None else None
    if plan is None and views is not None:
        plan = ViewPlan.for_dataset(train_set, views, view_seed)
    if plan is None:
        return out
    # a plan: K recorded views per image, one drawn per image and epoch, in the ordinary batches
    if not cfg.augment:
        raise ValueError("a view plan records augmented views: it cannot be combined with --no-augment")
    out.plan, out.sampler = plan, PlanViewSampler(sampler, plan, cfg.seed)
    hook = teacher.loader_hook(plan, plan_reads(cfg, plan, out.sampler)) if teacher is not None and distils else None
    out.loader = DataLoader(PlanViews(train_set, plan, hook), batch_sampler=out.sampler,
                            num_workers=cfg.num_workers, collate_fn=PlanViews.collate,
                            generator=loader_generator(cfg.seed, dist.rank), persistent_workers=False, pin_memory=pin)
    log.info("view plan: %d views per image, one drawn per image and epoch%s", plan.num_views,
             f", teacher outputs read from {hook.root}" if hook is not None else "")
    return out


def plan_reads(cfg: TrainConfig, plan: ViewPlan, sampler: PlanViewSampler) -> list[ViewKey]:
    """The ``(image, view)`` pairs a run reads: those the plan gives each image in epochs ``0 .. E-1`` (E: the
    run's epochs, from ``--epochs`` or ``--max-iters``); from K epochs on, every view of the plan."""
    per_epoch = max(1, sampler.batches_per_epoch())
    epochs = cfg.epochs if cfg.max_iters is None else math.ceil(cfg.max_iters / per_epoch)
    if epochs >= plan.num_views:
        return plan.all_views()
    return sorted({(i, int(k)) for e in range(max(epochs, 1)) for i, k in enumerate(plan.epoch_views(e, cfg.seed))},
                  key=lambda ik: (ik[1], ik[0]))
