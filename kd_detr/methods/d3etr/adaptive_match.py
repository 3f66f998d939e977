"""Adaptive Matching (D3ETR): teacher-student bipartite matching, per decoder layer and image.

The cost of pairing teacher output ``i`` with student output ``j`` is

    class_weight * D_cls(i, j) + bbox_weight * ||b_i - b_j||_1 + giou_weight * (-GIoU(b_i, b_j))

with ``D_cls(i, j) = sum_c KL_bernoulli(sigmoid(t_ic) || sigmoid(s_jc))``: the soft-label sigmoid BCE cost
minus the teacher's entropy; identical predictions cost 0 (a property the tests rely on). The entropy is
constant along a teacher row, so when every teacher output is matched (``Nt <= Ns``) the optimal assignment
is the same as with the plain soft-BCE cost; with more teacher than student outputs the rows left unmatched
depend on it and the assignments differ (600 teacher vs 300 student queries: 118 of 600 pairs differed).

Boxes are normalised ``cxcywh``; GIoU is taken on ``xyxy``. The cost is computed for all ``M`` matrices
(``M`` = layers x images) at once on the inputs' device; the Hungarian solves run on the CPU with scipy
in the shared thread pool of :func:`kd_detr.matcher.solve_matchings` (``linear_sum_assignment`` releases the
GIL, so the solves of one batch overlap).

A matching is a pair of int64 tensors ``teacher_idx [..., K]``, ``student_idx [..., K]`` with
``K = min(Nt, Ns)``, sorted by ``teacher_idx``: teacher query ``teacher_idx[..., k]`` pairs with student
query ``student_idx[..., k]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert

from kd_detr.matcher import solve_matchings  # noqa: F401  (the batched Hungarian solver; re-exported)

__all__ = [
    "adaptive_match",
    "elementwise_giou",
    "identity_matching",
    "match_cost",
    "solve_matchings",
]

# Guards against degenerate boxes (zero width and height: union and enclosing area are 0), which
# torchvision's GIoU turns into NaN. Far below any real box area, so other values are unchanged.
_AREA_EPS = 1e-12

# ----------------------------------------------------------------------------- costs
def elementwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of corresponding boxes, with broadcasting.

    Args:
        a: ``[..., 4]`` boxes in ``xyxy``.
        b: ``[..., 4]`` boxes in ``xyxy``, broadcastable against ``a`` (e.g. ``a[:, :, None]`` and
            ``b[:, None]`` give all pairs of two sets, batched).

    Returns:
        ``[...]`` GIoU in ``[-1, 1]`` (the broadcast shape without the last dimension). Equal to
        ``torchvision.ops.generalized_box_iou`` on valid boxes; two degenerate (zero-area) boxes give
        a finite value instead of NaN.
    """
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(_AREA_EPS)
    enc_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp_min(0)
    enclose = enc_wh[..., 0] * enc_wh[..., 1]
    return iou - (enclose - union) / enclose.clamp_min(_AREA_EPS)


@torch.no_grad()
def _pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of every pair of two batched box sets: ``a [M, Nt, 4]``, ``b [M, Ns, 4]`` xyxy -> ``[M, Nt, Ns]``.

    The same values as :func:`elementwise_giou` on ``a[:, :, None]`` and ``b[:, None]`` (for boxes of
    non-zero area; degenerate pairs are finite but may differ), built with
    in-place operations on contiguous ``[M, Nt, Ns]`` buffers (no ``[..., 2]`` intermediates): the
    computation is memory-bound on the CPU, and this halves its time for 96 x 300 x 300 pairs.
    Uses 1-D identities: ``max(a1, b1) - min(a0, b0) = (a1 - a0) + (b1 - b0) - (min(a1, b1) - max(a0, b0))``
    (enclosing extent from the signed overlap) and ``GIoU = inter/union + union/enclose - 1``.
    Identical boxes give exactly 1 (every quantity reduces to the same product of differences).
    """

    def extents(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        a0, a1 = a[..., lo, None], a[..., hi, None]  # [M, Nt, 1]
        b0, b1 = b[:, None, :, lo], b[:, None, :, hi]  # [M, 1, Ns]
        overlap = torch.minimum(a1, b1).sub_(torch.maximum(a0, b0))  # signed
        enclose = ((a1 - a0) + (b1 - b0)).sub_(overlap)
        return overlap.clamp_(min=0), enclose

    inter, enclose = extents(0, 2)
    ih, eh = extents(1, 3)
    inter.mul_(ih)
    enclose.mul_(eh)
    area_a = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]))[:, :, None]
    area_b = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[:, None, :]
    union = (area_a + area_b).sub_(inter)
    out = inter.div_(union.clamp(min=_AREA_EPS))
    return out.add_(union.div_(enclose.clamp_(min=_AREA_EPS))).sub_(1)


@torch.no_grad()
def match_cost(
    t_logits: Tensor,
    t_boxes: Tensor,
    s_logits: Tensor,
    s_boxes: Tensor,
    class_weight: float = 2.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
) -> Tensor:
    """Teacher-student matching costs for ``M`` independent matrices (no loop over pairs or ``M``).

    Args:
        t_logits: ``[M, Nt, C]`` teacher class logits (pre-sigmoid).
        t_boxes: ``[M, Nt, 4]`` teacher boxes, normalised cxcywh.
        s_logits: ``[M, Ns, C]`` student class logits.
        s_boxes: ``[M, Ns, 4]`` student boxes, normalised cxcywh.
        class_weight, bbox_weight, giou_weight: weights of the three terms.

    Returns:
        ``[M, Nt, Ns]`` float32 cost on the inputs' device (computed in float32 whatever the input
        dtype, e.g. float16 under AMP). Computed under ``no_grad``: a matching cost is not differentiated.
    """
    if t_logits.dim() != 3 or s_logits.dim() != 3 or t_boxes.dim() != 3 or s_boxes.dim() != 3:
        raise ValueError(
            "match_cost expects [M, N, C] logits and [M, N, 4] boxes, got "
            f"{tuple(t_logits.shape)}, {tuple(t_boxes.shape)}, {tuple(s_logits.shape)}, {tuple(s_boxes.shape)}"
        )
    m, nt, c = t_logits.shape
    ms, ns, cs = s_logits.shape
    if ms != m or cs != c:
        raise ValueError(
            f"teacher logits {tuple(t_logits.shape)} and student logits {tuple(s_logits.shape)} differ in "
            "the number of matrices or of classes (teacher and student must share the label space)"
        )
    if tuple(t_boxes.shape) != (m, nt, 4) or tuple(s_boxes.shape) != (m, ns, 4):
        raise ValueError(
            f"boxes must be [M, N, 4] matching the logits: teacher {tuple(t_boxes.shape)} for "
            f"{tuple(t_logits.shape)}, student {tuple(s_boxes.shape)} for {tuple(s_logits.shape)}"
        )
    t = t_logits.float()
    s = s_logits.float()
    tb = t_boxes.float()
    sb = s_boxes.float()

    # Class term: soft-BCE cross-entropy minus the teacher entropy. With q = sigmoid(t),
    #   -log sigmoid(s) = relu(-s) + log1p(exp(-|s|)),  -log(1 - sigmoid(s)) = relu(s) + log1p(exp(-|s|)),
    # so CE[i, j] = q_i . relu(-s_j) + (1 - q_i) . relu(s_j) + sum_c log1p(exp(-|s_jc|)): two matmuls
    # over non-negative terms (no cancellation between large numbers, so identical predictions
    # give ~1e-7 relative to their entropy instead of relative to |logits|), and the entropy
    # H[i] is the same expression evaluated elementwise at s = t.
    q = t.sigmoid()
    soft_t = torch.log1p(torch.exp(-t.abs()))
    soft_s = torch.log1p(torch.exp(-s.abs()))
    entropy = (q * (-t).relu() + (1 - q) * t.relu() + soft_t).sum(-1)  # [M, Nt]
    cross = torch.bmm(q, (-s).relu().transpose(1, 2))  # [M, Nt, Ns]
    cross.baddbmm_(1 - q, s.relu().transpose(1, 2))
    cross.add_(soft_s.sum(-1)[:, None, :]).sub_(entropy[:, :, None])
    # KL >= 0; rounding can leave tiny negative values for (near-)identical predictions.
    c_cls = cross.clamp_(min=0)

    c_l1 = torch.cdist(tb, sb, p=1) if nt and ns else tb.new_zeros(m, nt, ns)
    giou = _pairwise_giou(box_convert(tb, "cxcywh", "xyxy"), box_convert(sb, "cxcywh", "xyxy"))
    # In place on the [M, Nt, Ns] buffers (fewer passes over memory): wc*cls + wb*l1 + wg*(-giou).
    cost = c_cls.mul_(class_weight)
    cost.add_(c_l1, alpha=bbox_weight)
    return cost.add_(giou, alpha=-giou_weight)


def identity_matching(batch: int, n: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Fixed Matching: teacher query ``i`` pairs with (auxiliary) student query ``i``.

    Returns:
        ``(teacher_idx [batch, n], student_idx [batch, n])``, both ``arange(n)`` per row, int64.
    """
    idx = torch.arange(n, dtype=torch.int64, device=device).repeat(batch, 1)
    return idx, idx.clone()


def _weights(weights: Any) -> tuple[float, float, float]:
    """``(class, bbox, giou)`` weights from a recipe section, a mapping or a 3-sequence."""
    names = ("class_weight", "bbox_weight", "giou_weight")
    if weights is None:
        return 2.0, 5.0, 2.0
    if isinstance(weights, Mapping):
        return tuple(float(weights[n]) for n in names)  # type: ignore[return-value]
    if all(hasattr(weights, n) for n in names):
        return tuple(float(getattr(weights, n)) for n in names)  # type: ignore[return-value]
    if isinstance(weights, Sequence) and len(weights) == 3:
        return tuple(float(w) for w in weights)  # type: ignore[return-value]
    raise TypeError(
        "weights must have class_weight, bbox_weight and giou_weight (attributes or keys), "
        f"or be a (class, bbox, giou) triple; got {weights!r}"
    )


@torch.no_grad()
def adaptive_match(
    t_logits: Tensor,
    t_boxes: Tensor,
    s_logits: Tensor,
    s_boxes: Tensor,
    weights: Any = None,
) -> tuple[Tensor, Tensor]:
    """Adaptive Matching of every decoder layer and image: one Hungarian solve per ``(l, b)``.

    Args:
        t_logits: ``[L, B, Nt, C]`` teacher logits; ``t_boxes``: ``[L, B, Nt, 4]`` cxcywh.
        s_logits: ``[L, B, Ns, C]`` student logits; ``s_boxes``: ``[L, B, Ns, 4]`` cxcywh. Layer ``l``
            of the teacher is matched to layer ``l`` of the student (select/map layers before).
        weights: the ``[distill.match]`` recipe section (``class_weight``, ``bbox_weight``,
            ``giou_weight`` attributes or keys) or a ``(class, bbox, giou)`` triple; ``None`` = (2, 5, 2).

    Returns:
        ``(teacher_idx [L, B, K], student_idx [L, B, K])`` int64 on ``s_logits``'s device,
        ``K = min(Nt, Ns)``, sorted by ``teacher_idx``.
    """
    if t_logits.dim() != 4 or s_logits.dim() != 4:
        raise ValueError(
            f"adaptive_match expects [L, B, N, C] logits, got {tuple(t_logits.shape)} (teacher) and "
            f"{tuple(s_logits.shape)} (student)"
        )
    if t_logits.shape[:2] != s_logits.shape[:2]:
        raise ValueError(
            f"teacher [L, B] = {tuple(t_logits.shape[:2])} differs from student {tuple(s_logits.shape[:2])}"
        )
    wc, wb, wg = _weights(weights)
    n_layers, bs = s_logits.shape[:2]
    cost = match_cost(
        t_logits.flatten(0, 1),
        t_boxes.flatten(0, 1),
        s_logits.flatten(0, 1),
        s_boxes.flatten(0, 1),
        wc,
        wb,
        wg,
    )
    t_idx, s_idx = solve_matchings(cost)
    k = t_idx.shape[-1]
    device = s_logits.device
    return t_idx.view(n_layers, bs, k).to(device), s_idx.view(n_layers, bs, k).to(device)
