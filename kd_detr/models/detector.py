"""The detector contract: what methods, teacher sources, evaluation and export may ask of a detector.

A detector is any ``nn.Module`` with the members of :class:`Detector`; kd-detr's
:class:`~kd_detr.models.ConditionalDETR` is one. Everything above the models depends on this protocol
and on the config fields it declares, never on a concrete class, so another DETR family plugs in by
implementing it.

* **Config** (``detector.config``): ``num_classes`` (class logits ``C``), ``num_queries`` (``Q``),
  ``dec_layers`` (``L``), ``d_model`` (``d``), ``nheads`` (``H``), ``stride`` (of the map the decoder
  cross-attends to), ``feature_levels`` and ``feature_channels`` (the encoder output maps
  ``DetectorRequest(features=True)`` returns: how many, and their one width), ``dim_feedforward``,
  ``dropout``, ``activation``, ``pe_temperature`` (for methods that build decoder-shaped modules), ``supports`` (its :data:`CAPABILITIES`: the :class:`DetectorRequest` fields it
  can honour and which of ``heads``, ``output_norm``, ``decode`` below it implements).
* **Forward**: ``detector(images [B,3,H,W], mask [B,H,W] | None, request: DetectorRequest | None)``
  -> :class:`DetectorOutput`. One request argument says everything a method wants beyond the predictions.
* ``heads(hs [...,B,Q,d], reference [B,Q,2])`` -> ``(logits [...,B,Q,C], boxes [...,B,Q,4])``: the shared
  prediction heads on decoder features (one-to-many objectives reuse them).
* ``output_norm(x [...,d])``: the norm every decoder output goes through before the heads.
* ``learned_queries()`` -> ``[Q,d]``: the object queries (a teacher hands them over for Fixed Matching).
* Detectors whose ground-truth loss runs inside their forward (``own_loss = True``: the transformers
  families, whose denoising groups need the labels) take ``targets=`` in training and return their
  unweighted terms in ``family_losses`` (see :class:`~kd_detr.criterion.FamilyLossCriterion`).
* ``decode(encoded, groups, request)`` -> one :class:`DetectorOutput` per group: a decoder pass of query
  groups alone on an encoder output (``request.memory``), for methods with their own queries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CAPABILITIES", "Detector", "DetectorOutput", "DetectorRequest", "METHOD_CAPABILITIES", "REQUEST_FIELDS"]

REQUEST_FIELDS = ("attention", "query_groups", "candidates", "memory", "features")
# the detector methods beyond forward() that some training methods call on the student
METHOD_CAPABILITIES = ("heads", "output_norm", "decode")
# what ``config.supports`` may list; a method's ``requires`` is checked against it when a run is built
CAPABILITIES = REQUEST_FIELDS + METHOD_CAPABILITIES


@dataclass(frozen=True)
class DetectorRequest:
    """What a forward pass returns beyond the per-layer predictions.

    Attributes:
        attention: decoder attention maps, per head and before dropout: ``self_attn [L,B,H,Q,Q]`` and
            ``cross_attn [L,B,H,Q,S]`` (``S = h*w`` tokens of the map the decoder reads).
        query_groups: extra query groups run through the same decoder weights, with self-attention only
            within a group: each a dict with ``query_pos [N,d]`` or ``[B,N,d]``, optional ``query_content
            [B,N,d]`` and ``reference_points [B,N,2]`` (sigmoid space). Their outputs are ``groups``.
        candidates: each decoder layer's features after cross-attention, before the FFN: ``candidates [L,B,Q,d]``.
        memory: the encoder output, for :meth:`Detector.decode`: ``encoded``.
        features: the encoder's output feature maps, for feature distillation: ``features``, a list of
            ``[B,C,h,w]`` maps, highest resolution first (one width ``C = config.feature_channels``,
            ``config.feature_levels`` of them); ``feature_strides``, each map's stride in input pixels; and
            ``feature_masks``, a list of ``[B,h,w]`` bool, True outside each image's own region (padding; all
            False for families that resize each image to their square input).
    """

    attention: bool = False
    query_groups: Optional[tuple[dict[str, Tensor], ...]] = None
    candidates: bool = False
    memory: bool = False
    features: bool = False

    def __post_init__(self) -> None:
        if self.query_groups is not None and not isinstance(self.query_groups, tuple):
            object.__setattr__(self, "query_groups", tuple(self.query_groups))

    def merge(self, other: Optional["DetectorRequest"]) -> "DetectorRequest":
        """Everything either request asks for (two methods may not both bring query groups)."""
        if other is None:
            return self
        if self.query_groups is not None and other.query_groups is not None:
            raise ValueError("two methods of the recipe both run their own query groups through the detector's "
                             "forward; only one may")
        return DetectorRequest(attention=self.attention or other.attention,
                               query_groups=self.query_groups if self.query_groups is not None else other.query_groups,
                               candidates=self.candidates or other.candidates, memory=self.memory or other.memory,
                               features=self.features or other.features)

    def asked(self) -> set[str]:
        """Names of the fields set (to check them against ``config.supports``)."""
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name)}


class DetectorOutput(dict):
    """A forward pass's outputs: a dict (the names below, as DETR's criterion and the official code use)
    with typed, stacked views.

    Keys: ``pred_logits [B,Q,C]`` and ``pred_boxes [B,Q,4]`` (normalised cxcywh) of the last decoder layer;
    ``aux_outputs`` (the other ``L-1`` layers, first first); ``hs [L,B,Q,d]``; ``reference_points [B,Q,2]``;
    ``query_embed [Q,d]``; ``feature_size (h, w)``; ``memory_mask [B,S]``; on request ``self_attn``,
    ``cross_attn``, ``candidates``, ``encoded``, ``groups`` (one :class:`DetectorOutput` per query group) and
    ``features`` / ``feature_strides`` / ``feature_masks`` (:class:`DetectorRequest`).
    """

    @property
    def logits(self) -> Tensor:
        """``[L,B,Q,C]`` class logits of every decoder layer (layer 0 first)."""
        return torch.stack([o["pred_logits"] for o in self._layers()])

    @property
    def boxes(self) -> Tensor:
        """``[L,B,Q,4]`` normalised cxcywh boxes of every decoder layer."""
        return torch.stack([o["pred_boxes"] for o in self._layers()])

    @property
    def num_layers(self) -> int:
        return len(self.get("aux_outputs") or []) + 1

    @property
    def groups(self) -> list["DetectorOutput"]:
        return self.get("groups") or []

    def _layers(self) -> list[dict[str, Any]]:
        return [*(self.get("aux_outputs") or []), self]


@runtime_checkable
class Detector(Protocol):
    """The members a detector has (see the module docstring for shapes)."""

    config: Any

    def __call__(self, images: Tensor, mask: Optional[Tensor] = None,
                 request: Optional[DetectorRequest] = None) -> DetectorOutput: ...

    def heads(self, hs: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]: ...

    def output_norm(self, x: Tensor) -> Tensor: ...

    def learned_queries(self) -> Tensor: ...

    def decode(self, encoded: dict[str, Any], groups: Sequence[dict[str, Tensor]],
               request: Optional[DetectorRequest] = None) -> list[DetectorOutput]: ...
