"""Hungarian matching between decoder predictions and ground-truth boxes.

Follows the official Conditional DETR matcher: the cost of assigning prediction ``q``
to ground truth ``n`` is

    cost_class * focal_cost(q, label_n) + cost_bbox * L1(box_q, box_n) + cost_giou * (-GIoU(box_q, box_n))

where ``focal_cost = alpha (1-p)^gamma (-log(p + eps)) - (1-alpha) p^gamma (-log(1-p + eps))`` with
``p = sigmoid(logit)`` of the ground-truth class and ``eps = 1e-8``; L1 is taken on normalised
``cxcywh`` boxes and GIoU on ``xyxy``. The assignment is solved per image with
``scipy.optimize.linear_sum_assignment``.

The cost and the solver are exposed separately (:func:`pairwise_match_cost`,
:func:`solve_assignments`) so that other matchings (e.g. teacher-student) reuse them.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

__all__ = [
    "HungarianMatcher",
    "assignment_to_indices",
    "focal_class_cost",
    "indices_to_assignment",
    "pairwise_match_cost",
    "solve_assignments",
    "solve_matchings",
]

Assignment = tuple[Tensor, Tensor]

# Official constant inside the logs of the focal matching cost.
_FOCAL_COST_EPS = 1e-8


def focal_class_cost(
    prob: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal classification matching cost.

    Args:
        prob: ``[P, C]`` sigmoid probabilities of the predictions.
        labels: ``[T]`` int64 class indices of the targets.
        alpha, gamma: focal parameters (official: 0.25, 2).

    Returns:
        ``[P, T]`` cost: positive focal term minus negative focal term of the target's class.
    """
    # Gather the T needed columns first: identical values to computing both terms on [P, C]
    # and indexing afterwards (the official order), but cheaper when C >> T.
    p = prob[:, labels]
    pos = alpha * (1 - p) ** gamma * (-(p + _FOCAL_COST_EPS).log())
    neg = (1 - alpha) * p**gamma * (-(1 - p + _FOCAL_COST_EPS).log())
    return pos - neg


def pairwise_match_cost(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    tgt_labels: Tensor,
    tgt_boxes: Tensor,
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Tensor:
    """Weighted matching cost between every prediction and every target.

    Args:
        pred_logits: ``[P, C]`` classification logits (pre-sigmoid).
        pred_boxes: ``[P, 4]`` normalised cxcywh boxes.
        tgt_labels: ``[T]`` int64 class indices in ``[0, C)``.
        tgt_boxes: ``[T, 4]`` normalised cxcywh boxes.
        cost_class, cost_bbox, cost_giou: weights of the three terms.
        focal_alpha, focal_gamma: focal parameters of the class cost.

    Returns:
        ``[P, T]`` cost matrix on the device of the inputs (no gradient is tracked by callers
        that run under ``torch.no_grad``).
    """
    tgt_boxes = tgt_boxes.to(pred_boxes.dtype)
    prob = pred_logits.sigmoid()
    c_class = focal_class_cost(prob, tgt_labels, focal_alpha, focal_gamma)
    c_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
    c_giou = -generalized_box_iou(
        box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
    )
    # Same summation order as the official matcher (bbox + class + giou) for bitwise parity.
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


def solve_assignments(costs: Sequence[Tensor]) -> list[Assignment]:
    """Solve one linear assignment problem per cost matrix.

    Args:
        costs: sequence of ``[Q_i, N_i]`` cost matrices (any device; moved to CPU). Rectangular
            and empty (``N_i == 0`` or ``Q_i == 0``) matrices are allowed.

    Returns:
        One ``(row_idx, col_idx)`` pair of int64 CPU tensors per matrix, each of length
        ``min(Q_i, N_i)``, sorted by ``row_idx`` (as scipy returns them).

    Raises:
        ValueError: if a cost matrix is not 2-D or contains NaN/Inf (typically diverged
            predictions), instead of scipy's generic error.
    """
    out: list[Assignment] = []
    for i, cost in enumerate(costs):
        if cost.dim() != 2:
            raise ValueError(f"cost matrix {i} must be 2-D [Q, N], got shape {tuple(cost.shape)}")
        c = cost.detach().to("cpu", torch.float64)
        if c.numel() and not torch.isfinite(c).all():
            raise ValueError(
                f"matching cost for image {i} contains NaN/Inf; the predictions (or targets) "
                "are not finite, so training has probably diverged"
            )
        rows, cols = linear_sum_assignment(c.numpy())
        out.append(
            (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
        )
    return out


class HungarianMatcher(nn.Module):
    """One-to-one matching of each image's predictions to its ground-truth boxes.

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 box cost.
        cost_giou: weight of the (negative) GIoU cost.
        focal_alpha, focal_gamma: focal parameters of the class cost (official: fixed 0.25, 2).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching cost weights are 0")
        self.cost_class = float(cost_class)
        self.cost_bbox = float(cost_bbox)
        self.cost_giou = float(cost_giou)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: Sequence[dict]) -> list[Tensor]:
        """Per-image cost matrices.

        Args:
            outputs: ``{"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}``.
            targets: ``B`` dicts with ``labels [N_b]`` and ``boxes [N_b, 4]`` (normalised cxcywh).

        Returns:
            ``B`` CPU tensors of shape ``[Q, N_b]``.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries = logits.shape[:2]
        if len(targets) != bs:
            raise ValueError(f"got {len(targets)} targets for a batch of {bs} predictions")
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [torch.zeros(num_queries, 0) for _ in range(bs)]
        device = logits.device
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        # Batched like the official matcher ([B*Q, sum N], then keep each image's block):
        # one set of kernels per batch instead of per image.
        cost = pairwise_match_cost(
            logits.flatten(0, 1),
            boxes.flatten(0, 1),
            tgt_labels,
            tgt_boxes,
            self.cost_class,
            self.cost_bbox,
            self.cost_giou,
            self.focal_alpha,
            self.focal_gamma,
        )
        cost = cost.view(bs, num_queries, -1).cpu()
        return [block[i] for i, block in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> list[Assignment]:
        """Match predictions to targets.

        Args:
            outputs: ``{"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}`` (other keys ignored).
            targets: ``B`` dicts with ``labels [N_b]`` int64 and ``boxes [N_b, 4]`` normalised cxcywh.

        Returns:
            ``B`` pairs ``(src_idx, tgt_idx)`` of int64 CPU tensors of length ``min(Q, N_b)``:
            query ``src_idx[k]`` is assigned to target ``tgt_idx[k]``; sorted by ``src_idx``.
        """
        return solve_assignments(self.cost_matrices(outputs, targets))


def assignment_to_indices(assignment: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``[B,N]`` GT index per query (-1: background) -> per-image ``(query_idx, gt_idx)`` pairs sorted by query."""
    out = []
    for row in assignment.cpu():
        q = (row >= 0).nonzero().flatten()
        out.append((q, row[q]))
    return out


def indices_to_assignment(indices: Sequence[tuple[Tensor, Tensor]], num_queries: int) -> Tensor:
    """Inverse of :func:`assignment_to_indices`: ``[B,N]`` int64, -1 where a query has no GT."""
    out = torch.full((len(indices), num_queries), -1, dtype=torch.int64)
    for b, (q, g) in enumerate(indices):
        out[b, q.cpu()] = g.cpu().long()
    return out


# ----------------------------------------------------------------------------- thread pool
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """The module's solver pool, created on first use (importing the module starts no threads)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        with _EXECUTOR_LOCK:
            if _EXECUTOR is None:
                _EXECUTOR = ThreadPoolExecutor(
                    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="kd_detr_match"
                )
    return _EXECUTOR


def _forget_executor_after_fork() -> None:
    # A forked child (e.g. a DataLoader worker) inherits the pool object but not its threads:
    # submitting to it would hang, so the child starts a fresh pool if it ever needs one.
    global _EXECUTOR, _EXECUTOR_LOCK
    _EXECUTOR = None
    _EXECUTOR_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor_after_fork)


# ----------------------------------------------------------------------------- batched solves (D3ETR's
# Adaptive Matching: M equal-sized problems per batch, solved in one thread pool)
def _solve_into(c: np.ndarray, t_out: np.ndarray, s_out: np.ndarray) -> None:
    rows, cols = linear_sum_assignment(c)
    # scipy returns rows sorted (also for rectangular problems); sorting again costs nothing and
    # makes "sorted by teacher index" independent of that implementation detail.
    order = np.argsort(rows, kind="stable")
    t_out[:] = rows[order]
    s_out[:] = cols[order]


def solve_matchings(costs: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``M`` linear assignment problems (minimum total cost) in the shared thread pool.

    Args:
        costs: ``[M, Nt, Ns]`` cost matrices (any device and float dtype; moved to the CPU as
            float64 once). Rectangular matrices and ``M == 0`` / ``Nt == 0`` / ``Ns == 0`` are allowed.

    Returns:
        ``(teacher_idx [M, K], student_idx [M, K])`` int64 CPU tensors, ``K = min(Nt, Ns)``, each row
        sorted by ``teacher_idx`` (``teacher_idx[m] == arange(Nt)`` when ``Nt <= Ns``).

    Raises:
        ValueError: if ``costs`` is not 3-D, or some matrix contains NaN/Inf (named by index).
    """
    if costs.dim() != 3:
        raise ValueError(f"costs must be [M, Nt, Ns], got shape {tuple(costs.shape)}")
    # One transfer in the input dtype, then one conversion on the CPU (float64 is what scipy solves in).
    c = costs.detach().to("cpu").to(torch.float64)
    m, nt, ns = c.shape
    k = min(nt, ns)
    if m and k:
        # A matrix is finite iff its float64 sum is (costs are far from overflowing float64, and
        # NaN/Inf propagate); one reduction instead of a full boolean mask (15x faster).
        bad = (~torch.isfinite(c.flatten(1).sum(1))).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise ValueError(
                f"teacher-student matching cost matrix {shown} (of {m}) contains NaN/Inf: the teacher or "
                "student predictions are not finite, so training has probably diverged"
            )
    t_idx = np.empty((m, k), dtype=np.int64)
    s_idx = np.empty((m, k), dtype=np.int64)
    if m and k:
        arr = c.numpy()
        if m == 1:
            _solve_into(arr[0], t_idx[0], s_idx[0])
        else:
            # list() re-raises any worker exception here.
            list(_executor().map(_solve_into, arr, t_idx, s_idx))
    return torch.from_numpy(t_idx), torch.from_numpy(s_idx)
