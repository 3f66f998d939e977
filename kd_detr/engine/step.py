"""One training forward and its losses: the one ground-truth loss step, shared by every run (baseline,
distillation, one-to-many methods), the trainer and ``benchmarks/``."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from kd_detr.criterion import weighted_total
from kd_detr.methods import Method, TermWeights
from kd_detr.models import DetectorRequest
from kd_detr.teacher import TeacherOutputs

__all__ = ["batch_losses", "to_float32"]


def to_float32(obj: Any) -> Any:
    """Cast every floating tensor in a nested dict/list of model outputs to float32."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):  # keeps a DetectorOutput's typed views
        return type(obj)({k: to_float32(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(v) for v in obj)
    return obj


def batch_losses(model: torch.nn.Module, criterion, images: torch.Tensor, mask: torch.Tensor, targets: Sequence[dict],
                 methods: Sequence[Method] = (), teacher: Optional[TeacherOutputs] = None, aux_loss: bool = True,
                 raw_model: Optional[torch.nn.Module] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], TermWeights]:
    """The student's forward (with what every method asks of it) and every loss of one batch.

    Returns ``(total, gt_terms, method_terms, method_weights)``: the weighted total and the unweighted term
    dicts (GT weights in ``criterion.weight_dict``, the methods' in ``method_weights``, a
    :class:`~kd_detr.methods.TermWeights` that carries each method term's declared log group in ``.groups``
    for :func:`~kd_detr.engine.loss_logs.loss_logs`). Each method is called as ``method(model, outputs,
    targets, num_boxes, teacher)`` (:meth:`~kd_detr.methods.Method.forward`).

    Args:
        model: the student (possibly DDP-wrapped); ``raw_model`` the unwrapped detector (default ``model``),
            which methods use for its heads or decoder.
        criterion: the ground-truth :class:`~kd_detr.criterion.SetCriterion`.
        images, mask, targets: the batch (``[B,3,H,W]``, ``[B,H,W]`` True = pad, per-image targets).
        methods: the recipe's methods, in registration order.
        teacher: the teacher's outputs for this batch (``None`` without a teacher).
        aux_loss: supervise every decoder layer (``False``: the last one only).
    """
    request = DetectorRequest()
    for m in methods:
        request = request.merge(m.request(teacher))
    detector = raw_model if raw_model is not None else model
    missing = request.asked() - set(getattr(detector.config, "supports", request.asked()))
    if missing:
        raise ValueError(f"the student ({type(detector).__name__}) cannot return {sorted(missing)}, which the recipe's "
                         f"methods ({', '.join(m.section for m in methods)}) ask of it: switch those terms off in "
                         "the recipe, or use a student family that has them")
    # a detector with its own ground-truth loss (transformers families) computes it in this forward
    own = {"targets": targets} if getattr(criterion, "in_forward", False) else {}
    outputs = model(images, mask, request=request, **own)
    with torch.autocast(images.device.type, enabled=False):  # losses in float32 under AMP
        out32 = to_float32(outputs)
        gt_outputs = out32 if aux_loss else {k: v for k, v in out32.items() if k != "aux_outputs"}
        gt = criterion(gt_outputs, targets)
        terms: dict[str, torch.Tensor] = {}
        weights = TermWeights()
        if methods:
            num_boxes = criterion.num_boxes(targets, images.device)
            for m in methods:
                terms.update(m(detector, out32, targets, num_boxes, teacher))
                weights.add(m)
    total = weighted_total(gt, criterion.weight_dict)
    if terms:
        total = total + weighted_total(terms, weights)
    return total, gt, terms, weights
