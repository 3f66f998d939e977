"""A frozen teacher model run on a padded batch: ``(images, mask) -> TeacherOutputs``. Used by the in-process
source and inside the Ray teacher actors, so both give the same numbers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .outputs import ATTN_MODES, TeacherOutputs

__all__ = ["InProcessTeacher"]


class InProcessTeacher:
    """Runs a frozen teacher model on a padded batch: ``(images, mask) -> TeacherOutputs``.

    Args:
        model: the teacher detector; put in eval mode, parameters frozen.
        attn: ``per_head`` | ``mean`` | ``none``: how attention maps are returned (``mean`` saves
            memory when the recipe compares head-averaged maps).
    """

    def __init__(self, model: nn.Module, attn: str = "per_head"):
        if attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {attn!r}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.attn = attn

    @property
    def config(self):
        return self.model.config

    def to(self, device: Any) -> "InProcessTeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor, mask: Tensor) -> TeacherOutputs:
        """``images [B,3,H,W]``, ``mask [B,H,W]`` (True = pad) -> :class:`TeacherOutputs`."""
        from kd_detr.models import DetectorRequest

        self.model.eval()  # the trainer's model.train() never reaches the teacher, but be sure
        out = self.model(images, mask, request=DetectorRequest(attention=self.attn != "none"))
        return TeacherOutputs.from_model_output(out, self.attn)
