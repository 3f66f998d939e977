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

__all__ = ["ATTN_MODES", "TeacherOutputs", "WIRE_KEYS", "stack_layers"]

# How a teacher returns its attention maps: per head, averaged over heads (H = 1), or not at all.
ATTN_MODES = ("per_head", "mean", "none")

# The wire format's keys (``query_embed`` is constant per teacher: it is sent or stored once, not per batch).
WIRE_KEYS = ("logits", "boxes", "reference_points", "feature_size", "self_attn", "cross_attn", "gt_assignment")


def stack_layers(outputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Per-layer predictions of a model output: ``(logits [L,B,N,C], boxes [L,B,N,4])``, layer 0 first."""
    layers = [*(outputs.get("aux_outputs") or []), outputs]
    return (torch.stack([o["pred_logits"] for o in layers]),
            torch.stack([o["pred_boxes"] for o in layers]))


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
    """

    logits: Tensor
    boxes: Tensor
    self_attn: Optional[Tensor]
    cross_attn: Optional[Tensor]
    query_embed: Tensor
    reference_points: Tensor
    feature_size: tuple[int, int]
    gt_assignment: Optional[Tensor] = None

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
        ``self_attn``, ``cross_attn`` and ``gt_assignment`` only when present. ``query_embed`` is left out.
        """
        out = {"logits": self.logits, "boxes": self.boxes, "reference_points": self.reference_points,
               "feature_size": torch.tensor([int(x) for x in self.feature_size], dtype=torch.int32)}
        for key in ("self_attn", "cross_attn", "gt_assignment"):
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
                   gt_assignment=wire.get("gt_assignment"))

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
