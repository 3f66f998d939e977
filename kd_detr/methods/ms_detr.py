"""MS-DETR mixed supervision for a Conditional DETR student (training only; docs/methods.md section 3).

MS-DETR (Zhao et al., CVPR 2024) adds a one-to-many (o2m) loss on the primary decoder's own queries,
beside the usual one-to-one (o2o) Hungarian loss: no extra queries and no extra decoder branch, so the
model used at inference is unchanged. :class:`MixedSupervision` is that o2m loss as an
:class:`~kd_detr.methods.base.Method` (recipe section ``[ms_detr]``): its own parameters (one auxiliary FFN per decoder
layer, optionally a separate class head) live in the objective, never in the student, so checkpoints and
exports stay plain Conditional DETR models.

Porting (docs/methods.md 3.7): MS-DETR reorders its (Deformable DETR) decoder layer to cross-attention ->
self-attention -> FFN and taps the o2m features after cross-attention. Conditional DETR's layer order is
kept here (its cross-attention depends on the previous layer's output through ``query_scale`` and the
first layer's self-attention runs on zero content, so reordering would change the model); the o2m tap is
either each layer's features after cross-attention + its LayerNorm (``tap = "cross_attn"``, the closest to
MS-DETR's intent, before the FFN) or the normal layer output (``tap = "layer_output"``, MS-DETR's
implementation (a)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from kd_detr.models import DetectorRequest
from kd_detr.schema import check_config, opt
from kd_detr.teacher import TeacherOutputs

from .base import Method
from .registry import register_method

__all__ = ["AuxFFN", "MixedSupervision", "MsDetrConfig", "one_to_many_assignment"]


@dataclass
class MsDetrConfig:
    """MS-DETR mixed supervision of the student's primary queries (``[ms_detr]``, docs/methods.md 3).

    A training-only one-to-many (o2m) loss beside the usual one-to-one Hungarian loss; the trained and
    exported student is a plain Conditional DETR (the auxiliary FFNs / class head live in the objective).

    * ``enabled``: switch the o2m objective on.
    * ``alpha``: class weight of the assignment score ``alpha * p(class) + (1 - alpha) * IoU`` (MS-DETR 0.3).
    * ``threshold``: a query is a candidate positive of its best GT when that score is ``>=`` this (0.4).
    * ``topk``: at most this many positives per GT, the best by score (MS-DETR ``K = 6``).
    * ``max_positive_fraction``: random cap on the positives of one image, as a fraction of the queries (0.25).
    * ``use_aux_ffn``: an auxiliary FFN (Linear-ReLU-Linear + residual + LayerNorm) per decoder layer on the
      o2m features, as MS-DETR's ``--use_aux_ffn``.
    * ``tap``: o2m features: ``"cross_attn"`` (each layer's features after cross-attention, before the FFN;
      the MS-DETR main implementation) or ``"layer_output"`` (the normal layer output, implementation (a)).
    * ``class_head``: ``"shared"`` (the student's class head, MS-DETR main) or ``"separate"`` (an own o2m class
      head, implementation (a)); the box head is always the student's.
    * ``class_weight``, ``bbox_weight``, ``giou_weight``: weights of the o2m focal, L1 and GIoU terms of every
      decoder layer (MS-DETR 2, 5, 2).
    * ``cap_rule``: which positives survive the ``max_positive_fraction`` cap. ``"best_first"`` (ours, default):
      every GT's best query first, the other candidates at random, so no GT loses its only positive while
      they fit; ``"official"``: uniformly at random among all positives (the official code).
    * ``duplicate_pairs``: a query selected for two GTs. ``"best"`` (ours, default): it keeps only its
      highest-scoring pair, for the class and the box terms; ``"official"``: the best pair sets the class
      target and every pair enters the L1 and GIoU terms (the official code).

    The o2o loss is the student's criterion: its class weight is ``[train] cls_loss_coef``, 2 as in the
    baseline, so that ``ms_detr`` and ``baseline`` differ only in the o2m term; every official MS-DETR run
    uses 1 (``recipes/ms_detr_official.toml`` sets it, with both switches at ``"official"``).
    """

    enabled: bool = False
    alpha: float = opt(0.3, min=0, max=1)
    threshold: float = opt(0.4, min=0, max=1)
    topk: int = opt(6, min=1)
    max_positive_fraction: float = opt(0.25, gt=0, max=1)
    use_aux_ffn: bool = True
    tap: str = opt("cross_attn", choices=("cross_attn", "layer_output"))
    class_head: str = opt("shared", choices=("shared", "separate"))
    class_weight: float = opt(2.0, min=0)
    bbox_weight: float = opt(5.0, min=0)
    giou_weight: float = opt(2.0, min=0)
    cap_rule: str = opt("best_first", choices=("best_first", "official"))
    duplicate_pairs: str = opt("best", choices=("best", "official"))


@torch.no_grad()
def one_to_many_assignment(prob: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                           alpha: float = 0.3, threshold: float = 0.4, topk: int = 6,
                           max_positive_fraction: float = 0.25,
                           generator: Optional[torch.Generator] = None, cap_rule: str = "best_first",
                           duplicate_pairs: str = "best"):
    """MS-DETR's one-to-many assignment of one image and one decoder layer (docs/methods.md 3.3).

    1. score ``m(g, q) = alpha * prob[q, label_g] + (1 - alpha) * IoU(boxes[q], gt_boxes[g])`` (plain IoU);
    2. each query takes its best GT ``g*(q) = argmax_g m(g, q)`` and is a candidate iff ``m(g*, q) >=
       threshold``;
    3. every GT's best query ``argmax_q m(g, q)`` is positive too (still assigned to its own ``g*``);
    4. random cap: at most ``floor(max_positive_fraction * Q)`` positives. ``cap_rule="best_first"``: the
       forced queries of step 3 go first (so they survive the cap; only if they alone exceed it is a random
       subset of them kept), the other candidates fill the remaining places at random (``generator``);
       ``"official"``: a uniformly random subset of all positives;
    5. a GT ``g`` that received ``c`` positives keeps its top-``min(c, topk)`` queries by ``m(g, .)``
       over **all** queries; a query selected for several GTs keeps only its highest-scoring pair (what
       MS-DETR's ascending sort achieves for the class target). ``duplicate_pairs="best"`` drops the
       other pairs for the box terms too, so each query has exactly one target; ``"official"`` also
       returns every selected pair for the box terms.

    Args:
        prob: ``[Q,C]`` class probabilities (sigmoid of the logits).
        boxes: ``[Q,4]`` predicted boxes, normalised cxcywh.
        gt_labels: ``[N]`` int64 class indices in ``[0, C)``.
        gt_boxes: ``[N,4]`` GT boxes, normalised cxcywh.
        alpha, threshold, topk, max_positive_fraction: see above (MS-DETR: 0.3, 0.4, 6, 0.25).
        generator: RNG of the random cap (``None``: the global RNG of ``prob``'s device).
        cap_rule, duplicate_pairs: see steps 4 and 5.

    Returns:
        ``(query_idx [P], gt_idx [P])`` int64 on ``prob``'s device, sorted by query, each query at most
        once, ``P <= floor(max_positive_fraction * Q)``. With ``duplicate_pairs="official"``:
        ``((query_idx, gt_idx), (box_query_idx [P'], box_gt_idx [P']))``, the second every selected pair
        (sorted by query, then GT).
    """
    if cap_rule not in ("best_first", "official") or duplicate_pairs not in ("best", "official"):
        raise ValueError(f"cap_rule must be best_first|official and duplicate_pairs best|official, got "
                         f"{cap_rule!r}, {duplicate_pairs!r}")
    num_queries, device = prob.shape[0], prob.device
    empty = torch.empty(0, dtype=torch.long, device=device)
    if num_queries == 0 or gt_labels.numel() == 0:
        return ((empty, empty), (empty, empty)) if duplicate_pairs == "official" else (empty, empty)
    num_gt = gt_labels.numel()
    gt_labels = gt_labels.to(device=device, dtype=torch.long)
    gt_boxes = gt_boxes.to(device=device, dtype=boxes.dtype)
    iou = box_iou(box_convert(gt_boxes, "cxcywh", "xyxy"), box_convert(boxes, "cxcywh", "xyxy"))  # [N,Q]
    # 0/0 for two degenerate (zero-area) boxes: no overlap rather than NaN in every comparison below
    iou = torch.nan_to_num(iou, nan=0.0)
    score = alpha * prob[:, gt_labels].t() + (1 - alpha) * iou  # [N,Q]

    # 2. each query's best GT, thresholded
    best_score, best_gt = score.max(dim=0)  # [Q]
    positive = best_score >= threshold
    # 3. every GT's best query is positive whatever its score ("low-quality" rescue)
    forced = torch.zeros(num_queries, dtype=torch.bool, device=device)
    forced[score.argmax(dim=1)] = True
    positive |= forced

    # 4. random cap, without a host sync: priority = forced in [2, 3), other positives in [0, 1),
    #    negatives -1; the top `cap` priorities are kept if positive
    cap = min(int(num_queries * max_positive_fraction), num_queries)
    if generator is not None:
        rand = torch.rand(num_queries, generator=generator, device=generator.device).to(device)
    else:
        rand = torch.rand(num_queries, device=device)
    boost = 2 * forced.to(rand.dtype) if cap_rule == "best_first" else torch.zeros_like(rand)
    priority = torch.where(positive, rand + boost, torch.full_like(rand, -1.0))
    keep_idx = priority.topk(cap).indices
    kept = torch.zeros_like(positive)
    kept[keep_idx] = positive[keep_idx]

    # 5. per GT: top-min(c, K) queries by its score over all queries
    counts = torch.bincount(best_gt[kept], minlength=num_gt).clamp(max=topk)  # [N]
    k = min(topk, num_queries)
    top_q = score.topk(k, dim=1).indices  # [N,k]
    take = torch.arange(k, device=device)[None, :] < counts[:, None]  # [N,k]
    selected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top_q, take)  # [N,Q]
    # one pair per query: the selected GT with the highest score
    pair_score, gt_idx = score.masked_fill(~selected, -math.inf).max(dim=0)  # [Q]
    query_idx = torch.nonzero(pair_score > -math.inf).squeeze(1)
    best = (query_idx, gt_idx[query_idx])
    if duplicate_pairs == "best":
        return best
    box_q, box_g = selected.t().nonzero(as_tuple=True)  # every selected pair, by query then GT
    return best, (box_q, box_g)


class AuxFFN(nn.Module):
    """MS-DETR's auxiliary FFN on the o2m features: ``norm(x + dropout(W2 dropout(act(W1 x))))``.

    ``x [..., d]`` -> ``[..., d]``; same shape as the decoder layer's own FFN (``d -> dim_feedforward -> d``).
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation should be relu or gelu, not {activation!r}")
        self.activation = F.relu if activation == "relu" else F.gelu
        # Xavier like every matrix of the transformer (MS-DETR's aux FFN sits in its transformer, whose
        # _reset_parameters Xavier-initialises it too)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm(x + self.dropout2(y))


@register_method("ms_detr", MsDetrConfig)
class MixedSupervision(Method):
    """MS-DETR's one-to-many loss on the student's primary queries, at every decoder layer.

    Per layer ``l``: o2m features (``tap``) -> auxiliary FFN (``use_aux_ffn``) -> the decoder's shared final
    LayerNorm (``model.output_norm``, as every ``hs`` goes through it before the heads) ->
    the student's box head on the layer's reference points (``model.heads``) and its class head (or the
    objective's own, ``class_head = "separate"``) -> :func:`one_to_many_assignment` on those predictions
    (no grad) -> focal / L1 / GIoU of the criterion (:meth:`SetCriterion.layer_losses`), normalised by the
    batch's GT count.

    With ``tap = "layer_output"`` the features are ``hs``, which are already through the final norm: it is
    applied again only after the auxiliary FFN (whose own LayerNorm output it then rescales as the heads
    expect); without the FFN, ``hs`` go to the heads directly, so with the shared class head the o2m loss
    supervises exactly the o2o predictions.

    Loss terms ``ms_detr.loss_ce.l{l}``, ``ms_detr.loss_bbox.l{l}``, ``ms_detr.loss_giou.l{l}`` for
    ``l = 0..L-1``, unweighted; :attr:`weight_dict` holds the recipe's weights. Logged in the group
    ``ms_detr`` (``ms_detr.total``), each term also summed over layers (``ms_detr.loss_ce``).

    Args:
        cfg: :class:`MsDetrConfig` (``[ms_detr]``).
        model_config: the student's :class:`~kd_detr.models.ModelConfig` (``d_model``, ``dec_layers``,
            ``dim_feedforward``, ``dropout``, ``activation``, ``num_classes``).
        criterion: the student's :class:`~kd_detr.criterion.SetCriterion` (its focal parameters).
        generator: optional RNG of the assignment's random cap (default: the global RNG).
    """


    def __init__(self, cfg: MsDetrConfig, model_config: Any, criterion: nn.Module,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cfg = cfg
        # not a submodule: the criterion belongs to the trainer (and must not enter this objective's state)
        object.__setattr__(self, "criterion", criterion)
        self.generator = generator
        self.num_layers = int(model_config.dec_layers)
        d = int(model_config.d_model)
        check_config(cfg, "ms_detr")  # its fields' own checks (a recipe ran them already; code may not have)
        self.tap = cfg.tap
        # one auxiliary FFN per decoder layer (MS-DETR: inside each decoder layer)
        self.aux_ffn: Optional[nn.ModuleList] = None
        if cfg.use_aux_ffn:
            self.aux_ffn = nn.ModuleList(
                AuxFFN(d, int(model_config.dim_feedforward), float(model_config.dropout), model_config.activation)
                for _ in range(self.num_layers))
        # implementation (a): a separate o2m class head; one for all layers, as the student's class head
        self.class_head: Optional[nn.Linear] = None
        if cfg.class_head == "separate":
            self.class_head = nn.Linear(d, int(model_config.num_classes))
            prior_prob = 0.01  # the focal prior of the student's class head: every class starts at 0.01
            nn.init.constant_(self.class_head.bias, -math.log((1 - prior_prob) / prior_prob))
        for i in range(self.num_layers):  # logged summed over layers (ms_detr.loss_ce) and in ms_detr.total
            for k, w in (("loss_ce", cfg.class_weight), ("loss_bbox", cfg.bbox_weight), ("loss_giou", cfg.giou_weight)):
                self.add_term(f"ms_detr.{k}.l{i}", float(w), subgroup=f"ms_detr.{k}")

    @classmethod
    def requires(cls, cfg: MsDetrConfig) -> frozenset[str]:
        # the o2m predictions go through the student's own heads and output norm (predictions())
        needs = {"heads", "output_norm"}
        if cfg.tap == "cross_attn":
            needs.add("candidates")
        return frozenset(needs)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"tap={c.tap}, class_head={c.class_head}, alpha={c.alpha}, threshold={c.threshold}, "
                f"topk={c.topk}, max_positive_fraction={c.max_positive_fraction}")

    def request(self, teacher=None) -> DetectorRequest:
        # the layer-output tap uses the normal outputs (hs); only the cross-attention tap needs candidates
        return DetectorRequest(candidates=self.tap == "cross_attn")

    def predictions(self, model: nn.Module, outputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """The o2m predictions of every layer: ``(logits [L,B,Q,C], boxes [L,B,Q,4])`` (with grad)."""
        if self.tap == "cross_attn":
            if "candidates" not in outputs:
                raise ValueError("ms_detr: the model outputs have no 'candidates'; run the model with "
                                 "request=DetectorRequest(candidates=True) (MixedSupervision.request)")
            feats = outputs["candidates"]  # [L,B,Q,d], raw (each layer's norm2 output)
        else:
            feats = outputs["hs"]  # [L,B,Q,d], already through the decoder's final norm
        if feats.shape[0] != self.num_layers:
            raise ValueError(f"ms_detr: expected {self.num_layers} decoder layers, got {feats.shape[0]}")
        if self.aux_ffn is not None:
            feats = torch.stack([ffn(f) for ffn, f in zip(self.aux_ffn, feats)])
        if self.tap == "cross_attn" or self.aux_ffn is not None:
            # the heads were built for decoder.norm outputs (hs): give the o2m features the same norm
            feats = model.output_norm(feats)
        logits, boxes = model.heads(feats, outputs["reference_points"])
        if self.class_head is not None:
            logits = self.class_head(feats)
        return logits, boxes

    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
                teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        """Unweighted o2m terms of one batch (see the class docstring); ``model`` is the unwrapped student,
        ``teacher`` unused (:meth:`Method.forward`)."""
        cfg = self.cfg
        logits, boxes = self.predictions(model, outputs)
        losses: dict[str, Tensor] = {}
        for i in range(self.num_layers):
            with torch.no_grad():  # the assignment is a target, not a path for gradients
                prob = logits[i].detach().sigmoid()
                pred_boxes = boxes[i].detach()
                indices = [one_to_many_assignment(prob[b], pred_boxes[b], t["labels"], t["boxes"],
                                                  alpha=cfg.alpha, threshold=cfg.threshold, topk=cfg.topk,
                                                  max_positive_fraction=cfg.max_positive_fraction,
                                                  generator=self.generator, cap_rule=cfg.cap_rule,
                                                  duplicate_pairs=cfg.duplicate_pairs)
                           for b, t in enumerate(targets)]
            layer = {"pred_logits": logits[i], "pred_boxes": boxes[i]}
            if cfg.duplicate_pairs == "best":
                terms = self.criterion.layer_losses(layer, targets, indices, num_boxes)
            else:  # the class target from each query's best pair, the box terms over every pair
                terms = {"loss_ce": self.criterion.loss_labels(logits[i], targets, [b for b, _ in indices], num_boxes),
                         **self.criterion.loss_boxes(boxes[i], targets, [a for _, a in indices], num_boxes)}
            for k, v in terms.items():
                losses[f"ms_detr.{k}.l{i}"] = v
        return losses
