"""Checks a teacher must pass before a run spends compute distilling from it (recipe section
``[teacher_check]``): its classes and training image size fit the data (:func:`~kd_detr.teacher.loading.check_teacher_fits`)
and, when asked, its AP on the first validation images is not far below what its card says."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kd_detr.schema import opt

from .loading import TeacherSpec

log = logging.getLogger("kd_detr.teacher")

__all__ = ["TeacherCheck", "check_teacher_ap"]


@dataclass
class TeacherCheck:
    """Checks a teacher must pass before a run spends compute distilling from it."""

    image_size: bool = True
    eval_images: int = opt(0, min=0)
    min_ap: float = opt(0.0, min=0, max=100)
    max_ap_drop: float = opt(10.0, min=0)


def check_teacher_ap(model: torch.nn.Module, spec: TeacherSpec, chk: TeacherCheck, val_set, label_map,
                     device: str, batch_size: int, progress: bool = True) -> Optional[dict[str, Any]]:
    """Evaluate the teacher on the first ``chk.eval_images`` validation images and refuse it if it is far too
    weak. Returns ``{"teacher_AP_check", "teacher_AP_check_images"}`` (``None`` on non-zero ranks of a
    distributed evaluation)."""
    from kd_detr.evaluation import eval_loader, evaluate_model

    if val_set is None:
        raise ValueError("teacher_check.eval_images > 0 needs validation data (--data or --val-ann/--val-images)")
    n = min(chk.eval_images, len(val_set))
    loader = eval_loader(val_set, batch_size, max_images=n)
    result, _ = evaluate_model(model, loader, val_set.coco, label_map, device, progress=progress)
    if result is None:
        return None
    ap = 100 * result.metrics["AP"]
    log.info("teacher %s: AP %.1f on the first %d validation images", spec.name, ap, n)
    if ap < chk.min_ap:
        raise ValueError(f"teacher {spec.name} ({spec.checkpoint}) reaches AP {ap:.1f} on {n} validation images, "
                         f"below teacher_check.min_ap = {chk.min_ap}: wrong checkpoint, label map or data?")
    if spec.known_ap is not None and spec.known_ap - ap > chk.max_ap_drop:
        raise ValueError(f"teacher {spec.name} reaches AP {ap:.1f} on {n} validation images, {spec.known_ap - ap:.1f} "
                         f"points below its card's {spec.known_ap} (teacher_check.max_ap_drop = {chk.max_ap_drop})")
    return {"teacher_AP_check": ap, "teacher_AP_check_images": n}
