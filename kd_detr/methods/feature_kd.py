"""Feature distillation on the encoder's output (docs/methods.md, "Feature distillation").

The student's encoder output maps (``DetectorRequest(features=True)``: kd-detr's Conditional DETR gives its C5
memory, the transformers families their encoder's maps, RT-DETR-like hybrid encoders three levels at strides
8/16/32) learn to match the teacher's, as real-time DETR students are distilled (RT-DETRv4, LW-DETR-era work):

* ``mse``: FitNet (Romero et al., ICLR 2015): a learned 1x1 convolution (the *projector*, student width ->
  teacher width; the identity when the widths agree) on each student level, then the mean squared error to the
  teacher's map over the valid positions of every image (inside its own region, never the batch's padding);
* ``cwd``: channel-wise distillation (Shu et al., ICCV 2021): each channel of the projected student map and of
  the teacher's map becomes a distribution over the image's positions (softmax at temperature ``tau``);
  ``tau^2 * KL(teacher || student)``, averaged over channels and images.

Each student level is compared with the teacher level of the nearest stride; a teacher map of another size is
resized bilinearly to the student's grid, image by image (the teacher saw each image alone: its map covers the
image exactly, as the student's valid region does, whether that is the top-left block of a padded batch's map or
the whole map of a family that resizes every image to its square input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_detr.models import DetectorRequest
from kd_detr.schema import opt
from kd_detr.teacher import TeacherOutputs
from kd_detr.teacher.outputs import own_grids

from .base import Method
from .registry import register_method

__all__ = ["FeatureKdConfig", "FeatureDistillation", "feature_mse", "feature_cwd", "match_levels"]

LOSSES = ("mse", "cwd")


@dataclass
class FeatureKdConfig:
    """Feature distillation on the encoder output (``[feature_kd]``).

    * ``enabled``: switch it on (it needs a teacher: ``--teacher``, or ``--teacher-cache`` built with
      ``--features``).
    * ``weight``: the weight of every level's term.
    * ``loss``: ``mse`` (FitNet-style, through the projector) | ``cwd`` (channel-wise distillation).
    * ``tau``: the CWD temperature (1.0: the reference implementation's default, mmrazor's
      ``ChannelWiseDivergence``, and its detection configs).
    * ``levels``: the student levels distilled (0 = highest resolution), or ``"all"``.
    """

    enabled: bool = False
    weight: float = opt(1.0, min=0)
    loss: str = opt("mse", choices=LOSSES)
    tau: float = opt(1.0, gt=0)
    levels: str | list[int] = opt("all", choices=("all",), min=0, unique=True)


def match_levels(student_strides: Sequence[int], teacher_strides: Sequence[int]) -> list[int]:
    """For each student stride, the index of the teacher level of the nearest stride (in ``log2``; a tie goes to the
    finer teacher level)."""
    return [min(range(len(teacher_strides)), key=lambda j: (abs(math.log2(teacher_strides[j] / s)), j))
            for s in student_strides]


Grids = Union[Tensor, Sequence[Sequence[int]]]  # [B,2]: each image's (rows, cols) on a map


def _regions(student: Tensor, student_grids: Grids, teacher: Tensor,
             teacher_grids: Grids) -> list[tuple[Tensor, Tensor]]:
    """Per image ``b``: the student's ``[C,h_b,w_b]`` valid block and the teacher's block resized to it
    (bilinear, ``align_corners=False``; unchanged when the sizes agree)."""
    out = []
    for b in range(student.shape[0]):
        sh, sw = (int(x) for x in student_grids[b])
        th, tw = (int(x) for x in teacher_grids[b])
        s = student[b, :, :sh, :sw]
        t = teacher[b, :, :th, :tw]
        if (th, tw) != (sh, sw):
            t = F.interpolate(t[None], size=(sh, sw), mode="bilinear", align_corners=False)[0]
        out.append((s, t))
    return out


def feature_mse(student: Tensor, student_grids: Grids, teacher: Tensor, teacher_grids: Grids) -> Tensor:
    """Mean squared error over every image's valid positions and every channel.

    Args:
        student: ``[B,C,h,w]`` the (projected) student map; image ``b`` in its top-left ``student_grids[b]`` block.
        student_grids: ``[B,2]`` each image's ``(rows, cols)`` on the student map (a tensor or nested lists).
        teacher: ``[B,C,h',w']`` the teacher's map; image ``b`` in its top-left ``teacher_grids[b]`` block.
        teacher_grids: ``[B,2]``.
    Returns a scalar: ``sum_b sum (s_b - t_b)^2 / (C * sum_b h_b w_b)``.
    """
    pairs = _regions(student, student_grids, teacher, teacher_grids)
    total = sum(((s - t) ** 2).sum() for s, t in pairs)
    count = sum(s.numel() for s, _ in pairs)
    return total / max(count, 1)


def feature_cwd(student: Tensor, student_grids: Grids, teacher: Tensor, teacher_grids: Grids,
                tau: float = 1.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021): per image and channel, ``p = softmax(map / tau)`` over the
    image's valid positions; ``tau^2 * KL(p_teacher || p_student)`` averaged over channels and images. Shapes as
    :func:`feature_mse`."""
    terms = []
    for s, t in _regions(student, student_grids, teacher, teacher_grids):
        log_s = F.log_softmax(s.flatten(1) / tau, dim=1)  # [C,h*w]
        log_t = F.log_softmax(t.flatten(1) / tau, dim=1)
        terms.append((log_t.exp() * (log_t - log_s)).sum(1))  # [C]
    return (tau ** 2) * torch.cat(terms).mean()


@register_method("feature_kd", FeatureKdConfig)
class FeatureDistillation(Method):
    """Encoder-output feature distillation; terms ``feature_kd.{mse,cwd}.p<level>`` (student level ``level``, 0 the
    highest resolution), projectors ``projectors.p<level>`` (1x1 convolutions, trained beside the student)."""

    uses_teacher = True

    def __init__(self, cfg: FeatureKdConfig, student: Any, criterion: Optional[nn.Module], teacher: Any) -> None:
        super().__init__()
        self.cfg = cfg
        if teacher is None:
            raise ValueError("[feature_kd] distils from a teacher: give --teacher or --teacher-cache")
        levels = int(student.feature_levels)
        self.levels = list(range(levels)) if cfg.levels == "all" else [int(i) for i in cfg.levels]
        bad = [i for i in self.levels if i >= levels]
        if bad:
            raise ValueError(f"[feature_kd] levels {bad}: the student {student.name} has {levels} encoder output "
                             f"level(s), 0..{levels - 1}")
        self.student_width, self.teacher_width = int(student.feature_channels), int(teacher.feature_channels)
        self.projectors = nn.ModuleDict({
            f"p{i}": (nn.Conv2d(self.student_width, self.teacher_width, kernel_size=1)
                      if self.student_width != self.teacher_width else nn.Identity())
            for i in self.levels})
        for i in self.levels:
            self.add_term(f"feature_kd.{cfg.loss}.p{i}", cfg.weight, subgroup=f"feature_kd.{cfg.loss}")

    @classmethod
    def build(cls, cfg: Any, student: Any, criterion: nn.Module, teacher: Any = None) -> "FeatureDistillation":
        if teacher is not None and "features" not in frozenset(getattr(teacher, "supports", ())):
            family = getattr(teacher, "family", None)
            raise ValueError(f"[feature_kd] needs the teacher's encoder feature maps, which the teacher "
                             f"{teacher.name}{f' (transformers {family})' if family else ''} does not give: switch "
                             "[feature_kd] off (feature_kd.enabled = false)")
        return cls(cfg, student, criterion, teacher)

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"features"})

    def request(self, teacher: Optional[TeacherOutputs] = None) -> DetectorRequest:
        return DetectorRequest(features=True)

    def teacher_features(self) -> bool:
        return True

    def trainable_modules(self) -> dict[str, nn.Module]:
        # the projectors, when the widths differ (identity projectors train nothing)
        return {f"objective.{self.section}": self} if any(True for _ in self.parameters()) else {}

    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
                teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        if teacher is None:
            raise ValueError("[feature_kd] needs the teacher's outputs for every batch")
        if teacher.features is None:
            raise ValueError("[feature_kd] needs the teacher's encoder feature maps, and this batch's teacher "
                             "outputs have none (a teacher cache built without --features?)")
        if outputs.get("features") is None:
            raise ValueError("[feature_kd]: the student returned no encoder feature maps (DetectorRequest(features))")
        maps, strides, masks = outputs["features"], outputs["feature_strides"], outputs["feature_masks"]
        match = match_levels([strides[i] for i in self.levels], teacher.feature_strides)
        out = {}
        for i, j in zip(self.levels, match):
            t = teacher.features[j].to(device=maps[i].device, dtype=maps[i].dtype)
            if t.shape[1] != self.teacher_width:
                raise ValueError(f"[feature_kd]: the teacher's level {j} has {t.shape[1]} channels, the projector "
                                 f"gives {self.teacher_width}")
            s = self.projectors[f"p{i}"](maps[i])  # [B,Ct,h,w]
            s_grids = own_grids([masks[i]])[:, 0].tolist()
            t_grids = (teacher.feature_grids[:, j].tolist() if teacher.feature_grids is not None
                       else [list(t.shape[-2:])] * t.shape[0])
            if self.cfg.loss == "mse":
                out[f"feature_kd.mse.p{i}"] = feature_mse(s, s_grids, t, t_grids)
            else:
                out[f"feature_kd.cwd.p{i}"] = feature_cwd(s, s_grids, t, t_grids, self.cfg.tau)
        return out
