"""D3ETR's recipe section ``[distill]``: what the student learns from the teacher (defaults: the full
MixMatcher; docs/methods.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kd_detr.schema import opt

__all__ = ["AttnDistill", "DistillConfig", "FixedGroup", "MatchCost", "PredDistill"]


@dataclass
class MatchCost:
    """Adaptive Matching cost: ``class_weight * D_cls + bbox_weight * L1 + giou_weight * (-GIoU)``."""

    class_weight: float = opt(2.0, min=0)
    bbox_weight: float = opt(5.0, min=0)
    giou_weight: float = opt(2.0, min=0)


@dataclass
class PredDistill:
    """Prediction distillation of matched pairs: soft-label class KL, box L1 and GIoU."""

    enabled: bool = True
    class_weight: float = opt(1.0, min=0)
    bbox_weight: float = opt(5.0, min=0)
    giou_weight: float = opt(2.0, min=0)
    temperature: float = opt(1.0, gt=0)
    confidence_weighting: bool = False


@dataclass
class AttnDistill:
    """Attention-map distillation (``[distill.self_attn]`` and ``[distill.cross_attn]``)."""

    enabled: bool = True
    weight: float = opt(1.0, min=0)
    loss: str = opt("kl", choices=("kl", "mse"))
    per_head: bool = False


@dataclass
class FixedGroup:
    """The Fixed Matching auxiliary group: teacher queries run through the student decoder."""

    gt_loss: bool = True
    teacher_assignment: str = opt("last", choices=("last", "all", "off"))
    reference_points: str = opt("student", choices=("student", "teacher"))
    query_projection: str = opt("none", choices=("none", "linear"))


@dataclass
class DistillConfig:
    """What the student learns from the teacher (``[distill]``); defaults are the full D3ETR MixMatcher."""

    enabled: bool = True
    adaptive: bool = True
    fixed: bool = True
    layers: str | list[int] = opt("all", choices=("all", "last"), min=0, unique=True)
    layer_map: str | list[int] = opt("identity", choices=("identity", "uniform"), min=0)
    adaptive_weight: float = opt(1.0, min=0)
    fixed_weight: float = opt(1.0, min=0)
    match: MatchCost = field(default_factory=MatchCost)
    pred: PredDistill = field(default_factory=PredDistill)
    self_attn: AttnDistill = field(default_factory=AttnDistill)
    cross_attn: AttnDistill = field(default_factory=AttnDistill)
    fixed_group: FixedGroup = field(default_factory=FixedGroup)

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Checks across fields: ``[(keys involved, what is wrong)]`` (the recipe loader reports the first)."""
        if self.enabled and not (self.adaptive or self.fixed):
            return [(("adaptive", "fixed"), "distill.adaptive and distill.fixed are both false, so nothing would be "
                                           "distilled; set distill.enabled = false to train the student alone")]
        return []
