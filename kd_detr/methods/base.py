"""The base type of a training method: an objective beside the student's ground-truth loss.

A method is configured by one recipe section (its config dataclass), asks the detector for what it needs
(a :class:`~kd_detr.models.DetectorRequest`), and returns unweighted loss terms whose weights are in
:attr:`Method.weight_dict`. The modules it trains (projections, auxiliary FFNs, heads) live in the method,
never in the detector, so checkpoints and exports stay plain detectors; the trainer optimises their
parameters with the transformer's learning rate, saves their state with the training state and averages
their gradients across DDP ranks (:meth:`Method.trainable_modules`).

**One call for every method**: ``method(model, outputs, targets, num_boxes, teacher)`` (:meth:`Method.forward`),
with or without a teacher; a method that distils reads ``teacher``, the others ignore it.

**Log groups are declared, not parsed from the terms' names.** Each term a method returns has a
:class:`TermGroup` (:meth:`Method.term_groups`): the method's *group*, whose ``<group>.total`` in the logs
is the method's whole weighted objective (the key ``kd-detr compare`` plots for ``distill``); a *subgroup*,
the log key of a partial sum (the term over the decoder layers, ``distill.adaptive.self_attn``; one head's
terms, ``co_detr.atss``); and optionally a named *part* of the objective, logged as ``<part>.total`` too
(D3ETR's auxiliary-group ground-truth loss, ``fixed_gt.total``, inside ``distill.total``). A method
declares a term and its weight together with :meth:`Method.add_term`; a weight put in :attr:`weight_dict`
directly counts in the method's group, as its own subgroup. :func:`~kd_detr.engine.step.batch_losses`
hands the groups on with the weights (:class:`TermWeights`), and
:func:`~kd_detr.engine.loss_logs.loss_logs` sums by them.

Register a method with :func:`~kd_detr.methods.registry.register_method`; see docs/architecture.md
("Adding a method").
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, NamedTuple, Optional, Sequence

from torch import Tensor, nn

from kd_detr.models import DetectorRequest
from kd_detr.teacher import TeacherOutputs

__all__ = ["Method", "TermGroup", "TermWeights"]


class TermGroup(NamedTuple):
    """Where one loss term is summed in the logs.

    ``group``: the method's objective; ``<group>.total`` sums every term of the method (weighted).
    ``subgroup``: the log key of a partial sum the term adds to (e.g. the term over the decoder layers,
    ``distill.adaptive.self_attn`` for ``distill.adaptive.self_attn.l0``); the term's own name for none.
    ``part``: a named part of the objective, also logged as ``<part>.total`` (``None``: none).
    """

    group: str
    subgroup: str
    part: Optional[str] = None


class TermWeights(dict):
    """The methods' weights of one step, ``{term: weight}``, with each term's :class:`TermGroup` in
    :attr:`groups` (what :func:`~kd_detr.engine.step.batch_losses` returns beside the terms)."""

    def __init__(self, weights: Mapping[str, float] = (), groups: Optional[Mapping[str, TermGroup]] = None):
        super().__init__(weights)
        self.groups: dict[str, TermGroup] = dict(groups or {})

    def add(self, method: "Method") -> None:
        """Add a method's weights and term groups."""
        self.update(method.weight_dict)
        self.groups.update(method.term_groups())


class Method(nn.Module, abc.ABC):
    """Base class. Subclasses are registered under their recipe section and implement :meth:`forward`.

    Class attributes (set by :func:`~kd_detr.methods.registry.register_method`): ``section`` (the recipe
    section, e.g. ``"ms_detr"``), ``config_class`` (its dataclass). ``uses_teacher``: the method needs
    teacher outputs (then :meth:`teacher_attention` says which attention maps and :meth:`teacher_features`
    whether it needs the teacher's encoder feature maps). ``log_group``: the group its
    terms are summed in, ``<log_group>.total`` in the logs (default ``""``: the recipe section); unique
    across methods.

    Loss names must be unique across methods: ``<section>.<term>.l<layer>`` (e.g. ``ms_detr.loss_ce.l3``).
    Subclasses call ``super().__init__()`` first and declare their terms with :meth:`add_term`.
    """

    section: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    uses_teacher: ClassVar[bool] = False
    log_group: ClassVar[str] = ""
    weight_dict: dict[str, float]

    def __init__(self) -> None:
        super().__init__()
        self.weight_dict = {}
        self._term_groups: dict[str, TermGroup] = {}

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

    @classmethod
    def group(cls) -> str:
        """The method's log group: ``<group>.total`` is its whole weighted objective."""
        return cls.log_group or cls.section

    def add_term(self, name: str, weight: float, subgroup: Optional[str] = None, part: Optional[str] = None) -> None:
        """Declare a loss term the method returns: its ``weight`` (into :attr:`weight_dict`) and its
        :class:`TermGroup` in the method's group (``subgroup``: the partial sum it adds to, default none;
        ``part``: a named part of the objective)."""
        self.weight_dict[name] = weight
        self._term_groups[name] = TermGroup(self.group(), subgroup or name, part)

    def term_groups(self) -> dict[str, TermGroup]:
        """``{term: TermGroup}`` for every term of :attr:`weight_dict`: as declared by :meth:`add_term`, else
        in the method's group as its own subgroup. So every weighted term counts in ``<group>.total``."""
        declared = self._term_groups
        return {name: declared.get(name) or TermGroup(self.group(), name) for name in self.weight_dict}

    def request(self, teacher: Optional[TeacherOutputs] = None) -> DetectorRequest:
        """What the student's forward must return for this method (given this batch's teacher outputs)."""
        return DetectorRequest()

    def teacher_attention(self) -> str:
        """Attention maps wanted from the teacher: ``per_head`` | ``mean`` | ``none``."""
        return "none"

    def teacher_features(self) -> bool:
        """Whether the teacher must also return its encoder output maps (``TeacherOutputs.features``)."""
        return False

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules trained beside the student, by the name their state is saved under."""
        return {f"objective.{self.section}": self}

    @abc.abstractmethod
    def forward(self, model: nn.Module, outputs: Mapping[str, Any], targets: Sequence[dict], num_boxes: float,
                teacher: Optional[TeacherOutputs] = None) -> dict[str, Tensor]:
        """Unweighted loss terms of one batch; the one call for every method (the trainer's, through
        :func:`~kd_detr.engine.step.batch_losses`, and the tests').

        Args:
            model: the (unwrapped) student detector, e.g. for its shared heads or a ``decode`` pass.
            outputs: the student's outputs for the batch (float32), with what :meth:`request` asked.
            targets: ground truth (``labels [N]``, ``boxes [N,4]`` normalised cxcywh).
            num_boxes: the GT normaliser of the batch (all-reduced across ranks:
                ``criterion.num_boxes(targets, device)``).
            teacher: the teacher's outputs for the same batch (``None`` without a teacher); a method with
                ``uses_teacher`` refuses ``None``, the others ignore it.
        """
