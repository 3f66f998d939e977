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

__all__ = ["ATTN_MODES", "TeacherOutputs", "WIRE_KEYS", "stack_layers", "embed_grid"]

# How a teacher returns its attention maps: per head, averaged over heads (H = 1), or not at all.
ATTN_MODES = ("per_head", "mean", "none")

# The wire format's keys (``query_embed`` is constant per teacher: it is sent or stored once, not per batch).
WIRE_KEYS = ("logits", "boxes", "reference_points", "feature_size", "self_attn", "cross_attn", "gt_assignment",
             "image_grids")


def stack_layers(outputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per-layer predictions of a model output: ``(logits [L,B,N,C], boxes [L,B,N,4])``, layer 0 first."""
    layers = [*(outputs.get("aux_outputs") or []), outputs]
    return (torch.stack([o["pred_logits"] for o in layers]),
            torch.stack([o["pred_boxes"] for o in layers]))


def embed_grid(maps: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``maps [..., h*w]`` over a C5 grid ``(h, w)`` -> ``[..., H*W]`` over the larger grid ``size = (H, W)``:
    the ``(h, w)`` grid in the top-left corner (where a padded batch puts the image), zeros elsewhere."""
    h, w = (int(x) for x in grid)
    big_h, big_w = (int(x) for x in size)
    if h > big_h or w > big_w:
        raise ValueError(f"a C5 grid of {h}x{w} does not fit in {big_h}x{big_w}")
    if (h, w) == (big_h, big_w):
        return maps
    out = maps.new_zeros(*maps.shape[:-1], big_h, big_w)
    out[..., :h, :w] = maps.reshape(*maps.shape[:-1], h, w)
    return out.flatten(-2)


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
            if not torch.is_tensor(t):
                return t
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return dataclasses.replace(self, **{f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name != "feature_size"})

    def float(self) -> "TeacherOutputs":
        return self.to(dtype=torch.float32)

    def to_wire(self) -> dict[str, Tensor]:
        """The flat dict of tensors this batch travels as (Ray) and is encoded from (cache).

        ``logits``, ``boxes``, ``reference_points`` as they are; ``feature_size`` int32 ``[2]``;
        ``self_attn``, ``cross_attn``, ``gt_assignment`` and ``image_grids`` only when present. ``query_embed`` is left out.
        """
        out = {"logits": self.logits, "boxes": self.boxes, "reference_points": self.reference_points,
               "feature_size": torch.tensor([int(x) for x in self.feature_size], dtype=torch.int32)}
        for key in ("self_attn", "cross_attn", "gt_assignment", "image_grids"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_wire(cls, wire: dict[str, Any], query_embed: Tensor) -> "TeacherOutputs":
        """Inverse of :meth:`to_wire` (``query_embed [Nt,d]`` comes from the source's one copy)."""
        unknown = set(wire) - set(WIRE_KEYS)
        if unknown:
            raise ValueError(f"teacher outputs: unknown wire keys {sorted(unknown)} (expected {list(WIRE_KEYS)})")
        h, w = (int(x) for x in torch.as_tensor(wire["feature_size"]).tolist())
        return cls(logits=wire["logits"], boxes=wire["boxes"], self_attn=wire.get("self_attn"),
                   cross_attn=wire.get("cross_attn"), query_embed=query_embed,
                   reference_points=wire["reference_points"], feature_size=(h, w),
                   gt_assignment=wire.get("gt_assignment"), image_grids=wire.get("image_grids"))

    @classmethod
    def from_model_output(cls, out: dict[str, Any], attn: str = "per_head") -> "TeacherOutputs":
        """Build from a :class:`ConditionalDETR` output (``return_attn=True`` unless ``attn == "none"``)."""
        if attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {attn!r}")
        logits, boxes = stack_layers(out)
        sa = ca = None
        if attn != "none":
            sa, ca = out["self_attn"], out["cross_attn"]
            if attn == "mean":
                sa, ca = sa.mean(2, keepdim=True), ca.mean(2, keepdim=True)
        return cls(logits=logits, boxes=boxes, self_attn=sa, cross_attn=ca,
                   query_embed=out["query_embed"].detach(), reference_points=out["reference_points"],
                   feature_size=tuple(out["feature_size"]))

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
        return cls(logits=cat("logits"), boxes=cat("boxes"), self_attn=cat("self_attn"), cross_attn=cross,
                   query_embed=views[0].query_embed, reference_points=cat("reference_points", 0),
                   feature_size=size, gt_assignment=cat("gt_assignment", 0),
                   image_grids=torch.tensor(grids, dtype=torch.int64))

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
