"""A transformers DETR-family model as a kd-detr detector: :class:`HFDetector`.

The adapter runs the family's own ``*ForObjectDetection.forward`` unchanged (its outputs, its loss, its
denoising) and reads what the detector contract needs around it:

* every decoder layer's logits and boxes (``[L,B,Q,C]``, ``[L,B,Q,4]``), read the family's way
  (:mod:`.families`), with denoising and training-only queries cut off so that the methods see only the
  queries that exist at inference;
* class logits in one semantics for every family: per-class sigmoid logits. A softmax family (DETR: ``C``
  classes plus no-object) gives ``logit(softmax(z)[:C])``, so that ``sigmoid`` of what the methods see is
  the family's own class probability and KD terms compare like with like across families; its raw logits
  stay in ``family_logits``;
* the family's image policy on the view kd-detr's data pipeline made (ImageNet-normalised, padded, with a
  mask): mask families (DETR, Conditional/DAB/Deformable DETR) take the padded batch and its pixel mask as
  is; fixed-size families (RT-DETR, D-FINE, ...) get each image's own region resized to
  ``input_size x input_size`` (boxes are relative to the image, so they do not change), in ``[0, 1]``
  without mean/std where the family has none;
* with ``targets`` in training, the family's own training loss (``family_losses``, one term per key of its
  ``loss_dict``), computed by transformers in the same forward (its matcher, focal/VFL terms, denoising).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detector import DetectorOutput, DetectorRequest
from .config import HFModelConfig
from .families import Family, get_family

__all__ = ["HFDetector", "build_transformers_model", "transformers_labels"]

_MEAN = (0.485, 0.456, 0.406)  # kd-detr's data pipeline normalises with ImageNet mean/std
_STD = (0.229, 0.224, 0.225)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the extra is installed in tests
        raise ImportError("Hugging Face detectors need transformers: pip install \"kd-detr[hf]\"") from e
    return transformers


def build_transformers_model(config: HFModelConfig) -> nn.Module:
    """The transformers model of ``config``: the folder's weights (``config.source``, local files only) or a
    random initialisation. A class head of another size than the folder's is re-initialised (fine-tuning
    to other classes), which is logged by transformers."""
    transformers = _transformers()
    family = get_family(config.family)
    cls = getattr(transformers, family.hf_class)
    hf_config = cls.config_class.from_dict(dict(config.hf_config))
    attn = "eager" if family.dense_attention else None  # attention weights come only from the eager path
    kwargs = {"attn_implementation": attn} if attn else {}
    if config.source:
        return cls.from_pretrained(config.source, config=hf_config, local_files_only=True,
                                   ignore_mismatched_sizes=True, **kwargs)
    if attn:
        hf_config._attn_implementation = attn
    return cls(hf_config)


def transformers_labels(targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """kd-detr targets (``labels [n]``, ``boxes [n,4]`` normalised cxcywh) -> transformers' ``labels``."""
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


class HFDetector(nn.Module):
    """A transformers ``*ForObjectDetection`` model under the detector contract (see the module docstring).

    Args:
        config: the :class:`HFModelConfig`.
        model: an already built transformers model (default: :func:`build_transformers_model`).
    """

    own_loss = True  # the ground-truth loss comes from the family's forward (``targets=``)

    def __init__(self, config: HFModelConfig, model: Optional[nn.Module] = None):
        super().__init__()
        self.config = config.validate()
        self.family: Family = get_family(config.family)
        self.hf = model if model is not None else build_transformers_model(config)
        self.register_buffer("_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ input policy
    @property
    def input_size(self) -> Optional[int]:
        if self.family.pixel_mask:
            return None
        return int(self.config.input_size or self.family.default_input_size)

    def pixels(self, images: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """kd-detr's batch (``images [B,3,H,W]`` ImageNet-normalised, ``mask [B,H,W]`` True = pad) -> the
        family's ``(pixel_values, pixel_mask)``."""
        x = images if self.family.imagenet_norm else images * self._std + self._mean
        if self.family.pixel_mask:
            return x, None if mask is None else (~mask).long()
        return _resize_regions(x, mask, self.input_size), None

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Optional[Tensor] = None, request: Optional[DetectorRequest] = None,
                targets: Optional[Sequence[dict[str, Tensor]]] = None) -> DetectorOutput:
        """``images [B,3,H,W]``, ``mask [B,H,W]`` -> :class:`DetectorOutput` (``targets`` in training: the
        family's own loss in ``family_losses``)."""
        request = request or DetectorRequest()
        unsupported = request.asked() - self.config.supports
        if unsupported:
            raise ValueError(f"{self.config.name} ({self.family.hf_class}) cannot return {sorted(unsupported)}"
                             + (": it has no dense attention maps (deformable attention)"
                                if "attention" in unsupported else ""))
        pixel_values, pixel_mask = self.pixels(images, mask)
        captured: dict[str, Any] = {}
        hooks = [self.hf.model.register_forward_hook(lambda m, a, o: captured.__setitem__("base", o))]
        backbone = self._backbone()
        if backbone is not None:
            hooks.append(backbone.register_forward_hook(lambda m, a, o: captured.__setitem__("features", o)))
        if self.family.layer_modules is not None:
            captured["layers"] = []
            hooks += [m.register_forward_hook(lambda m, a, o: captured["layers"].append(o))
                      for m in self.family.layer_modules(self.hf)]
        kwargs: dict[str, Any] = {}
        if request.attention:
            kwargs["output_attentions"] = True
        labels = transformers_labels(targets) if (targets is not None and self.training) else None
        every_layer = (self.family.all_layers_in_eval(self.hf) if (self.family.all_layers_in_eval and not self.training)
                       else contextlib.nullcontext())
        try:
            with every_layer:
                out = self.hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        layers = self.family.layers(self.hf, captured["base"], out, self.training, captured)
        logits = self._mapped(self._sigmoid_logits(layers.logits))
        boxes = layers.boxes
        result = DetectorOutput(pred_logits=logits[-1], pred_boxes=boxes[-1])
        result["aux_outputs"] = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(logits) - 1)]
        result["family_logits"] = layers.logits[-1]
        result["reference_points"] = (layers.reference_points if layers.reference_points is not None
                                      else boxes[-1, ..., :2].detach())
        result["query_embed"] = self.learned_queries()
        result["feature_size"] = self._feature_size(captured.get("features"), pixel_values)
        result["dn_queries"] = layers.dn_queries
        if request.attention:
            self._attention(out, result)
        if labels is not None:
            result["family_losses"] = dict(out.loss_dict)
            result["family_loss"] = out.loss
        return result

    def family_loss_weights(self, names: Sequence[str]) -> dict[str, float]:
        """The weight of each term of the family's ``loss_dict`` in its ``loss`` (0: logged only)."""
        if self.family.summed_loss:
            return {k: 1.0 for k in names}
        weights = self.family.loss_weights(self.hf.config)
        return {k: float(weights.get(k, 0.0)) for k in names}

    def _sigmoid_logits(self, logits: Tensor) -> Tensor:
        if not self.family.softmax:
            return logits
        # DETR: C classes + no-object under one softmax -> each class's probability as a sigmoid logit
        p = logits.float().softmax(-1)[..., :-1]
        return torch.logit(p, eps=1e-6).to(logits.dtype)

    def _mapped(self, logits: Tensor) -> Tensor:
        """The family's classes -> the data's (``config.class_map``); classes it lacks get a logit of -30
        (probability 1e-13: "not this class")."""
        if self.config.class_map is None:
            return logits
        index = torch.tensor(self.config.class_map, device=logits.device)
        out = logits.index_select(-1, index.clamp(min=0))
        return out.masked_fill(index < 0, -30.0)

    def learned_queries(self) -> Tensor:
        """``[Q,d]`` the family's learned object queries (see :meth:`_query_embed` for dynamic families)."""
        return self._query_embed()

    def _query_embed(self) -> Tensor:
        emb = getattr(self.hf.model, "query_position_embeddings", None)
        if isinstance(emb, nn.Embedding) and emb.weight.shape[0] == self.config.num_queries:
            return emb.weight.detach()
        # dynamic queries (top-k encoder tokens per image): nothing fixed to hand over; Fixed Matching is
        # refused for these families (config.fixed_queries is False), so these zeros are never used as queries
        return torch.zeros(self.config.num_queries, self.config.d_model, device=self._mean.device)

    def _backbone(self) -> Optional[nn.Module]:
        bb = getattr(self.hf.model, "backbone", None)
        return bb if isinstance(bb, nn.Module) else None

    def _feature_size(self, features: Any, pixel_values: Tensor) -> tuple[int, int]:
        """``(h, w)`` of the last backbone map (the C5 tokens a dense family's decoder cross-attends to)."""
        maps = [t for t in _tensors(features) if t.dim() == 4]
        if maps:
            last = min(maps, key=lambda t: t.shape[-1] * t.shape[-2])
            return int(last.shape[-2]), int(last.shape[-1])
        h, w = pixel_values.shape[-2:]
        return math.ceil(h / 32), math.ceil(w / 32)

    def _attention(self, out: Any, result: DetectorOutput) -> None:
        if float(getattr(self.hf.config, "attention_dropout", 0.0) or 0.0) > 0 and self.training:
            raise ValueError(f"{self.config.name}: attention_dropout = {self.hf.config.attention_dropout} drops "
                             "attention weights before transformers returns them; set attention_dropout = 0 "
                             "(--student-opt attention_dropout=0) to distil attention maps")
        sa, ca = out.decoder_attentions, out.cross_attentions
        if not sa or not ca:
            raise ValueError(f"{self.config.name}: transformers returned no decoder attention maps "
                             "(the eager attention implementation is needed)")
        result["self_attn"] = torch.stack(list(sa))  # [L,B,H,Q,Q]
        result["cross_attn"] = torch.stack(list(ca))  # [L,B,H,Q,S]

    # ------------------------------------------------------------------ the rest of the contract
    def heads(self, hs: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{self.config.name}: methods with their own query groups need kd-detr's "
                                  "Conditional DETR student (the transformers families run their own decoder)")

    def output_norm(self, x: Tensor) -> Tensor:
        raise ValueError(f"{self.config.name}: no shared decoder output norm is exposed")

    def decode(self, encoded: dict[str, Any], groups: Sequence[dict[str, Tensor]],
               request: Optional[DetectorRequest] = None) -> list[DetectorOutput]:
        raise ValueError(f"{self.config.name}: decode() of extra query groups needs kd-detr's "
                                  "Conditional DETR student")


def _resize_regions(x: Tensor, mask: Optional[Tensor], size: int) -> Tensor:
    """Each image's own region (``mask`` False) of ``x [B,3,H,W]`` resized bilinearly to ``[B,3,S,S]``:
    ``F.interpolate(crop, (S, S), mode="bilinear", align_corners=False)`` per image, written as one
    ``grid_sample`` with the crop sizes as tensors, so that it batches and traces (ONNX) at any size."""
    B, _, H, W = x.shape
    if mask is None:
        h = torch.full((B,), H, dtype=x.dtype, device=x.device)
        w = torch.full((B,), W, dtype=x.dtype, device=x.device)
    else:
        valid = ~mask
        h = valid.any(2).sum(1).clamp(min=1).to(x.dtype)
        w = valid.any(1).sum(1).clamp(min=1).to(x.dtype)
    d = torch.arange(size, device=x.device, dtype=x.dtype) + 0.5

    def source(n: Tensor, full: int) -> Tensor:  # [B,S] pixel coordinates, as interpolate computes them
        src = (d[None] * (n[:, None] / size) - 0.5).clamp(min=0)
        src = torch.minimum(src, n[:, None] - 1)
        return src / max(full - 1, 1) * 2 - 1

    gy, gx = source(h, H), source(w, W)
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _tensors(obj: Any) -> list[Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):
        return _tensors(obj.to_tuple())
    return []
