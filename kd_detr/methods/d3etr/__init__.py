"""D3ETR (Chen et al., IJCAI 2024): MixMatcher distillation of a DETR student from a DETR teacher
(docs/methods.md section 2), recipe section ``[distill]``.

:mod:`.config` (:class:`DistillConfig`), :mod:`.adaptive_match` (the teacher-student Hungarian matching),
:mod:`.losses` (prediction and attention KD terms) and :mod:`.objective` (:class:`D3ETRLoss`: both
matchings, label-assignment sharing, every term).
"""

from .config import AttnDistill, DistillConfig, FixedGroup, MatchCost, PredDistill
from .objective import D3ETRLoss, resolve_layer_map, resolve_layers

__all__ = ["AttnDistill", "D3ETRLoss", "DistillConfig", "FixedGroup", "MatchCost", "PredDistill",
           "resolve_layer_map", "resolve_layers"]
