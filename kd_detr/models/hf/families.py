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
        queries: ``(model, hf_config dict) -> [Q,d]`` the family's static learned object queries, the part that
            plays Conditional DETR's positional queries; ``None``: the family has none.
        dynamic_queries: ``(hf_config dict) -> reason or None``: why this configuration has no static
            ``[Q,d]`` queries (``None``: it has them), named when Fixed Matching is refused.
        count_queries: ``(hf_config dict) -> Q``, the queries the model outputs at inference (default
            ``num_queries``; DAB-DETR's pattern copies, two-stage Deformable DETR's proposals).
        summed_loss: the family's ``loss_dict`` terms are already weighted (``loss = sum(loss_dict)``);
            else ``loss = sum(w_k * loss_dict[k])`` with DETR's weight dict (``loss_weights``).
        layers: ``(model, base_output, output, training, captured) -> LayerOutputs``; ``captured["layers"]``
            holds the outputs of the modules ``layer_modules(model)`` names (forward hooks), when it names any.
        layer_modules: modules whose outputs a family's ``layers`` needs (DETR: each decoder layer).
        all_layers_in_eval: a context manager factory ``(model) -> ctx`` under which an eval-mode forward
            emits every layer (D-FINE emits only ``eval_idx`` otherwise); it must not turn dropout on.
        group_queries: training runs extra query groups (LW-DETR's Group DETR): keep the first
            ``num_queries``, the group inference runs.
        pad_multiple: ``(transformers config) -> m``: a mask family whose backbone needs the padded height and
            width to be multiples of ``m`` (a windowed ViT splits the patch grid into equal windows); the
            adapter pads the batch further, as masked padding.
        features: ``(model, captured) -> [(map [B,C,h,w], valid [B,h,w] bool | None), ...]``: the encoder's
            output maps, highest resolution first (``valid`` True inside the image, ``None``: everywhere), read
            from ``captured["encoder"] = (kwargs, output)`` (a hook on ``model.model.encoder``) or
            ``captured["features"]`` (the backbone's output); ``None``: the family has none to give
            (``DetectorRequest(features=True)`` is then refused by name).
        feature_levels: ``(hf_config dict) -> n``, how many maps ``features`` gives.
        feature_width: ``(hf_config dict) -> C``, their width (``None``: ``d_model``).
    """

    key: str
    model_type: str
    hf_class: str
    softmax: bool
    pixel_mask: bool
    imagenet_norm: bool
    dense_attention: bool
    summed_loss: bool
    layers: Callable[..., LayerOutputs]
    default_input_size: Optional[int] = None
    layer_modules: Optional[Callable[[Any], list]] = None
    all_layers_in_eval: Optional[Callable[[Any], Any]] = None
    group_queries: bool = False
    pad_multiple: Optional[Callable[[Any], int]] = None
    loss_weights: Optional[Callable[[Any], dict[str, float]]] = None
    queries: Optional[Callable[[Any, dict], Tensor]] = None
    dynamic_queries: Callable[[dict], Optional[str]] = (
        lambda cfg: "its queries are the encoder's top-k tokens of each image (no learned [Q,d] queries)")
    count_queries: Callable[[dict], int] = lambda cfg: _num_queries(cfg)
    features: Optional[Callable[[Any, dict], list]] = None
    feature_levels: Callable[[dict], int] = lambda cfg: 1
    feature_width: Optional[Callable[[dict], int]] = None
    note: str = ""

    @property
    def supports(self) -> frozenset[str]:
        # the HF families run their own decoder: no injected query groups, candidates, memory, shared heads,
        # output norm or decode() (kd_detr.models.detector.CAPABILITIES); their encoder output maps where a
        # reader gives them (``features``)
        return frozenset(({"attention"} if self.dense_attention else set())
                         | ({"features"} if self.features is not None else set()))


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


# ---------------------------------------------------------------------------- object queries
def _num_queries(cfg: dict) -> int:
    return int(cfg["num_queries"]) if cfg.get("num_queries") is not None else 300


def _static_queries(cfg: dict) -> Optional[str]:
    return None


def _embedding_queries(model: Any, cfg: dict) -> Tensor:
    """DETR / Conditional DETR: ``query_position_embeddings [Q,d]``, positional queries added in every decoder
    layer to content queries that start at zero, as kd-detr's Conditional DETR student's are."""
    return model.model.query_position_embeddings.weight


def _deformable_dynamic(cfg: dict) -> Optional[str]:
    if cfg.get("two_stage"):
        return ("two_stage = true: its queries are chosen per image from the encoder's top-scoring proposals "
                "(no learned [Q,d] queries)")
    return None


def _deformable_queries(model: Any, cfg: dict) -> Tensor:
    """Single-stage Deformable DETR: ``query_position_embeddings [Q,2d]`` is split by transformers into
    ``(query_pos, target)``, in that order. ``query_pos [Q,d]`` gives the reference points (a linear layer) and is
    added to the queries in every decoder layer: the role of Conditional DETR's positional queries (its
    reference points come from them through ``ref_point_head``), so it is what Fixed Matching hands over.
    ``target`` is a learned content query; Conditional DETR's content queries start at zero, so it has no
    place in the student's decoder."""
    d = int(cfg.get("d_model") or model.config.d_model)
    return model.model.query_position_embeddings.weight[:, :d]


def _deformable_count(cfg: dict) -> int:
    if cfg.get("two_stage"):  # the decoder runs on the top-k proposals, not on num_queries embeddings
        k = cfg.get("two_stage_num_proposals")
        return int(k) if k is not None else 300
    return _num_queries(cfg)


def _dab_dynamic(cfg: dict) -> Optional[str]:
    return ("its queries are learned 4-d anchor boxes (query_refpoint_embeddings [Q,4]) whose positional "
            "embeddings are recomputed from the refined boxes in every layer, not [Q,d] embeddings")


def _dab_count(cfg: dict) -> int:
    # num_patterns > 0 runs every anchor once per pattern (DAB-DETR's "anchor x pattern" queries)
    patterns = cfg.get("num_patterns") or 0
    patterns = patterns if isinstance(patterns, int) else 0  # transformers treats a non-int as 0 as well
    return _num_queries(cfg) * patterns if patterns > 0 else _num_queries(cfg)


def _group_dynamic(cfg: dict) -> Optional[str]:
    return ("its queries' reference boxes are the encoder's top-k proposals of each image (two-stage; no "
            "learned [Q,d] queries)")


# ---------------------------------------------------------------------------- encoder output maps
def map_mask_pairs(obj: Any) -> list[tuple[Tensor, Tensor]]:
    """Every ``(map [B,C,h,w], mask [B,h,w] bool)`` pair in a backbone's output (nested lists / tuples), in
    order: what DETR-style backbones return per level (the mask True inside the image)."""
    if isinstance(obj, (list, tuple)):
        if (len(obj) == 2 and torch.is_tensor(obj[0]) and torch.is_tensor(obj[1]) and obj[0].dim() == 4
                and obj[1].dim() == 3 and obj[1].dtype == torch.bool):
            return [(obj[0], obj[1])]
        return [p for o in obj for p in map_mask_pairs(o)]
    return []


def _flat_encoder_features(model: Any, captured: dict) -> list:
    """DETR, Conditional, DAB and Deformable DETR: the encoder's ``last_hidden_state [B,S,d]`` over its levels'
    tokens, cut back into ``[B,d,h,w]`` maps (the levels' shapes: the encoder's ``spatial_shapes_list``, else the
    backbone's C5 map) with the encoder's ``attention_mask [B,S]`` (True inside the image)."""
    kwargs, output = captured["encoder"]
    tokens = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    shapes = kwargs.get("spatial_shapes_list")
    if shapes is None:
        pairs = map_mask_pairs(captured.get("features"))
        shapes = [tuple(pairs[-1][0].shape[-2:])]
    valid = kwargs.get("attention_mask")
    b, _, d = tokens.shape
    out, start = [], 0
    for h, w in ((int(h), int(w)) for h, w in shapes):
        level = tokens[:, start:start + h * w]
        mask = valid[:, start:start + h * w].reshape(b, h, w).bool() if valid is not None else None
        out.append((level.transpose(1, 2).reshape(b, d, h, w), mask))
        start += h * w
    if start != tokens.shape[1]:
        raise ValueError(f"the encoder's {tokens.shape[1]} tokens are not its levels' {shapes}")
    return out


def _hybrid_encoder_features(model: Any, captured: dict) -> list:
    """RT-DETR, RT-DETRv2, D-FINE, DEIMv2: the hybrid encoder's output maps ``[B,C,h,w]`` (strides 8/16/32 of
    the square input: every position lies inside the image)."""
    _, output = captured["encoder"]
    maps = getattr(output, "last_hidden_state", None)
    if maps is None:
        maps = getattr(output, "feature_maps", None)
    if maps is None:
        maps = output[0]
    return [(m, None) for m in maps]


def _projector_features(model: Any, captured: dict) -> list:
    """LW-DETR, RF-DETR: no transformer encoder; their ViT encoder and multi-scale projector (the backbone
    module) give the ``[B,d,h,w]`` maps the decoder reads, with their masks."""
    return [(m, mask.bool()) for m, mask in map_mask_pairs(captured.get("features"))]


def _hybrid_levels(cfg: dict) -> int:
    return len(cfg.get("encoder_in_channels") or cfg.get("feat_strides") or (0, 0, 0))


def _hybrid_width(cfg: dict) -> int:
    return int(cfg["encoder_hidden_dim"])


def _deformable_levels(cfg: dict) -> int:
    return int(cfg.get("num_feature_levels") or 4)


def _projector_levels(cfg: dict) -> int:
    return len(cfg.get("projector_scale_factors") or ()) or int(cfg.get("num_feature_levels") or 1)


_FLAT = dict(features=_flat_encoder_features)
_HYBRID = dict(features=_hybrid_encoder_features, feature_levels=_hybrid_levels, feature_width=_hybrid_width)
_PROJECTOR = dict(features=_projector_features, feature_levels=_projector_levels)


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


def group_detr_loss_weights(config: Any) -> dict[str, float]:
    """LW-DETR / RF-DETR: class, box and GIoU coefficients, per auxiliary layer and for the encoder's
    proposals (``_enc``)."""
    base = {"loss_ce": float(config.class_loss_coefficient), "loss_bbox": float(config.bbox_loss_coefficient),
            "loss_giou": float(config.giou_loss_coefficient)}
    weights = dict(base)
    for i in range(config.decoder_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    weights.update({f"{k}_enc": v for k, v in list(weights.items())})
    return weights


# ---------------------------------------------------------------------------- per-layer readers
def _inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _decoder_layers(model: Any) -> list:
    return list(model.model.decoder.layers)


def _normed_layers(model: Any, base: Any, captured: dict) -> Tensor:
    """``[L,B,Q,d]``: every decoder layer's output through the decoder's final norm, as the official DETR
    code reads them. transformers 5.x with ``auxiliary_loss`` also feeds the normed output to the next
    layer (its own forward, kept as it is), so layers ``< L-1`` are ``norm(layer output)`` either way and
    the last is the model's own ``last_hidden_state``."""
    norm = model.model.decoder.layernorm
    outs = [o[0] if isinstance(o, tuple) else o for o in captured["layers"]]
    return torch.stack([norm(h) for h in outs[:-1]] + [base.last_hidden_state])


def _detr_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    hs = _normed_layers(model, base, captured)
    logits = model.class_labels_classifier(hs)
    boxes = model.bbox_predictor(hs).sigmoid()
    return LayerOutputs(logits, boxes)  # DETR has no reference points


def _conditional_detr_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    hs = _normed_layers(model, base, captured)
    reference = base.reference_points.transpose(0, 1)  # [Q,B,2] -> [B,Q,2], shared by every layer
    logits = model.class_labels_classifier(hs)
    tmp = model.bbox_predictor(hs)
    tmp = torch.cat([tmp[..., :2] + _inverse_sigmoid(reference), tmp[..., 2:]], -1)
    return LayerOutputs(logits, tmp.sigmoid(), reference_points=reference)


def _dab_detr_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    hs = base.intermediate_hidden_states  # [L,B,Q,d]
    anchors = base.reference_points  # [L,B,Q,4]: the anchor each layer starts from
    logits = model.class_embed(hs)
    boxes = (model.bbox_predictor(hs) + _inverse_sigmoid(anchors)).sigmoid()
    return LayerOutputs(logits, boxes, reference_points=anchors[0, ..., :2])


def _deformable_detr_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    hs = base.intermediate_hidden_states  # [B,L,Q,d]
    init, inter = base.init_reference_points, base.intermediate_reference_points
    logits, boxes = [], []
    for level in range(hs.shape[1]):
        reference = _inverse_sigmoid(init if level == 0 else inter[:, level - 1])
        logits.append(model.class_embed[level](hs[:, level]))
        delta = model.bbox_embed[level](hs[:, level])
        if reference.shape[-1] == 4:
            delta = delta + reference
        else:
            delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
        boxes.append(delta.sigmoid())
    return LayerOutputs(torch.stack(logits), torch.stack(boxes), reference_points=init[..., :2])


def _dn_split(base: Any, training: bool) -> int:
    meta = getattr(base, "denoising_meta_values", None)
    return int(meta["dn_num_split"][0]) if (training and meta is not None) else 0  # denoising queries come first


def _rt_detr_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    dn = _dn_split(base, training)
    logits = base.intermediate_logits.transpose(0, 1)[:, :, dn:]  # [B,L,N,C] -> [L,B,Q,C]
    boxes = base.intermediate_reference_points.transpose(0, 1)[:, :, dn:]
    init = getattr(base, "initial_reference_points", None)
    ref = init[:, dn:, :2] if init is not None and init.dim() == 3 else boxes[0, ..., :2]
    return LayerOutputs(logits, boxes, reference_points=ref.detach(), dn_queries=dn)


def _d_fine_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    # index 0 is the "pre" prediction (pre_bbox_head, before the first layer's refinement); 1..L the layers
    dn = _dn_split(base, training)
    logits = base.intermediate_logits[:, 1:, dn:].transpose(0, 1)
    boxes = base.intermediate_reference_points[:, 1:, dn:].transpose(0, 1)
    ref = base.intermediate_reference_points[:, 0, dn:, :2]
    return LayerOutputs(logits, boxes, reference_points=ref.detach(), dn_queries=dn)


class _DecoderEmitsAllLayers:
    """D-FINE / DEIMv2 gate their per-layer heads on the decoder's own ``training`` flag: setting that one
    attribute (not ``.train()``, which would reach the dropouts) makes an eval pass emit every layer."""

    def __init__(self, model: Any):
        self.decoder = model.model.decoder

    def __enter__(self):
        self.old = self.decoder.training
        self.decoder.training = True

    def __exit__(self, *exc):
        self.decoder.training = self.old


def _group_detr_layers(model: Any, base: Any, out: Any, training: bool, captured: dict) -> LayerOutputs:
    import importlib

    refine = importlib.import_module(type(model).__module__).refine_bboxes
    q = model.config.num_queries
    hs = base.intermediate_hidden_states[:, :, :q]  # [L,B,Q*G,d]: group 0 is the one inference runs
    ref = base.intermediate_reference_points[-1][:, :q]  # [B,Q,4], fixed across layers
    logits = model.class_embed(hs)
    boxes = refine(ref, model.bbox_embed(hs))
    extra = base.intermediate_hidden_states.shape[2] - q
    return LayerOutputs(logits, boxes, reference_points=ref[..., :2].detach(), dn_queries=extra)


def _lw_detr_windows(config: Any) -> int:
    """LW-DETR's ViT: ``num_windows`` windows in a square grid of patches."""
    vit = config.backbone_config
    return int(vit.patch_size) * int(vit.num_windows_side)


def _rf_detr_windows(config: Any) -> int:
    """RF-DETR's DINOv2: ``num_windows`` windows per side of the patch grid."""
    vit = config.backbone_config
    return int(vit.patch_size) * max(1, int(vit.num_windows))


_MASKED = dict(pixel_mask=True, imagenet_norm=True)
_FIXED_640 = dict(pixel_mask=False, imagenet_norm=False, default_input_size=640)

register_family(Family(
    key="detr", model_type="detr", hf_class="DetrForObjectDetection", softmax=True, dense_attention=True,
    queries=_embedding_queries, dynamic_queries=_static_queries, summed_loss=False, layers=_detr_layers,
    layer_modules=_decoder_layers,
    loss_weights=detr_loss_weights, note="softmax + no-object; decoder layers hooked, its heads applied", **_FLAT,
    **_MASKED))
register_family(Family(
    key="conditional_detr", model_type="conditional_detr", hf_class="ConditionalDetrForObjectDetection",
    softmax=False, dense_attention=True, summed_loss=False, layers=_conditional_detr_layers,
    queries=_embedding_queries, dynamic_queries=_static_queries,
    layer_modules=_decoder_layers, loss_weights=detr_loss_weights,
    note="decoder layers hooked; heads with the shared 2-d reference points", **_FLAT, **_MASKED))
register_family(Family(
    key="dab_detr", model_type="dab-detr", hf_class="DabDetrForObjectDetection", softmax=False,
    dense_attention=True, summed_loss=False, layers=_dab_detr_layers, dynamic_queries=_dab_dynamic,
    count_queries=_dab_count,
    loss_weights=detr_loss_weights, note="intermediate_hidden_states + per-layer 4-d anchors", **_FLAT, **_MASKED))
register_family(Family(
    key="deformable_detr", model_type="deformable_detr", hf_class="DeformableDetrForObjectDetection",
    softmax=False, dense_attention=False, summed_loss=False, layers=_deformable_detr_layers,
    queries=_deformable_queries, dynamic_queries=_deformable_dynamic, count_queries=_deformable_count,
    loss_weights=detr_loss_weights, note="per-layer class_embed/bbox_embed on intermediate_hidden_states",
    features=_flat_encoder_features, feature_levels=_deformable_levels, **_MASKED))
register_family(Family(
    key="rt_detr", model_type="rt_detr", hf_class="RTDetrForObjectDetection", softmax=False, dense_attention=False,
    summed_loss=True, layers=_rt_detr_layers,
    note="intermediate_logits / intermediate_reference_points; denoising queries cut", **_HYBRID, **_FIXED_640))
register_family(Family(
    key="rt_detr_v2", model_type="rt_detr_v2", hf_class="RTDetrV2ForObjectDetection", softmax=False,
    dense_attention=False, summed_loss=True, layers=_rt_detr_layers, note="as RT-DETR",
    **_HYBRID, **_FIXED_640))
register_family(Family(
    key="d_fine", model_type="d_fine", hf_class="DFineForObjectDetection", softmax=False, dense_attention=False,
    summed_loss=True, layers=_d_fine_layers, all_layers_in_eval=_DecoderEmitsAllLayers,
    note="every layer in eval through the decoder's own training flag; denoising queries cut", **_HYBRID,
    **_FIXED_640))
register_family(Family(
    key="deimv2", model_type="deimv2", hf_class="Deimv2ForObjectDetection", softmax=False, dense_attention=False,
    summed_loss=True, layers=_d_fine_layers, all_layers_in_eval=_DecoderEmitsAllLayers,
    note="as D-FINE", **_HYBRID, **_FIXED_640))
register_family(Family(
    key="lw_detr", model_type="lw_detr", hf_class="LwDetrForObjectDetection", softmax=False, dense_attention=False,
    summed_loss=False, layers=_group_detr_layers, loss_weights=group_detr_loss_weights,
    group_queries=True, dynamic_queries=_group_dynamic, pad_multiple=_lw_detr_windows,
    note="Group DETR groups in training: group 0 kept; batch padded to whole windows", **_PROJECTOR, **_MASKED))
register_family(Family(
    key="rf_detr", model_type="rf_detr", hf_class="RfDetrForObjectDetection", softmax=False, dense_attention=False,
    summed_loss=False, layers=_group_detr_layers, loss_weights=group_detr_loss_weights,
    group_queries=True, dynamic_queries=_group_dynamic, pad_multiple=_rf_detr_windows, note="as LW-DETR",
    **_PROJECTOR, **_MASKED))
