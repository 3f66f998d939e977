"""Set-prediction loss of Conditional DETR: sigmoid focal + L1 + GIoU, with auxiliary losses.

Follows the official ``SetCriterion`` (Conditional DETR, focal variant):

* classification: sigmoid focal loss (alpha 0.25, gamma 2) on ``[B, Q, C]`` one-hot targets
  (unmatched queries are all-zero rows; there is no "no-object" logit), reduced as
  ``mean over queries -> sum -> / num_boxes -> * Q``, i.e. the sum over all ``B*Q*C``
  elements divided by ``num_boxes``;
* boxes: L1 on normalised cxcywh and ``1 - GIoU`` on xyxy, summed over matched pairs and
  divided by ``num_boxes``;
* ``num_boxes``: number of ground-truth boxes in the batch, all-reduced over ranks, divided
  by the world size, clamped to >= 1;
* every decoder layer is matched separately; aux layer ``i`` terms get the suffix ``_{i}``.

All terms returned by :meth:`SetCriterion.forward` are unweighted; :func:`weighted_total`
applies the weights.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .matcher import Assignment, HungarianMatcher

__all__ = [
    "SetCriterion",
    "class_error",
    "compute_num_boxes",
    "default_weight_dict",
    "weighted_total",
]


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def default_weight_dict(
    num_dec_layers: int = 6,
    ce: float = 2.0,
    bbox: float = 5.0,
    giou: float = 2.0,
) -> dict[str, float]:
    """Official loss weights, with copies ``loss_*_{i}`` for aux layers ``i = 0..L-2``.

    Args:
        num_dec_layers: number of decoder layers ``L`` (official 6); ``L - 1`` aux copies.
        ce, bbox, giou: weights of the focal, L1 and GIoU terms (official 2, 5, 2).
    """
    if num_dec_layers < 1:
        raise ValueError(f"num_dec_layers must be >= 1, got {num_dec_layers}")
    base = {"loss_ce": float(ce), "loss_bbox": float(bbox), "loss_giou": float(giou)}
    out = dict(base)
    for i in range(num_dec_layers - 1):
        out.update({f"{k}_{i}": v for k, v in base.items()})
    return out


def weighted_total(
    loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float], strict: bool = True
) -> Tensor:
    """Weighted sum ``sum_k loss_dict[k] * weight_dict[k]``.

    Args:
        loss_dict: unweighted scalar loss terms.
        weight_dict: weight per term name.
        strict: if True, a term of ``loss_dict`` without a weight raises ``KeyError`` (the
            official engine silently drops it, which hides e.g. a missing aux-layer weight);
            if False such terms are ignored, as officially.

    Returns:
        Scalar tensor.
    """
    missing = [k for k in loss_dict if k not in weight_dict]
    if strict and missing:
        raise KeyError(
            f"loss terms without a weight: {missing}; add them to the weight dict "
            "(or pass strict=False to ignore them)"
        )
    terms = [loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict]
    if not terms:
        raise ValueError("no loss term has a weight: nothing to sum")
    return torch.stack([t.reshape(()) for t in terms]).sum()


def compute_num_boxes(targets: Sequence[Mapping[str, Tensor]], device: torch.device | str) -> float:
    """Normaliser of the losses: GT count, averaged over ranks, clamped to >= 1 (official).

    Args:
        targets: per-image dicts with ``labels [N_b]``.
        device: device of the all-reduce buffer (must suit the process group backend).

    Returns:
        ``max(sum over ranks of sum_b N_b / world_size, 1)`` as a Python float.
    """
    n = torch.as_tensor(
        [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
    )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
    return torch.clamp(n / _dist_world_size(), min=1).item()


def _src_permutation_idx(indices: Sequence[Assignment]) -> tuple[Tensor, Tensor]:
    """Flatten per-image assignments into ``(batch_idx, query_idx)`` for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


@torch.no_grad()
def class_error(
    pred_logits: Tensor, targets: Sequence[Mapping[str, Tensor]], indices: Sequence[Assignment]
) -> Tensor:
    """Top-1 classification error (%) of the matched queries (official logging metric).

    Args:
        pred_logits: ``[B, Q, C]``.
        targets: per-image dicts with ``labels``.
        indices: per-image ``(src_idx, tgt_idx)`` assignment.

    Returns:
        Scalar tensor ``100 - accuracy``; 100 when nothing is matched (official convention).
    """
    batch_idx, src_idx = _src_permutation_idx(indices)
    device = pred_logits.device
    matched = pred_logits[batch_idx.to(device), src_idx.to(device)]
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(device)
    if labels.numel() == 0:
        return torch.tensor(100.0, device=device)
    acc = (matched.argmax(-1) == labels).float().mean() * 100
    return 100 - acc


class SetCriterion(nn.Module):
    """Conditional DETR loss: Hungarian matching per decoder layer + focal / L1 / GIoU.

    Args:
        num_classes: number of class logits ``C`` (targets' labels are in ``[0, C)``).
        matcher: assignment module (``HungarianMatcher`` or compatible callable).
        weight_dict: weights used by :meth:`total`; default: official weights with aux copies
            for ``num_dec_layers`` layers.
        focal_alpha, focal_gamma: focal loss parameters (official 0.25, 2).
        num_dec_layers: decoder depth used for the default weight dict (default 6).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module | None = None,
        weight_dict: Mapping[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_dec_layers: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        if weight_dict is None:
            weight_dict = default_weight_dict(num_dec_layers if num_dec_layers is not None else 6)
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.num_dec_layers = num_dec_layers

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    # ------------------------------------------------------------------ validation
    def validate_outputs(self, layer_outputs: Mapping[str, Tensor], batch_size: int) -> None:
        """Check ``pred_logits [B, Q, C]`` / ``pred_boxes [B, Q, 4]`` shapes; raise ``ValueError``."""
        logits, boxes = layer_outputs["pred_logits"], layer_outputs["pred_boxes"]
        if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(
                "expected pred_logits [B, Q, C] and pred_boxes [B, Q, 4], got "
                f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        if logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(
                f"pred_logits {tuple(logits.shape)} and pred_boxes {tuple(boxes.shape)} disagree on [B, Q]"
            )
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes but the criterion expects {self.num_classes}"
            )
        if logits.shape[0] != batch_size:
            raise ValueError(f"got {batch_size} targets for a batch of {logits.shape[0]} images")

    def validate_targets(self, targets: Sequence[Mapping[str, Tensor]]) -> None:
        """Check target shapes and label range; raise ``ValueError`` naming the offending image."""
        for b, t in enumerate(targets):
            labels, tboxes = t["labels"], t["boxes"]
            if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(
                    f"target {b}: labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}"
                )
            if tboxes.dim() != 2 or tboxes.shape[-1] != 4 or len(tboxes) != len(labels):
                raise ValueError(
                    f"target {b}: boxes must be [N, 4] with N = len(labels) = {len(labels)}, "
                    f"got {tuple(tboxes.shape)}"
                )
        labels = torch.cat([t["labels"].reshape(-1).long().cpu() for t in targets]) if targets else None
        if labels is None or labels.numel() == 0:
            return
        # One host transfer for the whole batch; locate the offender only on failure.
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            sizes = [len(t["labels"]) for t in targets]
            pos = int(bad.nonzero()[0, 0])
            image = 0
            while pos >= sizes[image]:
                pos -= sizes[image]
                image += 1
            raise ValueError(
                f"target of image {image} in the batch has label {int(targets[image]['labels'][pos])}, "
                f"outside [0, {self.num_classes}); labels must be model class indices (see LabelMap)"
            )
        wh = torch.cat([t["boxes"].reshape(-1, 4)[:, 2:].detach().cpu() for t in targets])
        if not torch.isfinite(wh).all() or (wh < 0).any():
            raise ValueError("target boxes must be finite normalised cxcywh with width, height >= 0")

    # ------------------------------------------------------------------ losses
    def num_boxes(self, targets: Sequence[Mapping[str, Tensor]], device: torch.device | str = "cpu") -> float:
        """See :func:`compute_num_boxes`."""
        return compute_num_boxes(targets, device)

    def loss_labels(
        self, pred_logits: Tensor, targets: Sequence[Mapping[str, Tensor]], indices: Sequence[Assignment], num_boxes: float
    ) -> Tensor:
        """Sigmoid focal loss over all ``B*Q*C`` logits, official normalisation.

        Args:
            pred_logits: ``[B, Q, C]``.
            targets, indices: ground truth and its assignment to queries.
            num_boxes: normaliser from :func:`compute_num_boxes`.
        """
        device = pred_logits.device
        batch_idx, src_idx = _src_permutation_idx(indices)
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(device)
        onehot = torch.zeros_like(pred_logits)
        onehot[batch_idx.to(device), src_idx.to(device), tgt_labels] = 1
        focal = sigmoid_focal_loss(
            pred_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        num_queries = pred_logits.shape[1]
        # Official order of operations: mean over queries, sum, / num_boxes, then * Q.
        return focal.mean(1).sum() / num_boxes * num_queries

    def loss_boxes(
        self, pred_boxes: Tensor, targets: Sequence[Mapping[str, Tensor]], indices: Sequence[Assignment], num_boxes: float
    ) -> dict[str, Tensor]:
        """L1 (cxcywh) and ``1 - GIoU`` (xyxy) over matched pairs, each summed / ``num_boxes``.

        Args:
            pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
        """
        device = pred_boxes.device
        batch_idx, src_idx = _src_permutation_idx(indices)
        src = pred_boxes[batch_idx.to(device), src_idx.to(device)]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(device, src.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(
            generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        )
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def layer_losses(
        self,
        layer_outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        indices: Sequence[Assignment],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """The three unweighted terms of one decoder layer for a given assignment.

        Args:
            layer_outputs: ``{"pred_logits": [B, Q, C], "pred_boxes": [B, Q, 4]}``.
            targets: ``B`` dicts with ``labels [N_b]`` and ``boxes [N_b, 4]``.
            indices: ``B`` pairs ``(src_idx, tgt_idx)`` (e.g. from a matcher, or a teacher's).
            num_boxes: normaliser (:func:`compute_num_boxes`).

        Returns:
            ``{"loss_ce", "loss_bbox", "loss_giou"}`` scalar tensors.
        """
        if len(indices) != len(targets):
            raise ValueError(f"got {len(indices)} assignments for {len(targets)} targets")
        self.validate_outputs(layer_outputs, len(targets))
        num_queries = layer_outputs["pred_logits"].shape[1]
        for b, ((src, tgt), t) in enumerate(zip(indices, targets)):
            if len(src) != len(tgt):
                raise ValueError(f"assignment {b}: {len(src)} queries vs {len(tgt)} targets")
            if len(src) and (int(src.max()) >= num_queries or int(tgt.max()) >= len(t["labels"])):
                raise ValueError(f"assignment {b} indexes outside the queries or the targets")
        out = {"loss_ce": self.loss_labels(layer_outputs["pred_logits"], targets, indices, num_boxes)}
        out.update(self.loss_boxes(layer_outputs["pred_boxes"], targets, indices, num_boxes))
        return out

    def forward(
        self,
        outputs: Mapping,
        targets: Sequence[Mapping[str, Tensor]],
        return_indices: bool = False,
    ):
        """Match every decoder layer separately and compute its unweighted losses.

        Args:
            outputs: model output: ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (last layer)
                and optionally ``aux_outputs`` (list of ``L-1`` such dicts, layers ``0..L-2``).
            targets: ``B`` dicts with ``labels [N_b]`` int64 in ``[0, C)`` and ``boxes [N_b, 4]``
                normalised cxcywh.
            return_indices: also return the assignments.

        Returns:
            ``{"loss_ce", "loss_bbox", "loss_giou"}`` for the last layer plus
            ``"loss_ce_{i}"``, ``"loss_bbox_{i}"``, ``"loss_giou_{i}"`` per aux layer ``i``.
            With ``return_indices``: ``(losses, indices)`` where ``indices`` lists the per-image
            assignments of layers ``0..L-1`` (aux layers first, last layer at the end).
        """
        last = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
        aux = list(outputs.get("aux_outputs") or [])
        self.validate_targets(targets)
        for layer in [last, *aux]:
            self.validate_outputs(layer, len(targets))
        num_boxes = self.num_boxes(targets, last["pred_logits"].device)

        last_indices = self.matcher(last, targets)
        losses = self.layer_losses(last, targets, last_indices, num_boxes)
        all_indices = []
        for i, layer in enumerate(aux):
            idx = self.matcher(layer, targets)
            all_indices.append(idx)
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(layer, targets, idx, num_boxes).items()})
        all_indices.append(last_indices)
        if return_indices:
            return losses, all_indices
        return losses

    def total(self, loss_dict: Mapping[str, Tensor]) -> Tensor:
        """:func:`weighted_total` with this criterion's weight dict."""
        return weighted_total(loss_dict, self.weight_dict)


class FamilyLossCriterion(SetCriterion):
    """The ground-truth loss of a detector that computes its own in its forward (the transformers families:
    their matcher, focal/varifocal terms and denoising groups need the labels inside the forward).

    The forward runs with ``targets=`` (``in_forward``) and returns its unweighted terms in
    ``outputs["family_losses"]``; this criterion hands them on and keeps :attr:`weight_dict` up to date
    from ``weights_for(term names)`` (the family's weights; 0 for terms it only logs), so that
    ``weighted_total(terms, weight_dict)`` equals the family's own ``loss``. The inherited matcher and
    :meth:`layer_losses` stay available to methods that match teacher predictions to the ground truth.
    """

    in_forward = True

    def __init__(self, num_classes: int, weights_for: Callable[[Iterable[str]], dict[str, float]],
                 matcher: nn.Module | None = None, focal_alpha: float = 0.25) -> None:
        super().__init__(num_classes, matcher, weight_dict={}, focal_alpha=focal_alpha)
        self.weights_for = weights_for

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, Tensor]], return_indices: bool = False):
        if "family_losses" not in outputs:
            raise ValueError("the detector returned no family_losses: it must run in training mode with targets= "
                             "(its ground-truth loss is computed inside its forward)")
        if return_indices:
            raise ValueError("a family's own loss does not expose its assignments")
        losses = dict(outputs["family_losses"])
        self.weight_dict.update(self.weights_for(losses))
        return losses
