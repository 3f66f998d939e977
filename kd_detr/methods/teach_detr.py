"""Teach-DETR: the teacher's confident boxes as extra one-to-one targets (Huang et al., ICCV 2023; docs/methods.md).

The teacher's last-layer predictions whose score passes ``score_threshold`` become, per image, a second
target set beside the ground truth; every student decoder layer is Hungarian-matched to it on its own and
trained with the ground-truth losses (sigmoid focal, L1, GIoU with the official 2/5/2 matching costs and
weights), scaled by ``weight``. Only the teacher's final class logits and boxes are read, so any teacher
works (another family, a cache without attention maps), and the student needs nothing but its per-layer
predictions: every family is reached.

A transformers student's ground-truth loss is its family's own (VFL, denoising); its teacher-box loss is
this focal / L1 / GIoU set loss, the same for every student, so recipes compare across families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from kd_detr.criterion import SetCriterion
from kd_detr.matcher import HungarianMatcher
from kd_detr.schema import opt
from kd_detr.teacher import TeacherOutputs

from .base import Method
from .registry import register_method

__all__ = ["TeachDetrConfig", "TeacherBoxTargets", "teacher_box_targets"]


@dataclass
class TeachDetrConfig:
    """Teach-DETR's teacher-box targets (``[teach_detr]``).

    * ``enabled``: switch the teacher-box loss on (it needs a teacher: ``--teacher`` or ``--teacher-cache``).
    * ``score_threshold``: a teacher prediction is a target when its best class probability (sigmoid) is
      above this; its class is that best class.
    * ``max_targets``: at most this many targets per image, the most confident first (0: no limit).
    * ``weight``: multiplies every term of the teacher-box loss (Teach-DETR's loss weight).
    * ``class_weight``, ``bbox_weight``, ``giou_weight``: focal, L1 and GIoU weights of every decoder layer (the
      ground-truth loss's 2 / 5 / 2), also the matching costs.
    """

    enabled: bool = False
    score_threshold: float = opt(0.5, min=0, max=1)
    max_targets: int = opt(100, min=0)
    weight: float = opt(1.0, min=0)
    class_weight: float = opt(2.0, min=0)
    bbox_weight: float = opt(5.0, min=0)
    giou_weight: float = opt(2.0, min=0)


@torch.no_grad()
def teacher_box_targets(logits: Tensor, boxes: Tensor, score_threshold: float, max_targets: int = 0) -> list[dict]:
    """Per-image targets from the teacher's last layer.

    Args:
        logits: ``[B,Nt,C]`` teacher class logits (sigmoid scores).
        boxes: ``[B,Nt,4]`` teacher boxes, normalised cxcywh.
        score_threshold: keep the predictions whose best class probability is ``> score_threshold``.
        max_targets: keep at most this many per image, highest score first (``0``: all).

    Returns:
        ``B`` dicts ``{"labels": [N_b] int64, "boxes": [N_b,4], "scores": [N_b]}``, sorted by score
        (descending), ``N_b`` possibly 0; the boxes are detached float32 copies.
    """
    scores, labels = logits.float().sigmoid().max(dim=-1)  # [B,Nt]
    out = []
    for b in range(logits.shape[0]):
        keep = (scores[b] > score_threshold).nonzero().flatten()
        order = scores[b, keep].argsort(descending=True, stable=True)
        keep = keep[order]
        if max_targets:
            keep = keep[:max_targets]
        out.append({"labels": labels[b, keep], "boxes": boxes[b, keep].float().clone(), "scores": scores[b, keep]})
    return out


@register_method("teach_detr", TeachDetrConfig)
class TeacherBoxTargets(Method):
    """The teacher-box loss of every student decoder layer; terms ``teach_detr.{loss_ce,loss_bbox,loss_giou}.l<i>``
    (layer ``i``, 0 first)."""

    uses_teacher = True

    def __init__(self, cfg: TeachDetrConfig, student: Any, criterion: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_layers = int(student.dec_layers)
        self.num_classes = int(student.num_classes)
        matcher = HungarianMatcher(cost_class=cfg.class_weight, cost_bbox=cfg.bbox_weight, cost_giou=cfg.giou_weight)
        self.set_loss = SetCriterion(self.num_classes, matcher, weight_dict={}, num_dec_layers=self.num_layers)
        base = {"loss_ce": cfg.class_weight, "loss_bbox": cfg.bbox_weight, "loss_giou": cfg.giou_weight}
        for i in range(self.num_layers):
            for term, w in base.items():
                self.add_term(f"teach_detr.{term}.l{i}", cfg.weight * w, subgroup=f"teach_detr.{term}")

    @classmethod
    def build(cls, cfg: Any, student: Any, criterion: nn.Module, teacher: Any = None) -> "TeacherBoxTargets":
        if teacher is not None and int(teacher.num_classes) != int(student.num_classes):
            raise ValueError(f"[teach_detr] takes the teacher's classes as targets: the teacher has "
                             f"{teacher.num_classes} classes, the student {student.num_classes}")
        return cls(cfg, student, criterion)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}  # nothing to train beside the student

    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
                teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("[teach_detr] needs the teacher's outputs for every batch")
        if teacher.logits.shape[-1] != self.num_classes:
            raise ValueError(f"[teach_detr]: the teacher's logits have {teacher.logits.shape[-1]} classes, the "
                             f"student's {self.num_classes}")
        pseudo = teacher_box_targets(teacher.logits[-1], teacher.boxes[-1], self.cfg.score_threshold,
                                     self.cfg.max_targets)
        device = outputs["pred_logits"].device
        pseudo = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in pseudo]
        layers = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"],
                  "aux_outputs": [{"pred_logits": a["pred_logits"], "pred_boxes": a["pred_boxes"]}
                                  for a in (outputs.get("aux_outputs") or [])]}
        if len(layers["aux_outputs"]) + 1 != self.num_layers:
            raise ValueError(f"[teach_detr] expects {self.num_layers} decoder layers from the student, got "
                             f"{len(layers['aux_outputs']) + 1}")
        losses = self.set_loss(layers, pseudo)
        last = self.num_layers - 1
        out = {}
        for key, value in losses.items():
            term, _, layer = key.rpartition("_") if key[-1].isdigit() else (key, "", str(last))
            out[f"teach_detr.{term}.l{layer}"] = value
        return out
