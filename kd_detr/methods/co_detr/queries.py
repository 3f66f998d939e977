"""Customised positive queries (docs/methods.md 4.1.3, 4.2): an auxiliary head's assignment -> decoder queries.

Per head and image: the head's positive boxes (ATSS anchors, sampled R-CNN proposals) with the GT it
assigned them, at most ``max_positive`` (a random subset beyond), padded with the same head's negatives
(background, no box loss) to the batch's largest count, at least ``min_queries``. Each box becomes a query:
``[q_pos ; q_content] = LN(Linear_{2d->2d}(sinePE(box)))`` where the sine PE encodes all four normalised
cxcywh coordinates (``d/2`` features each, temperature 10000, scale 2pi: Deformable DETR's
``get_proposal_pos_embed`` on ``sigmoid(logit(box))``), optionally ``q_pos += head embedding`` and
``q_content += LN(Linear(feature))``. Conditional DETR needs only a 2-d reference point: it is the box
centre (replacing ``sigmoid(ref_point_head(q_pos))``); the box head then predicts offsets from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from kd_detr.models.position_encoding import sine_embed_points

from .assignment import HeadAssignment

__all__ = ["PositiveQueryEncoder", "QuerySelection", "box_sine_embed", "select_queries"]

# Used only if an image has no negative at all to pad with: a 1-px box in the top-left corner overlaps
# no object, so it is a genuine background box.
_FALLBACK_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclass
class QuerySelection:
    """One head's queries for a batch, positives first in every image.

    Attributes:
        boxes: ``[B,M,4]`` normalised cxcywh (w.r.t. the unpadded image), clamped to ``[0,1]``; no gradient.
        gt_index: ``[B,M]`` int64, the GT (index into the image's targets) the head assigned to query
            ``j``; ``-1`` for the background padding.
        source_index: ``[B,M]`` int64, the row of the head's :class:`HeadAssignment` query ``j`` comes from
            (``-1``: the fallback box).
        num_positive: ``[B]`` int64, positive queries per image (``gt_index[b, :num_positive[b]] >= 0``).
        features: ``[B,M,d]`` the head's features of the boxes, or ``None``.
    """

    boxes: Tensor
    gt_index: Tensor
    source_index: Tensor
    num_positive: Tensor
    features: Optional[Tensor] = None


def _pad_indices(negatives: Tensor, need: int) -> Tensor:
    """``need`` random negatives (without replacement if there are enough; ``-1`` if there are none)."""
    if need <= 0:
        return negatives[:0]
    if len(negatives) >= need:
        return negatives[torch.randperm(len(negatives), device=negatives.device)[:need]]
    if len(negatives) > 0:  # too few (tiny images, few proposals): draw with replacement
        return negatives[torch.randint(len(negatives), (need,), device=negatives.device)]
    return torch.full((need,), -1, dtype=torch.long, device=negatives.device)


def select_queries(assignments: Sequence[HeadAssignment], image_sizes: Sequence[tuple[int, int]],
                   max_positive: int = 300, min_queries: int = 9) -> QuerySelection:
    """Pick and pad one head's query boxes for the batch (see the module docstring).

    Args:
        assignments: the head's assignment per image (absolute xyxy boxes on the canvas).
        image_sizes: unpadded ``(h, w)`` per image, to normalise the boxes.
    """
    positives = []
    for a in assignments:
        p = a.positive.nonzero().squeeze(1)
        if len(p) > max_positive:
            p = p[torch.randperm(len(p), device=p.device)[:max_positive]]
        positives.append(p)
    m = max(min_queries, max(len(p) for p in positives))

    boxes, gt_index, source, feats = [], [], [], []
    for a, p, (h, w) in zip(assignments, positives, image_sizes):
        src = torch.cat([p, _pad_indices((a.gt_index == -1).nonzero().squeeze(1), m - len(p))])
        # Row N of the extended tensors is the fallback background box (source index -1).
        row = torch.where(src >= 0, src, len(a.boxes))
        xyxy = torch.cat([a.boxes.detach(), a.boxes.new_tensor([_FALLBACK_BOX])])[row]
        scale = a.boxes.new_tensor([w, h, w, h])
        boxes.append(box_convert(xyxy / scale, "xyxy", "cxcywh").clamp(0.0, 1.0))
        gt_index.append(torch.cat([a.gt_index, a.gt_index.new_tensor([-1])])[row])
        source.append(src)
        if a.features is not None:
            feats.append(torch.cat([a.features, a.features.new_zeros(1, a.features.shape[1])])[row])
    device = boxes[0].device
    return QuerySelection(
        boxes=torch.stack(boxes), gt_index=torch.stack(gt_index), source_index=torch.stack(source),
        num_positive=torch.tensor([len(p) for p in positives], device=device),
        features=torch.stack(feats) if len(feats) == len(assignments) else None)


def box_sine_embed(boxes: Tensor, num_pos_feats: int, temperature: int = 10000) -> Tensor:
    """Sine PE of the four box coordinates: ``[..., 4]`` cxcywh in ``[0,1]`` -> ``[..., 4*num_pos_feats]``
    ordered ``[cy, cx, h, w]`` (the model's point embedding applied to the centre, then to the size)."""
    return torch.cat([sine_embed_points(boxes[..., :2], num_pos_feats, temperature),
                      sine_embed_points(boxes[..., 2:], num_pos_feats, temperature)], -1)


class PositiveQueryEncoder(nn.Module):
    """One head's query projection: :class:`QuerySelection` -> a :meth:`ConditionalDETR.decode` group.

    Args:
        d: decoder width.
        temperature: of the sine PE (the model's ``pe_temperature``).
        head_embedding: add a learnt embedding (this head's identity) to ``query_pos``.
        head_embedding_form: ``"vector"``: a ``[d]`` vector initialised N(0, 1) (ours); ``"official"``: one
            scalar broadcast over the channels, Xavier-uniform initialised as a row of a ``[num_heads, 1]``
            table (Co-Deformable-DETR's code builds its head embedding that way; its comment calls it a bug
            kept for reproducibility).
        num_heads: the number of auxiliary heads (the table's size, for the ``"official"`` initialisation).
        content_from_features: add ``LN(Linear(feature))`` to ``query_content`` (needs features).
    """

    def __init__(self, d: int, temperature: int = 10000, head_embedding: bool = True,
                 content_from_features: bool = False, head_embedding_form: str = "vector", num_heads: int = 2):
        super().__init__()
        if d % 4:
            raise ValueError(f"positive queries need d divisible by 4 (d/2 sine features per coordinate), got {d}")
        self.d = d
        self.temperature = temperature
        self.proj = nn.Linear(2 * d, 2 * d)
        self.norm = nn.LayerNorm(2 * d)
        if head_embedding_form not in ("vector", "official"):
            raise ValueError(f"head_embedding_form must be 'vector' or 'official', got {head_embedding_form!r}")
        self.head_embed: Optional[nn.Parameter] = None
        if head_embedding and head_embedding_form == "vector":
            self.head_embed = nn.Parameter(torch.randn(d))  # nn.Embedding's N(0, 1) initialisation (ours)
        elif head_embedding:
            # a [num_heads, 1] table under xavier_uniform_: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
            bound = math.sqrt(6.0 / (1 + num_heads))
            self.head_embed = nn.Parameter(torch.empty(1).uniform_(-bound, bound))
        self.feat_proj = nn.Linear(d, d) if content_from_features else None
        self.feat_norm = nn.LayerNorm(d) if content_from_features else None

    def forward(self, sel: QuerySelection) -> dict[str, Tensor]:
        """Returns ``{"query_pos" [B,M,d], "query_content" [B,M,d], "reference_points" [B,M,2]}``."""
        pe = box_sine_embed(sel.boxes, self.d // 2, self.temperature)  # [B,M,2d]
        query_pos, query_content = self.norm(self.proj(pe)).split(self.d, dim=-1)
        if self.head_embed is not None:
            query_pos = query_pos + self.head_embed
        if self.feat_proj is not None:
            if sel.features is None:
                raise ValueError("content_from_features needs the head's features (build the head with_features)")
            query_content = query_content + self.feat_norm(self.feat_proj(sel.features))
        return {"query_pos": query_pos, "query_content": query_content,
                "reference_points": sel.boxes[..., :2].contiguous()}
