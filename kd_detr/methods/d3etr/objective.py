"""D3ETR loss: MixMatcher (Adaptive + Fixed Matching), label-assignment sharing, all KD terms.

Per batch (docs/methods.md 2.2): the teacher's outputs are given; the student ran with its own queries
(group P, "adaptive") plus the teacher's frozen queries as an auxiliary group (group A, "fixed").

* adaptive: per distilled layer, Hungarian matching of teacher layer ``m(l)`` to student layer ``l``
  predictions; predictions and attention maps distilled through it.
* fixed: identity correspondence (auxiliary query i <-> teacher query i); the same KD terms, plus a
  ground-truth loss whose assignment is the teacher's own at the last layer (label-assignment
  sharing) and the group's own Hungarian matching at the other layers (recipe: ``teacher_assignment``).

The ground-truth loss of group P is the plain criterion, computed by the trainer.

Loss names (all unweighted in the loss dict; weights in :attr:`D3ETRLoss.weight_dict`):
``distill.{adaptive|fixed}.{pred_cls|pred_l1|pred_giou|self_attn|cross_attn}.l{l}`` and
``fixed_gt.{loss_ce|loss_bbox|loss_giou}.l{l}`` (``l`` = student decoder layer, 0-based). All of them are
logged in the group ``distill``: ``distill.total`` is the whole D3ETR objective, the auxiliary group's GT loss
included (it is also logged alone as the part ``fixed_gt.total``); each term is also summed over layers
(``distill.adaptive.self_attn``, ``fixed_gt.loss_ce``).
"""

from __future__ import annotations

import dataclasses

import time
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from kd_detr.criterion import SetCriterion
from kd_detr.matcher import assignment_to_indices
from kd_detr.models.registry import ModelConfig

from kd_detr.models import DetectorRequest
from kd_detr.teacher import TeacherOutputs, stack_layers

from ..base import Method
from ..registry import register_method
from .adaptive_match import adaptive_match, identity_matching
from .config import DistillConfig
from .losses import attention_distill, prediction_distill

__all__ = ["D3ETRLoss", "resolve_layer_map", "resolve_layers"]

PRED_TERMS = ("pred_cls", "pred_l1", "pred_giou")


def resolve_layer_map(layer_map: str | Sequence[int], student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher decoder layer distilled into each student layer (``distill.layer_map``).

    ``identity`` needs equal depths; ``uniform`` spreads the student layers over the teacher's so
    that the last maps to the last (``m(l) = round((l + 1) * Lt / Ls) - 1``); a list gives it explicitly.
    """
    if layer_map == "identity":
        if student_layers != teacher_layers:
            raise ValueError(
                f"the student has {student_layers} decoder layers and the teacher {teacher_layers}: "
                "set distill.layer_map = \"uniform\" or an explicit list of teacher layers (one per student layer)")
        return list(range(student_layers))
    if layer_map == "uniform":
        return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]
    mapping = [int(i) for i in layer_map]
    if len(mapping) != student_layers:
        raise ValueError(f"distill.layer_map lists {len(mapping)} teacher layers but the student has "
                         f"{student_layers} decoder layers")
    bad = [i for i in mapping if not 0 <= i < teacher_layers]
    if bad:
        raise ValueError(f"distill.layer_map: teacher layers {bad} do not exist (the teacher has {teacher_layers})")
    return mapping


def resolve_layers(layers: str | Sequence[int], student_layers: int) -> list[int]:
    """Student decoder layers that are distilled (``distill.layers``)."""
    if layers == "all":
        return list(range(student_layers))
    if layers == "last":
        return [student_layers - 1]
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < student_layers]
    if bad:
        raise ValueError(f"distill.layers: student layers {bad} do not exist (the student has {student_layers})")
    if not out:
        raise ValueError("distill.layers is empty: nothing to distil")
    return out


@register_method("distill", DistillConfig)
class D3ETRLoss(Method):
    """The distillation part of the D3ETR objective (everything except group P's ground-truth loss).

    Args:
        cfg: the recipe's ``[distill]`` section.
        student: the student's :class:`ModelConfig`.
        teacher: the teacher's :class:`ModelConfig`.
        criterion: the student's ground-truth criterion (its matcher and loss weights are reused for
            the auxiliary group and for the teacher's assignment).

    Incompatible teacher/student pairs are refused here, before any training, with the recipe
    option that would make them work (if any).
    """

    def __init__(self, cfg: DistillConfig, student: ModelConfig, teacher: ModelConfig, criterion: SetCriterion):
        super().__init__()
        self.cfg = cfg
        self.criterion = criterion
        if student.num_classes != teacher.num_classes:
            raise ValueError(f"the teacher predicts {teacher.num_classes} classes and the student {student.num_classes}: "
                             "teacher and student must share one label map")
        if not (cfg.adaptive or cfg.fixed):
            raise ValueError("distill.adaptive and distill.fixed are both false: no matching to distil through "
                             "(use the baseline recipe to train the student alone)")
        self.layer_map = resolve_layer_map(cfg.layer_map, student.dec_layers, teacher.dec_layers)
        self.layers = resolve_layers(cfg.layers, student.dec_layers)
        self.num_layers = student.dec_layers
        attn_on = [a for a in ("self_attn", "cross_attn") if getattr(cfg, a).enabled]
        _check_families(cfg, student, teacher, attn_on)
        for a in attn_on:
            if getattr(cfg, a).per_head and student.nheads != teacher.nheads:
                raise ValueError(f"distill.{a}.per_head = true needs equal head counts, but the teacher has "
                                 f"{teacher.nheads} heads and the student {student.nheads}: set it to false "
                                 "(head-averaged maps)")
        if cfg.cross_attn.enabled and student.stride != teacher.stride:
            raise ValueError("distill.cross_attn needs teacher and student maps of the same stride, but one "
                             f"backbone is dilated (DC5) and the other not (teacher stride {teacher.stride}, "
                             f"student stride {student.stride}): disable distill.cross_attn")
        self.projection: Optional[nn.Linear] = None
        if cfg.fixed and teacher.d_model != student.d_model:
            if cfg.fixed_group.query_projection != "linear":
                raise ValueError(
                    f"Fixed Matching feeds the teacher's queries (d={teacher.d_model}) to the student decoder "
                    f"(d={student.d_model}): set distill.fixed_group.query_projection = \"linear\" (a trainable "
                    "projection) or distill.fixed = false")
            self.projection = nn.Linear(teacher.d_model, student.d_model)
        self.attn_mode = "none"
        if attn_on:
            self.attn_mode = "per_head" if any(getattr(cfg, a).per_head for a in attn_on) else "mean"
        self._declare_terms()
        # seconds spent in matchings since the last reset (benchmarks/distill_step.py reads them)
        self.match_seconds = {"adaptive": 0.0, "gt": 0.0}

    uses_teacher = True

    @classmethod
    def build(cls, cfg: DistillConfig, student: Any, criterion: SetCriterion, teacher: Any = None) -> "D3ETRLoss":
        return cls(cfg, student, teacher, criterion)

    # ------------------------------------------------------------------ the method contract
    def request(self, teacher: Optional[TeacherOutputs] = None) -> DetectorRequest:
        """The Fixed Matching group (the teacher's queries) and, for attention distillation, the maps."""
        return DetectorRequest(attention=self.needs_attn,
                               query_groups=self.extra_groups(teacher) if teacher is not None else None)

    def teacher_attention(self) -> str:
        return self.attn_mode

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"distill_projection": self.projection} if self.projection is not None else {}

    # ------------------------------------------------------------------ setup helpers
    @property
    def needs_attn(self) -> bool:
        return self.attn_mode != "none"

    def _terms(self) -> list[tuple[str, float]]:
        cfg = self.cfg
        terms = []
        if cfg.pred.enabled:
            terms += [("pred_cls", cfg.pred.class_weight), ("pred_l1", cfg.pred.bbox_weight),
                      ("pred_giou", cfg.pred.giou_weight)]
        for a in ("self_attn", "cross_attn"):
            if getattr(cfg, a).enabled:
                terms.append((a, getattr(cfg, a).weight))
        return [(t, w) for t, w in terms if w > 0]

    def _groups(self) -> list[tuple[str, float]]:
        out = []
        if self.cfg.adaptive:
            out.append(("adaptive", self.cfg.adaptive_weight))
        if self.cfg.fixed:
            out.append(("fixed", self.cfg.fixed_weight))
        return out

    def _declare_terms(self) -> None:
        """Every term's weight and log group (:meth:`Method.add_term`): all in ``distill``, each summed over
        layers; the auxiliary group's GT loss also as the part ``fixed_gt``."""
        for group, gw in self._groups():
            for term, tw in self._terms():
                for layer in self.layers:
                    self.add_term(f"distill.{group}.{term}.l{layer}", gw * tw, subgroup=f"distill.{group}.{term}")
        if self.cfg.fixed and self.cfg.fixed_group.gt_loss:
            base = {k: self.criterion.weight_dict[k] for k in ("loss_ce", "loss_bbox", "loss_giou")}
            for layer in range(self.num_layers):
                for k, v in base.items():
                    self.add_term(f"fixed_gt.{k}.l{layer}", v, subgroup=f"fixed_gt.{k}", part="fixed_gt")

    def extra_groups(self, teacher: TeacherOutputs) -> Optional[list[dict[str, Tensor]]]:
        """The auxiliary query group for the student's forward (``None`` without Fixed Matching)."""
        if not self.cfg.fixed:
            return None
        queries = teacher.query_embed.detach()
        if self.projection is not None:
            queries = self.projection(queries.to(self.projection.weight.dtype))
        group: dict[str, Tensor] = {"query_pos": queries}
        if self.cfg.fixed_group.reference_points == "teacher":
            group["reference_points"] = teacher.reference_points.detach()
        return [group]

    # ------------------------------------------------------------------ loss
    def _match_gt(self, logits: Tensor, boxes: Tensor, targets) -> list:
        t0 = time.perf_counter()
        idx = self.criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        self.match_seconds["gt"] += time.perf_counter() - t0
        return idx

    def fixed_gt_losses(self, logits: Tensor, boxes: Tensor, teacher: TeacherOutputs, targets,
                        num_boxes: float) -> dict[str, Tensor]:
        """Ground-truth loss of the auxiliary group, ``logits [L,B,Nt,C]``, ``boxes [L,B,Nt,4]``.

        At the layers named by ``teacher_assignment`` the assignment is the teacher's own Hungarian
        matching of its (mapped) layer to the ground truth: auxiliary query i is positive for the box
        teacher query i was matched to, background otherwise. Elsewhere: the group's own matching.
        """
        mode = self.cfg.fixed_group.teacher_assignment
        shared = {"last": {self.num_layers - 1}, "all": set(range(self.num_layers)), "off": set()}[mode]
        out = {}
        for layer in range(self.num_layers):
            if layer in shared:
                m = self.layer_map[layer]
                if teacher.gt_assignment is not None and m == teacher.num_layers - 1:
                    idx = assignment_to_indices(teacher.gt_assignment)  # stored with a cached teacher
                else:
                    idx = self._match_gt(teacher.logits[m], teacher.boxes[m], targets)
            else:
                idx = self._match_gt(logits[layer], boxes[layer], targets)
            terms = self.criterion.layer_losses({"pred_logits": logits[layer], "pred_boxes": boxes[layer]},
                                                targets, idx, num_boxes)
            out.update({f"fixed_gt.{k}.l{layer}": v for k, v in terms.items()})
        return out

    def _kd_terms(self, group: str, layer: int, s_logits, s_boxes, s_sa, s_ca, teacher: TeacherOutputs,
                  t_idx: Tensor, s_idx: Tensor, crop: Optional[Tensor] = None) -> dict[str, Tensor]:
        """The KD terms of one student layer; ``crop [B,S]`` (per-view teacher): the student's cross-attention
        keys over each image's own C5 grid (the others are zeroed: for ``kl`` the same as cropping, since the
        teacher has no mass there)."""
        cfg, m = self.cfg, self.layer_map[layer]
        out: dict[str, Tensor] = {}
        prefix = f"distill.{group}"
        if cfg.pred.enabled:
            p = prediction_distill(s_logits, s_boxes, teacher.logits[m], teacher.boxes[m], t_idx, s_idx,
                                   temperature=cfg.pred.temperature,
                                   confidence_weighting=cfg.pred.confidence_weighting)
            for name, key in (("pred_cls", "cls"), ("pred_l1", "l1"), ("pred_giou", "giou")):
                out[f"{prefix}.{name}.l{layer}"] = p[key]
        for a, s_map, t_maps, kind in (("self_attn", s_sa, teacher.self_attn, "self"),
                                       ("cross_attn", s_ca, teacher.cross_attn, "cross")):
            acfg = getattr(cfg, a)
            if not acfg.enabled:
                continue
            if t_maps is None:
                raise ValueError(f"distill.{a} is enabled but the teacher provided no attention maps")
            s_layer = s_map[layer]
            if kind == "cross" and crop is not None:
                s_layer = s_layer * crop[:, None, None, :].to(s_layer.dtype)
            out[f"{prefix}.{a}.l{layer}"] = attention_distill(
                s_layer, t_maps[m], t_idx, s_idx, kind=kind, loss=acfg.loss, per_head=acfg.per_head)
        return {k: v for k, v in out.items() if k in self.weight_dict}

    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
                teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        """All distillation terms (unweighted) of one batch (:meth:`Method.forward`).

        Args:
            model: the unwrapped student (unused: its outputs carry everything D3ETR reads).
            outputs: the student's output with ``groups`` (when Fixed Matching is on) and attention maps
                (when attention distillation is on), float32.
            targets: ground truth (for the auxiliary group's loss).
            num_boxes: the GT normaliser of the batch (``criterion.num_boxes(targets, device)``).
            teacher: the teacher's outputs for the same padded batch (cast to float32 here); required.
        """
        if teacher is None:
            raise ValueError("D3ETR distils from a teacher: the run has no teacher outputs for this batch")
        teacher = teacher.float()
        s_logits, s_boxes = stack_layers(outputs)
        if s_logits.shape[0] != self.num_layers:
            raise ValueError(f"the student output has {s_logits.shape[0]} decoder layers, expected {self.num_layers} "
                             "(aux outputs must be kept for distillation)")
        if teacher.num_layers <= max(self.layer_map):
            raise ValueError(f"the teacher output has {teacher.num_layers} decoder layers but the layer map "
                             f"uses layer {max(self.layer_map)}")
        crop = None
        if self.needs_attn and teacher.cross_attn is not None:
            # a teacher that saw each image alone has maps over each image's own C5 grid: put them on the
            # student's padded grid and compare only the student's rows over each image's grid (the crop)
            size = tuple(int(x) for x in outputs["feature_size"])
            teacher = dataclasses.replace(teacher, cross_attn=teacher.cross_attn_on(size), feature_size=size)
            crop = teacher.cross_attn_valid(size)
        losses: dict[str, Tensor] = {}
        layers = self.layers
        tm = [self.layer_map[layer] for layer in layers]
        if self.cfg.adaptive:
            t0 = time.perf_counter()
            t_idx, s_idx = adaptive_match(teacher.logits[tm], teacher.boxes[tm], s_logits[layers], s_boxes[layers],
                                          weights=self.cfg.match)
            self.match_seconds["adaptive"] += time.perf_counter() - t0
            t_idx, s_idx = t_idx.to(s_logits.device), s_idx.to(s_logits.device)
            for j, layer in enumerate(layers):
                losses.update(self._kd_terms("adaptive", layer, s_logits[layer], s_boxes[layer],
                                             outputs.get("self_attn"), outputs.get("cross_attn"), teacher,
                                             t_idx[j], s_idx[j], crop))
        if self.cfg.fixed:
            group = outputs["groups"][0]
            a_logits, a_boxes = stack_layers(group)
            ident = identity_matching(a_logits.shape[1], a_logits.shape[2], a_logits.device)
            for layer in layers:
                losses.update(self._kd_terms("fixed", layer, a_logits[layer], a_boxes[layer],
                                             group.get("self_attn"), group.get("cross_attn"), teacher, *ident,
                                             crop=crop))
            if self.cfg.fixed_group.gt_loss:
                losses.update(self.fixed_gt_losses(a_logits, a_boxes, teacher, targets, num_boxes))
        return losses


def _family(config: Any) -> str:
    fam = getattr(config, "family", None)
    return f"{config.name} (transformers {fam})" if fam else f"{config.name} (kd-detr Conditional DETR)"


def _check_families(cfg: DistillConfig, student: Any, teacher: Any, attn_on: list[str]) -> None:
    """Refuse, naming the family and the recipe switch, what a student or teacher family cannot do."""
    student_can = getattr(student, "supports", frozenset())
    teacher_can = getattr(teacher, "supports", frozenset())
    if cfg.fixed:
        if "query_groups" not in student_can:
            raise ValueError(f"Fixed Matching runs the teacher's queries through the student's decoder as an extra "
                             f"group with group-wise self-attention, which the student {_family(student)} cannot "
                             "run: set distill.fixed = false (Adaptive Matching alone)")
        if not getattr(teacher, "fixed_queries", True):
            # the family says why (DAB-DETR: 4-d anchors; two-stage Deformable DETR, RT-DETR ...: chosen per image)
            reason = getattr(teacher, "fixed_queries_reason", None) or "its queries are chosen per image"
            raise ValueError(f"Fixed Matching hands the teacher's static learned [Q,d] object queries to the "
                             f"student, but the teacher {_family(teacher)} has none: {reason}; set "
                             "distill.fixed = false")
    for a in attn_on:
        for who, config, can in (("student", student, student_can), ("teacher", teacher, teacher_can)):
            if "attention" not in can:
                raise ValueError(f"distill.{a} compares dense decoder attention maps, which the {who} "
                                 f"{_family(config)} does not return (deformable attention, for one, samples a "
                                 f"few points and has no dense map): set distill.{a}.enabled = false")
