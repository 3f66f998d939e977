"""Training methods: objectives beside the student's ground-truth loss, one home each, registered by the
recipe section they read (:func:`~kd_detr.methods.registry.register_method`).

* ``[distill]`` -> :class:`~kd_detr.methods.d3etr.D3ETRLoss` (D3ETR distillation from a teacher);
* ``[ms_detr]`` -> :class:`~kd_detr.methods.ms_detr.MixedSupervision` (MS-DETR one-to-many supervision);
* ``[co_detr]`` -> :class:`~kd_detr.methods.co_detr.CollaborativeHybrid` (Co-DETR auxiliary heads);
* ``[teach_detr]`` -> :class:`~kd_detr.methods.teach_detr.TeacherBoxTargets` (Teach-DETR teacher-box targets);
* ``[feature_kd]`` -> :class:`~kd_detr.methods.feature_kd.FeatureDistillation` (encoder-output feature KD).

Importing this package registers them, in this order (the order their terms are summed in).
"""

from . import d3etr, ms_detr, co_detr, teach_detr, feature_kd  # noqa: F401  (registration, in this order)
from .base import Method, TermGroup, TermWeights
from .registry import build_methods, get_method, list_methods, register_method

__all__ = ["Method", "TermGroup", "TermWeights", "build_methods", "get_method", "list_methods", "register_method"]
