"""What an auxiliary head hands to the positive queries: its one-to-many assignment per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["HeadAssignment", "mean_over_ranks"]


@dataclass
class HeadAssignment:
    """The boxes one auxiliary head supervised in one image, and the ground truth it gave each.

    Attributes:
        boxes: ``[N,4]`` absolute xyxy pixels on the padded canvas (no gradient): ATSS's valid anchors,
            or the RoI head's sampled proposals.
        gt_index: ``[N]`` int64, the index of the assigned GT box in the image's targets, ``-1`` for a
            negative (background). Boxes the head ignored are not listed.
        features: ``[N,d]`` the head's feature of each box (encoder feature at the anchor, mean-pooled RoI
            feature), or ``None`` when the queries do not use features.
    """

    boxes: Tensor
    gt_index: Tensor
    features: Optional[Tensor] = None

    @property
    def positive(self) -> Tensor:
        """``[N]`` bool, True where the head assigned a GT."""
        return self.gt_index >= 0


def mean_over_ranks(count: Tensor | float, device: torch.device | str) -> float:
    """A loss normaliser: ``count`` averaged over DDP ranks, clamped to ``>= 1`` (mmdet's ``reduce_mean``)."""
    t = torch.as_tensor(count, dtype=torch.float32, device=device).reshape(1).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return max(float(t.item()), 1.0)
