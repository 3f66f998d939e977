"""What a teacher provides per batch: :class:`TeacherOutputs`, and its one wire format.

Every teacher source (in-process, cache, Ray actors) produces the same ``TeacherOutputs``, so the
methods do not care where the teacher ran. :meth:`TeacherOutputs.to_wire` / :meth:`from_wire` is the
flat dict of tensors that crosses process boundaries (Ray) and that the cache codec stores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["ATTN_MODES", "TeacherOutputs", "WIRE_KEYS", "stack_layers", "embed_grid", "embed_map", "own_grids"]

# How a teacher returns its attention maps: per head, averaged over heads (H = 1), or not at all.
ATTN_MODES = ("per_head", "mean", "none")

# The wire format's keys (``query_embed`` is constant per teacher: it is sent or stored once, not per batch).
WIRE_KEYS = ("logits", "boxes", "reference_points", "feature_size", "self_attn", "cross_attn", "gt_assignment",
             "image_grids", "feature_strides", "feature_grids")
# the encoder output maps travel as ``features.0``, ``features.1``, ... (one key per level)
FEATURE_PREFIX = "features."


def stack_layers(outputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per-layer predictions of a model output: ``(logits [L,B,N,C], boxes [L,B,N,4])``, layer 0 first."""
    layers = [*(outputs.get("aux_outputs") or []), outputs]
    return (torch.stack([o["pred_logits"] for o in layers]),
            torch.stack([o["pred_boxes"] for o in layers]))


def embed_grid(maps: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``maps [..., h*w]`` over a C5 grid ``(h, w)`` -> ``[..., H*W]`` over the larger grid ``size = (H, W)``:
    the ``(h, w)`` grid in the top-left corner (where a padded batch puts the image), zeros elsewhere."""
    h, w = (int(x) for x in grid)
    if (h, w) == tuple(int(x) for x in size):
        return maps
    return embed_map(maps.reshape(*maps.shape[:-1], h, w), size).flatten(-2)


def embed_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``maps [B,C,h,w]`` -> ``[B,C,H,W]`` over the larger grid ``size = (H, W)``: in the top-left corner, zeros
    elsewhere (:func:`embed_grid` is it for maps flattened over their grid)."""
    h, w = maps.shape[-2:]
    big_h, big_w = (int(x) for x in size)
    if h > big_h or w > big_w:
        raise ValueError(f"a {h}x{w} feature map does not fit in {big_h}x{big_w}")
    if (h, w) == (big_h, big_w):
        return maps
    out = maps.new_zeros(*maps.shape[:-2], big_h, big_w)
    out[..., :h, :w] = maps
    return out


def own_grids(masks: list[Tensor]) -> Tensor:
    """``[B,n,2]`` int64: each image's own ``(rows, cols)`` on each of ``n`` maps, from their ``masks [B,h,w]``
    (True = padding; an image's region is the top-left block of its map)."""
    grids = [torch.stack([(~m).any(2).sum(1), (~m).any(1).sum(1)], -1) for m in masks]  # each [B,2]
    return torch.stack(grids, 1).to(torch.int64)


@dataclass
class TeacherOutputs:
    """Decoder outputs of a teacher for one padded batch.

    Attributes:
        logits: ``[L,B,Nt,C]`` class logits of every decoder layer (layer 0 first).
        boxes: ``[L,B,Nt,4]`` normalised cxcywh boxes.
        self_attn: ``[L,B,H,Nt,Nt]`` decoder self-attention probabilities, or ``None``
            (``H = 1`` when stored averaged over heads).
        cross_attn: ``[L,B,H,Nt,S]`` decoder cross-attention probabilities over the C5 tokens, or ``None``.
        query_embed: ``[Nt,d_t]`` the teacher's (frozen) object queries.
        reference_points: ``[B,Nt,2]`` the teacher's reference points (sigmoid space).
        feature_size: ``(h, w)`` of the teacher's C5 map (``S = h * w``).
        gt_assignment: ``[B,Nt]`` int64 or ``None``: the ground-truth index each teacher query got in the
            teacher's last-layer Hungarian matching (-1: background). A cache stores it; when ``None`` it
            is recomputed from ``logits[-1]``/``boxes[-1]``.
        image_grids: ``[B,2]`` int64 or ``None``: each image's own C5 grid ``(h_b, w_b)`` when the teacher saw
            every image alone (per view); ``cross_attn`` then holds image ``b``'s map in the top-left
            ``h_b x w_b`` of the ``feature_size`` grid and zeros elsewhere (:meth:`stack_views`). ``None``: the
            teacher saw the padded batch, every map is over the whole ``feature_size`` grid.
        features: the encoder's output maps, a list of ``[B,C,h_l,w_l]`` (highest resolution first), or ``None``
            (asked only by feature distillation). Image ``b``'s own map (the teacher saw it alone) lies in the
            top-left ``feature_grids[b, l]`` block of level ``l``, zeros elsewhere.
        feature_strides: ``(s_0, ..., s_{n-1})`` each level's stride in input pixels (with ``features``).
        feature_grids: ``[B,n,2]`` int64: image ``b``'s own ``(rows, cols)`` on level ``l`` (``None``: every map
            is whole).
    """

    logits: Tensor
    boxes: Tensor
    self_attn: Optional[Tensor]
    cross_attn: Optional[Tensor]
    query_embed: Tensor
    reference_points: Tensor
    feature_size: tuple[int, int]
    gt_assignment: Optional[Tensor] = None
    image_grids: Optional[Tensor] = None
    features: Optional[list[Tensor]] = None
    feature_strides: Optional[tuple[int, ...]] = None
    feature_grids: Optional[Tensor] = None

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    @property
    def num_queries(self) -> int:
        return self.logits.shape[2]

    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "TeacherOutputs":
        """Move every tensor; ``dtype`` applies to floating tensors only."""
        def conv(t):
            if t is None:
                return None
            if isinstance(t, list):
                return [conv(x) for x in t]
            if not torch.is_tensor(t):
                return t
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return dataclasses.replace(self, **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name not in ("feature_size", "feature_strides")})

    def float(self) -> "TeacherOutputs":
        return self.to(dtype=torch.float32)

    def to_wire(self) -> dict[str, Tensor]:
        """The flat dict of tensors this batch travels as (Ray) and is encoded from (cache).

        ``logits``, ``boxes``, ``reference_points`` as they are; ``feature_size`` int32 ``[2]``;
        ``self_attn``, ``cross_attn``, ``gt_assignment`` and ``image_grids`` only when present. ``query_embed`` is left out.
        With ``features``: ``features.<l>`` per level, ``feature_strides`` int32 ``[n]`` and ``feature_grids``.
        """
        out = {"logits": self.logits, "boxes": self.boxes, "reference_points": self.reference_points,
               "feature_size": torch.tensor([int(x) for x in self.feature_size], dtype=torch.int32)}
        for key in ("self_attn", "cross_attn", "gt_assignment", "image_grids"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.features is not None:
            out.update({f"{FEATURE_PREFIX}{i}": m for i, m in enumerate(self.features)})
            out["feature_strides"] = torch.tensor([int(x) for x in self.feature_strides], dtype=torch.int32)
            if self.feature_grids is not None:
                out["feature_grids"] = self.feature_grids
        return out

    @classmethod
    def from_wire(cls, wire: dict[str, Any], query_embed: Tensor) -> "TeacherOutputs":
        """Inverse of :meth:`to_wire` (``query_embed [Nt,d]`` comes from the source's one copy)."""
        levels = sorted((k for k in wire if k.startswith(FEATURE_PREFIX)), key=lambda k: int(k[len(FEATURE_PREFIX):]))
        unknown = set(wire) - set(WIRE_KEYS) - set(levels)
        if unknown:
            raise ValueError(f"teacher outputs: unknown wire keys {sorted(unknown)} (expected {list(WIRE_KEYS)} and "
                             f"{FEATURE_PREFIX}<level>)")
        if [int(k[len(FEATURE_PREFIX):]) for k in levels] != list(range(len(levels))):
            raise ValueError(f"teacher outputs: feature levels {levels} are not 0..{len(levels) - 1}")
        h, w = (int(x) for x in torch.as_tensor(wire["feature_size"]).tolist())
        strides = None
        if levels:
            if "feature_strides" not in wire:
                raise ValueError("teacher outputs: feature maps without feature_strides")
            strides = tuple(int(x) for x in torch.as_tensor(wire["feature_strides"]).tolist())
            if len(strides) != len(levels):
                raise ValueError(f"teacher outputs: {len(levels)} feature maps, {len(strides)} strides")
        return cls(logits=wire["logits"], boxes=wire["boxes"], self_attn=wire.get("self_attn"),
                   cross_attn=wire.get("cross_attn"), query_embed=query_embed,
                   reference_points=wire["reference_points"], feature_size=(h, w),
                   gt_assignment=wire.get("gt_assignment"), image_grids=wire.get("image_grids"),
                   features=[wire[k] for k in levels] if levels else None, feature_strides=strides,
                   feature_grids=wire.get("feature_grids") if levels else None)

    @classmethod
    def from_model_output(cls, out: dict[str, Any], attn: str = "per_head", features: bool = False) -> "TeacherOutputs":
        """Build from a detector's output (``attention`` asked unless ``attn == "none"``; ``features``: with its
        encoder output maps, asked with ``DetectorRequest(features=True)``). A single image's maps (``B = 1``)
        are cut to the image's own region (a family that pads to whole windows pads a lone image too)."""
        if attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {attn!r}")
        logits, boxes = stack_layers(out)
        sa = ca = None
        if attn != "none":
            sa, ca = out["self_attn"], out["cross_attn"]
            if attn == "mean":
                sa, ca = sa.mean(2, keepdim=True), ca.mean(2, keepdim=True)
        maps = strides = grids = None
        if features:
            if out.get("features") is None:
                raise ValueError("the teacher's output has no encoder feature maps (DetectorRequest(features=True))")
            maps = [m.detach() for m in out["features"]]
            strides = tuple(int(x) for x in out["feature_strides"])
            grids = own_grids(out["feature_masks"])
            if logits.shape[1] == 1:
                maps = [m[..., :int(g[0]), :int(g[1])] for m, g in zip(maps, grids[0])]
        return cls(logits=logits, boxes=boxes, self_attn=sa, cross_attn=ca,
                   query_embed=out["query_embed"].detach(), reference_points=out["reference_points"],
                   feature_size=tuple(out["feature_size"]), features=maps, feature_strides=strides,
                   feature_grids=grids)

    @classmethod
    def stack_views(cls, views: "list[TeacherOutputs]") -> "TeacherOutputs":
        """The outputs of a batch from the outputs of its images, each computed on the image alone (``B = 1``
        each, in batch order).

        Cross-attention maps are over each image's own C5 grid; they are placed in the top-left corner of the
        batch's grid (the largest ``h`` and ``w``: what the student's padded batch has, as its C5 grid is
        ``ceil(H_max / stride)``), and ``image_grids`` records each image's grid so that a method compares only
        the student's rows over it (:meth:`cross_attn_valid`).
        """
        if not views:
            raise ValueError("stack_views needs at least one view")
        for v in views:
            if v.logits.shape[1] != 1:
                raise ValueError(f"stack_views takes single-image outputs, got batch {v.logits.shape[1]}")
        grids = [tuple(int(x) for x in v.feature_size) for v in views]
        size = (max(g[0] for g in grids), max(g[1] for g in grids))

        def cat(name: str, dim: int = 1) -> Optional[Tensor]:
            parts = [getattr(v, name) for v in views]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"stack_views: some views have {name}, others not")
            return torch.cat(parts, dim)

        cross = None
        if views[0].cross_attn is not None:
            cross = torch.cat([embed_grid(v.cross_attn, g, size) for v, g in zip(views, grids)], 1)
        maps = strides = fgrids = None
        if any(v.features is not None for v in views):
            if any(v.features is None for v in views):
                raise ValueError("stack_views: some views have features, others not")
            strides = views[0].feature_strides
            if any(tuple(v.feature_strides) != tuple(strides) or len(v.features) != len(strides) for v in views):
                raise ValueError("stack_views: the views' feature maps have different levels")
            per_view = [v.feature_grids if v.feature_grids is not None else
                        torch.tensor([[list(m.shape[-2:]) for m in v.features]], dtype=torch.int64) for v in views]
            fgrids = torch.cat([g.to(torch.int64).cpu() for g in per_view], 0)  # [B,n,2]
            maps = []
            for level in range(len(strides)):
                big = (max(int(v.features[level].shape[-2]) for v in views),
                       max(int(v.features[level].shape[-1]) for v in views))
                maps.append(torch.cat([embed_map(v.features[level], big) for v in views], 0))
        return cls(logits=cat("logits"), boxes=cat("boxes"), self_attn=cat("self_attn"), cross_attn=cross,
                   query_embed=views[0].query_embed, reference_points=cat("reference_points", 0),
                   feature_size=size, gt_assignment=cat("gt_assignment", 0),
                   image_grids=torch.tensor(grids, dtype=torch.int64), features=maps, feature_strides=strides,
                   feature_grids=fgrids)

    def cross_attn_valid(self, feature_size: tuple[int, int]) -> Optional[Tensor]:
        """``[B, h*w]`` bool over a student's C5 grid ``feature_size = (h, w)``: True inside each image's own grid
        (``image_grids``); ``None`` when the teacher saw the padded batch (every position counts)."""
        if self.image_grids is None:
            return None
        h, w = (int(x) for x in feature_size)
        rows = torch.arange(h, device=self.image_grids.device)
        cols = torch.arange(w, device=self.image_grids.device)
        g = self.image_grids
        valid = (rows[None, :, None] < g[:, 0, None, None]) & (cols[None, None, :] < g[:, 1, None, None])
        return valid.flatten(1)

    def cross_attn_on(self, feature_size: tuple[int, int]) -> Optional[Tensor]:
        """``cross_attn`` over the grid ``feature_size`` (a student's padded C5 grid, at least this batch's):
        per-view maps are re-embedded (zeros outside each image's grid); padded-batch maps must already be on it."""
        if self.cross_attn is None:
            return None
        size = tuple(int(x) for x in feature_size)
        if size == tuple(self.feature_size):
            return self.cross_attn
        if self.image_grids is None:
            raise ValueError(f"teacher C5 map {tuple(self.feature_size)} and student C5 map {size} differ: "
                             "cross-attention maps cannot be compared")
        return embed_grid(self.cross_attn, self.feature_size, size)  # each image's grid is already top-left
