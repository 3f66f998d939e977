"""ATSS auxiliary head (Zhang et al., CVPR 2020) as configured in Co-DETR (docs/methods.md 4.1.2).

One 3x3 conv (+ GroupNorm + ReLU) per branch, one square anchor per location of side ``8 x stride``,
the ATSS assigner with top-9 candidates per level, and mmdet's ATSS losses: sigmoid focal loss
(alpha 0.25, gamma 2) over the valid anchors / #positives, GIoU of the decoded boxes weighted by the
centerness targets / their sum, centerness BCE / #positives. Box deltas use mmdet's
``DeltaXYWHBBoxCoder`` standard deviations (0.1, 0.1, 0.2, 0.2), i.e. torchvision ``BoxCoder`` weights
(10, 10, 5, 5), and a learnt scale per level as mmdet's ``Scale``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .adapter import PYRAMID_STRIDES, gn_groups
from .anchors import PyramidAnchorGenerator
from .assignment import HeadAssignment, mean_over_ranks

__all__ = ["ATSSHead", "IGNORED", "atss_assign", "centerness_targets"]

IGNORED = -2  # atss_assign's label of anchors outside the image (neither positive nor negative)


def atss_assign(anchors: Tensor, num_per_level: Sequence[int], gt_boxes: Tensor, topk: int = 9,
                valid: Tensor | None = None) -> Tensor:
    """Adaptive Training Sample Selection (mmdet ``ATSSAssigner``).

    For every GT: per level, the ``topk`` valid anchors whose centres are closest to the GT centre are
    candidates; the IoU threshold is the candidates' mean + (unbiased) std; candidates with IoU above it
    and their centre inside the GT (by > 0.01 px) are positives; an anchor positive for several GTs goes
    to the one with the highest IoU.

    Args:
        anchors: ``[A,4]`` absolute xyxy, levels concatenated in order.
        num_per_level: anchors per level (sums to ``A``).
        gt_boxes: ``[G,4]`` absolute xyxy.
        valid: ``[A]`` bool, anchors that may be assigned (default all).

    Returns:
        ``[A]`` int64: the GT index of positives, ``-1`` for negatives, :data:`IGNORED` for invalid anchors.
    """
    num_anchors, num_gt = len(anchors), len(gt_boxes)
    if valid is None:
        valid = torch.ones(num_anchors, dtype=torch.bool, device=anchors.device)
    out = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    out[~valid] = IGNORED
    if num_gt == 0 or num_anchors == 0:
        return out
    iou = box_iou(anchors, gt_boxes)  # [A,G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = torch.cdist(a_ctr, g_ctr).masked_fill(~valid[:, None], math.inf)  # [A,G]

    candidate = torch.zeros_like(iou, dtype=torch.bool)
    start = 0
    for n in num_per_level:
        if n > 0:
            idx = dist[start:start + n].topk(min(topk, n), dim=0, largest=False).indices + start  # [k,G]
            candidate.scatter_(0, idx, True)
        start += n
    candidate &= valid[:, None]  # a level with fewer than topk valid anchors picked some invalid ones

    # Threshold per GT: mean + std of the candidates' IoUs (std unbiased as torch/mmdet; 0 for one candidate).
    count = candidate.sum(0).float()
    mean = (iou * candidate).sum(0) / count.clamp(min=1)
    var = ((iou - mean) ** 2 * candidate).sum(0) / (count - 1).clamp(min=1)
    threshold = mean + var.sqrt()

    ltrb = torch.cat([a_ctr[:, None, :] - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - a_ctr[:, None, :]], -1)
    inside = ltrb.min(-1).values > 0.01
    positive = candidate & (iou >= threshold) & inside  # [A,G]
    best_gt = iou.masked_fill(~positive, -1.0).argmax(1)
    is_pos = positive.any(1)
    out[is_pos] = best_gt[is_pos]
    return out


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness of the anchor centres inside their GT: ``[P,4], [P,4] -> [P]`` in ``(0, 1]``."""
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    lt = ctr - gt_boxes[:, :2]
    rb = gt_boxes[:, 2:] - ctr
    lr = torch.stack([lt[:, 0], rb[:, 0]], -1)
    tb = torch.stack([lt[:, 1], rb[:, 1]], -1)
    ratio = (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    return ratio.clamp(min=0).sqrt()


def _tower(d: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GroupNorm(gn_groups(d), d), nn.ReLU(inplace=True))


class ATSSHead(nn.Module):
    """ATSS head on the adapter's pyramid; :meth:`forward` returns its losses and assignments.

    Args:
        d: channels of the pyramid.
        num_classes: ``C`` (labels in ``[0, C)``, sigmoid classification: no background logit).
        strides: the pyramid's strides (anchor side ``octave_scale * stride``).
        topk: ATSS candidates per level and GT.
        with_features: also return each anchor's pyramid feature (for content queries).
    """

    name = "atss"

    def __init__(self, d: int, num_classes: int, strides: Sequence[int] = PYRAMID_STRIDES, topk: int = 9,
                 octave_scale: int = 8, with_features: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.topk = topk
        self.with_features = with_features
        self.anchor_generator = PyramidAnchorGenerator([[octave_scale * s] for s in strides],
                                                       [[1.0]] * len(strides), strides)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.cls_tower = _tower(d)
        self.reg_tower = _tower(d)
        self.cls_logits = nn.Conv2d(d, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(d, 4, 3, padding=1)
        self.centerness = nn.Conv2d(d, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))  # mmdet's per-level Scale of the deltas
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior 0.01

    def predict(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Pyramid -> ``(logits [B,A,C], deltas [B,A,4], centerness [B,A])``, levels concatenated."""
        logits, deltas, ctr = [], [], []
        for level, x in enumerate(feats):
            c, r = self.cls_tower(x), self.reg_tower(x)
            logits.append(self.cls_logits(c).flatten(2).transpose(1, 2))
            deltas.append((self.bbox_pred(r) * self.scales[level]).flatten(2).transpose(1, 2))
            ctr.append(self.centerness(r).flatten(1))
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(ctr, 1)

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor]
                ) -> tuple[dict[str, Tensor], list[HeadAssignment]]:
        """Losses and per-image assignments.

        Args:
            feats: pyramid levels ``[B,d,h_l,w_l]``.
            image_sizes: unpadded ``(h, w)`` per image; anchors centred in the padding are ignored
                (mmdet's valid flags).
            gt_boxes: ``[G_b,4]`` absolute xyxy per image; gt_labels: ``[G_b]`` in ``[0, C)``.

        Returns:
            ``({"loss_cls", "loss_bbox", "loss_centerness"}, [HeadAssignment per image])`` with the
            valid anchors as boxes.
        """
        anchor_levels = self.anchor_generator.per_level(feats)
        num_per_level = [len(a) for a in anchor_levels]
        anchors = torch.cat(anchor_levels)  # [A,4]
        logits, deltas, ctr_logits = self.predict(feats)
        flat_feats = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1) if self.with_features else None
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2

        loss_cls = loss_bbox = loss_ctr = logits.sum() * 0  # keeps the graph when nothing is positive
        num_pos: Tensor | float = 0.0
        ctr_sum: Tensor | float = 0.0
        assignments: list[HeadAssignment] = []
        for b, (h, w) in enumerate(image_sizes):
            valid = (centres[:, 0] < w) & (centres[:, 1] < h)
            gt_index = atss_assign(anchors, num_per_level, gt_boxes[b], self.topk, valid)
            pos = gt_index >= 0
            onehot = torch.zeros_like(logits[b])
            onehot[pos, gt_labels[b][gt_index[pos]]] = 1.0
            loss_cls = loss_cls + sigmoid_focal_loss(logits[b][valid], onehot[valid], reduction="sum")
            target = gt_boxes[b][gt_index[pos]].to(anchors.dtype)  # [P,4] (P may be 0)
            pred = self.box_coder.decode_single(deltas[b][pos], anchors[pos])
            ctr_t = centerness_targets(anchors[pos], target)
            loss_bbox = loss_bbox + (ctr_t * generalized_box_iou_loss(pred, target, reduction="none")).sum()
            loss_ctr = loss_ctr + F.binary_cross_entropy_with_logits(ctr_logits[b][pos], ctr_t, reduction="sum")
            num_pos = num_pos + pos.sum()
            ctr_sum = ctr_sum + ctr_t.detach().sum()
            assignments.append(HeadAssignment(  # the valid anchors: ignored ones are neither pos nor neg
                boxes=anchors[valid], gt_index=gt_index[valid],
                features=flat_feats[b][valid] if flat_feats is not None else None))
        num_pos = mean_over_ranks(num_pos, logits.device)
        ctr_sum = mean_over_ranks(ctr_sum, logits.device)
        losses = {"loss_cls": loss_cls / num_pos, "loss_bbox": loss_bbox / ctr_sum,
                  "loss_centerness": loss_ctr / num_pos}
        return losses, assignments
