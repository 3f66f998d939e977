"""What differs between transformers' DETR families, one :class:`Family` each, in a registry.

Each family says how to read every decoder layer's logits and boxes from its outputs (some expose them,
some only expose hidden states to which its heads are applied, as its own ``forward`` does), which
queries are denoising or training-only groups, its classification semantics, its input policy and its
loss weighting. The adapter (:mod:`kd_detr.models.hf.adapter`) is family-agnostic and asks these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["FAMILIES", "Family", "LayerOutputs", "get_family", "register_family"]


@dataclass
class LayerOutputs:
    """Every decoder layer's predictions of the matching queries.

    Attributes:
        logits: ``[L,B,Q,K]`` the family's raw class logits (``K = C + 1`` with DETR's no-object class).
        boxes: ``[L,B,Q,4]`` normalised cxcywh.
        reference_points: ``[B,Q,2]`` where the decoder's queries look first (sigmoid space), or ``None``.
        dn_queries: how many denoising / training-only queries were cut off (0 at inference).
    """

    logits: Tensor
    boxes: Tensor
    reference_points: Optional[Tensor] = None
    dn_queries: int = 0


@dataclass(frozen=True)
class Family:
    """One transformers detector family.

    Attributes:
        key: registry key (``detr``, ``rt_detr`` ...); ``model_type``: transformers' ``config.model_type``.
        hf_class: the ``*ForObjectDetection`` class name in ``transformers``.
        softmax: class scores are a softmax with a trailing no-object class (DETR); else per-class sigmoids.
        pixel_mask: the model reads a pixel mask, so padded batches are exact; otherwise each image's view is
            resized to a fixed square (``default_input_size``) as the family's image processor does.
        imagenet_norm: the family normalises pixels with ImageNet mean/std (else pixels in [0, 1]).
        dense_attention: decoder attention maps are dense ``[B,H,Q,S]`` (DETR, Conditional, DAB).
        fixed_queries: the family has learned object queries (``query_position_embeddings``).
        summed_loss: the family's ``loss_dict`` terms are already weighted (``loss = sum(loss_dict)``);
            else ``loss = sum(w_k * loss_dict[k])`` with DETR's weight dict (``loss_weights``).
        layers: ``(model, base_output, output, training) -> LayerOutputs``.
        prepare: called once on a built model (e.g. turn on the intermediate outputs a family hides).
    """

    key: str
    model_type: str
    hf_class: str
    softmax: bool
    pixel_mask: bool
    imagenet_norm: bool
    dense_attention: bool
    fixed_queries: bool
    summed_loss: bool
    layers: Callable[..., LayerOutputs]
    default_input_size: Optional[int] = None
    prepare: Optional[Callable[[Any], None]] = None
    loss_weights: Optional[Callable[[Any], dict[str, float]]] = None
    note: str = ""

    @property
    def supports(self) -> frozenset[str]:
        # the HF families run their own decoder: no injected query groups, candidates or decode()
        return frozenset({"attention"} if self.dense_attention else set())


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.key in FAMILIES:
        raise ValueError(f"family {family.key!r} is already registered")
    FAMILIES[family.key] = family
    return family


def get_family(key: str) -> Family:
    if key not in FAMILIES:
        raise ValueError(f"unknown transformers detector family {key!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[key]


def family_of_model_type(model_type: str) -> Family:
    """The family whose transformers ``model_type`` (``config.json``) is ``model_type``."""
    for f in FAMILIES.values():
        if f.model_type == model_type:
            return f
    raise ValueError(f"transformers model_type {model_type!r} is not a supported DETR family; supported: "
                     f"{sorted(f.model_type for f in FAMILIES.values())}")


# ---------------------------------------------------------------------------- weight dicts
def detr_loss_weights(config: Any) -> dict[str, float]:
    """DETR's weight dict (``ForObjectDetectionLoss``): ``loss_ce`` 1, box and GIoU coefficients, the same for
    every auxiliary layer; ``cardinality`` is logged, not weighted."""
    base = {"loss_ce": 1.0, "loss_bbox": float(config.bbox_loss_coefficient),
            "loss_giou": float(config.giou_loss_coefficient)}
    weights = dict(base)
    if config.auxiliary_loss:
        for i in range(config.decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def focal_detr_loss_weights(config: Any) -> dict[str, float]:
    """Conditional / DAB / Deformable DETR: as DETR, with ``cls_loss_coefficient`` on ``loss_ce``."""
    weights = detr_loss_weights(config)
    for k in weights:
        if k.startswith("loss_ce"):
            weights[k] = float(config.cls_loss_coefficient)
    return weights


# ---------------------------------------------------------------------------- per-layer readers
def _aux_on(model: Any) -> None:
    # DETR-style decoders keep their intermediate layers only with auxiliary_loss; turning it on changes
    # nothing in the forward's outputs (the last layer is the same), only what is kept and, with labels,
    # the loss (the auxiliary terms kd-detr trains with anyway).
    model.config.auxiliary_loss = True


def _detr_layers(model: Any, base: Any, out: Any, training: bool) -> LayerOutputs:
    hs = base.intermediate_hidden_states  # [L,B,Q,d]
    logits = model.class_labels_classifier(hs)
    boxes = model.bbox_predictor(hs).sigmoid()
    return LayerOutputs(logits, boxes, reference_points=boxes[-1, ..., :2].detach())


def _conditional_detr_layers(model: Any, base: Any, out: Any, training: bool) -> LayerOutputs:
    from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid

    hs = base.intermediate_hidden_states  # [L,B,Q,d]
    reference = base.reference_points.transpose(0, 1)  # [Q,B,2] -> [B,Q,2]
    logits = model.class_labels_classifier(hs)
    tmp = model.bbox_predictor(hs)
    tmp = torch.cat([tmp[..., :2] + inverse_sigmoid(reference), tmp[..., 2:]], -1)
    return LayerOutputs(logits, tmp.sigmoid(), reference_points=reference)


def _rt_detr_layers(model: Any, base: Any, out: Any, training: bool) -> LayerOutputs:
    logits = base.intermediate_logits.transpose(0, 1)  # [B,L,N,C] -> [L,B,N,C]
    boxes = base.intermediate_reference_points.transpose(0, 1)
    dn = 0
    meta = getattr(base, "denoising_meta_values", None)
    if training and meta is not None:
        dn = int(meta["dn_num_split"][0])  # denoising queries come first
        logits, boxes = logits[:, :, dn:], boxes[:, :, dn:]
    init = getattr(base, "initial_reference_points", None)
    ref = init[:, dn:, :2] if init is not None and init.dim() == 3 else boxes[0, ..., :2]
    return LayerOutputs(logits, boxes, reference_points=ref.detach(), dn_queries=dn)


register_family(Family(
    key="detr", model_type="detr", hf_class="DetrForObjectDetection", softmax=True, pixel_mask=True,
    imagenet_norm=True, dense_attention=True, fixed_queries=True, summed_loss=False, layers=_detr_layers,
    prepare=_aux_on, loss_weights=detr_loss_weights,
    note="softmax with a no-object class; heads applied to intermediate_hidden_states"))
register_family(Family(
    key="conditional_detr", model_type="conditional_detr", hf_class="ConditionalDetrForObjectDetection",
    softmax=False, pixel_mask=True, imagenet_norm=True, dense_attention=True, fixed_queries=True, summed_loss=False,
    layers=_conditional_detr_layers, prepare=_aux_on, loss_weights=focal_detr_loss_weights,
    note="heads applied to intermediate_hidden_states with the shared 2-d reference points"))
register_family(Family(
    key="rt_detr", model_type="rt_detr", hf_class="RTDetrForObjectDetection", softmax=False, pixel_mask=False,
    imagenet_norm=False, dense_attention=False, fixed_queries=False, summed_loss=True, layers=_rt_detr_layers,
    default_input_size=640, note="intermediate_logits / intermediate_reference_points; denoising queries cut"))
register_family(Family(
    key="rt_detr_v2", model_type="rt_detr_v2", hf_class="RTDetrV2ForObjectDetection", softmax=False,
    pixel_mask=False, imagenet_norm=False, dense_attention=False, fixed_queries=False, summed_loss=True,
    layers=_rt_detr_layers, default_input_size=640, note="as RT-DETR"))
