"""Co-DETR's recipe section ``[co_detr]`` (docs/methods.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kd_detr.schema import opt

__all__ = ["CoDetrConfig"]


@dataclass
class CoDetrConfig:
    """Co-DETR collaborative hybrid assignments for the student (``[co_detr]``, docs/methods.md 4).

    Training-only: the adapter, the auxiliary heads and the query projections live in the objective
    (:mod:`kd_detr.methods.co_detr`), never in the exported student. ``heads`` entries are checked by the
    objective (``atss`` or ``faster_rcnn``).
    """

    enabled: bool = False
    """Train the student with auxiliary one-to-many heads and their customised positive queries."""
    heads: list[str] = field(default_factory=lambda: ["atss", "faster_rcnn"],
                             metadata={"choices": ("atss", "faster_rcnn"), "unique": True})
    """Auxiliary heads, each with its own positive-query decoder pass (K = 2 as in the paper)."""
    lambda1: float = opt(1.0, min=0)
    """Weight of the positive queries' decoder losses (on top of the main focal 2 / L1 5 / GIoU 2)."""
    lambda2: float = opt(2.0, min=0)
    """Weight of the auxiliary heads' own losses; multiplied by the decoder depth L as in Co-DETR's code."""
    max_positive_queries: int = opt(300, min=1)
    """Cap on the positive queries per image and head (a random subset beyond it)."""
    min_queries: int = opt(9, min=1)
    """Every image's query group is padded with negatives to the batch maximum, at least this many."""
    use_head_embedding: bool = True
    """Add a learnt per-head embedding to the positional queries (ours by default; official Co-Deformable-DETR
    has one, Co-DINO none)."""
    head_embedding_form: str = opt("vector", choices=("vector", "official"))
    """``"vector"`` (ours): a ``[d]`` vector per head, N(0, 1) initialised; ``"official"``: one scalar per head
    broadcast over the channels, Xavier-uniform initialised, as Co-Deformable-DETR's code builds it."""
    content_from_features: bool = False
    """Add a projection of the head's feature (anchor location / pooled RoI) to the content queries. Off by
    default (ours, and Co-DINO's); official Co-Deformable-DETR has it on (``co_detr_official.toml``)."""
    atss_topk: int = opt(9, min=1)
    """ATSS assigner: candidate anchors per pyramid level and GT (closest centres)."""
    rpn_batch_size_per_image: int = opt(256, min=1)
    """RPN: anchors sampled per image for its loss."""
    rpn_positive_fraction: float = opt(0.5, gt=0, max=1)
    """RPN: largest fraction of positives among the sampled anchors."""
    rpn_post_nms_top_n: int = opt(1000, min=1)
    """RPN: proposals kept per image after NMS (IoU 0.7)."""
    roi_batch_size_per_image: int = opt(512, min=1)
    """RoI head: proposals sampled per image (they are the R-CNN head's positive / negative coordinates)."""
    roi_positive_fraction: float = opt(0.25, gt=0, max=1)
    """RoI head: largest fraction of positives among the sampled proposals."""
