"""The base type of a training method: an objective beside the student's ground-truth loss.

A method is configured by one recipe section (its config dataclass), asks the detector for what it needs
(a :class:`~kd_detr.models.DetectorRequest`), and returns unweighted loss terms whose weights are in
:attr:`Method.weight_dict`. The modules it trains (projections, auxiliary FFNs, heads) live in the method,
never in the detector, so checkpoints and exports stay plain detectors; the trainer optimises their
parameters with the transformer's learning rate, saves their state with the training state and averages
their gradients across DDP ranks (:meth:`Method.trainable_modules`).

Register a method with :func:`~kd_detr.methods.registry.register_method`; see docs/architecture.md
("Adding a method").
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, Optional, Sequence

from torch import Tensor, nn

from kd_detr.models import DetectorRequest
from kd_detr.teacher import TeacherOutputs

__all__ = ["Method"]


class Method(nn.Module, abc.ABC):
    """Base class. Subclasses are registered under their recipe section and implement :meth:`forward`.

    Class attributes (set by :func:`~kd_detr.methods.registry.register_method`): ``section`` (the recipe
    section, e.g. ``"ms_detr"``), ``config_class`` (its dataclass). ``uses_teacher``: the method needs
    teacher outputs (then :meth:`teacher_attention` says which attention maps).

    Loss names must be unique across methods: ``<section>.<term>.l<layer>`` (e.g. ``ms_detr.loss_ce.l3``).
    """

    section: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    uses_teacher: ClassVar[bool] = False
    weight_dict: dict[str, float]

    @classmethod
    def build(cls, cfg: Any, student: Any, criterion: nn.Module, teacher: Any = None) -> "Method":
        """The method for a run: ``cfg`` its recipe section, ``student``/``teacher`` the detectors' configs
        (``teacher`` ``None`` without a teacher), ``criterion`` the student's ground-truth criterion."""
        return cls(cfg, student, criterion)

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        """The student :data:`~kd_detr.models.detector.CAPABILITIES` the method needs with config ``cfg``
        (checked against ``student.supports`` before the method is built)."""
        return frozenset()

    @staticmethod
    def enabled(cfg: Any) -> bool:
        """Whether the recipe section switches the method on."""
        return bool(getattr(cfg, "enabled", False))

    def request(self, teacher: Optional[TeacherOutputs] = None) -> DetectorRequest:
        """What the student's forward must return for this method (given this batch's teacher outputs)."""
        return DetectorRequest()

    def teacher_attention(self) -> str:
        """Attention maps wanted from the teacher: ``per_head`` | ``mean`` | ``none``."""
        return "none"

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules trained beside the student, by the name their state is saved under."""
        return {f"objective.{self.section}": self}

    def loss(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
             teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        """The trainer's call: unweighted terms of one batch (see :meth:`forward`)."""
        return self(model, outputs, targets, num_boxes)

    @abc.abstractmethod
    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict],
                num_boxes: float) -> dict[str, Tensor]:
        """Unweighted loss terms of one batch.

        Args:
            model: the (unwrapped) student detector, e.g. for its shared heads or a ``decode`` pass.
            outputs: the student's outputs for the batch (float32), with what :meth:`request` asked.
            targets: ground truth (``labels [N]``, ``boxes [N,4]`` normalised cxcywh).
            num_boxes: the GT normaliser of the batch (all-reduced across ranks).
        """
