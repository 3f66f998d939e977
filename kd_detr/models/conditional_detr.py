"""ConditionalDETR: backbone + input projection + conditional transformer + shared heads.

State-dict names equal the official ``ConditionalDETR`` module except the backbone prefix:
ours ``backbone.body.*`` <-> official ``backbone.0.body.*`` (the official ``backbone`` is a
``Joiner(backbone, position_embedding)`` sequential; our position encoding is a separate
parameter-free module). See :mod:`kd_detr.models.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .detector import DetectorOutput, DetectorRequest
from .position_encoding import PositionEmbeddingSine
from .config import ModelConfig
from .transformer import MLP, Transformer

__all__ = ["ConditionalDETR", "inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with both terms clamped at ``eps`` (official ``util.misc.inverse_sigmoid``)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class ConditionalDETR(nn.Module):
    """Conditional DETR (Meng et al., ICCV 2021), architecture identical to the official code.

    Build with :func:`kd_detr.models.build_model`; ``model.config`` is the resolved
    :class:`ModelConfig`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config = dataclasses.replace(config).validate()
        if config.freeze_stem is None:
            config.freeze_stem = config.backbone_norm == "frozen_bn"
        self.config = config
        d = config.d_model
        # Construction order follows the official build (backbone, transformer, heads) so that a
        # given seed consumes the RNG in the same order; registration order below follows the
        # official module order so state dicts list keys in the official order.
        backbone = Backbone(config.backbone, config.dilation, config.backbone_norm, config.gn_groups,
                            freeze_stem=config.freeze_stem, train_backbone=config.train_backbone)
        transformer = Transformer(d, config.nheads, config.enc_layers, config.dec_layers,
                                  config.dim_feedforward, config.dropout, config.activation,
                                  config.pe_temperature)
        class_embed = nn.Linear(d, config.num_classes)
        bbox_embed = MLP(d, d, 4, 3)
        query_embed = nn.Embedding(config.num_queries, d)
        input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)

        self.num_queries = config.num_queries
        self.transformer = transformer
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.query_embed = query_embed
        self.input_proj = input_proj
        self.backbone = backbone
        self.position_embedding = PositionEmbeddingSine(d // 2, config.pe_temperature, normalize=True)

        # Focal-loss prior: every class starts at probability 0.01.
        prior_prob = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        # Boxes start at the reference points (zero offset, w = h = 0.5).
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def hidden_dim(self) -> int:
        return self.config.d_model

    def _heads(self, hs: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """``hs [L,B,N,d]``, ``reference [B,N,2]`` -> ``(logits [L,B,N,C], boxes [L,B,N,4])``."""
        logits = self.class_embed(hs)
        tmp = self.bbox_embed(hs)
        # The box head predicts an offset of (cx, cy) from the reference point in logit space.
        tmp[..., :2] += inverse_sigmoid(reference)
        return logits, tmp.sigmoid()

    def learned_queries(self) -> Tensor:
        """``[Q,d]`` the object queries (``query_embed``): what Fixed Matching hands to a student."""
        return self.query_embed.weight

    def heads(self, hs: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        """The shared class and box heads on decoder features: ``hs [...,B,N,d]``, ``reference [B,N,2]``
        -> ``(logits [...,B,N,C], boxes [...,B,N,4])`` (boxes offset from the reference points)."""
        return self._heads(hs, reference)

    @staticmethod
    def _pack(logits: Tensor, boxes: Tensor, hs: Tensor, reference: Tensor) -> DetectorOutput:
        return DetectorOutput({
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
            "hs": hs,
            "reference_points": reference,
        })

    def forward(self, images: Tensor, mask: Optional[Tensor] = None,
                request: Optional[DetectorRequest] = None) -> DetectorOutput:
        """Run the detector (the :class:`~kd_detr.models.detector.Detector` contract).

        Args:
            images: ``[B,3,H,W]`` normalised, zero-padded bottom/right.
            mask: ``[B,H,W]`` bool, True at padding (``None``: no padding).
            request: what to return beyond the predictions (:class:`DetectorRequest`):
                ``query_groups``: extra query groups, each a dict with ``query_pos`` ``[N,d]`` or ``[B,N,d]``,
                optional ``query_content [B,N,d]`` (default zeros) and optional ``reference_points [B,N,2]``
                in sigmoid space (default ``sigmoid(ref_point_head(query_pos))``); groups share all decoder
                weights and decoder self-attention runs only within a group. ``attention``: the decoder
                attention maps (memory: ``L*B*H*Q*S`` floats). ``memory``: the encoder output ``encoded =
                {"memory" [S,B,d], "memory_mask" [B,S], "pos_embed" [S,B,d], "feature_size"}`` (for
                :meth:`decode` and auxiliary heads). ``features``: the encoder memory as one map,
                ``features = [[B,d,h,w]]``, ``feature_strides = (stride,)``, ``feature_masks = [[B,h,w]]``
                (True = pad), for feature distillation. ``candidates``: ``candidates [L,B,Q,d]``, each decoder
                layer's features after cross-attention, before the FFN (per group too), for one-to-many
                supervision.

        Returns a :class:`DetectorOutput` (``L`` decoder layers, ``Q`` queries, ``S = h*w`` C5 tokens):
            ``pred_logits [B,Q,C]``, ``pred_boxes [B,Q,4]`` (sigmoid cxcywh) of the last layer;
            ``aux_outputs``: ``L-1`` dicts for layers ``0..L-2``; ``hs [L,B,Q,d]`` normed decoder
            outputs; ``reference_points [B,Q,2]``; ``query_embed [Q,d]``; ``feature_size (h, w)``;
            ``memory_mask [B,S]`` True = pad; with ``attention``: ``self_attn [L,B,H,Q,Q]`` and
            ``cross_attn [L,B,H,Q,S]`` (per head, pre-dropout probabilities); with ``query_groups``:
            ``groups``, one dict per group with ``pred_logits``, ``pred_boxes``, ``aux_outputs``, ``hs``,
            ``reference_points``, ``feature_size``, ``memory_mask`` (+ attention maps).
        """
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W], got {list(images.shape)}")
        if mask is None:
            mask = torch.zeros(images.shape[0], images.shape[2], images.shape[3],
                               dtype=torch.bool, device=images.device)
        elif mask.shape != (images.shape[0], images.shape[2], images.shape[3]) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {[images.shape[0], *images.shape[2:]]}, "
                             f"got {mask.dtype} {list(mask.shape)}")
        request = request or DetectorRequest()
        features, fmask = self.backbone(images, mask)
        pos = self.position_embedding(fmask).to(features.dtype)
        t = self.transformer(self.input_proj(features), fmask, self.query_embed.weight, pos,
                             extra_groups=request.query_groups, return_attn=request.attention,
                             return_memory=request.memory or request.features,
                             return_candidates=request.candidates)
        feature_size = (int(features.shape[-2]), int(features.shape[-1]))
        out = self._outputs(t, request.attention, feature_size)
        if request.memory:
            out["encoded"] = {"memory": t["memory"], "memory_mask": t["memory_mask"], "pos_embed": t["pos_embed"],
                              "feature_size": feature_size}
        if request.features:  # the encoder memory [S,B,d] as one [B,d,h,w] map on the C5 grid
            h, w = feature_size
            out["features"] = [t["memory"].permute(1, 2, 0).reshape(images.shape[0], -1, h, w)]
            out["feature_strides"] = (int(self.config.stride),)
            out["feature_masks"] = [t["memory_mask"].reshape(-1, h, w)]
        out["query_embed"] = self.query_embed.weight
        return out

    def decode(self, encoded: dict[str, Any], groups: Sequence[dict[str, Tensor]],
               request: Optional[DetectorRequest] = None) -> list[DetectorOutput]:
        """A decoder pass of query ``groups`` only (no primary queries) on an encoder output from
        ``forward(..., request=DetectorRequest(memory=True))["encoded"]``; e.g. Co-DETR's positive queries.
        ``request``: ``attention`` and ``candidates`` as in :meth:`forward`.

        Returns one :class:`DetectorOutput` per group, as ``forward``'s ``groups`` entries.
        """
        request = request or DetectorRequest()
        t = self.transformer.decode(encoded["memory"], encoded["memory_mask"], encoded["pos_embed"], None,
                                    extra_groups=groups, return_attn=request.attention,
                                    return_candidates=request.candidates)
        out = self._outputs(t, request.attention, encoded["feature_size"])
        if len(groups) == 1:
            return [out]
        return [DetectorOutput({k: v for k, v in out.items() if k != "groups"}), *out["groups"]]

    def output_norm(self, x: Tensor) -> Tensor:
        """The decoder's final LayerNorm, which every decoder output goes through before the heads."""
        return self.transformer.decoder.norm(x)

    def _outputs(self, t: dict[str, Any], return_attn: bool, feature_size: tuple[int, int]) -> DetectorOutput:
        """Heads on the decoder output of :meth:`Transformer.decode`, split into query groups."""
        logits, boxes = self._heads(t["hs"], t["reference_points"])
        sizes = t["group_sizes"]
        cands = t.get("candidates")

        if len(sizes) == 1:
            out = self._pack(logits, boxes, t["hs"], t["reference_points"])
            if return_attn:
                out["self_attn"] = t["self_attn"][0]
                out["cross_attn"] = t["cross_attn"]
            if cands is not None:
                out["candidates"] = cands
        else:
            per_group = [
                self._pack(lg, bx, h, r)
                for lg, bx, h, r in zip(logits.split(sizes, dim=2), boxes.split(sizes, dim=2),
                                        t["hs"].split(sizes, dim=2), t["reference_points"].split(sizes, dim=1))
            ]
            if return_attn:
                for g, ca in enumerate(t["cross_attn"].split(sizes, dim=3)):
                    per_group[g]["self_attn"] = t["self_attn"][g]
                    per_group[g]["cross_attn"] = ca
            if cands is not None:
                for g, c in enumerate(cands.split(sizes, dim=2)):
                    per_group[g]["candidates"] = c
            for g in per_group[1:]:
                g["feature_size"] = feature_size
                g["memory_mask"] = t["memory_mask"]
            out = per_group[0]
            out["groups"] = per_group[1:]
        out["feature_size"] = feature_size
        out["memory_mask"] = t["memory_mask"]
        return out
