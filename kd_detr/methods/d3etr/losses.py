"""D3ETR distillation losses: predictions (class + boxes) and attention maps, through a matching.

A matching is ``teacher_idx [B, K]``, ``student_idx [B, K]`` (see :mod:`kd_detr.methods.d3etr.adaptive_match`):
pair ``k`` of image ``b`` compares teacher query ``teacher_idx[b, k]`` with student query
``student_idx[b, k]``. Every loss gathers the matched rows with ``torch.gather`` (no loop over images or
pairs), works in float32 whatever the input dtype, and returns an unweighted scalar: the recipe
weights are applied by the caller. Gradients flow to the student tensors only in intent; teacher
tensors are expected without ``requires_grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from .adaptive_match import elementwise_giou

__all__ = ["attention_distill", "prediction_distill"]

# Student probabilities are clamped before the log of the attention KL (an exactly-zero student
# probability where the teacher has mass would otherwise give an infinite loss).
_ATTN_LOG_CLAMP = 1e-8


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x [B, N, D]``, ``idx [B, K]`` -> ``[B, K, D]`` with ``out[b, k] = x[b, idx[b, k]]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _check_matching(teacher_idx: Tensor, student_idx: Tensor, batch: int) -> None:
    if teacher_idx.dim() != 2 or teacher_idx.shape != student_idx.shape or teacher_idx.shape[0] != batch:
        raise ValueError(
            f"matching indices must both be [B, K] with B = {batch}, got teacher_idx "
            f"{tuple(teacher_idx.shape)} and student_idx {tuple(student_idx.shape)}"
        )


def _zero_like_graph(x: Tensor) -> Tensor:
    # A 0 that stays connected to the student's graph: backward still reaches its parameters
    # (DDP expects every used parameter to receive a gradient, even a zero one).
    return x.float().sum() * 0.0


def prediction_distill(
    s_logits: Tensor,
    s_boxes: Tensor,
    t_logits: Tensor,
    t_boxes: Tensor,
    teacher_idx: Tensor,
    student_idx: Tensor,
    temperature: float = 1.0,
    confidence_weighting: bool = False,
) -> dict[str, Tensor]:
    """Distil the teacher's class probabilities and boxes into the matched student predictions.

    Args:
        s_logits: ``[B, Ns, C]`` student logits; ``s_boxes``: ``[B, Ns, 4]`` cxcywh.
        t_logits: ``[B, Nt, C]`` teacher logits; ``t_boxes``: ``[B, Nt, 4]`` cxcywh.
        teacher_idx, student_idx: ``[B, K]`` int64 matching (same device as the tensors).
        temperature: ``T``; the class term compares ``sigmoid(t/T)`` and ``sigmoid(s/T)`` and is
            multiplied by ``T^2`` (keeps gradient magnitudes comparable across temperatures).
        confidence_weighting: weight every pair by the teacher's max class probability
            ``max_c sigmoid(t)`` (at ``T = 1``: the teacher's actual confidence), so background
            teacher queries count less; the sum is still divided by ``K``.

    Returns:
        ``{"cls", "l1", "giou"}`` float32 scalars, each ``sum_{b,k} w * loss / (B * K)`` with
        ``w = 1`` unless ``confidence_weighting``:
        ``cls`` = ``T^2 * sum_c KL_bernoulli(sigmoid(t/T) || sigmoid(s/T))`` (soft-target BCE minus the
        teacher entropy: exactly 0 for identical logits), ``l1`` = L1 over the 4 coordinates,
        ``giou`` = ``1 - GIoU``. With ``K == 0`` the terms are 0 (still connected to the student graph).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bs = s_logits.shape[0]
    if t_logits.shape[0] != bs or s_logits.shape[-1] != t_logits.shape[-1]:
        raise ValueError(
            f"student logits {tuple(s_logits.shape)} and teacher logits {tuple(t_logits.shape)} differ "
            "in batch size or number of classes"
        )
    _check_matching(teacher_idx, student_idx, bs)
    if teacher_idx.numel() == 0:
        zero = _zero_like_graph(s_logits) + _zero_like_graph(s_boxes)
        return {"cls": zero, "l1": zero.clone(), "giou": zero.clone()}

    s_l = _gather_rows(s_logits.float(), student_idx)  # [B, K, C]
    t_l = _gather_rows(t_logits.float(), teacher_idx)
    s_b = _gather_rows(s_boxes.float(), student_idx)  # [B, K, 4]
    t_b = _gather_rows(t_boxes.float(), teacher_idx)

    # Binary KL from logits, stably: log q = logsigmoid(t), log(1-q) = logsigmoid(-t) (no log of a
    # probability that may have under/overflowed to 0 or 1).
    tt = t_l / temperature
    st = s_l / temperature
    q = tt.sigmoid()
    kl = q * (F.logsigmoid(tt) - F.logsigmoid(st)) + (1 - q) * (F.logsigmoid(-tt) - F.logsigmoid(-st))
    cls = kl.sum(-1) * temperature**2  # [B, K]
    l1 = (s_b - t_b).abs().sum(-1)  # [B, K]
    giou = 1 - elementwise_giou(
        box_convert(s_b, "cxcywh", "xyxy"), box_convert(t_b, "cxcywh", "xyxy")
    )  # [B, K]

    if confidence_weighting:
        w = t_l.sigmoid().amax(-1)  # [B, K], teacher tensors carry no gradient
        cls, l1, giou = w * cls, w * l1, w * giou
    # sum w * loss / K per image, averaged over images == sum over all pairs / (B * K).
    return {"cls": cls.mean(), "l1": l1.mean(), "giou": giou.mean()}


def _gather_attention(attn: Tensor, idx: Tensor, kind: str) -> Tensor:
    """Re-index ``attn [B, H, N, Kk]`` through ``idx [B, K]``.

    ``self``: rows then columns, ``out[b, h, k, m] = attn[b, h, idx[b, k], idx[b, m]]`` -> ``[B, H, K, K]``,
    renormalised to rows summing to 1 when ``K < N`` (dropped columns carried some mass; for a
    permutation the sums are already 1 and it is skipped). ``cross``: rows only -> ``[B, H, K, Kk]``.
    """
    b, h, n, n_keys = attn.shape
    k = idx.shape[1]
    rows = torch.gather(attn, 2, idx[:, None, :, None].expand(b, h, k, n_keys))
    if kind == "cross":
        return rows
    out = torch.gather(rows, 3, idx[:, None, None, :].expand(b, h, k, k))
    if k < n:
        out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def attention_distill(
    s_attn: Tensor,
    t_attn: Tensor,
    teacher_idx: Tensor,
    student_idx: Tensor,
    kind: str = "self",
    loss: str = "kl",
    per_head: bool = False,
) -> Tensor:
    """Distil the teacher's decoder attention maps into the student's, through a matching.

    Args:
        s_attn: ``[B, Hs, Ns, Ks]`` student attention probabilities (pre-dropout; rows sum to 1).
            ``self``: ``Ks == Ns``; ``cross``: ``Ks`` = number of C5 tokens.
        t_attn: ``[B, Ht, Nt, Kt]`` teacher maps; ``Ht == 1`` means already head-averaged.
        teacher_idx, student_idx: ``[B, K]`` int64 matching (same device as the maps).
        kind: ``"self"`` (rows and columns re-indexed: ``Ã[b,h,k,m] = A[b,h,idx[b,k],idx[b,m]]``) or
            ``"cross"`` (rows only: keys are image tokens, shared by teacher and student).
        loss: ``"kl"``: ``sum_keys t * (log t - log s)`` per row (``xlogy``: zero teacher keys, e.g.
            padding, contribute 0; ``s`` clamped at 1e-8), mean over ``(b, h, k)``; ``"mse"``: mean
            squared error over all elements.
        per_head: compare head ``h`` with head ``h`` (needs ``Hs == Ht``); otherwise both maps are
            averaged over heads first (invariant to head order).

    Returns:
        float32 scalar (0, still connected to the student graph, when ``K == 0``).

    Raises:
        ValueError: bad ``kind``/``loss``, shape mismatches, ``per_head`` with different head counts,
            or cross-attention maps over different numbers of image tokens.
    """
    if kind not in ("self", "cross"):
        raise ValueError(f"kind must be 'self' or 'cross', got {kind!r}")
    if loss not in ("kl", "mse"):
        raise ValueError(f"loss must be 'kl' or 'mse', got {loss!r}")
    if s_attn.dim() != 4 or t_attn.dim() != 4:
        raise ValueError(
            f"attention maps must be [B, H, N, keys], got student {tuple(s_attn.shape)} and "
            f"teacher {tuple(t_attn.shape)}"
        )
    bs, hs, ns, ks = s_attn.shape
    bt, ht, nt, kt = t_attn.shape
    if bt != bs:
        raise ValueError(f"student attention has batch {bs}, teacher attention {bt}")
    _check_matching(teacher_idx, student_idx, bs)
    if kind == "self":
        if ks != ns or kt != nt:
            raise ValueError(
                f"self-attention maps must be square [B, H, N, N], got student {tuple(s_attn.shape)} and "
                f"teacher {tuple(t_attn.shape)}"
            )
    elif ks != kt:
        raise ValueError(
            f"cross-attention maps attend over {ks} (student) and {kt} (teacher) image tokens: the teacher "
            "and student C5 feature maps differ in size (the backbones' strides or the input sizes differ)"
        )
    if per_head and hs != ht:
        raise ValueError(
            f"per_head attention distillation needs the same number of heads, got {hs} (student) and "
            f"{ht} (teacher){' (the teacher maps are stored head-averaged)' if ht == 1 else ''}"
        )
    if teacher_idx.numel() == 0:
        return _zero_like_graph(s_attn)

    s = s_attn.float()
    t = t_attn.float()
    if not per_head:
        # Averaging commutes with the re-indexing; doing it first gathers H times less data.
        s = s.mean(1, keepdim=True)
        t = t.mean(1, keepdim=True)
    s = _gather_attention(s, student_idx, kind)
    t = _gather_attention(t, teacher_idx, kind)
    if loss == "mse":
        return F.mse_loss(s, t)
    kl = torch.xlogy(t, t) - t * torch.log(s.clamp_min(_ATTN_LOG_CLAMP))
    return kl.sum(-1).mean()
