"""Co-DETR collaborative hybrid assignments (Zong et al., ICCV 2023) as a training-only objective.

Per batch (docs/methods.md 4.1.4, ``L`` decoder layers, ``K`` heads):

* the encoder memory goes through the :class:`PyramidAdapter` to the ``K`` auxiliary heads (ATSS,
  Faster R-CNN), which train with their own one-to-many assignments: ``L^enc``, weighted ``L * lambda2``
  times each head's own loss weights (Co-DETR's code folds the paper's sum over layers into the weight);
* every head's positive boxes become customised positive queries that run through the student decoder
  in a separate pass (shared weights, no interaction with the main queries or the other heads) and are
  supervised at every decoder layer by the GT their head assigned them (no Hungarian matching;
  background padding gets the class loss only), with the main loss weights x ``lambda1``.

Everything trainable here (adapter, heads, query projections) belongs to this module, not to the
detector: the trained student is a plain Conditional DETR.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from kd_detr.models import DetectorRequest
from kd_detr.schema import check_config
from kd_detr.teacher import TeacherOutputs

from ..base import Method
from ..registry import register_method

from .adapter import PYRAMID_STRIDES, PyramidAdapter
from .assignment import HeadAssignment, mean_over_ranks
from .atss_head import ATSSHead
from .config import CoDetrConfig
from .queries import PositiveQueryEncoder, QuerySelection, select_queries
from .rcnn_head import FasterRCNNHead

__all__ = ["CollaborativeHybrid", "HEADS", "HEAD_LOSS_WEIGHTS"]

HEADS = ("atss", "faster_rcnn")

# Each head's own loss weights in Co-DETR's Co-Deformable-DETR config (before the L * lambda2 factor).
HEAD_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "atss": {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0},  # focal, GIoU, centerness BCE
    "faster_rcnn": {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0,            # RPN BCE, box regression
                    "loss_cls": 1.0, "loss_bbox": 10.0},                  # RoI CE, GIoU of decoded boxes
}
DECODER_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


@register_method("co_detr", CoDetrConfig)
class CollaborativeHybrid(Method):
    """Co-DETR's auxiliary heads and customised positive queries for a Conditional DETR student.

    Args:
        cfg: the recipe's ``[co_detr]`` section (:class:`~kd_detr.methods.co_detr.CoDetrConfig`).
        model_config: the student's :class:`~kd_detr.models.registry.ModelConfig`.
        criterion: the student's :class:`~kd_detr.criterion.SetCriterion` (its ``layer_losses`` and main
            loss weights supervise the positive queries).

    Loss terms (unweighted; weights in :attr:`weight_dict`): ``co_detr.<head>.<term>`` for the heads and
    ``co_detr.dec.<head>.<loss_ce|loss_bbox|loss_giou>.l<layer>`` for the positive queries. Logged in the
    group ``co_detr`` (``co_detr.total``), with each head's own terms summed (``co_detr.atss``) and each
    decoder term over layers (``co_detr.dec.atss.loss_ce``).

    After each call, :attr:`last_assignments` maps every head to what supervised its queries (detached):
    ``selection`` (:class:`QuerySelection`), ``labels [B,M]`` (``-1`` = background), ``target_boxes
    [B,M,4]`` (normalised cxcywh, zeros for background), ``reference_points [B,M,2]`` and ``assignments``
    (the head's :class:`HeadAssignment` per image, without features).
    """

    def __init__(self, cfg: CoDetrConfig, model_config: Any, criterion: nn.Module):
        super().__init__()
        check_config(cfg, "co_detr")  # its fields' own checks (a recipe ran them already; code may not have)
        self.cfg = cfg
        self.criterion = criterion
        d, num_classes = model_config.d_model, model_config.num_classes
        self.num_layers = model_config.dec_layers
        self.stride = model_config.stride  # the memory's stride (C5, or DC5)
        self.adapter = PyramidAdapter(d, self.stride, PYRAMID_STRIDES)
        with_features = cfg.content_from_features
        self.heads = nn.ModuleDict()
        for h in cfg.heads:
            if h == "atss":
                self.heads[h] = ATSSHead(d, num_classes, PYRAMID_STRIDES, topk=cfg.atss_topk,
                                         with_features=with_features)
            else:
                self.heads[h] = FasterRCNNHead(
                    d, num_classes, PYRAMID_STRIDES, with_features=with_features,
                    rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
                    rpn_positive_fraction=cfg.rpn_positive_fraction, rpn_post_nms_top_n=cfg.rpn_post_nms_top_n,
                    roi_batch_size_per_image=cfg.roi_batch_size_per_image,
                    roi_positive_fraction=cfg.roi_positive_fraction)
        self.queries = nn.ModuleDict({
            h: PositiveQueryEncoder(d, model_config.pe_temperature, head_embedding=cfg.use_head_embedding,
                                    content_from_features=with_features, head_embedding_form=cfg.head_embedding_form,
                                    num_heads=len(cfg.heads)) for h in cfg.heads})

        for h in cfg.heads:  # logged in co_detr.total; a head's own terms summed (co_detr.atss), each
            for k, w in HEAD_LOSS_WEIGHTS[h].items():  # decoder term over layers (co_detr.dec.atss.loss_ce)
                self.add_term(f"co_detr.{h}.{k}", w * self.num_layers * cfg.lambda2, subgroup=f"co_detr.{h}")
            for k in DECODER_LOSSES:
                for layer in range(self.num_layers):
                    self.add_term(f"co_detr.dec.{h}.{k}.l{layer}", criterion.weight_dict[k] * cfg.lambda1,
                                  subgroup=f"co_detr.dec.{h}.{k}")
        self.last_assignments: dict[str, dict[str, Any]] = {}

    @classmethod
    def requires(cls, cfg: CoDetrConfig) -> frozenset[str]:
        # the auxiliary heads read the encoder's memory; their positive queries run through decode()
        return frozenset({"memory", "decode"})

    def request(self, teacher=None) -> DetectorRequest:
        return DetectorRequest(memory=True)

    # ------------------------------------------------------------------ inputs
    def image_sizes(self, targets: Sequence[Mapping[str, Tensor]], encoded: Mapping[str, Any]) -> list[tuple[int, int]]:
        """Unpadded ``(h, w)`` per image: the targets' ``size`` (the data pipeline sets it), else the valid
        feature cells of the padding mask times the memory's stride (exact up to ``stride - 1`` pixels)."""
        if all("size" in t for t in targets):
            return [(int(t["size"][0]), int(t["size"][1])) for t in targets]
        h, w = encoded["feature_size"]
        valid = ~encoded["memory_mask"].reshape(-1, h, w)
        rows, cols = valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)
        return [(int(r) * self.stride, int(c) * self.stride) for r, c in zip(rows, cols)]

    @staticmethod
    def absolute_boxes(targets: Sequence[Mapping[str, Tensor]], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Targets' normalised cxcywh -> absolute xyxy pixels on the padded canvas (padding is bottom/right,
        so the unpadded image's pixel coordinates are the canvas's)."""
        out = []
        for t, (h, w) in zip(targets, sizes):
            boxes = t["boxes"].float()
            out.append(box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([w, h, w, h]))
        return out

    @staticmethod
    def supervision(sel: QuerySelection, targets: Sequence[Mapping[str, Tensor]]
                    ) -> tuple[list[dict[str, Tensor]], list[tuple[Tensor, Tensor]]]:
        """The head's assignment as ``SetCriterion.layer_losses`` input: per image, targets ``{labels,
        boxes}`` of the positive queries in order and the identity assignment ``(query j, target j)``."""
        sup, indices = [], []
        for b, t in enumerate(targets):
            n = int(sel.num_positive[b])
            gt = sel.gt_index[b, :n]
            sup.append({"labels": t["labels"][gt], "boxes": t["boxes"][gt]})
            j = torch.arange(n, device=gt.device)
            indices.append((j, j))
        return sup, indices

    # ------------------------------------------------------------------ loss
    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
                teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        """Unweighted terms of one batch (see the class docstring); ``model`` is the unwrapped student (its
        ``decode`` runs the positive queries), ``teacher`` unused (:meth:`Method.forward`)."""
        if "encoded" not in outputs:
            raise ValueError("co_detr needs the encoder memory: run the model with "
                             "request=DetectorRequest(memory=True) (CollaborativeHybrid.request)")
        enc = outputs["encoded"]
        sizes = self.image_sizes(targets, enc)
        feats = self.adapter(enc["memory"], enc["memory_mask"], enc["feature_size"])
        gt_boxes = self.absolute_boxes(targets, sizes)
        gt_labels = [t["labels"].long() for t in targets]

        terms: dict[str, Tensor] = {}
        selections: dict[str, QuerySelection] = {}
        groups = []
        for name, head in self.heads.items():
            losses, assignments = head(feats, sizes, gt_boxes, gt_labels)
            terms.update({f"co_detr.{name}.{k}": v for k, v in losses.items()})
            selections[name] = sel = select_queries(assignments, sizes, self.cfg.max_positive_queries,
                                                    self.cfg.min_queries)
            groups.append(self.queries[name](sel))
            self.last_assignments[name] = {
                "assignments": [HeadAssignment(a.boxes.detach(), a.gt_index) for a in assignments]}

        # One decoder pass for all heads: groups never attend to each other (nor to the main queries), so
        # this equals a separate pass per head, in one batched call.
        decoded = model.decode(enc, groups)
        for (name, sel), group, out in zip(selections.items(), groups, decoded):
            sup, indices = self.supervision(sel, targets)
            norm = mean_over_ranks(sel.num_positive.sum(), sel.boxes.device)  # Co-DETR: #positive queries
            for layer, lo in enumerate([*out["aux_outputs"], out]):
                layer_terms = self.criterion.layer_losses(
                    {"pred_logits": lo["pred_logits"], "pred_boxes": lo["pred_boxes"]}, sup, indices, norm)
                terms.update({f"co_detr.dec.{name}.{k}.l{layer}": v for k, v in layer_terms.items()})
            self._record(name, sel, sup, group)
        return terms

    def _record(self, name: str, sel: QuerySelection, sup: Sequence[dict[str, Tensor]],
                group: Mapping[str, Tensor]) -> None:
        """Keep what supervised this head's queries (for tests and inspection), detached."""
        b, m = sel.gt_index.shape
        labels = torch.full((b, m), -1, dtype=torch.long, device=sel.boxes.device)
        target_boxes = sel.boxes.new_zeros(b, m, 4)
        for i, s in enumerate(sup):
            labels[i, :len(s["labels"])] = s["labels"]
            target_boxes[i, :len(s["boxes"])] = s["boxes"].detach()
        self.last_assignments[name].update(
            selection=QuerySelection(sel.boxes, sel.gt_index, sel.source_index, sel.num_positive),
            labels=labels, target_boxes=target_boxes, reference_points=group["reference_points"].detach())
