"""Inference post-processing: top-k over queries x classes, boxes to absolute xyxy pixels.

As the official Conditional DETR ``PostProcess``: scores are ``sigmoid(logits)``; the top
``num_select`` (official 100) of the flattened ``[Q * C]`` scores are kept per image, so one
query may yield several detections with different labels; no NMS; boxes are scaled to the
given ``(h, w)`` and are not clipped to the image.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """Convert raw model outputs to per-image detections.

    Args:
        num_select: detections kept per image (``k = min(num_select, Q * C)``).
    """

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select = int(num_select)

    def extra_repr(self) -> str:
        return f"num_select={self.num_select}"

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Select detections.

        Args:
            outputs: ``{"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}`` (normalised cxcywh).
            target_sizes: ``[B, 2]`` ``(h, w)`` per image: the original image size for COCO
                evaluation, the transformed (unpadded) size for visualisation.

        Returns:
            ``B`` dicts, sorted by decreasing score: ``scores [k]`` float, ``labels [k]`` int64
            model class indices, ``boxes [k, 4]`` absolute xyxy pixels (not clipped),
            ``query [k]`` int64 index of the decoder query each detection comes from.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"expected pred_logits [B, Q, C] and pred_boxes [B, Q, 4], got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be [B, 2] = [{logits.shape[0]}, 2] (h, w), got {tuple(target_sizes.shape)}"
            )
        bs, num_queries, num_classes = logits.shape
        k = min(self.num_select, num_queries * num_classes)

        prob = logits.sigmoid()
        scores, flat_idx = torch.topk(prob.reshape(bs, -1), k, dim=1)
        query = torch.div(flat_idx, num_classes, rounding_mode="floor")
        labels = flat_idx % num_classes

        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        xyxy = torch.gather(xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(xyxy.dtype).unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        xyxy = xyxy * scale[:, None, :]

        return [
            {"scores": s, "labels": l, "boxes": b, "query": q}
            for s, l, b, q in zip(scores, labels, xyxy, query)
        ]
