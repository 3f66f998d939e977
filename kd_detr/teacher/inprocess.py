"""A frozen teacher model run on the images of a padded batch: ``(images, mask) -> TeacherOutputs``. Used by the
in-process source, inside the Ray teacher actors and by the cache builder, so all three give the same numbers.

The teacher sees every image alone (its region of the padded batch, unpadded): a DETR's outputs for an image
depend on the padding of its batch (convolutions see the padded region, the transformer attends over the
padded grid's size), and a teacher output that does not is one a cache can store per (image, view) and serve
to any batch size. The image's cross-attention maps are then over its own C5 grid
(:meth:`~kd_detr.teacher.outputs.TeacherOutputs.stack_views`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .outputs import ATTN_MODES, TeacherOutputs

__all__ = ["InProcessTeacher", "image_regions"]


class InProcessTeacher:
    """Runs a frozen teacher model on each image of a padded batch alone: ``(images, mask) -> TeacherOutputs``.

    The teacher runs in float32 whatever ``torch.autocast`` its caller is under: the trainer's ``--amp`` step
    autocasts the student's forward, and a teacher run inside it in float16 would differ from the same teacher
    in a Ray actor or a cache build (which run outside it), so the three sources would not give the same numbers.

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
        """``images [B,3,H,W]``, ``mask [B,H,W]`` (True = pad) -> :class:`TeacherOutputs` of every image run
        alone (``image_grids`` set), stacked in batch order."""
        return TeacherOutputs.stack_views([self.view(image) for image in image_regions(images, mask)])

    @torch.no_grad()
    def view(self, image: Tensor) -> TeacherOutputs:
        """``image [3,H,W]`` (one view, unpadded) -> :class:`TeacherOutputs` with ``B = 1``."""
        from kd_detr.models import DetectorRequest

        self.model.eval()  # the trainer's model.train() never reaches the teacher, but be sure
        h, w = image.shape[-2:]
        mask = torch.zeros((1, h, w), dtype=torch.bool, device=image.device)
        with torch.autocast(image.device.type, enabled=False):  # float32: see the class docstring
            out = self.model(image[None].float(), mask, request=DetectorRequest(attention=self.attn != "none"))
        return TeacherOutputs.from_model_output(out, self.attn)


def image_regions(images: Tensor, mask: Tensor) -> list[Tensor]:
    """The images of a padded batch without their padding: ``[3,h_b,w_b]`` each (``collate_fn`` puts an image in
    the top-left corner; ``mask`` is True at padding)."""
    out = []
    for b in range(images.shape[0]):
        valid = ~mask[b]
        h = int(valid.any(1).sum())
        w = int(valid.any(0).sum())
        if h == 0 or w == 0:
            raise ValueError(f"image {b} of the batch is all padding (its mask has no valid pixel)")
        out.append(images[b, :, :h, :w])
    return out
